"""Determinism: same seed and data give bit-identical masks across runs, backends, memory
layouts and 1 vs 2 DDP processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.ops._dispatch import _IMPLS, triton_interpret


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3),
    )


def _data(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(6, 3, 5, 5, generator=g) for _ in range(n)]


def _masks(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_mask.clone() for n, m in egp_fast.masked_layers(net).items()}


def _run(backend=None, method="egp", channels_last=False, iterations=3) -> dict[str, torch.Tensor]:
    net = _net()
    data = _data()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        data = [x.to(memory_format=torch.channels_last) for x in data]
    egp_fast.prune(net, data, iterations=iterations, method=method, backend=backend, progress=False)
    return _masks(net)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(int((~m).sum()) for m in a.values()), "nothing was pruned: the comparison is vacuous"


@pytest.mark.parametrize("method", ["egp", "imp"])
def test_same_seed_same_masks(method):
    _assert_same(_run(method=method), _run(method=method))


def _cpu_backends() -> list[str]:
    out = ["torch"]
    if "select_smallest" in _IMPLS and "cpp" in _IMPLS["select_smallest"]:
        out.append("cpp")
    if "triton" in _IMPLS.get("sign_count", {}) and triton_interpret():
        out.append("triton")
    return out


@pytest.mark.parametrize(
    "backend, method",
    # IMP masks never read the activations, so Triton (measurement only) is tested with EGP.
    [(b, m) for b in _cpu_backends()[1:] for m in ("egp", "imp") if not (b == "triton" and m == "imp")],
)
def test_backends_give_identical_masks(backend, method):
    _assert_same(_run("torch", method), _run(backend, method))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_backends_give_identical_counts(backend):
    net = _net()
    ref = egp_fast.measure_entropy(net, _data(), backend="torch", progress=False)
    got = egp_fast.measure_entropy(net, _data(), backend=backend, progress=False)
    for name, s in ref.sites.items():
        assert torch.equal(s.piece_counts, got.sites[name].piece_counts), name
        assert s.entropy == got.sites[name].entropy or abs(s.entropy - got.sites[name].entropy) < 1e-12


@pytest.mark.parametrize("backend", _cpu_backends()[:2])
def test_channels_last_gives_identical_masks(backend):
    # Regression: the torch reference lost its writes into channels-last masks, so a
    # channels-last model was never pruned.
    _assert_same(_run(backend), _run(backend, channels_last=True))


_DDP = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import torch.nn as nn
    sys.path[:0] = [os.environ["EGP_TEST_DIR"], os.path.dirname(os.environ["EGP_TEST_DIR"])]
    from test_determinism import _data, _masks, _net
    import egp_fast
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + out + ".rendezvous", rank=rank,
                                world_size=world)
    net = _net()
    data = _data(4)[rank::world]  # each rank measures its shard of the same 4 batches
    # the example batch must be the same everywhere so tracing agrees
    res = egp_fast.prune(net, data, iterations=2, example_inputs=_data(1)[0], progress=False)
    counts = {n: s.piece_counts for n, s in res.stats.sites.items()}
    torch.save({"masks": _masks(net), "counts": counts}, f"{out}.{rank}.pt")
    if world > 1:
        dist.destroy_process_group()
    """
)


def test_one_and_two_ddp_processes_give_identical_masks(tmp_path):
    env = dict(os.environ, EGP_TEST_DIR=os.path.dirname(os.path.abspath(__file__)), OMP_NUM_THREADS="1")
    script = tmp_path / "ddp.py"
    script.write_text(_DDP)
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    r = subprocess.run([sys.executable, str(script), "0", "1", one], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    procs = [subprocess.Popen([sys.executable, str(script), str(k), "2", two], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    ref = torch.load(f"{one}.0.pt", weights_only=True)
    for k in range(2):
        got = torch.load(f"{two}.{k}.pt", weights_only=True)
        _assert_same(ref["masks"], got["masks"])
        # the counts were summed over both shards: the same as one process over all batches
        assert ref["counts"].keys() == got["counts"].keys()
        for n in ref["counts"]:
            assert torch.equal(ref["counts"][n], got["counts"][n]), n
