"""How one pruning round scales with the number of weights (issue 21, item 3).

Curves of one round's time and peak extra memory against the number of weights, 10M -> 1B,
bf16 and fp32, methods EGP (per-layer selection) and IMP (one global selection):

    .venv/bin/python benchmarks/bench_scale.py --sizes 10e6,30e6,100e6,300e6,1e9 \\
        --dtypes bf16,fp32 --methods egp,imp --out benchmarks/results/scale.json --markdown

The model is a stack of ``nn.Linear(d, d, bias=False)`` + ``nn.ReLU()``, built directly in the
target dtype (no fp32 temporaries); ``d`` is the largest power of two <= 4096 that still gives
at least 4 layers, and the depth is the number of layers nearest to the requested weight count
(``--d`` forces a width). A round is::

    p = egp_fast.Pruner(model, x, step=0.5, method=m, progress=False)   # "ctor"
    stats = p.measure([x])                                              # one batch, x: 8 x d
    plan = p.plan(stats)
    p.apply(plan)

Every configuration runs in a fresh subprocess, so no peak carries over. The child builds the
model, collects garbage, then resets the kernel's peak-RSS counter (``echo 5 >
/proc/self/clear_refs``; this also resets ``ru_maxrss``) and reads ``ru_maxrss`` as the
baseline. The peak is reset again at each phase boundary, so each phase's own peak is known; the
round's peak is the highest of them. Reported: ``(peak ru_maxrss - baseline) / weights`` = extra
bytes per weight, per phase and for the round, plus what each phase leaves resident (the masks,
1 byte per weight, stay). Where ``clear_refs`` cannot be written the child falls back to plain
``ru_maxrss`` differences (then a build peak above the post-build RSS can hide part of the
round's peak; the JSON says ``"peak_reset": false``).

``egp_fast.ops.global_smallest`` (k = half of the weights, all-True masks) and, for comparison,
``egp_fast.ops.select_smallest`` (half of each layer) are also timed alone in their own child
per (size, dtype), with their peak extra memory (the input masks excluded).

Below 200M weights each configuration runs in 3 fresh children and the fastest stands for it
(``--repeats``; the machine is shared, noise only adds time); each child first runs a tiny round
to warm lazy imports, the extension and the thread pool.

The growth exponent is the least-squares slope of log(time) against log(weights), per
(dtype, method). Only the public API is used (``import egp_fast``).

The machine this was written on is shared: each round also records its CPU time, its
involuntary context switches and /proc/pressure/cpu, and the table marks (⚠) rounds whose threads
did not get their cores (CPU s / (wall x threads) < 0.75); the exponents are also fitted on the
undisturbed rounds only and on CPU time. ``--quiet-below P`` waits (at most ``--quiet-wait-s``)
before each child until the CPU pressure is under P %. ``--merge A.json B.json ...`` runs
nothing and pools earlier result files (the fastest child per configuration stands).

A configuration whose estimated footprint (model + 2.5 extra bytes/weight) exceeds
``--mem-limit-gib`` (default 18) or the memory available now is skipped with the reason; so is
anything started after ``--budget-s``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
ELEM_BYTES = {"bf16": 2, "fp32": 4, "fp16": 2}
# Extra bytes per weight of one round (used only to skip configs): about 1.3 after issue 21
# (benchmarks/results/scale_after2.md), with room for the selection op's own child (its output
# masks and scratch).
EST_EXTRA = {"bf16": 2.5, "fp32": 2.5, "fp16": 2.5}
GIB = 1024**3


# ---- shapes and machine -----------------------------------------------------------------------


def shape_for(n: float, d: int | None = None, max_d: int = 4096, min_depth: int = 4) -> tuple[int, int]:
    """``(d, depth)`` of the Linear stack nearest to ``n`` weights.

    Example:
        >>> shape_for(1e9), shape_for(10e6), shape_for(30e6), shape_for(100e6)
        ((4096, 60), (1024, 10), (2048, 7), (4096, 6))
    """
    if d is None:
        d = max_d
        while d > 64 and n / (d * d) < min_depth - 0.5:
            d //= 2
    depth = max(1, round(n / (d * d)))
    return d, depth


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in open("/proc/meminfo"):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        nproc = os.cpu_count()
    mem = _meminfo()
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": nproc,
        "cpu": cpu,
        "mem_total_gib": round(mem.get("MemTotal", 0) / GIB, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


# ---- child side -------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _maxrss_kib() -> int:
    # VmHWM, the peak that clear_refs resets; ru_maxrss is also the larger of it and a mark taken
    # whenever a thread exits, which the reset leaves alone (it can hold the baseline too high).
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_peak() -> bool:
    """Reset the peak-RSS counter (VmHWM and ru_maxrss) to the current RSS; False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_pressure() -> float | None:
    """``some avg10`` of /proc/pressure/cpu: % of the last 10 s some task waited for a CPU."""
    try:
        for line in open("/proc/pressure/cpu"):
            if line.startswith("some"):
                return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return None


