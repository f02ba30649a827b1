"""How sure a measurement is (issue 13): flip bounds, stop="decided" on the entropies, and the
plan rule that waits for the decision they feed (measure_entropy(plan=...), Pruner.measure)."""

from __future__ import annotations

import math
import os
import random
import warnings

import pytest
import torch
import torch.nn as nn
from _models import TwoSites, gaussian_batches, spawn_two_ranks

import egp_fast
from egp_fast.pruning.budget import allocate, allocation_shares, round_shares
from egp_fast.errors import ConfigError
from egp_fast.measurement import flip_bound, samples_needed
from egp_fast.measurement.decide import JACKKNIFE_GROUPS, PLAN_SLACK, T_975


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )


def _within(early: dict, full: dict, plan_tol: float) -> bool:
    """The plan rule's promise: each amount within plan_tol of the full pass's, plus one weight."""
    return all(abs(early.get(k, 0) - v) <= plan_tol * v + 1 for k, v in full.items())


# --------------------------------------------------------------------------------------------
# flip_bound


@pytest.mark.parametrize("n", [1, 2, 8, 100, 1437, 10**6])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_flip_bound_is_the_exact_binomial_bound(n, confidence):
    q = flip_bound(n, confidence)
    # No event in n draws has probability (1 - q) ** n: the bound is where it equals 1 - c.
    assert (1 - q) ** n == pytest.approx(1 - confidence, rel=1e-9)
    # Clopper-Pearson's upper limit for 0 events is the Beta(1, n) quantile.
    scipy_stats = pytest.importorskip("scipy.stats")
    assert q == pytest.approx(float(scipy_stats.beta.ppf(confidence, 1, n)), rel=1e-7)


def test_flip_bound_examples_from_the_docs():
    assert flip_bound(8) == pytest.approx(0.3123, abs=1e-4)
    assert flip_bound(1437) == pytest.approx(0.002083, abs=1e-6)
    assert flip_bound(1000) == pytest.approx(3 / 1000, rel=0.01)  # the "3 / n" rule


def test_flip_bound_is_never_zero_and_is_one_without_evidence():
    for n in (10**9, 10**15, 10**30):
        assert flip_bound(n) > 0.0
    assert flip_bound(0) == 1.0  # no evidence


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.95", None, float("nan")])
def test_flip_bound_validates_confidence(bad):
    with pytest.raises(ConfigError, match="confidence="):
        flip_bound(10, bad)
    with pytest.raises(ConfigError, match="confidence="):
        flip_bound(0, bad)  # also where the bound is 1.0 anyway


def test_samples_needed_is_the_smallest_sufficient_n():
    for max_flip in (0.5, 0.1, 0.01, 0.001):
        n = samples_needed(max_flip)
        assert flip_bound(n) <= max_flip < flip_bound(n - 1) if n > 1 else True
    assert samples_needed(0.01) == 299


