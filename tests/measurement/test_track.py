"""How sure "zero entropy" is (issue 13): samples, flip bounds, stop="decided", track_entropy."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import TwoSites, gaussian_batches, spawn_two_ranks

import egp_fast
from egp_fast.errors import ConfigError, DataError
from egp_fast.measurement.measure import track_entropy
from egp_fast.measurement.decide import flip_bound, samples_needed


def _const_net(bias: float = 100.0) -> nn.Module:
    """A conv whose ReLU is always ON (zero entropy) on any reasonable input."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        net[0].weight.mul_(0.01)
        net[0].bias.fill_(bias)
    return net


# --------------------------------------------------------------------------------------------
# flip_bound


@pytest.mark.parametrize("n", [1, 2, 8, 100, 1437, 10**6])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_flip_bound_is_the_exact_binomial_bound(n, confidence):
    q = flip_bound(n, True, confidence)
    # No event in n draws has probability (1 - q) ** n: the bound is where it equals 1 - c.
    assert (1 - q) ** n == pytest.approx(1 - confidence, rel=1e-9)
    # Clopper-Pearson's upper limit for 0 events is the Beta(1, n) quantile.
    scipy_stats = pytest.importorskip("scipy.stats")
    assert q == pytest.approx(float(scipy_stats.beta.ppf(confidence, 1, n)), rel=1e-7)


def test_flip_bound_examples_from_the_docs():
    assert flip_bound(8, True) == pytest.approx(0.3123, abs=1e-4)
    assert flip_bound(1437, True) == pytest.approx(0.002083, abs=1e-6)
    assert flip_bound(1000, True) == pytest.approx(3 / 1000, rel=0.01)  # the "3 / n" rule


def test_flip_bound_is_never_zero_and_is_one_without_evidence():
    for n in (10**9, 10**15, 10**30):
        assert flip_bound(n, True) > 0.0
    assert flip_bound(0, True) == 1.0
    assert flip_bound(10**6, False) == 1.0  # the site already flips


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.95", None, float("nan")])
def test_confidence_is_validated(bad):
    with pytest.raises(ConfigError, match="confidence="):
        flip_bound(10, True, bad)
    s = egp_fast.measure_entropy(_const_net(), [torch.randn(2, 3, 4, 4)], progress=False).sites["1"]
    with pytest.raises(ConfigError, match="confidence="):
        s.flip_bound(bad)


def test_samples_needed_is_the_smallest_sufficient_n():
    for max_flip in (0.5, 0.1, 0.01, 0.001):
        n = samples_needed(max_flip)
        assert flip_bound(n, True) <= max_flip < flip_bound(n - 1, True) if n > 1 else True
    assert samples_needed(0.01) == 299


# --------------------------------------------------------------------------------------------
# samples


def test_samples_count_inputs_not_positions():
    net = _const_net()
    stats = egp_fast.measure_entropy(net, [torch.randn(5, 3, 4, 4), torch.randn(3, 3, 4, 4)], progress=False)
    s = stats.sites["1"]
    assert s.samples == 8 and stats.samples == 8
    assert s.observations == 8 * 16  # positions are observations, not samples
    assert s.collapsible
    assert s.flip_bound() == pytest.approx(1 - 0.05 ** (1 / 8))
    d = s.to_dict()
    assert d["samples"] == 8 and d["flip_bound_95"] == pytest.approx(s.flip_bound())
    assert stats.to_dict()["samples"] == 8 and stats.to_dict()["stopped_early"] is False


def test_flip_bound_is_invariant_to_batch_size():
    net = _const_net()
    x = torch.randn(16, 3, 4, 4)
    by1 = egp_fast.measure_entropy(net, list(x.split(1)), progress=False).sites["1"]
    by8 = egp_fast.measure_entropy(net, list(x.split(8)), progress=False).sites["1"]
    assert by1.samples == by8.samples == 16
    assert by1.flip_bound() == by8.flip_bound() == flip_bound(16, True)


def test_samples_of_dict_and_tuple_batches():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.act = nn.ReLU()

        def forward(self, pixel_values):
            return self.act(self.fc(pixel_values))

    x = torch.randn(6, 2)
    d = egp_fast.measure_entropy(KW(), [{"pixel_values": x, "labels": torch.zeros(6)}], progress=False)
    t = egp_fast.measure_entropy(KW(), [(x, torch.zeros(6))] * 2, progress=False)
    assert d.sites["act"].samples == 6 and t.sites["act"].samples == 12


