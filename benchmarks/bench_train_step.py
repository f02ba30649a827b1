"""Benchmark: the cost of pruning masks in a training step (issue 11, section 6).

One training step of torchvision's resnet18 (10 classes, 32x32 inputs): forward, cross-entropy,
backward, ``optimizer.step()``. The masked model carries egp_fast masks on every Conv/Linear
(50% pruned per layer); the plain model is the same network without masks. Bar: masked step
<= 1.03x the plain step.

pytest-benchmark suite (JSON for BENCHMARKS.md):

    .venv/bin/python -m pytest benchmarks/bench_train_step.py --benchmark-only -q

Side-by-side ratio in one run (plain and masked steps interleaved, so load from other processes
hits both alike):

    .venv/bin/python benchmarks/bench_train_step.py --batch 64 --opt sgd --rounds 15
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --batch 256   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import requires_cuda, sync  # noqa: E402

import egp_fast  # noqa: E402
from egp_fast import masks as egp_masks  # noqa: E402


def _resnet18(device: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).to(device).train()


def _layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def masked_copy(model: torch.nn.Module, fraction: float = 0.5) -> torch.nn.Module:
    """A deep copy of ``model`` with egp_fast masks on every Conv/Linear, ``fraction`` pruned."""
    net = copy.deepcopy(model)
    names = _layers(net)
    egp_fast.attach_masks(net, names)
    mods = [net.get_submodule(n) for n in names]
    new = egp_fast.ops.select_smallest(
        [m.weight for m in mods], [m.weight_mask for m in mods], [int(m.weight.numel() * fraction) for m in mods]
    )
    egp_masks.set_masks(net, dict(zip(names, new)))
    return net


OPTIMIZERS = ("sgd", "adamw", "adamw_loop")


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, weight decay 5e-4: the paper's fine-tuning), AdamW with torch's fused
    kernel (the faster AdamW, and what ``egp_fast.cli.train.build_optimizer`` gives), or the
    for-loop AdamW (torch's default; an extra row: on AMD CPUs its ``torch.sqrt`` of the second
    moments, MKL's, is ~6x slower on the exact zeros pruned entries keep)."""
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=True)
    if kind == "adamw_loop":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    raise ValueError(f"--opt must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _time_steps(model, opt, x, y, steps: int, device: str, clock=time.perf_counter) -> float:
    sync(device)
    t0 = clock()
    for _ in range(steps):
        train_step(model, opt, x, y)
    sync(device)
    return (clock() - t0) / steps


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def compare(
    batch: int = 64, opt: str = "sgd", rounds: int = 15, steps: int = 3, device: str = "cpu", clock: str = "wall"
) -> dict:
    """Plain vs masked step time, interleaved round by round.

    ``clock="cpu"`` times the process's CPU time instead of the wall clock: on a machine
    shared with other jobs it leaves out the time this process waited for a core (meaningful
    with one thread; GPU runs must use the wall clock).

    Returns:
        ``{"plain_ms", "masked_ms"}`` (medians over rounds of the per-step mean), ``"ratio"``
        (median of per-round masked/plain ratios), ``"ratio_best"`` (best masked / best plain)
        and the per-round lists.
    """
    plain = _resnet18(device)
    masked = masked_copy(plain)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    op, om = make_optimizer(plain, opt), make_optimizer(masked, opt)
    for _ in range(3):  # warm-up: allocator, optimizer state, hooks installed
        train_step(plain, op, x, y)
        train_step(masked, om, x, y)
    clk = CLOCKS[clock]
    tp, tm = [], []
    for r in range(rounds):
        # Alternate which goes first so a slow-down that starts mid-round is shared.
        if r % 2 == 0:
            tp.append(_time_steps(plain, op, x, y, steps, device, clk))
            tm.append(_time_steps(masked, om, x, y, steps, device, clk))
        else:
            tm.append(_time_steps(masked, om, x, y, steps, device, clk))
            tp.append(_time_steps(plain, op, x, y, steps, device, clk))
    pruned = [~m.weight_mask for m in egp_fast.masked_layers(masked).values()]
    mods = list(egp_fast.masked_layers(masked).values())
    assert all(bool((m.weight[p] == 0).all()) for m, p in zip(mods, pruned)), "a pruned weight moved"
    return {
        "plain_ms": statistics.median(tp) * 1e3,
        "masked_ms": statistics.median(tm) * 1e3,
        "ratio": statistics.median(m / p for m, p in zip(tm, tp)),
        "ratio_best": min(tm) / min(tp),
        "plain": tp,
        "masked": tm,
    }


# ---- pytest-benchmark suite -----------------------------------------------------------------


@pytest.mark.benchmark(group="train_step-resnet18-b32-cpu")
@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("provider", ["plain", "masked"])
def test_train_step_resnet18_cpu(benchmark, provider, opt):
    plain = _resnet18("cpu")
    model = plain if provider == "plain" else masked_copy(plain)
    o = make_optimizer(model, opt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    benchmark.extra_info.update(batch=32, image="32x32", optimizer=opt, masked_fraction=0.5)
    benchmark.pedantic(train_step, args=(model, o, x, y), rounds=5, warmup_rounds=3, iterations=1)
    if provider == "masked":
        # The side-by-side figure: plain and masked steps interleaved in one process (the two
        # blocks above run apart, and a burst of load in one moves their ratio by 30%).
        res = compare(batch=32, opt=opt, rounds=11, steps=2, device="cpu")
        benchmark.extra_info.update(
            paired_ratio=res["ratio"], paired_pairs=11,
            paired_min=min(m / p for m, p in zip(res["masked"], res["plain"])),
            paired_max=max(m / p for m, p in zip(res["masked"], res["plain"])),
        )


@requires_cuda
@pytest.mark.benchmark(group="train_step-resnet18-b256-gpu")
@pytest.mark.parametrize("provider", ["plain", "masked"])
def test_train_step_resnet18_gpu(benchmark, provider):
    plain = _resnet18("cuda")
    model = plain if provider == "plain" else masked_copy(plain)
    o = make_optimizer(model, "sgd")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 3, 32, 32, device="cuda", generator=g)
    y = torch.randint(0, 10, (256,), device="cuda", generator=g)
    benchmark.extra_info.update(batch=256, image="32x32", optimizer="sgd", masked_fraction=0.5, device="cuda")

    def step():
        train_step(model, o, x, y)
        sync("cuda")

    benchmark.pedantic(step, rounds=20, warmup_rounds=5, iterations=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--opt", default="sgd", choices=OPTIMIZERS)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3, help="steps timed back to back per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall clock, or process CPU time")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res = compare(a.batch, a.opt, a.rounds, a.steps, a.device, a.clock)
    import platform

    print(
        f"resnet18 train step, batch {a.batch}, 32x32, {a.opt}, {a.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}): "
        f"plain {res['plain_ms']:.1f} ms, masked {res['masked_ms']:.1f} ms -> "
        f"median ratio {res['ratio']:.3f}x (best/best {res['ratio_best']:.3f}x, {a.rounds} interleaved rounds "
        f"of {a.steps} steps, {a.clock} clock)"
    )