def test_math_helpers_agree_with_math():
    assert math.isclose(flip_bound(3, 0.9), 1 - 0.1 ** (1 / 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flip_bound(1) == pytest.approx(0.95)


# --------------------------------------------------------------------------------------------
# stop="decided" on the entropies


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


def test_decided_on_the_last_batch_is_not_early():
    r = egp_fast.measure_entropy(TwoSites(), gaussian_batches(5, 64), progress=False, stop="decided")
    assert r.batches == 5 and not r.stopped_early


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
# measure_entropy(plan=...)


def test_a_sensitive_plan_waits_for_more_batches_than_the_entropies():
    # amount = 1000 * H_b: 1% of it needs H_b within ~0.005 bits, tol=0.02 asks for 0.02 bits.
    net = TwoSites()
    data = gaussian_batches(60, 16)
    full = egp_fast.measure_entropy(net, data, progress=False)
    calls = []

    def plan(entropy, constant):
        calls.append((list(entropy), list(constant)))
        return {"b": 1000.0 * entropy[1]}

    loose = egp_fast.measure_entropy(net, data, progress=False, stop="decided", max_flip=0.05)
    early = egp_fast.measure_entropy(net, data, progress=False, stop="decided", max_flip=0.05, plan=plan)
    assert loose.stopped_early and early.stopped_early
    assert early.batches > loose.batches
    assert (
        abs(1000 * early.sites["b"].entropy - 1000 * full.sites["b"].entropy)
        <= 0.01 * 1000 * full.sites["b"].entropy
    )
    # the callback saw one list entry per site, in site order, and the zero-entropy flags
    assert calls and all(len(e) == 2 and c[0] is True and c[1] is False for e, c in calls)
    # its first row is the estimate from all batches so far: at the stop, the returned entropy
    last_full_row = calls[-min(early.batches, JACKKNIFE_GROUPS) - 1][0]
    assert last_full_row[1] == pytest.approx(early.sites["b"].entropy, abs=1e-12)
    assert last_full_row[0] == 0.0


def test_plan_none_or_plan_tol_none_is_the_entropy_rule():
    net = TwoSites()
    data = gaussian_batches(20, 64)
    base = egp_fast.measure_entropy(net, data, progress=False, stop="decided")
    off = egp_fast.measure_entropy(
        net, data, progress=False, stop="decided", plan=lambda e, c: {"x": 1e9 * e[1]}, plan_tol=None
    )
    assert base.batches == off.batches == 5 and base.stopped_early and off.stopped_early


def test_an_unstable_choice_keeps_the_pass_going():
    # A 0/1 choice that flips with the 5th decimal of H_b: leaving out any one group of batches
    # moves H_b by more than that, so the leave-one-group-out choices never all agree.
    net = TwoSites()
    data = gaussian_batches(20, 64)

    def choice(entropy, constant):
        return {"pick": float(int(entropy[1] * 1e5) % 2)}

    r = egp_fast.measure_entropy(net, iter(data), progress=False, stop="decided", plan=choice)
    assert not r.stopped_early and r.batches == 20
    # a choice that does not depend on the entropies is known at once
    r = egp_fast.measure_entropy(
        net, iter(data), progress=False, stop="decided", plan=lambda e, c: {"pick": 1.0}
    )
    assert r.stopped_early and r.batches == 5


def test_finite_population_factor_stops_before_the_end_only_when_the_length_is_known():
    # An amount that needs H_b to ~1e-4 bits: no sample of 30 batches pins that down, but the
    # plan of the whole pass is what the early plan is compared with, and after n of N batches
    # only the other N - n can still move it: se * sqrt(1 - n / N).
    net = TwoSites()
    data = gaussian_batches(30, 16)

    def plan(entropy, constant):
        return {"b": 200.0 * (entropy[1] - 0.98)}

    with_len = egp_fast.measure_entropy(net, data, progress=False, stop="decided", max_flip=0.05, plan=plan)
    no_len = egp_fast.measure_entropy(
        net, iter(data), progress=False, stop="decided", max_flip=0.05, plan=plan
    )
    assert not no_len.stopped_early and no_len.batches == 30
    assert with_len.stopped_early and 20 <= with_len.batches < 30
    full = egp_fast.measure_entropy(net, data, progress=False)
    assert (
        abs(plan([0, with_len.sites["b"].entropy], [])["b"] - plan([0, full.sites["b"].entropy], [])["b"])
        <= 1
    )


def test_plan_rule_in_paper_mode():
    net = TwoSites()
    data = gaussian_batches(60, 16)
    full = egp_fast.measure_entropy(net, data, progress=False, mode="paper")
    seen = []

    def plan(entropy, constant):
        seen.append(entropy[1])
        return {"b": 1000.0 * entropy[1]}

    loose = egp_fast.measure_entropy(net, data, progress=False, mode="paper", stop="decided", max_flip=0.05)
    early = egp_fast.measure_entropy(
        net, data, progress=False, mode="paper", stop="decided", max_flip=0.05, plan=plan
    )
    assert early.batches >= loose.batches and early.stopped_early
    # the rows are paper-mode values: the first row at the stop is the returned paper entropy
    assert seen[-min(early.batches, JACKKNIFE_GROUPS) - 1] == pytest.approx(
        early.sites["b"].entropy, abs=1e-12
    )
    assert abs(early.sites["b"].entropy - full.sites["b"].entropy) <= 0.01 * full.sites["b"].entropy + 1e-3


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, True, "0.01", float("nan")])
def test_plan_tol_is_validated(bad):
    with pytest.raises(ConfigError, match="plan_tol="):
        egp_fast.measure_entropy(
            TwoSites(), gaussian_batches(2, 4), progress=False, stop="decided", plan=lambda e, c: {}, plan_tol=bad
        )
    pruner = egp_fast.Pruner(_mlp(), torch.randn(4, 8), progress=False)
    with pytest.raises(ConfigError, match="plan_tol="):
        pruner.measure(gaussian_batches(2, 4, features=8), plan_tol=bad)  # also without stop=