def test_nonzero_entropy_site_bound_is_one():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
    s = egp_fast.measure_entropy(net, [torch.randn(64, 3)], progress=False).sites["1"]
    assert not s.collapsible and s.flip_bound() == 1.0


# --------------------------------------------------------------------------------------------
# stop="decided"




def test_stop_decided_stops_early_on_an_easy_model():
    net = TwoSites()
    data = gaussian_batches(20, 64)
    full = egp_fast.measure_entropy(net, data, progress=False)
    early = egp_fast.measure_entropy(net, data, progress=False, stop="decided")
    assert early.stopped_early and not full.stopped_early
    # site `a` needs 299 samples for a 1% bound at 95%: 5 batches of 64
    assert early.batches == 5 and early.samples == 320 and full.batches == 20
    assert early.zero_entropy_sites() == full.zero_entropy_sites() == ["a"]
    assert early.sites["a"].flip_bound() <= 0.01
    assert abs(early.sites["b"].entropy - full.sites["b"].entropy) <= 0.02


def test_stop_decided_runs_the_whole_pass_when_evidence_stays_short():
    net = TwoSites()
    few = egp_fast.measure_entropy(net, gaussian_batches(5, 4), progress=False, stop="decided")
    assert not few.stopped_early and few.batches == 5  # 20 samples: bound 14%, undecided
    # a loose max_flip decides it: 1 - 0.05 ** (1/8) = 31% at 2 batches of 4
    loose = egp_fast.measure_entropy(net, gaussian_batches(5, 4), progress=False, stop="decided", max_flip=0.35, tol=1.0)
    assert loose.stopped_early and loose.batches == 2
    # an entropy tolerance nothing can meet keeps it going too
    tight = egp_fast.measure_entropy(net, gaussian_batches(20, 64), progress=False, stop="decided", tol=1e-9)
    assert not tight.stopped_early and tight.batches == 20


def test_stop_decided_waits_for_unstable_entropies():
    # Site b's channels: the first batches see one distribution, later ones another, so the
    # jackknife spread stays large until many batches are in.
    net = TwoSites()
    data = [x * (3.0 if i % 2 else 0.2) + (2.0 if i % 3 == 0 else -2.0) for i, x in enumerate(gaussian_batches(12, 16))]
    r = egp_fast.measure_entropy(net, data, progress=False, stop="decided", max_flip=0.5, tol=0.005)
    assert not r.stopped_early


def test_stop_decided_in_paper_mode():
    net = TwoSites()
    data = gaussian_batches(20, 64)
    early = egp_fast.measure_entropy(net, data, progress=False, stop="decided", mode="paper")
    assert early.stopped_early and early.batches == 5 and early.zero_entropy_sites() == ["a"]


def test_stop_decided_respects_min_and_max_batches():
    net = TwoSites()
    data = gaussian_batches(20, 64)
    r = egp_fast.measure_entropy(net, data, progress=False, stop="decided", min_batches=9)
    assert r.stopped_early and r.batches == 9
    r = egp_fast.measure_entropy(net, data, progress=False, stop="decided", max_batches=3)
    assert not r.stopped_early and r.batches == 3


def test_stop_decided_with_multi_piece_sites():
    # ReLU6 site: channel 0 always in the middle piece (zero entropy), channel 1 moving.
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU6())
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.01, 0.0], [0.0, 5.0]]))
        net[0].bias.copy_(torch.tensor([3.0, 0.0]))
    data = gaussian_batches(20, 64)
    data = [x[:, :2] for x in data]
    full = egp_fast.measure_entropy(net, data, progress=False)
    early = egp_fast.measure_entropy(net, data, progress=False, stop="decided", tol=0.05)
    assert early.stopped_early and early.batches < full.batches
    # tol is a 95% interval of the early estimate, not a hard bound: allow twice it
    assert abs(early.sites["1"].entropy - full.sites["1"].entropy) <= 2 * 0.05
    assert early.sites["1"].piece[0] == full.sites["1"].piece[0] == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stop": "soon"}, "stop="),
        ({"stop": "decided", "max_flip": 0.0}, "max_flip="),
        ({"stop": "decided", "max_flip": 1.5}, "max_flip="),
        ({"stop": "decided", "confidence": 1.0}, "confidence="),
        ({"stop": "decided", "tol": 0}, "tol="),
        ({"stop": "decided", "tol": float("inf")}, "tol="),
        ({"stop": "decided", "min_batches": 0}, "min_batches="),
        ({"stop": "decided", "min_batches": 2.5}, "min_batches="),
    ],
)
def test_stop_arguments_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        egp_fast.measure_entropy(TwoSites(), gaussian_batches(2, 4), progress=False, **kwargs)


