"""method="easier": which sites go, in which order, and which model comes back.

The test model has parallel branches ``relu_i(x_0 + b_i)`` whose entropies the biases set
exactly (``p_on = P(x_0 > -b_i)``), so the order EASIER must follow is known in advance.
"""

import json

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.folding.affine import ChannelAffine
from egp_fast.pruning import within_tolerance
from egp_fast.pruning.methods.easier import choose_sites, pick_sites
from egp_fast.errors import ConfigError, NumericsError


class Branches(nn.Module):
    """``head(sum_i act_i(fc_i(x)))`` with ``fc_i(x)[c] = x_0 + bias[i][c]``."""

    def __init__(self, biases, width=4):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(3, width) for _ in biases)
        self.acts = nn.ModuleList(nn.ReLU() for _ in biases)
        self.head = nn.Linear(width, 2)
        with torch.no_grad():
            for fc, b in zip(self.fcs, biases):
                fc.weight.zero_()
                fc.weight[:, 0] = 1.0
                fc.bias.copy_(torch.as_tensor(b, dtype=torch.float32).expand(width))

    def forward(self, x):
        out = 0
        for fc, act in zip(self.fcs, self.acts):
            out = out + act(fc(x))
        return self.head(out)


def _data(n=512, batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=g) for _ in range(batches)]


def _stats(model, data):
    return egp_fast.measure_entropy(model, data, progress=False)


def _removed(model):
    return [n for n, m in model.named_modules() if isinstance(m, ChannelAffine)]


def test_lowest_entropy_site_is_chosen():
    # p_on ~ 0.5, 0.98, 0.84, 0.5: entropies ~1.0, 0.15, 0.63, 1.0
    model = Branches([0.0, 2.0, 1.0, 0.0])
    assert choose_sites(_stats(model, _data())) == ["acts.1"]


def test_ties_go_to_the_first_site_in_execution_order():
    model = Branches([1.5, 0.0, 1.5])  # acts.0 and acts.2 have exactly the same entropy
    st = _stats(model, _data())
    assert st.sites["acts.0"].entropy == st.sites["acts.2"].entropy < st.sites["acts.1"].entropy
    assert choose_sites(st) == ["acts.0"]
    res = egp_fast.prune(model, _data(), method="easier", evaluate=lambda m: 0.5, iterations=2, progress=False)
    assert [r.removed_sites for r in res.rounds] == [["acts.0"], ["acts.2"]]


def test_pick_sites_on_bare_lists():
    # what choose_sites and the plan rule both call: constant sites, then the first lowest live one
    assert pick_sites(["a", "b", "c"], [0.5, 0.2, 0.2], [False, False, False]) == ["b"]
    assert pick_sites(["a", "b", "c"], [0.0, 0.9, 0.0], [True, False, True]) == ["a", "b", "c"]
    assert pick_sites(["a", "b"], [0.0, 0.0], [True, True]) == ["a", "b"]
    assert pick_sites([], [], []) == []


def test_zero_entropy_sites_are_taken_together_with_the_lowest_live_one():
    model = Branches([0.0, 100.0, 1.0, -100.0])  # acts.1 always ON, acts.3 always OFF
    x = _data()
    st = _stats(model, x)
    assert st.zero_entropy_sites() == ["acts.1", "acts.3"]
    assert choose_sites(st) == ["acts.1", "acts.2", "acts.3"]
    pruner = egp_fast.Pruner(model, x[0], method="easier", progress=False)
    before = model(x[0])
    rec = pruner.round(x)
    assert rec.removed_sites == ["acts.1", "acts.2", "acts.3"] and rec.method == "easier"
    assert rec.layers == [] and rec.sparsity == 0.0 and rec.pruned == 0 and rec.sites_left == 1
    assert rec.zero_entropy_sites == ["acts.1", "acts.3"]
    # zero-entropy sites get their exact data map (acts.3 -> zero), the live one the identity
    a1, a2, a3 = model.acts[1], model.acts[2], model.acts[3]
    assert a1.exact and a1.how == "data" and a1.is_identity()
    assert a3.exact and a3.how == "data" and bool((a3.scale == 0).all())
    assert not a2.exact and a2.how == "identity" and a2.is_identity()
    # acts.2 (p_on ~0.84) changed; the exact ones did not: compare with the hand-made forward
    fc = model.fcs
    expect = model.head(torch.relu(fc[0](x[0])) + fc[1](x[0]) + fc[2](x[0]))
    assert torch.allclose(model(x[0]), expect, atol=1e-5) and not torch.allclose(model(x[0]), before)
    assert [s.name for s in pruner.graph] == ["acts.0"]