def _trimmed_resident(m: "_Meter") -> float | None:
    """RSS over the baseline once garbage is collected and glibc gave its free memory back:
    what the round really keeps (``resident_after`` also counts the allocator's free pages)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return None
    return (_status_kib("VmRSS") - m.base_rss) * 1024 / m.weights


class _Meter:
    """Times phases and tracks each phase's peak RSS over the round's baseline."""

    def __init__(self, weights: int):
        self.weights = weights
        gc.collect()
        self.reset_ok = _reset_peak()
        self.base_maxrss = _maxrss_kib()
        self.base_rss = _status_kib("VmRSS")
        self.phases: dict[str, dict] = {}
        self.peak_kib = self.base_maxrss
        self.load_at_start = os.getloadavg()[0]
        self.psi_at_start = _cpu_pressure()

    def phase(self, name: str, fn):
        if self.reset_ok:
            _reset_peak()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        peak = _maxrss_kib()
        rss = _status_kib("VmRSS")
        self.peak_kib = max(self.peak_kib, peak)
        self.phases[name] = {
            "s": dt,
            # CPU time of all this process's threads, and how often the kernel took a CPU away
            # (a shared machine: cpu_s / s well under the thread count means waiting for CPUs)
            "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "preempted": ru1.ru_nivcsw - ru0.ru_nivcsw,
            "peak_extra_B_per_w": (peak - self.base_maxrss) * 1024 / self.weights,
            "resident_after_B_per_w": (rss - self.base_rss) * 1024 / self.weights,
        }
        return out

    def summary(self) -> dict:
        return {
            "load_at_start": self.load_at_start,
            "cpu_pressure_at_start": self.psi_at_start,
            "cpu_pressure_at_end": _cpu_pressure(),
            "peak_reset": self.reset_ok,
            "baseline_rss_gib": self.base_rss * 1024 / GIB,
            "baseline_maxrss_gib": self.base_maxrss * 1024 / GIB,
            "peak_extra_B_per_w": (self.peak_kib - self.base_maxrss) * 1024 / self.weights,
            "peak_extra_gib": (self.peak_kib - self.base_maxrss) * 1024 / GIB,
            "phases": self.phases,
        }


def _build(d: int, depth: int, dtype_name: str, batch: int, seed: int = 0):
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    torch.manual_seed(seed)
    with torch.no_grad():
        layers = []
        for _ in range(depth):
            # created in dtype; reset_parameters fills in place (no fp32 copy)
            layers += [torch.nn.Linear(d, d, bias=False, dtype=dtype), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers).eval()
        x = torch.randn(batch, d, dtype=dtype)
    return model, x


def _warm_up(dtype_name: str, method: str | None) -> None:
    """One tiny round (and selection) first: lazy imports, the extension, fx, thread pools."""
    import egp_fast

    model, x = _build(64, 3, dtype_name, 8)
    if method is not None:
        p = egp_fast.Pruner(model, x, step=0.5, method=method, progress=False)
        p.apply(p.plan(p.measure([x])))
    else:
        import torch

        ws = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
        ms = [torch.ones_like(w, dtype=torch.bool) for w in ws]
        egp_fast.ops.global_smallest(ws, ms, sum(w.numel() for w in ws) // 2)
        egp_fast.ops.select_smallest(ws, ms, [w.numel() // 2 for w in ws])
    del model, x
    gc.collect()


def child_round(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import egp_fast

    _warm_up(a.dtype, a.method)
    t = time.perf_counter()
    model, x = _build(a.d, a.depth, a.dtype, a.batch)
    build_s = time.perf_counter() - t
    weights = sum(p.numel() for p in model.parameters())
    m = _Meter(weights)
    p = m.phase("ctor", lambda: egp_fast.Pruner(model, x, step=0.5, method=a.method, progress=False))
    stats = m.phase("measure", lambda: p.measure([x]))
    plan = m.phase("plan", lambda: p.plan(stats))
    m.phase("apply", lambda: p.apply(plan))
    out = m.summary()
    planned = int(sum(plan.values()))
    del stats, plan
    out["resident_after_trim_B_per_w"] = _trimmed_resident(m)
    out.update(
        kind="round",
        weights=weights,
        build_s=build_s,
        round_s=sum(v["s"] for v in m.phases.values()),
        round_cpu_s=sum(v["cpu_s"] for v in m.phases.values()),
        planned=planned,
        sparsity=p.sparsity(),
    )
    return out


def child_select(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import egp_fast

    _warm_up(a.dtype, None)
    t = time.perf_counter()
    model, _ = _build(a.d, a.depth, a.dtype, a.batch)
    build_s = time.perf_counter() - t
    ws = [mod.weight.detach() for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
    ms = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    weights = sum(w.numel() for w in ws)
    out = {"kind": "select", "weights": weights, "build_s": build_s}
    for name, fn in (
        ("global_smallest", lambda: egp_fast.ops.global_smallest(ws, ms, weights // 2)),
        ("select_smallest", lambda: egp_fast.ops.select_smallest(ws, ms, [w.numel() // 2 for w in ws])),
    ):
        meter = _Meter(weights)  # baseline: model + input masks
        res = meter.phase(name, fn)  # first call: time and peak
        pruned = sum(int(r.numel() - r.count_nonzero()) for r in res)
        del res
        times = [meter.phases[name]["s"]]
        while sum(times) < a.select_time and len(times) < 5:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        gc.collect()
        out[name] = {
            "s": min(times),
            "s_first": times[0],
            "s_all": times,
            "weights_per_s": weights / min(times),
            "cpu_s_first": meter.phases[name]["cpu_s"],
            "cpu_pressure_at_start": meter.psi_at_start,
            "peak_extra_B_per_w": meter.phases[name]["peak_extra_B_per_w"],
            "pruned": pruned,
            "peak_reset": meter.reset_ok,
        }
    return out


# ---- parent side ------------------------------------------------------------------------------


def _run_child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x).

    Example:
        >>> round(fit_exponent([(1, 2), (10, 20), (100, 200)]), 6)
        1.0
    """
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _skip_reason(n: int, dtype: str, limit_gib: float, extra_per_w: float | None = None) -> str | None:
    extra = EST_EXTRA[dtype] if extra_per_w is None else extra_per_w
    est = n * (ELEM_BYTES[dtype] + extra) + 0.6 * GIB  # + interpreter and torch
    avail = _meminfo().get("MemAvailable")
    cap = limit_gib * GIB
    if avail is not None:
        cap = min(cap, avail - 1 * GIB)
    if est > cap:
        return (f"estimated {est / GIB:.1f} GiB (model {ELEM_BYTES[dtype]} + ~{extra:g} extra B/weight) "
                f"> limit {cap / GIB:.1f} GiB (--mem-limit-gib {limit_gib:g}, "
                f"MemAvailable {(avail or 0) / GIB:.1f} GiB)")
    return None