# --------------------------------------------------------------------------------------------
# track_entropy


def _mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def test_tracking_training_forwards_equals_an_eval_pass_when_nothing_changes():
    # No BatchNorm, no dropout, lr = 0: a train-mode forward computes what an eval one does.
    net = _mlp()
    data = gaussian_batches(4, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    with track_entropy(net) as tracker:
        for x in data:
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        tracked = tracker.stats()
    ref = egp_fast.measure_entropy(net, data, progress=False)
    assert tracker.batches == 4 and tracked.batches == 4 and tracked.samples == 32
    assert list(tracked.sites) == list(ref.sites) == ["1", "3"]
    for name in ref.sites:
        assert tracked.sites[name].on_counts.tolist() == ref.sites[name].on_counts.tolist()
        assert tracked.sites[name].samples == ref.sites[name].samples == 32
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_tracking_leaves_the_training_step_unchanged():
    torch.manual_seed(1)
    a = _mlp()
    b = _mlp()
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    a(x).square().mean().backward()
    with track_entropy(b):
        b(x).square().mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_eval_forwards_are_not_counted_by_default():
    net = _mlp()
    with track_entropy(net) as tracker:
        net.eval()
        with torch.no_grad():
            net(torch.randn(4, 4))
        net.train()
        net(torch.randn(4, 4))
        assert tracker.batches == 1
    with track_entropy(net, training_only=False) as tracker:
        net.eval()
        net(torch.randn(4, 4))
        assert tracker.batches == 1


def test_tracker_removes_hooks_on_exceptions_and_reports_no_forward():
    net = _mlp()
    with pytest.raises(ZeroDivisionError):
        with track_entropy(net, example_inputs=torch.randn(2, 4)):
            raise ZeroDivisionError
    assert all(not m._forward_pre_hooks for m in net.modules())
    with track_entropy(net, example_inputs=torch.randn(2, 4)) as tracker:
        with pytest.raises(DataError, match="no forward"):
            tracker.stats()


def test_tracker_names_functional_sites_it_cannot_see():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(6, 6)

        def forward(self, x):
            return F.relu(self.fc2(self.act(self.fc1(x))))

    net = Mixed()
    with pytest.warns(UserWarning, match="functional"):
        with track_entropy(net) as tracker:
            net(torch.randn(8, 4))
    stats = tracker.stats()
    assert list(stats.sites) == ["act"] and stats.unmeasured == ["relu"]
    assert stats.to_dict()["unmeasured"] == ["relu"]


def test_tracker_with_a_pruner_graph_and_paper_mode():
    net = _mlp()
    graph = egp_fast.discover_sites(net, torch.randn(2, 4))
    data = gaussian_batches(3, 8)
    with track_entropy(net, graph=graph, mode="paper") as tracker:
        for x in data:
            net(x)
    s = tracker.stats()
    assert s.mode == "paper" and s.batches == 3
    # No BatchNorm, no dropout, no step: the tracked training forwards are an eval pass, so the
    # per-batch (paper) entropies must be measure_entropy's in paper mode, not the exact ones.
    ref = egp_fast.measure_entropy(net, data, mode="paper", progress=False)
    exact = egp_fast.measure_entropy(net, data, mode="exact", progress=False)
    assert list(s.sites) == list(ref.sites) == ["1", "3"]
    for name in ref.sites:
        assert s.sites[name].entropy == pytest.approx(ref.sites[name].entropy, abs=1e-6)
    # the two modes differ on these batches, so the comparison above tells them apart
    assert any(abs(ref.sites[n].entropy - exact.sites[n].entropy) > 1e-3 for n in ref.sites)
    with pytest.raises(ConfigError, match="mode="):
        with track_entropy(net, mode="bogus"):
            pass


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


def test_math_helpers_agree_with_math():
    assert math.isclose(flip_bound(3, True, 0.9), 1 - 0.1 ** (1 / 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flip_bound(1, True) == pytest.approx(0.95)


def test_decided_on_the_last_batch_is_not_early():
    r = egp_fast.measure_entropy(TwoSites(), gaussian_batches(5, 64), progress=False, stop="decided")
    assert r.batches == 5 and not r.stopped_early
