"""Atomic rounds: a failure inside a round returns the model to the end of the last completed one.

The model state is compared in full (weights, masks, optimiser-visible parameters, hooks,
training flags, linearised modules) with a copy taken when the previous round ended.
"""

import pytest
import torch
import torch.nn as nn
from _models import FunctionalMLP, SmallNet

import egp_fast
from egp_fast.folding.affine import ChannelAffine
from egp_fast.errors import PruneInterrupted
from egp_fast.pruning.records import ModelSnapshot


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 4),
    )


def _data(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hooks(model):
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class _Trainer:
    """A real fine-tune (SGD with momentum, created before pruning); can be told to fail."""

    def __init__(self, model, data, fail_at=None, exc=KeyboardInterrupt):
        self.model, self.data, self.fail_at, self.exc = model, data, fail_at, exc
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        self.ends = {}

    def __call__(self, m, i):
        m.train()
        for x, y in self.data:
            self.opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            self.opt.step()
            if i == self.fail_at:
                raise self.exc("stop" if self.exc is not KeyboardInterrupt else None)
        self.ends[i] = (_state(m), _hooks(m), m.training)


def test_ctrl_c_in_the_third_finetune_keeps_rounds_one_and_two():
    model = _net()
    data = _data()
    trainer = _Trainer(model, data, fail_at=2)
    with pytest.raises(KeyboardInterrupt) as info:
        egp_fast.prune(model, data, iterations=4, finetune=trainer, progress=False)
    partial = info.value.result
    assert [r.iteration for r in partial.rounds] == [0, 1]
    assert [r.sparsity for r in partial.rounds] == [pytest.approx(0.5, abs=0.005), pytest.approx(0.75, abs=0.005)]
    assert partial.model is model and partial.stats is None and partial.best_round == 1
    state, hooks, training = trainer.ends[1]
    assert _same(_state(model), state)  # weights, BN statistics and masks of the end of round 2
    assert _hooks(model) == hooks and model.training == training
    masks = egp_fast.masked_layers(model)
    assert set(masks) == {"0", "3"}
    assert egp_fast.sparsity(model) == pytest.approx(0.75, abs=0.01)
    # the masks still hold through further training
    pruned = {n: ~m.weight_mask.clone() for n, m in masks.items()}
    trainer.fail_at = None
    trainer(model, 9)
    assert all((masks[n].weight[p] == 0).all() for n, p in pruned.items())


class _FlakyData:
    """Batches that raise on the ``fail_on``-th pass over them."""

    def __init__(self, data, fail_on):
        self.data, self.fail_on, self.passes = data, fail_on, 0

    def __iter__(self):
        self.passes += 1
        if self.passes == self.fail_on:
            raise RuntimeError("disk went away")
        return iter(self.data)


def test_exception_in_a_measurement_raises_prune_interrupted_with_the_rounds_done():
    model = _net()
    data = _FlakyData(_data(), fail_on=4)  # passes: example batch, round 0, round 1, round 2 <- fails
    trainer = _Trainer(model, _data())
    with pytest.raises(PruneInterrupted) as info:
        egp_fast.prune(model, data, iterations=4, finetune=trainer, progress=False)
    err = info.value
    assert isinstance(err.original, RuntimeError) and err.__cause__ is err.original
    assert "disk went away" in str(err) and "2 completed round(s)" in str(err)
    assert len(err.result.rounds) == 2 and err.result.rounds[1].stats["sites"]
    assert _same(_state(model), trainer.ends[1][0])
    assert isinstance(err, RuntimeError)  # existing `except RuntimeError` clauses still catch it


def test_failure_in_evaluate_keeps_the_linearised_sites_of_completed_easier_rounds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 2))
    data = [torch.randn(64, 4)]
    calls = []

    def evaluate(m):
        calls.append(1)
        if len(calls) == 3:  # dense, round 0, round 1 <- fails
            raise ValueError("validation loader broke")
        return 0.9

    with pytest.raises(PruneInterrupted) as info:
        egp_fast.prune(model, data, method="easier", evaluate=evaluate, iterations=3, progress=False)
    partial = info.value.result
    assert len(partial.rounds) == 1 and partial.dense_accuracy == 0.9
    removed = partial.rounds[0].removed_sites
    assert len(removed) == 1
    replaced = [n for n, m in model.named_modules() if isinstance(m, ChannelAffine)]
    assert replaced == removed  # round 1's removal is undone, round 0's kept
    assert sum(isinstance(m, nn.ReLU) for m in model) == 2


