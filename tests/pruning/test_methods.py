"""Methods as plug-ins: the registry, the PruningMethod protocol, and each method's plan rule
(what measure(stop="decided") waits for) agreeing with its plan()."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from _models import gaussian_batches

import egp_fast
from egp_fast.errors import ConfigError
from egp_fast.pruning import (
    EasierMethod,
    EGPMethod,
    IMPMethod,
    MethodContext,
    PruningMethod,
    WeightMethod,
    available_methods,
    get_method,
    register_method,
    unregister_method,
)
from egp_fast.pruning.methods import layer_entropy


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 2))


def _row(stats):
    sites = list(stats.sites.values())
    return [s.entropy for s in sites], [s.collapsible for s in sites]


@pytest.fixture
def registered():
    """Names registered by a test, unregistered after it."""
    names: list[str] = []
    yield names
    for n in names:
        unregister_method(n)


class FirstLayerOnly(WeightMethod):
    """Prunes ``step`` of the first producer layer's remaining weights; entropies ignored."""

    name = "first-only"
    needs_entropy = False
    seen: list = []

    def __init__(self, **options):
        self.options = options

    def layers(self, model, graph):
        return graph.producer_layers()[:1]

    def plan(self, ctx, stats, remaining):
        FirstLayerOnly.seen.append(type(ctx))
        return {n: int(ctx.step * k) for n, k in remaining.items()}


class SiteCounter(PruningMethod):
    """Changes nothing: one round, then the loop stops (progressed is False)."""

    name = "nothing"
    prunes_weights = False

    def __init__(self, **options):
        pass

    def layers(self, model, graph):
        return []

    def plan(self, ctx, stats, remaining):
        return {}

    def apply(self, ctx, plan, stats):
        return []

    def progressed(self, record):
        return False


# --------------------------------------------------------------------------------------------
# The registry


def test_the_built_in_methods_are_registered():
    assert available_methods()[:3] == ["egp", "imp", "easier"]
    assert type(get_method("egp")) is EGPMethod and type(get_method("imp")) is IMPMethod
    easier = get_method("easier", linearization="majority")
    assert isinstance(easier, EasierMethod) and easier.linearization == "majority"
    assert get_method("egp") is not get_method("egp")  # a new instance per Pruner


def test_a_registered_method_runs_end_to_end_through_prune(registered):
    register_method("first-only", FirstLayerOnly)
    registered.append("first-only")
    assert "first-only" in available_methods()
    net = _mlp()
    data = gaussian_batches(2, 32, seed=1, features=8)
    res = egp_fast.prune(net, data, method="first-only", iterations=2, step=0.5, progress=False)
    assert [r.method for r in res.rounds] == ["first-only", "first-only"]
    assert list(egp_fast.masked_layers(net)) == ["0"]  # its layers() chose the masks
    assert [r.pruned for r in res.rounds] == [128, 64]
    assert int((net[0].weight == 0).sum()) == 192 and (net[2].weight != 0).all()
    assert set(FirstLayerOnly.seen) == {MethodContext}  # the method sees a context, not the Pruner
    assert res.config["method"] == "first-only"
    # needs_entropy=False: stop="decided" waits for the sites alone
    pruner = egp_fast.Pruner(_mlp(), data[0], method="first-only", progress=False)
    assert pruner.plan_rule() is None


def test_a_method_that_makes_no_progress_stops_the_loop(registered):
    register_method("nothing", SiteCounter)
    registered.append("nothing")
    res = egp_fast.prune(_mlp(), gaussian_batches(1, 16, features=8), method="nothing", iterations=4,
                         progress=False)
    assert len(res.rounds) == 1 and res.best_round == 0 and res.rounds[0].layers == []


def test_unknown_methods_are_refused_naming_the_known_ones(registered):
    with pytest.raises(ConfigError, match=r"method='magnitude' is not a pruning method; use 'egp' or 'imp' or 'easier'"):
        egp_fast.prune(_mlp(), gaussian_batches(1, 8, features=8), method="magnitude", progress=False)
    register_method("first-only", FirstLayerOnly)
    registered.append("first-only")
    with pytest.raises(ConfigError, match="'first-only'"):
        egp_fast.Pruner(_mlp(), method="nope")
    with pytest.raises(ConfigError, match="method=None"):
        get_method(None)


def test_registration_errors(registered):
    with pytest.raises(ConfigError, match="already registered"):
        register_method("egp", EGPMethod)
    with pytest.raises(ConfigError, match="callable"):
        register_method("x", 3)
    with pytest.raises(ConfigError, match="non-empty string"):
        register_method("", EGPMethod)
    register_method("bad", lambda **o: object())
    registered.append("bad")
    with pytest.raises(ConfigError, match="must return a PruningMethod"):
        egp_fast.Pruner(_mlp(), method="bad")
    register_method("bad", IMPMethod, replace=True)
    assert type(get_method("bad")) is IMPMethod
    unregister_method("bad")
    assert "bad" not in available_methods()


# --------------------------------------------------------------------------------------------
# Each method's plan rule is its plan()


def test_layer_entropy_is_the_measurements_layer_entropy():
    data = gaussian_batches(4, 32, seed=2, features=8)
    stats = egp_fast.measure_entropy(_mlp(), data, progress=False)
    sites = list(stats.sites.values())
    assert layer_entropy([s.producers for s in sites], [s.entropy for s in sites]) == stats.layer_entropy()


def test_egp_plan_is_its_rule_rounded_down():
    data = gaussian_batches(8, 32, seed=2, features=8)
    pruner = egp_fast.Pruner(_mlp(), data[0], progress=False)
    pruner.apply(pruner.plan(pruner.measure(data)))  # some masks, so remaining differs by layer
    for seed in (3, 4):
        stats = pruner.measure(gaussian_batches(4, 32, seed=seed, features=8))
        shares = pruner.plan_rule()(*_row(stats))
        assert {k: math.floor(v) for k, v in shares.items()} == pruner.plan(stats)


def test_easier_plan_is_its_rule():
    net = _mlp()
    with torch.no_grad():
        net[2].bias.fill_(100.0)  # site "3" always ON: removed as zero entropy
    data = gaussian_batches(8, 32, seed=3, features=8)
    pruner = egp_fast.Pruner(net, data[0], method="easier", progress=False)
    stats = pruner.measure(data)
    rule = pruner.plan_rule()(*_row(stats))
    assert set(rule) == set(stats.sites)
    assert {k for k, v in rule.items() if v == 1.0} == set(pruner.plan(stats)) == {"3", min(
        ("1", "5"), key=lambda n: stats.sites[n].entropy)}


def test_imp_plan_reads_no_entropy():
    data = gaussian_batches(4, 32, seed=4, features=8)
    pruner = egp_fast.Pruner(_mlp(), data[0], method="imp", progress=False)
    assert pruner.plan_rule() is None and not IMPMethod.needs_entropy
    a = pruner.plan(pruner.measure(data[:1]))
    b = pruner.plan(pruner.measure(data[1:]))
    assert a == b and sum(a.values()) == int(0.5 * sum(pruner._remaining().values()))