def test_tolerance_rolls_back_to_the_best_model_with_its_weights():
    model = Branches([0.0, 2.0, 1.0, 0.5])  # removal order: acts.1, acts.2, acts.3, acts.0
    x = _data()
    accuracies = iter([0.90, 0.899, 0.89, 0.85, 0.95])  # dense, then after rounds 0, 1, 2
    states = {}

    def finetune(m, i):
        with torch.no_grad():
            m.head.bias += i + 1.0  # a "fine-tune" that leaves a trace per round
        states[i] = {k: v.clone() for k, v in m.state_dict().items()}

    res = egp_fast.prune(model, x, method="easier", evaluate=lambda m: next(accuracies), max_drop=0.01,
                         finetune=finetune, iterations=4, progress=False)
    assert res.dense_accuracy == 0.90
    assert [r.accuracy for r in res.rounds] == [0.899, 0.89, 0.85]
    assert [r.kept for r in res.rounds] == [True, True, False]
    assert [r.removed_sites for r in res.rounds] == [["acts.1"], ["acts.2"], ["acts.3"]]
    assert res.best_round == 1 and res.removed_sites == ["acts.1", "acts.2"]
    # the model is the one after round 1: its structure and its fine-tuned weights
    assert _removed(model) == ["acts.1", "acts.2"] and isinstance(model.acts[3], nn.ReLU)
    now = model.state_dict()
    assert set(now) == set(states[1]) and all(torch.equal(now[k], states[1][k]) for k in now)
    assert list(res.stats.sites) == ["acts.0", "acts.3"]  # final stats describe the returned model
    json.dumps(res.to_dict())