def _fmt_par(r: dict, threads: int) -> str:
    par = _parallel(r, threads)
    return "?" if par is None else f"{par:.2f}" + ("" if par >= 0.75 else " ⚠")


def _fmt_psi(r: dict) -> str:
    a, b = r.get("cpu_pressure_at_start"), r.get("cpu_pressure_at_end")
    return "?" if a is None or b is None else f"{a:.0f}–{b:.0f}"


def _fmt_n(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:.0f}"


def _parallel(r: dict, threads: int) -> float | None:
    """The round's CPU time over (wall time x threads): about 1 when every thread had a core."""
    cpu = r.get("round_cpu_s")
    return None if cpu is None or not r.get("round_s") else cpu / (r["round_s"] * threads)


def _quiet(r: dict, threads: int, limit: float = 0.75) -> bool:
    """The round's threads ran in parallel at least ``limit`` of the time: not starved of CPUs.

    On this shared 2-core machine the split is sharp: undisturbed rounds show 0.9-1.0, rounds
    that shared the cores show about 1 / threads (and many involuntary context switches)."""
    par = _parallel(r, threads)
    return par is not None and par >= limit


def exponents(results: dict) -> dict:
    ex = {}
    for key in sorted({(r["dtype"], r["method"]) for r in results["rounds"] if "round_s" in r}):
        rows = [r for r in results["rounds"] if (r["dtype"], r["method"]) == key and "round_s" in r]
        quiet = [r for r in rows if _quiet(r, results["config"]["threads"])]
        e = {"round": fit_exponent([(r["weights"], r["round_s"]) for r in rows]),
             "round_quiet": fit_exponent([(r["weights"], r["round_s"]) for r in quiet]),
             "quiet_sizes": len(quiet),
             "round_cpu": fit_exponent([(r["weights"], r.get("round_cpu_s")) for r in rows])}
        for ph in ("ctor", "measure", "plan", "apply"):
            e[ph] = fit_exponent([(r["weights"], r["phases"][ph]["s"]) for r in rows])
        e["sizes"] = len(rows)
        ex[f"{key[0]}/{key[1]}"] = e
    for dt in sorted({s["dtype"] for s in results["select"] if "global_smallest" in s}):
        rows = [s for s in results["select"] if s["dtype"] == dt and "global_smallest" in s]
        for op in ("global_smallest", "select_smallest"):
            ex[f"{dt}/{op}"] = {"time": fit_exponent([(s["weights"], s[op]["s"]) for s in rows]),
                                "sizes": len(rows)}
    return ex


