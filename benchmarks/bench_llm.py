"""One EGP round on a LLaMA-style language model of about 1B parameters, on the CPU (issue 21, item 4).

    .venv/bin/python benchmarks/bench_llm.py --out benchmarks/results/llm_1b

The model is ``transformers.LlamaForCausalLM`` with random weights, built directly in the
target dtype from a ``LlamaConfig`` (default: hidden 2048, 22 layers, 32 heads with 4 key/value
heads, MLP 5632, vocabulary 32000: 1.10 B parameters, the shape of TinyLlama-1.1B). The data are
token batches made here (``--batches`` x ``--batch`` sequences of ``--seq`` random token ids,
seeded). One round through the public API::

    p = egp_fast.Pruner(model, batches[0], step=0.5, method="egp", progress=False)   # "trace"
    stats = p.measure(batches, stop="decided", max_flip=0.01, confidence=0.95)       # "measure"
    plan = p.plan(stats)                                                             # "select"
    p.apply(plan, stats)                                                             # "masks"

``--measure auto`` is what ``egp-fast prune --measure auto`` passes (``stop="decided"`` with
the run's ``--max-flip`` and ``--confidence``): the pass stops once every site's entropy and
the round's plan are known (docs/confidence.md); ``--measure full`` measures every batch.

What EGP does on this model: each decoder layer's MLP is ``down_proj(silu(gate_proj(x)) *
up_proj(x))``. The sites are the 22 SiLU calls (``model.layers.i.mlp.act_fn``), each neuron's
state is ON when the pre-activation is > 0, and the producer EGP prunes is ``gate_proj`` (the
only layer whose output is rectified; ``up_proj``, ``down_proj``, attention, embeddings and the
LM head are not pruned). A round prunes ``step`` of ``gate_proj``'s remaining weights, shared
among layers by entropy (docs/algorithm.md, docs/huggingface.md "Gated MLPs").

The round runs in a fresh subprocess (``--child``), so nothing carries over from the parent.
Memory is the process's resident set: after the model and the batches are built and garbage is
collected, the kernel's peak counter is reset (``echo 5 > /proc/self/clear_refs``, which resets
VmHWM and ``getrusage``'s ``ru_maxrss``); at the end of each phase the peak (``ru_maxrss``) is
read and the counter reset again, so every phase's own peak above the model is known. Where
``clear_refs`` cannot be written, plain ``ru_maxrss`` differences are reported
(``"peak_reset": false``; a higher peak while building can then hide part of the round's).

Writes ``OUT.json`` and ``OUT.md`` (machine, threads, load average, date). Timings on a shared
machine are noisy: the load average before and after is recorded with them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

GIB = 1024**3
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (default 22)")
    ap.add_argument("--heads", type=int, default=32, help="attention heads (default 32)")
    ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    ap.add_argument("--intermediate", type=int, default=5632, help="MLP width (default 5632)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype (default bf16)")
    ap.add_argument("--batches", type=int, default=8, help="token batches available to the measurement (default 8)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--measure", choices=("auto", "full"), default="auto",
                    help="auto: stop='decided' (what egp-fast prune --measure auto does); full: every batch")
    ap.add_argument("--max-flip", type=float, default=0.01, help="--measure auto's max_flip (default 0.01)")
    ap.add_argument("--confidence", type=float, default=0.95, help="--measure auto's confidence (default 0.95)")
    ap.add_argument("--step", type=float, default=0.5, help="fraction pruned in the round (default 0.5)")
    ap.add_argument("--forwards", type=int, default=2,
                    help="plain forwards timed before the round, the measurement's yardstick (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: print only)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite OUT.md (or print) from this "
                    "results file; runs nothing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def llama_config(args: argparse.Namespace):
    """The ``LlamaConfig`` of the options (no cache, eager attention, untied LM head)."""
    import transformers

    return transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq), use_cache=False, tie_word_embeddings=False,
        attn_implementation="eager")


def build_model(args: argparse.Namespace):
    """``LlamaForCausalLM`` with random weights, built directly in ``args.dtype`` (no fp32 copy)."""
    import torch
    import transformers

    torch.manual_seed(args.seed)
    dtype = getattr(torch, DTYPES[args.dtype])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = transformers.LlamaForCausalLM(llama_config(args))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def make_batches(args: argparse.Namespace) -> list[dict]:
    """``args.batches`` dicts ``{"input_ids": [batch, seq]}`` of seeded random token ids."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    return [{"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)}
            for _ in range(args.batches)]