def test_failure_before_the_first_round_completes_restores_the_model_as_passed():
    model = _net()
    before, hooks = _state(model), _hooks(model)
    trainer = _Trainer(model, _data(), fail_at=0, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        egp_fast.prune(model, _data(), iterations=3, finetune=trainer, progress=False)
    assert not hasattr(info.value, "result")
    assert _same(_state(model), before) and _hooks(model) == hooks
    assert not egp_fast.masked_layers(model)


def test_snapshot_reuses_its_buffers_and_restores_a_root_graph_module():
    # a functional site in a root GraphModule is rewritten in the root's own graph, in place
    gm = egp_fast.trace(FunctionalMLP())
    snap = ModelSnapshot(gm)
    ptrs = [v.data_ptr() for _, v in snap.values]
    with torch.no_grad():
        gm.fc1.weight.add_(1.0)
    snap.take(gm)
    assert [v.data_ptr() for _, v in snap.values] == ptrs  # no new CPU copies
    x = torch.randn(16, 4)
    before, code = gm(x), gm.code
    stats = egp_fast.measure_entropy(gm, [x], progress=False)
    assert egp_fast.linearize(gm, stats, sites=list(stats.sites), how="identity") == list(stats.sites)
    assert gm.code != code
    with torch.no_grad():
        gm.fc1.weight.mul_(0.5)
    assert not torch.allclose(gm(x), before)
    snap.restore()
    assert gm.code == code and torch.equal(gm(x), before)


# --------------------------------------------------------------------------------------------
# Every stage of round 2 (of 3), as an error and as Ctrl-C, for every method: the model is the
# end of round 1, down to hooks, mask enforcement and training flags; round 1's record survives.


def _full_state(model):
    from egp_fast.masks import optim as masks_mod
    out = {}
    for name, m in model.named_modules():
        out[f"module:{name}"] = (type(m), m.training, list(m._forward_pre_hooks.items()),
                                 list(m._forward_hooks.items()), list(m._modules.items()),
                                 list(m._parameters.items()), list(m._buffers.items()))
    for name, p in model.named_parameters():
        out[f"param:{name}"] = (p.requires_grad, p in masks_mod._REGISTRY)
    out["values"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "values":
            assert a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
        else:
            assert a[k] == b[k], k


class _Boom(RuntimeError):
    pass


@pytest.mark.filterwarnings("ignore:method=.easier. skips site")
@pytest.mark.parametrize("exc", [_Boom("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
@pytest.mark.parametrize("stage", ["measure", "apply", "finetune", "evaluate", "final_measure", "collapse"])
@pytest.mark.parametrize("method", ["egp", "imp", "easier"])
def test_a_failure_in_round_two_keeps_round_one(method, stage, exc, monkeypatch):
    import sys

    pruner_mod = sys.modules["egp_fast.pruning.pruner"]  # Pruner.measure reads measure_entropy there
    methods = sys.modules["egp_fast.pruning.methods"]
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    net.block.bn2.eval()  # mixed flags come back per module
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(6, 3, 6, 6, generator=g) for _ in range(3)]
    ends = {}
    calls = {"measure": 0, "evaluate": 0}

    def finetune(m, i):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for x in data[:2]:
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        if stage == "finetune" and i == 1:
            raise exc
        ends[i] = _full_state(m)

    def evaluate(m):
        calls["evaluate"] += 1
        if stage == "evaluate" and calls["evaluate"] == 3:  # dense, round 1, round 2 <- fails
            raise exc
        return 0.5

    real_measure = pruner_mod.measure_entropy

    def measure(*a, **k):
        calls["measure"] += 1
        if (stage == "measure" and calls["measure"] == 2) or (stage == "final_measure" and calls["measure"] == 3):
            raise exc
        return real_measure(*a, **k)

    monkeypatch.setattr(pruner_mod, "measure_entropy", measure)
    if stage == "apply":
        target = methods.EasierMethod if method == "easier" else methods.WeightMethod
        real_apply = target.apply
        applied = {"n": 0}

        def apply(self, *a, **k):
            applied["n"] += 1
            if applied["n"] == 2:
                raise exc
            return real_apply(self, *a, **k)

        monkeypatch.setattr(target, "apply", apply)
    if stage == "collapse":
        def broken(*a, **k):
            raise exc

        monkeypatch.setattr(sys.modules["egp_fast.pruning.loop"], "collapse_model", broken)  # what prune() calls
    iterations = 2 if stage in ("final_measure", "collapse") else 3
    expected = PruneInterrupted if isinstance(exc, Exception) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        egp_fast.prune(net, data, method=method, iterations=iterations, finetune=finetune, evaluate=evaluate,
                       collapse=stage == "collapse", progress=False)
    monkeypatch.undo()
    partial = info.value.result
    done = 2 if stage in ("final_measure", "collapse") else 1
    assert len(partial.rounds) == done and partial.best_round == done - 1
    if isinstance(exc, Exception):
        assert info.value.original is exc and info.value.__cause__ is exc
    _assert_same_state(ends[done - 1], _full_state(net))
    # the model keeps working: one more round runs on it
    res = egp_fast.prune(net, data, method=method, iterations=1, evaluate=evaluate, progress=False)
    assert res.rounds[0].removed_sites if method == "easier" else res.rounds[0].pruned > 0


# --------------------------------------------------------------------------------------------
# Ctrl-C (or an error) while the end-of-round snapshot is being taken: the round had finished,
# the model is at its end and untouched; only the half-written snapshot must not be used.


@pytest.mark.parametrize("exc", [KeyboardInterrupt, _Boom], ids=["interrupt", "error"])
@pytest.mark.parametrize("at_round", [0, 1])
def test_interrupt_while_the_snapshot_is_taken_keeps_the_round_just_finished(at_round, exc, monkeypatch):
    import sys

    records = sys.modules["egp_fast.pruning.records"]
    torch.manual_seed(0)
    net = SmallNet()
    net.train()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(6, 3, 6, 6, generator=g) for _ in range(3)]
    ends = {}

    def finetune(m, i):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for x in data[:2]:
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        ends[i] = _full_state(m)

    real_take = records.ModelSnapshot.take
    takes = {"n": 0, "interrupted": False}

    def take(self, model):
        # take #1 is prune()'s snapshot of the model as passed; take #(2 + i) ends round i.
        takes["n"] += 1
        if takes["n"] != 2 + at_round:
            return real_take(self, model)
        real_modules = model.modules
        walks = {"n": 0}

        def modules():
            # take() walks the modules twice (structure, then values): stop half-way through
            # the values, so the snapshot holds a mix of the previous state and this one.
            walks["n"] += 1
            for j, m in enumerate(real_modules()):
                if walks["n"] == 2 and j == 6:
                    takes["interrupted"] = True
                    raise exc("injected") if exc is not KeyboardInterrupt else exc()
                yield m

        model.modules = modules  # an instance attribute hides the method during this take only
        try:
            return real_take(self, model)
        finally:
            del model.modules

    monkeypatch.setattr(records.ModelSnapshot, "take", take)
    expected = PruneInterrupted if exc is _Boom else KeyboardInterrupt
    with pytest.raises(expected) as info:
        egp_fast.prune(net, data, iterations=3, finetune=finetune, progress=False)
    monkeypatch.undo()
    assert takes["interrupted"]
    partial = info.value.result
    # the round that had just finished is kept: its record, and the model at its end
    assert [r.iteration for r in partial.rounds] == list(range(at_round + 1))
    assert partial.best_round == at_round and all(r.kept for r in partial.rounds)
    assert partial.model is net and partial.stats is None
    assert partial.rounds[-1].sparsity == pytest.approx(1 - 0.5 ** (at_round + 1), abs=0.01)
    if exc is _Boom:
        assert isinstance(info.value.original, _Boom) and info.value.__cause__ is info.value.original
    _assert_same_state(ends[at_round], _full_state(net))
    # the model keeps working: its masks hold and one more round prunes further
    res = egp_fast.prune(net, data, iterations=1, progress=False)
    assert res.rounds[0].pruned > 0
