"""Counting: ON counts per channel, multi-piece states, paper mode, counts summed across ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
from _models import Identityish, TwoSites, gaussian_batches, spawn_two_ranks

import egp_fast
from egp_fast.measurement import paper_batch_entropy


def test_counts_match_a_hand_computed_example():
    x1 = torch.tensor([[[[1.0, -1.0]], [[0.0, 0.0]], [[2.0, 3.0]]]])  # [1, 3, 1, 2]
    x2 = torch.tensor([[[[-5.0, 4.0]], [[-0.0, 1.0]], [[1.0, 1.0]]]])
    stats = egp_fast.measure_entropy(Identityish(), [x1, x2], progress=False)
    s = stats.sites["act"]
    assert s.observations == 4
    assert s.on_counts.tolist() == [2, 1, 4]  # zero and -0.0 are OFF
    assert s.p_on.tolist() == [0.5, 0.25, 1.0]
    h25 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert s.channel_entropy.tolist() == pytest.approx([1.0, h25, 0.0], abs=1e-12)
    assert s.entropy == pytest.approx((1.0 + h25) / 2, abs=1e-12)  # constant channel excluded
    assert s.entropy_all == pytest.approx((1.0 + h25) / 3, abs=1e-12)
    assert s.piece.tolist() == [-1, -1, 1]
    assert not s.collapsible


def _h(p):
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_paper_mode_follows_the_reference_per_batch_formula():
    # Channels: 0 mixed, 1 dead (always OFF), 2 always ON, 3 mixed. Per batch, the constant
    # channels of THAT batch are left out and the rest averaged; an all-constant batch gives 0.
    b1 = torch.tensor(
        [[[[1.0, -1.0, -2.0, -4.0]], [[-1.0, -2.0, 0.0, -3.0]], [[1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 1.0, -1.0]]]]
    )  # [1, 4, 1, 4]: p = 0.25, 0, 1, 0.75
    b2 = torch.tensor(
        [[[[1.0, 1.0, 1.0, 1.0]], [[-1.0, -2.0, 0.0, -3.0]], [[1.0, 2.0, 3.0, 4.0]], [[-1.0, -1.0, -1.0, -1.0]]]]
    )  # every channel constant in this batch (channel 0 and 3 flip only across batches)
    b3 = torch.tensor(
        [[[[1.0, -1.0, 1.0, -1.0]], [[-1.0, -2.0, 0.0, -3.0]], [[1.0, 2.0, 3.0, 4.0]], [[1.0, 1.0, 1.0, 1.0]]]]
    )  # p = 0.5, 0, 1, 1
    stats = egp_fast.measure_entropy(Identityish(4), [b1, b2, b3], mode="paper", progress=False)
    s = stats.sites["act"]
    batch1 = (_h(0.25) + _h(0.75)) / 2  # channels 1 and 2 left out
    batch2 = 0.0
    batch3 = _h(0.5) / 1
    assert s.entropy == pytest.approx((batch1 + batch2 + batch3) / 3, abs=1e-5)
    # the old bug (clamped H averaged over all channels) gives a visibly different number
    eps = 1e-5
    hc = _h(1 - eps)
    buggy = ((_h(0.25) + _h(0.75) + 2 * hc) / 4 + 4 * hc / 4 + (_h(0.5) + 3 * hc) / 4) / 3
    assert abs(s.entropy - buggy) > 0.05
    # the exact mode is unaffected: over all 12 observations channel 0 is ON 1+4+2 = 7 times
    assert s.exact_entropy == pytest.approx((_h(7 / 12) + _h(7 / 12)) / 2, abs=1e-12)


def test_paper_mode_clamps_only_inside_the_logs():
    # One ON among 200000 observations: p = 5e-6 < 1e-5, so the clamp is active.
    x = torch.full((1, 1, 1, 200000), -1.0)
    x[..., 0] = 1.0
    s = egp_fast.measure_entropy(Identityish(1), [x], mode="paper", progress=False).sites["act"]
    p, pc = 5e-6, 1e-5
    expected = -(p * math.log2(pc) + (1 - p) * math.log2(1 - pc))
    clamped_everywhere = _h(pc)
    assert s.entropy == pytest.approx(expected, rel=1e-9)
    assert abs(s.entropy - clamped_everywhere) > 1e-5


def test_paper_mode_all_on_layer_reads_zero():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with torch.no_grad():
        net[0].bias.fill_(100.0)
    s = egp_fast.measure_entropy(net, [torch.randn(2, 3, 4, 4)] * 3, mode="paper", progress=False).sites["1"]
    assert s.entropy == 0.0  # was 0.000181 when constant channels were averaged in


def test_paper_batch_entropy_averages_the_moving_channels():
    on = torch.tensor([2, 0, 4, 1])  # of 4 observations: channels 1 and 2 are constant
    expected = (_h(2 / 4) + _h(1 / 4)) / 2
    assert float(paper_batch_entropy(on, 4)) == pytest.approx(expected, abs=1e-12)
    assert float(paper_batch_entropy(torch.tensor([0, 4]), 4)) == 0.0  # all constant: 0


def test_multi_piece_relu6_states():
    net = nn.Sequential(nn.Identity(), nn.ReLU6())
    x = torch.tensor([[-1.0, 3.0, 7.0, 3.0], [-2.0, 8.0, 9.0, 1.0]])  # [N=2, C=4]
    s = egp_fast.measure_entropy(net, [x], progress=False).sites["1"]
    assert s.piece_counts.tolist() == [[2, 0, 0, 0], [0, 1, 0, 2], [0, 1, 2, 0]]
    assert s.piece.tolist() == [0, -1, 2, 1]
    assert s.entropy == pytest.approx(1.0)


def _paper_reference():
    import importlib
    import pathlib
    import sys

    bench = str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("paper_reference")


def test_paper_mode_matches_the_independent_reference_on_resnet18():
    import torchvision

    ref = _paper_reference()
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        net.layer1[0].bn1.bias.fill_(30.0)  # every channel ON: the reference reads exactly 0
        net.layer2[0].bn1.bias[:64].fill_(-30.0)  # half the channels dead
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    mine = egp_fast.measure_entropy(net, batches, mode="paper", progress=False)
    theirs = ref.measure_paper_entropy(net, batches)
    assert list(theirs) == list(mine.sites)
    for name, h in theirs.items():
        assert mine.sites[name].entropy == pytest.approx(h, abs=1e-6), name
    assert theirs["layer1.0.relu"] == 0.0 and mine.sites["layer1.0.relu"].entropy == 0.0
    # the reference's own producer table and allocation agree with egp_fast's
    table = ref.site_producers(net, batches[0])
    assert table == {n: s.producers for n, s in mine.sites.items()}
    plan = ref.paper_plan(net, theirs, table)
    layer_h = mine.layer_entropy()
    modules = dict(net.named_modules())
    remaining = {n: int(modules[n].weight.count_nonzero()) for n in layer_h}
    magnitude = {n: float(modules[n].weight.detach().abs().double().mean()) for n in layer_h}
    budget = 0.5 * sum(remaining[n] for n in layer_h if layer_h[n] > 0)
    theirs_plan = egp_fast.allocate(layer_h, magnitude, remaining, budget)
    assert plan.keys() == theirs_plan.keys() and sum(plan.values()) > 0.49 * sum(remaining.values())
    for n in plan:  # float rounding may move one weight between layers
        assert abs(plan[n] - theirs_plan[n]) <= 1, n


# --------------------------------------------------------------------------------------------
# DDP: 1 process and 2 processes give identical statistics.


def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = TwoSites()
        data = gaussian_batches(8, 4)[rank::world]
        stats = egp_fast.measure_entropy(net, data, progress=False)
        early = egp_fast.measure_entropy(net, gaussian_batches(20, 64)[rank::world], progress=False, stop="decided")
        if rank == 0:
            torch.save(
                {
                    "samples": {n: s.samples for n, s in stats.sites.items()},
                    "on": {n: s.on_counts.tolist() for n, s in stats.sites.items()},
                    "total": stats.samples,
                    "bound": stats.sites["a"].flip_bound(),
                    "early": (early.batches, early.stopped_early, early.samples),
                },
                path,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    got = spawn_two_ranks(_ddp_worker, str(tmp_path / "ddp.pt"))
    torch.manual_seed(0)
    one = egp_fast.measure_entropy(TwoSites(), gaussian_batches(8, 4), progress=False)
    assert got["samples"] == {n: s.samples for n, s in one.sites.items()} == {"a": 32, "b": 32}
    assert got["on"] == {n: s.on_counts.tolist() for n, s in one.sites.items()}
    assert got["total"] == 32 and got["bound"] == one.sites["a"].flip_bound()
    # stop="decided" across 2 ranks: 3 batches of 64 per rank reach 299 samples (384); both
    # ranks stop together and .batches counts the batches of all ranks
    assert got["early"] == (6, True, 384)