def _maxrss_bytes() -> int:
    # VmHWM, the peak that clear_refs resets; ru_maxrss is also the larger of it and a mark taken
    # whenever a thread exits, which the reset leaves alone (it can hold the baseline too high).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Phases:
    """Wall time and own peak RSS (above the baseline) of consecutive phases."""

    def __init__(self) -> None:
        gc.collect()
        self.reset_ok = _reset_peak()
        self.base = _rss_bytes() if self.reset_ok else _maxrss_bytes()
        self.rows: dict[str, dict] = {}

    def run(self, name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        dt = time.perf_counter() - t0
        peak = _maxrss_bytes()
        self.rows[name] = {"seconds": dt, "peak_extra_bytes": max(0, peak - self.base),
                           "resident_after_bytes": _rss_bytes() - self.base}
        if self.reset_ok:
            _reset_peak()
        return out


def run_round(args: argparse.Namespace, model=None, batches=None) -> dict:
    """Build the model and batches (unless given), run one round, return the measurements.

    Args:
        args: :func:`parse_args` options.
        model, batches: a prebuilt model and token batches (tests pass tiny ones).

    Returns:
        A JSON-safe dict: model size, phases (seconds, peak extra bytes, resident after), the
        measurement's batches and early stop, the sites, the plan's total and the sparsity.
    """
    import torch

    import egp_fast

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if model is None:
        model = build_model(args)
    build_s = time.perf_counter() - t0
    if batches is None:
        batches = make_batches(args)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = _rss_bytes()
    maxrss_build = _maxrss_bytes()
    ph = _Phases()
    kw = {}
    if args.measure == "auto":
        kw = {"stop": "decided", "max_flip": args.max_flip, "confidence": args.confidence}
    with torch.no_grad():
        for i in range(args.forwards):  # plain forwards: the yardstick for the measurement
            ph.run(f"forward{i}", model, **batches[i % len(batches)])
        pruner = ph.run("trace", egp_fast.Pruner, model, batches[0], step=args.step, method="egp", progress=False)
        stats = ph.run("measure", pruner.measure, batches, progress=False, **kw)
        plan = ph.run("select", pruner.plan, stats)
        ph.run("masks", pruner.apply, plan, stats)
    prunable = pruner.prunable
    weights = sum(dict(model.named_modules())[n].weight.numel() for n in prunable)
    round_phases = ("measure", "select", "masks")
    peak_round = max(ph.rows[p]["peak_extra_bytes"] for p in round_phases)
    if not ph.reset_ok:  # differences of one monotone counter: the last is the round's
        peak_round = ph.rows["masks"]["peak_extra_bytes"]
    ent = [s.entropy for s in stats.sites.values()]
    fwd = [ph.rows[f"forward{i}"]["seconds"] for i in range(args.forwards)]
    fwd_s = min(fwd) if fwd else None
    n_meas = getattr(stats, "batches", None)
    return {
        "params": params, "param_bytes": param_bytes, "prunable_layers": len(prunable),
        "prunable_weights": weights, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "build_seconds": build_s, "rss_model_bytes": rss_model, "maxrss_build_bytes": maxrss_build,
        "peak_reset": ph.reset_ok, "phases": ph.rows,
        "round_seconds": sum(ph.rows[p]["seconds"] for p in round_phases),
        "round_peak_extra_bytes": peak_round,
        "round_peak_above_masks_bytes": max(0, peak_round - ph.rows["trace"]["resident_after_bytes"]),
        "round_peak_extra_bytes_per_weight": peak_round / max(weights, 1),
        "round_peak_extra_bytes_per_param": peak_round / max(params, 1),
        "forward_seconds": fwd_s,
        "forward_peak_extra_bytes": max((ph.rows[f"forward{i}"]["peak_extra_bytes"] for i in range(args.forwards)),
                                        default=None),
        "measure_vs_forwards": (ph.rows["measure"]["seconds"] / (n_meas * fwd_s)) if fwd_s and n_meas else None,
        "measure_batches": n_meas, "batches_available": len(batches),
        "tokens_per_batch": int(batches[0]["input_ids"].numel()),
        "measure_stopped_early": getattr(stats, "stopped_early", None),
        "sites": len(stats.sites), "site_example": next(iter(stats.sites), None),
        "entropy_min": min(ent) if ent else None, "entropy_max": max(ent) if ent else None,
        "zero_entropy_sites": len(stats.zero_entropy_sites()),
        "pruned": int(sum(plan.values())), "sparsity": pruner.sparsity(),
    }


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--child"]
    for k, v in vars(args).items():
        if k in ("child", "out", "render") or v is None:
            continue
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def markdown(res: dict) -> str:
    """The results as a markdown section (for benchmarks/results/llm_1b.md)."""
    r, a = res["result"], res["args"]
    ph = r["phases"]
    lines = [
        "# One EGP round on a LLaMA-style model of about 1B parameters (CPU)",
        "",
        f"`{res['command']}` — {res['date']}, {res['machine']}, {r['threads']} threads, "
        f"load average before {res['load_before']}, after {res['load_after']}; torch {res['torch']}, "
        f"transformers {res['transformers']}.",
        "",
        f"Model: `LlamaForCausalLM`, random init, hidden {a['hidden']}, {a['layers']} layers, {a['heads']} heads "
        f"({a['kv_heads']} key/value), MLP {a['intermediate']}, vocabulary {a['vocab']}: "
        f"**{r['params'] / 1e9:.2f} B parameters**, {r['dtype']} ({_gib(r['param_bytes'])}); built in "
        f"{r['build_seconds']:.1f} s. Data: {r['batches_available']} batches of {a['batch']} x {a['seq']} random "
        f"token ids. Measurement `--measure {a['measure']}`"
        + (f" (stop='decided', max_flip {a['max_flip']}, confidence {a['confidence']})" if a["measure"] == "auto"
           else "") + ".",
        "",
        "| phase | seconds | own peak above the model | left resident |",
        "|---|---|---|---|",
    ]
    if r.get("forward_seconds"):
        lines.append(f"| plain forward of one batch (fastest of {a['forwards']}; yardstick) | "
                     f"{r['forward_seconds']:.2f} | {_gib(r['forward_peak_extra_bytes'])} | |")
    for name, label in (("trace", "Pruner(...) (fx trace, masks attached)"), ("measure", "measure"),
                        ("select", "plan (selection)"), ("masks", "apply (masks)")):
        p = ph[name]
        lines.append(f"| {label} | {p['seconds']:.2f} | {_gib(p['peak_extra_bytes'])} | "
                     f"{_gib(p['resident_after_bytes'])} |")
    lines += [
        f"| **round (measure + plan + apply)** | **{r['round_seconds']:.2f}** | "
        f"**{_gib(r['round_peak_extra_bytes'])}** | |",
        "",
        f"- Measurement: {r['measure_batches']} of {r['batches_available']} batches "
        f"({r['tokens_per_batch']} tokens each), stopped early: {r['measure_stopped_early']}; {r['sites']} sites "
        f"(e.g. `{r['site_example']}`), entropy {r['entropy_min']:.3f}-{r['entropy_max']:.3f} bits, "
        f"{r['zero_entropy_sites']} at zero."
        + (f" The measurement took {r['measure_vs_forwards']:.2f}x the plain forwards of its batches."
           if r.get("measure_vs_forwards") else ""),
        f"- Selection: {r['pruned']:,} of {r['prunable_weights']:,} `gate_proj` weights pruned in "
        f"{r['prunable_layers']} layers (sparsity of the prunable weights {100 * r['sparsity']:.1f}%).",
        f"- Peak memory of the round above the model: {_gib(r['round_peak_extra_bytes'])} = "
        f"{r['round_peak_extra_bytes_per_param']:.3f} bytes per parameter, "
        f"{r['round_peak_extra_bytes_per_weight']:.2f} bytes per prunable weight "
        f"(peak counter reset at each phase: {r['peak_reset']}); above the model plus what `Pruner(...)` left "
        f"resident (its masks): {_gib(r['round_peak_above_masks_bytes'])} = "
        f"{r['round_peak_above_masks_bytes'] / max(r['prunable_weights'], 1):.2f} bytes per prunable weight. Resident after building the model and the "
        f"batches: {_gib(r['rss_model_bytes'])}; peak while building {_gib(r['maxrss_build_bytes'])}.",
    ]
    lines += [
        "",
        "What EGP does on this model: each decoder layer's MLP is `down_proj(silu(gate_proj(x)) * up_proj(x))`. "
        "The site is the SiLU call (`model.layers.i.mlp.act_fn`, recognised by what it computes), a neuron is ON "
        "where its pre-activation is > 0, and the producer EGP prunes is `gate_proj`, the only layer whose output "
        "is rectified; `up_proj`, `down_proj`, attention, the embeddings and the LM head keep all their weights. "
        "A round prunes half of `gate_proj`'s remaining weights, shared among the layers by entropy and "
        "magnitude. A gate channel that ends always OFF kills that channel of the whole MLP; one always ON "
        "leaves `gate_proj(x) * up_proj(x)`, a product that does not fold into one layer (docs/huggingface.md, "
        "\"Gated MLPs\"; docs/algorithm.md on SiLU being only approximately linear).",
    ]
    if r.get("measure_stopped_early") is False and a["measure"] == "auto":
        lines += [
            "",
            f"`--measure auto` used all {r['batches_available']} batches: it stops once every site's entropy "
            "*and* the round's plan are known (each layer's amount within 1%, docs/confidence.md). With random "
            "weights all sites sit within thousandths of a bit of each other and the per-layer split of the "
            "plan follows those differences, so the plan needs more tokens than the entropies. On a smaller "
            "model of the same shape (hidden 256, 6 layers, MLP 704; batches of 4 x 128 tokens) the same rule "
            "stopped after 20 batches, and after 6 on the entropies alone (`plan_tol=None`).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the round in a fresh subprocess and write the results."""
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            text = markdown(json.load(f))
        print(text)
        if args.out:
            with open(args.out + ".md", "w") as f:
                f.write(text)
        return 0
    if args.child:
        res = run_round(args)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    import torch
    import transformers

    load_before = _loadavg()
    proc = subprocess.run(_child_argv(args), capture_output=True, text=True, check=False)
    load_after = _loadavg()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        return proc.returncode
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    res = {
        "command": "python benchmarks/bench_llm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "load_before": load_before, "load_after": load_after,
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "result": json.loads(line[len("RESULT "):]),
    }
    text = markdown(res)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