def test_plan_must_be_callable():
    with pytest.raises(ConfigError, match="plan must be a callable plan"):
        egp_fast.measure_entropy(TwoSites(), gaussian_batches(2, 4), progress=False, stop="decided", plan={"a": 1})


def test_t_quantiles_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    assert len(T_975) == JACKKNIFE_GROUPS - 1
    for df, t in enumerate(T_975, start=1):
        assert t == pytest.approx(float(scipy_stats.t.ppf(0.975, df)), abs=1e-6)


# --------------------------------------------------------------------------------------------
# Pruner.measure(stop="decided"): the plan of the method


def test_egp_waits_until_the_plan_is_known_and_ends_within_plan_tol():
    # Small batches: the entropies alone look known after 2 batches, but EGP's split of the
    # budget between the first two layers is still far from the whole pass's.
    data = gaussian_batches(100, 32, seed=1, features=8)
    pruner = egp_fast.Pruner(_mlp(), data[0], progress=False)
    full = pruner.measure(data)
    plan_full = pruner.plan(full)
    loose = pruner.measure(data, stop="decided", tol=0.05, plan_tol=None)
    assert not _within(pruner.plan(loose), plan_full, 0.01)  # the entropy rule alone misses it
    early = pruner.measure(data, stop="decided", tol=0.05, plan_tol=0.01)
    assert loose.batches < early.batches < full.batches and early.stopped_early
    assert _within(pruner.plan(early), plan_full, 0.01)


def _row(stats):
    sites = list(stats.sites.values())
    return [s.entropy for s in sites], [s.collapsible for s in sites]


def test_egp_plan_rule_is_the_unrounded_plan():
    data = gaussian_batches(8, 32, seed=2, features=8)
    pruner = egp_fast.Pruner(_mlp(), data[0], progress=False)
    pruner.apply(pruner.plan(pruner.measure(data)))  # some masks, so remaining differs by layer
    stats = pruner.measure(data)
    shares = pruner.plan_rule()(*_row(stats))
    plan = pruner.plan(stats)
    assert {k: math.floor(v) for k, v in shares.items()} == plan
    assert sum(shares.values()) == pytest.approx(0.5 * sum(pruner._remaining().values()))


def test_easier_plan_rule_is_its_choice():
    net = _mlp()
    with torch.no_grad():
        net[2].bias.fill_(100.0)  # site "3" always ON: removed as zero entropy
    data = gaussian_batches(8, 32, seed=3, features=8)
    pruner = egp_fast.Pruner(net, data[0], method="easier", progress=False)
    stats = pruner.measure(data)
    chosen = {k for k, v in pruner.plan_rule()(*_row(stats)).items() if v}
    assert chosen == set(pruner.plan(stats)) and "3" in chosen and len(chosen) == 2
    early = pruner.measure(data * 8, stop="decided", max_flip=0.05)
    assert pruner.plan(early) == pruner.plan(stats)


def test_imp_has_no_plan_rule():
    data = gaussian_batches(20, 64, seed=4, features=8)
    pruner = egp_fast.Pruner(_mlp(), data[0], method="imp", progress=False)
    assert pruner.plan_rule() is None
    a = pruner.measure(data, stop="decided")
    b = egp_fast.measure_entropy(pruner.model, data, progress=False, stop="decided", graph=pruner.graph)
    assert a.batches == b.batches