def markdown(results: dict) -> str:
    mi = results["machine"]
    out = [
        f"# One pruning round against the number of weights (`benchmarks/bench_scale.py`)",
        "",
        f"{mi['date_utc']}; `nproc` {mi['nproc']}; CPU {mi['cpu']}; {mi['mem_total_gib']} GiB; "
        f"torch {mi['torch']}; {results['config']['threads']} threads; load average at start "
        f"{', '.join(f'{v:.2f}' for v in mi['loadavg_start'])}.",
        "",
        f"Command: `{results['config']['command']}`",
        "",
        "Model: `Linear(d, d, bias=False)` + `ReLU` × depth, built in the dtype; one batch of "
        f"{results['config']['batch']} × d; step 0.5. Each run is a fresh subprocess. Extra memory = "
        "(peak `ru_maxrss` during the round − `ru_maxrss` right before it, after the model is built and "
        "the peak counter reset) / weights; it includes the masks the Pruner attaches (1 B/weight). "
        "\"kept after\" = what the round leaves allocated "
        "(after `gc.collect()` and glibc `malloc_trim(0)`; in parentheses before the trim, i.e. with "
        "the allocator's cached free pages). \"runs\": round time of each fresh child (the row is the fastest one: on a shared machine noise only adds). "
        "Times in seconds. \"CPU s\": user+system time of the round (all threads; 2 threads fully "
        "busy = 2 × round). \"parallel\": CPU s / (round × threads), about 1 when every thread had a "
        "core; ⚠ marks a round that shared its cores with other processes (its time is inflated, "
        "here typically 2-4×). \"preempted\": involuntary context switches during the round. "
        "\"CPU wait %\": `some avg10` of /proc/pressure/cpu when the round "
        "started and ended (share of the last 10 s in which some task waited for a CPU: the "
        "machine is shared).",
        "",
        "| weights | dtype | method | d × depth | ctor | measure | plan | apply | **round** | runs | "
        "CPU s | parallel | preempted | CPU wait % | extra B/weight (peak) | peak in | kept after, B/w | sparsity |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results["rounds"]:
        head = f"| {_fmt_n(r['weights'])} | {r['dtype']} | {r['method']} | {r['d']} × {r['depth']} |"
        if "round_s" not in r:
            out.append(head + f" skipped: {r.get('skipped') or r.get('error')} ||||||||||||||")
            continue
        ph = r["phases"]
        worst = max(ph, key=lambda k: ph[k]["peak_extra_B_per_w"])
        kept = r.get("resident_after_trim_B_per_w")
        kept_s = f"{kept:.2f}" if kept is not None else "?"
        runs = ", ".join(f"{t:.2f}" for t in r.get("round_s_all", [r["round_s"]]))
        out.append(
            head + " " + " | ".join(f"{ph[k]['s']:.2f}" for k in ("ctor", "measure", "plan", "apply"))
            + f" | **{r['round_s']:.2f}** | {runs} | {r.get('round_cpu_s', float('nan')):.2f} | "
            f"{_fmt_par(r, results['config']['threads'])} | {sum(v.get('preempted', 0) for v in ph.values())} | "
            f"{_fmt_psi(r)} | {r['peak_extra_B_per_w']:.2f} | {worst} "
            f"| {kept_s} ({ph['apply']['resident_after_B_per_w']:.2f}) | {r['sparsity']:.3f} |"
        )
    out += [
        "",
        "Per-phase peak extra bytes/weight (each phase's peak over the round's baseline):",
        "",
        "| weights | dtype | method | ctor | measure | plan | apply |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results["rounds"]:
        if "round_s" in r:
            ph = r["phases"]
            out.append(f"| {_fmt_n(r['weights'])} | {r['dtype']} | {r['method']} | "
                       + " | ".join(f"{ph[k]['peak_extra_B_per_w']:.2f}"
                                    for k in ("ctor", "measure", "plan", "apply")) + " |")
    out += [
        "",
        "Selection ops alone (k = half of all weights for `global_smallest`, half of each layer for "
        "`select_smallest`; all-True input masks; best of up to 5 calls, peak of the first; "
        "extra memory excludes the input masks):",
        "",
        "| weights | dtype | `global_smallest` s | G weights/s | extra B/w | `select_smallest` s | G weights/s | extra B/w |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["select"]:
        head = f"| {_fmt_n(s['weights'])} | {s['dtype']} |"
        if "global_smallest" not in s:
            out.append(head + f" skipped: {s.get('skipped') or s.get('error')} ||||||")
            continue
        g, p = s["global_smallest"], s["select_smallest"]
        out.append(head + f" {g['s']:.3f} | {g['weights_per_s'] / 1e9:.3f} | {g['peak_extra_B_per_w']:.2f} |"
                   f" {p['s']:.3f} | {p['weights_per_s'] / 1e9:.3f} | {p['peak_extra_B_per_w']:.2f} |")
    out += ["", "Growth exponents (least-squares slope of log time against log weights):", "",
            "| series | sizes | exponent | undisturbed rounds only (sizes) | of CPU s | per phase |",
            "|---|---:|---:|---:|---:|---|"]

    def f2(v):
        return "–" if v is None else f"{v:.2f}"

    for k, e in results["exponents"].items():
        main = e.get("round", e.get("time"))
        phases = ", ".join(f"{ph} {e[ph]:.2f}" for ph in ("ctor", "measure", "plan", "apply")
                           if e.get(ph) is not None)
        quiet = f"{f2(e.get('round_quiet'))} ({e['quiet_sizes']})" if "quiet_sizes" in e else "–"
        out.append(f"| {k} | {e['sizes']} | {f2(main)} | {quiet} | {f2(e.get('round_cpu'))} | {phases} |")
    if results.get("notes"):
        out += ["", *results["notes"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10e6,30e6,100e6,300e6,1e9")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--methods", default="egp,imp")
    ap.add_argument("--d", type=int, default=None, help="force the width (default: see shape_for)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-select", action="store_true", help="skip timing the selection ops alone")
    ap.add_argument("--select-time", type=float, default=3.0, help="repeat each op alone until this many s")
    ap.add_argument("--repeats", type=int, default=0,
                    help="fresh children per configuration (0: 3 below 200M weights, else 1); "
                         "the row is the child with the fastest round; repeats run after every "
                         "configuration has run once, while --budget-s allows")
    ap.add_argument("--quiet-below", type=float, default=None,
                    help="before each child, wait until /proc/pressure/cpu 'some avg10' is below this %%")
    ap.add_argument("--quiet-wait-s", type=float, default=60.0, help="longest such wait per child")
    ap.add_argument("--mem-limit-gib", type=float, default=18.0)
    ap.add_argument("--budget-s", type=float, default=840.0, help="start no configuration after this")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per child")
    ap.add_argument("--out", default=None, help="JSON file (a .md next to it with --markdown)")
    ap.add_argument("--markdown", action="store_true", help="print (and save next to --out) a table")
    ap.add_argument("--note", action="append", help="a line added to the notes (repeatable)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="run nothing: combine earlier --out files (the fastest child per configuration)")
    ap.add_argument("--child", choices=["round", "select"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        res = child_round(a) if a.child == "round" else child_select(a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    sizes = [float(s) for s in a.sizes.split(",") if s]
    dtypes = [s for s in a.dtypes.split(",") if s]
    methods = [s for s in a.methods.split(",") if s]
    for dt in dtypes:
        if dt not in DTYPES:
            ap.error(f"unknown dtype {dt!r} (one of {', '.join(DTYPES)})")
    results = {
        "machine": machine_info(),
        "config": {"sizes": sizes, "dtypes": dtypes, "methods": methods, "batch": a.batch,
                   "threads": a.threads, "step": 0.5, "quiet_below": a.quiet_below,
                   "budget_s": a.budget_s,
                   "command": "python benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])},
        "rounds": [],
        "select": [],
        "notes": [],
    }
    t_start = time.perf_counter()
    base = ["--batch", str(a.batch), "--threads", str(a.threads), "--select-time", str(a.select_time)]

    def wait_quiet() -> float:
        """With --quiet-below: wait (at most --quiet-wait-s) until the CPU pressure drops under it."""
        if a.quiet_below is None or _cpu_pressure() is None:
            return 0.0
        t = time.perf_counter()
        while _cpu_pressure() > a.quiet_below and time.perf_counter() - t < a.quiet_wait_s:
            time.sleep(1.0)
        return time.perf_counter() - t

    def child(job: dict) -> dict:
        waited = wait_quiet()
        res = _run_child(["--child", job["kind"], "--d", str(job["d"]), "--depth", str(job["depth"]),
                          "--dtype", job["dtype"]] + base + job["extra"], a.timeout_s)
        res["waited_for_quiet_s"] = waited
        job["runs"].append(res)
        label = f"{job['kind']:6s} {_fmt_n(job['weights']):>6s} {job['dtype']} {job.get('method', '')}"
        if "error" in res:
            print(f"{label}: ERROR {res['error']}", flush=True)
        elif job["kind"] == "round":
            ph = res["phases"]
            print(f"{label}: round {res['round_s']:.2f} s, CPU {res['round_cpu_s']:.2f} s ("
                  + ", ".join(f"{k} {v['s']:.2f}" for k, v in ph.items())
                  + f"), +{res['peak_extra_B_per_w']:.2f} B/weight, build {res['build_s']:.1f} s, "
                  f"CPU wait {_fmt_psi(res)}%", flush=True)
        else:
            g, sel = res["global_smallest"], res["select_smallest"]
            print(f"{label}: global_smallest {g['s']:.3f} s ({g['weights_per_s'] / 1e9:.3f} Gw/s, "
                  f"+{g['peak_extra_B_per_w']:.2f} B/w); select_smallest {sel['s']:.3f} s "
                  f"(+{sel['peak_extra_B_per_w']:.2f} B/w)", flush=True)
        return res

    def row_of(job: dict) -> dict:
        row = {k: job[k] for k in ("requested", "weights", "d", "depth", "dtype")}
        if "method" in job:
            row["method"] = job["method"]
        if job.get("skipped"):
            row["skipped"] = job["skipped"]
            return row
        ok = [r for r in job["runs"] if "error" not in r]
        if not ok:
            row.update(job["runs"][0] if job["runs"] else {"skipped": "not run"})
            return row
        if job["kind"] == "round":  # the fastest child stands for the row (noise only adds time)
            ok.sort(key=lambda r: r["round_s"])
            res = dict(ok[0])
            res["round_s_all"] = [r["round_s"] for r in ok]
            res["peak_extra_B_per_w_all"] = [r["peak_extra_B_per_w"] for r in ok]
        else:  # best time over every call of every child; peak of the first call, largest over children
            res = dict(ok[0])
            for op in ("global_smallest", "select_smallest"):
                calls = [t for r in ok for t in r[op]["s_all"]]
                res[op] = dict(res[op], s=min(calls), s_all=calls, weights_per_s=job["weights"] / min(calls),
                               peak_extra_B_per_w=max(r[op]["peak_extra_B_per_w"] for r in ok))
        res["repeats"] = len(ok)
        res["runs_all"] = job["runs"] if len(job["runs"]) > 1 else None
        row.update(res)
        return row

    if a.merge:
        return merge(a, results, row_of)

    jobs = []
    for n in sorted(sizes):
        for dt in dtypes:
            d, depth = shape_for(n, a.d)
            common = {"requested": n, "weights": d * d * depth, "d": d, "depth": depth, "dtype": dt, "runs": []}
            for m in methods:
                jobs.append(dict(common, kind="round", method=m, extra=["--method", m], runs=[]))
            if not a.no_select:
                # masks (1 B/w) + both ops' outputs (1 B/w) + the op's own working space
                jobs.append(dict(common, kind="select", extra=[], est_extra=4.0, runs=[]))

    # Pass 1: every configuration once, largest first (the sizes that matter most get run even
    # when a loaded machine eats the budget); pass 2: the repeats, while time is left.
    for job in sorted(jobs, key=lambda j: -j["weights"]):
        reason = _skip_reason(job["weights"], job["dtype"], a.mem_limit_gib, job.get("est_extra"))
        elapsed = time.perf_counter() - t_start
        if reason is None and elapsed > a.budget_s:
            reason = f"time budget: {elapsed:.0f} s > --budget-s {a.budget_s:.0f}"
        if reason:
            job["skipped"] = reason
            print(f"{job['kind']:6s} {_fmt_n(job['weights']):>6s} {job['dtype']} {job.get('method', '')}: "
                  f"SKIPPED, {reason}", flush=True)
            continue
        child(job)
    for rep in range(1, 100):
        todo = [j for j in jobs if not j.get("skipped")
                and rep < (a.repeats if a.repeats > 0 else (3 if j["weights"] < 2e8 else 1))]
        if not todo:
            break
        for job in todo:
            if time.perf_counter() - t_start > a.budget_s:
                break
            child(job)
    results["rounds"] = [row_of(j) for j in jobs if j["kind"] == "round"]
    results["select"] = [row_of(j) for j in jobs if j["kind"] == "select"]

    results["wall_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_end"] = os.getloadavg()
    return finish(a, results, [r for j in jobs for r in j["runs"]])


def merge(a, results: dict, row_of) -> int:
    """``--merge``: no new runs; one result from several earlier JSON files of this script.

    Per configuration, every child of every file is pooled and the fastest round (the fastest
    call, for the selection ops) stands for it, as within one invocation."""
    files = [json.loads(Path(f).read_text()) for f in a.merge]
    jobs: dict[tuple, dict] = {}
    for f in files:
        for kind, rows in (("round", f["rounds"]), ("select", f["select"])):
            for r in rows:
                key = (kind, r["weights"], r["dtype"], r.get("method"))
                job = jobs.setdefault(key, dict({k: r[k] for k in ("requested", "weights", "d", "depth", "dtype")},
                                                kind=kind, runs=[]))
                if r.get("method"):
                    job["method"] = r["method"]
                if "skipped" in r or "error" in r:
                    continue
                job["runs"] += r.get("runs_all") or [{k: v for k, v in r.items() if k != "runs_all"}]
    for job in jobs.values():
        if not job["runs"]:
            job["skipped"] = "skipped or failed in every merged file"
    order = sorted(jobs.values(), key=lambda j: (j["weights"], j["dtype"], j.get("method") or ""))
    results["rounds"] = [row_of(j) for j in order if j["kind"] == "round"]
    results["select"] = [row_of(j) for j in order if j["kind"] == "select"]
    results["config"] = dict(files[0]["config"], command=results["config"]["command"])
    results["machine"] = dict(files[0]["machine"], date_utc=" and ".join(f["machine"]["date_utc"] for f in files),
                              merged_on=results["machine"]["date_utc"])
    results["wall_s"] = sum(f.get("wall_s") or 0 for f in files)
    results["merged"] = [{"file": str(n), "date_utc": f["machine"]["date_utc"], "command": f["config"]["command"],
                          "wall_s": f.get("wall_s"), "loadavg_start": f["machine"].get("loadavg_start"),
                          "loadavg_end": f["machine"].get("loadavg_end")} for n, f in zip(a.merge, files)]
    results["notes"].append(
        "Merged from " + "; ".join(f"{m['file']} ({m['date_utc']}, load average {m['loadavg_start'][0]:.1f} at start)"
                                    for m in results["merged"])
        + ": per configuration the fastest child over all files stands for the row (\"runs\" lists every child).")
    return finish(a, results, [r for j in jobs.values() for r in j["runs"]])


def finish(a, results: dict, all_runs: list[dict]) -> int:
    """Exponents, notes, printout and files."""
    results["exponents"] = exponents(results)
    results["notes"] += a.note or []
    done = [r for r in results["rounds"] if "round_s" in r]
    busy = [r for r in done if not _quiet(r, results["config"]["threads"])]
    if busy:
        results["notes"].append(
            f"The machine was shared: {len(busy)} of {len(done)} rounds (⚠) did not get their "
            f"{results['config']['threads']} cores (parallel < 0.75); their wall times are inflated. "
            "CPU s (the round's own CPU time) is less affected, but not immune (spinning threads, caches).")
    if a.quiet_below is not None:
        waits = [r.get("waited_for_quiet_s", 0) for r in all_runs]
        results["notes"].append(f"Each child waited (at most {a.quiet_wait_s:g} s) for CPU wait < "
                                f"{a.quiet_below:g}%: {sum(waits):.0f} s waited in all.")
    if not all(r.get("peak_reset", True) for r in results["rounds"]):
        results["notes"].append("Some children could not reset the peak counter (clear_refs): their "
                                "extra memory can be understated.")
    print("\ngrowth exponents (slope of log time vs log weights):")
    for k, e in results["exponents"].items():
        main_e = e.get("round", e.get("time"))
        line = f"  {k:22s} {main_e:.3f}" if main_e is not None else f"  {k:22s} -"
        line += f" ({e['sizes']} sizes)"
        if e.get("round_quiet") is not None:
            line += f"; undisturbed rounds only: {e['round_quiet']:.3f} ({e['quiet_sizes']} sizes)"
        if e.get("round_cpu") is not None:
            line += f"; of CPU time: {e['round_cpu']:.3f}"
        print(line)
    print(f"wall time {results.get('wall_s') or 0:.0f} s")
    md = markdown(results)
    if a.markdown:
        print()
        print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        if a.markdown:
            out.with_suffix(".md").write_text(md)
        print(f"wrote {out}" + (f" and {out.with_suffix('.md')}" if a.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