def test_first_round_outside_tolerance_returns_the_dense_model():
    model = Branches([0.0, 2.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = iter([0.9, 0.5])
    res = egp_fast.prune(model, _data(), method="easier", evaluate=lambda m: next(acc), iterations=3,
                         progress=False)
    assert res.best_round == -1 and [r.kept for r in res.rounds] == [False]
    assert _removed(model) == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stops_when_no_site_is_left_and_collapses():
    model = Branches([0.0, 2.0, 1.0])
    x = _data()
    res = egp_fast.prune(model, x, method="easier", evaluate=lambda m: 1.0, iterations=9, collapse=True,
                         progress=False)
    assert [r.removed_sites for r in res.rounds] == [["acts.1"], ["acts.2"], ["acts.0"]]
    assert res.rounds[-1].sites_left == 0 and res.best_round == 2
    assert res.stats.sites == {}
    assert res.collapse.after["sites"] == 0
    model.eval()
    assert torch.allclose(res.model(x[0]), model(x[0]), atol=1e-5)


def test_majority_vs_identity_on_a_mixed_site():
    biases = [[2.0, 2.0, 2.0, 2.0], [0.3, -0.3, 1.0, -1.0]]  # acts.1 is mixed: ON, OFF, ON, OFF mostly
    x = _data(2048)
    outs = {}
    for how in ("identity", "majority"):
        model = Branches(biases)
        st = _stats(model, x)
        assert choose_sites(st) == ["acts.0"]  # lower entropy: removed first (all-ON mostly)
        res = egp_fast.prune(model, x, method="easier", evaluate=lambda m: 1.0, iterations=2,
                             linearization=how, progress=False)
        assert res.removed_sites == ["acts.0", "acts.1"]
        outs[how] = model.acts[1]
    assert outs["identity"].scale.tolist() == [1, 1, 1, 1]
    assert outs["majority"].scale.tolist() == [1, 0, 1, 0]
    assert all(not a.exact for a in outs.values())


def test_pruner_plan_and_apply_contract_for_easier():
    model = Branches([0.0, 2.0, 1.0])
    x = _data()
    p = egp_fast.Pruner(model, x[0], method="easier", progress=False)
    assert p.prunable == [] and egp_fast.masked_layers(model) == {}
    st = p.measure(x)
    plan = p.plan(st)
    assert plan == {"acts.1": 1}
    with pytest.raises(ConfigError, match="does not have"):
        p.apply({"acts.9": 1})
    with pytest.raises(ConfigError, match="must be 1"):
        p.apply({"acts.0": 5})
    assert p.apply({}) == [] and _removed(model) == []
    assert p.apply({"acts.0": 1, "acts.2": 1}) == ["acts.0", "acts.2"]  # an edited plan
    assert [s.name for s in p.graph] == ["acts.1"] and p.sites_left == 1


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({}, ConfigError, "needs evaluate"),
        ({"evaluate": lambda m: 0.9, "max_drop": -0.1}, ConfigError, "max_drop=-0.1"),
        ({"evaluate": lambda m: 0.9, "max_drop": float("inf")}, ConfigError, "finite"),
        ({"evaluate": lambda m: 0.9, "linearization": "zero"}, ConfigError, "linearization='zero'"),
        ({"evaluate": lambda m: 93.0}, ConfigError, r"\[0, 1\]"),
        ({"evaluate": lambda m: "good"}, ConfigError, "float"),
        ({"evaluate": lambda m: float("nan")}, NumericsError, "nan"),
        ({"evaluate": 3}, ConfigError, "evaluate must be a callable"),
    ],
)
def test_bad_easier_arguments(kwargs, err, match):
    model = Branches([0.0, 2.0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        egp_fast.prune(model, _data(), method="easier", progress=False, **kwargs)
    assert _removed(model) == [] and model.state_dict().keys() == before.keys()


def test_layers_and_max_drop_without_evaluate_are_refused():
    with pytest.raises(ConfigError, match="prunes no"):
        egp_fast.Pruner(Branches([0.0]), method="easier", layers=["head"])
    with pytest.raises(ConfigError, match="needs evaluate"):
        egp_fast.prune(Branches([0.0]), _data(), max_drop=0.01, progress=False)


def test_evaluate_and_tolerance_also_work_for_egp():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    acc = iter([0.9, 0.9, 0.7])
    res = egp_fast.prune(model, _data(), evaluate=lambda m: next(acc), max_drop=0.05, iterations=3,
                         progress=False)
    assert [r.kept for r in res.rounds] == [True, False] and res.best_round == 0
    assert egp_fast.sparsity(model) == pytest.approx(res.rounds[0].sparsity, abs=0.02)


def test_the_step_by_step_loop_of_docs_easier_md():
    model = Branches([0.0, 2.0, 1.0, 0.5])  # removal order: acts.1, acts.2, acts.3, acts.0
    x = _data()
    accuracies = iter([0.9, 0.9, 0.8])  # dense, after step 0, after step 1 (outside the tolerance)
    pruner = egp_fast.Pruner(model, x[0], method="easier", linearization="identity", progress=False)
    best = pruner.snapshot()
    dense = next(accuracies)
    for _ in range(17):
        plan = pruner.plan(pruner.measure(x))
        if not plan:
            break
        pruner.apply(plan)
        if not within_tolerance(next(accuracies), dense, 0.01):
            pruner.restore(best)
            break
        best.take(model)
    assert _removed(model) == ["acts.1"] and [s.name for s in pruner.graph] == ["acts.0", "acts.2", "acts.3"]
    out = egp_fast.collapse(model, pruner.measure(x), x[0][:2], measure_latency=False)
    assert out.after["sites"] == 3


class RootFunctional(nn.Module):
    """A functional ReLU in the root's own forward (cannot be rewritten in place) and a module one."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(self.act(self.fc1(x)))))


def test_sites_that_cannot_be_replaced_in_place_are_skipped_with_a_warning():
    torch.manual_seed(0)
    model = RootFunctional()
    x = _data()
    with pytest.warns(UserWarning, match="skips site relu.*egp_fast.trace"):
        res = egp_fast.prune(model, x, method="easier", evaluate=lambda m: 1.0, iterations=5, progress=False)
    assert res.removed_sites == ["act"] and res.rounds[-1].removed_sites == [] and len(res.rounds) == 2
    # the same model as a GraphModule: every site can go
    torch.manual_seed(0)
    gm = egp_fast.trace(RootFunctional())
    res = egp_fast.prune(gm, x, method="easier", evaluate=lambda m: 1.0, iterations=5, progress=False)
    assert sorted(res.removed_sites) == ["act", "relu"]