def test_prune_with_measure_stop_uses_the_plan_rule():
    data = gaussian_batches(100, 32, seed=1, features=8)
    ref = egp_fast.Pruner(_mlp(), data[0], progress=False)
    plan_full = ref.plan(ref.measure(data))
    result = egp_fast.prune(_mlp(), data, iterations=1, measure_stop="decided", progress=False)
    rec = result.rounds[0]
    assert _within({r["name"]: r["pruned"] for r in rec.layers}, plan_full, 0.01)
    assert rec.stats["batches"] < 100


# --------------------------------------------------------------------------------------------
# The shares behind the plan


def test_allocation_shares_round_down_to_allocate():
    rng = random.Random(0)
    for _ in range(300):
        names = [f"l{i}" for i in range(rng.randint(1, 30))]
        ent = {k: rng.choice([0.0, rng.random(), 1e-200]) for k in names}
        mag = {k: rng.choice([rng.random(), 1e-200]) for k in names}
        rem = {k: rng.choice([0, 1, 9, rng.randint(1, 10**6)]) for k in names}
        budget = rng.uniform(0, 1.2) * sum(rem.values())
        shares = allocation_shares(ent, mag, rem, budget)
        assert {k: min(math.floor(v), rem[k]) for k, v in shares.items()} == allocate(ent, mag, rem, budget)
        assert all(0 <= v <= rem[k] for k, v in shares.items())
    step_shares = round_shares(
        {"a": 0.2, "b": 0.9, "c": 0.0}, dict.fromkeys("abc", 1.0), dict.fromkeys("abc", 100), 0.5
    )
    assert step_shares["c"] == 0.0 and sum(step_shares.values()) == pytest.approx(100.0)  # 0.5 * (a + b)


def test_amounts_below_one_weight_are_decided_by_the_slack():
    # 1% of 0.4 weights is nothing any sample can pin down; within PLAN_SLACK (half a weight)
    # the amount rounds down at most one weight away, which is all a plan of integers can ask.
    net = TwoSites()
    data = gaussian_batches(20, 64)
    base = egp_fast.measure_entropy(net, data, progress=False, stop="decided")
    tiny = egp_fast.measure_entropy(
        net, data, progress=False, stop="decided", plan=lambda e, c: {"t": 0.4 * e[1]}
    )
    assert PLAN_SLACK == 0.5 and tiny.batches == base.batches == 5


# --------------------------------------------------------------------------------------------
# DDP: the callback sees counts summed over ranks; every rank stops at the same batch.


@torch.no_grad()
def _local_entropy_b(net, batches):
    """Site b's layer entropy from these batches, computed by hand (no all_reduce)."""
    z = torch.cat([net.fb(net.a(net.fa(x)) - 50.0 + x[:, :3]) for x in batches])
    p = (z > 0).double().mean(0)
    moving = (p > 0) & (p < 1)
    q = p[moving]
    return float((-(q * q.log2()) - (1 - q) * (1 - q).log2()).mean())


def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = TwoSites()
        data = gaussian_batches(60, 16)[rank::world]
        rows = []

        def plan(entropy, constant):
            rows.append(entropy[1])
            return {"b": 1000.0 * entropy[1]}

        early = egp_fast.measure_entropy(net, data, progress=False, stop="decided", max_flip=0.05, plan=plan)
        local = _local_entropy_b(net, data[: early.batches // world])  # this rank's batches alone
        out = [None] * world
        row = rows[-min(early.batches // world, JACKKNIFE_GROUPS) - 1]
        dist.all_gather_object(out, (early.batches, early.sites["b"].entropy, row, local))
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_plan_callback_gets_reduced_numbers(tmp_path):
    (b0, h0, row0, local0), (b1, h1, row1, local1) = spawn_two_ranks(_ddp_worker, str(tmp_path / "ddp.pt"))
    assert b0 == b1 and h0 == h1  # same stop and same statistics on both ranks
    # the callback's full-data row is the entropy of both ranks' counts, not of one rank's
    assert row0 == row1 == pytest.approx(h0, abs=1e-12)
    assert local0 != pytest.approx(h0, abs=1e-9) and local1 != pytest.approx(h0, abs=1e-9)
