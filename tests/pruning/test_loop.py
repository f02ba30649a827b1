"""prune(): whole rounds, stopping, restoring after failures, argument checks, collapse at the end."""

import pytest
import torch
import torch.nn as nn
import torchvision

import egp_fast
from egp_fast.errors import ConfigError, DataError, ModelError


def _data(n=2, shape=(8, 3, 32, 32)):
    return [(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long)) for _ in range(n)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resnet18_two_rounds_rising_sparsity():
    model = torchvision.models.resnet18(num_classes=10)
    calls = []
    res = egp_fast.prune(model, _data(), iterations=2, progress=False,
                         finetune=lambda m, i: calls.append(i))
    assert calls == [0, 1]
    assert [round(r.sparsity, 4) for r in res.rounds] == [0.5, 0.75]
    # EGP prunes producers only: the head and downsample convs stay dense
    assert (model.fc.weight != 0).all() and (model.layer2[0].downsample[0].weight != 0).all()
    assert "fc" not in egp_fast.masked_layers(model)
    rec = res.rounds[0]
    assert {layer["name"] for layer in rec.layers} == set(egp_fast.masked_layers(model))
    assert sum(layer["pruned"] for layer in rec.layers) == pytest.approx(
        0.5 * sum(layer["nonzero"] for layer in rec.layers), abs=len(rec.layers))
    d = res.to_dict()
    import json

    json.dumps(d)
    assert d["rounds"][1]["iteration"] == 1


class TokenMLP(nn.Module):
    """A ViT/Swin-style block: LayerNorm + GELU MLP on [N, L, C] tokens."""

    def __init__(self, c=16):
        super().__init__()
        self.embed = nn.Linear(4, c)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(c), "fc1": nn.Linear(c, 4 * c), "act": nn.GELU(),
                           "fc2": nn.Linear(4 * c, c)}) for _ in range(2)
        )
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = x + b["fc2"](b["act"](b["fc1"](b["norm"](x))))
        return self.head(x.mean(1))


def test_gelu_token_model_two_rounds():
    model = TokenMLP()
    res = egp_fast.prune(model, [torch.randn(4, 7, 4) for _ in range(2)], iterations=2, progress=False)
    # each layer's share is rounded down (docs/algorithm.md, "One pruning round", step 6), so a round may fall a weight or two short
    assert [r.sparsity for r in res.rounds] == [pytest.approx(0.5, abs=2e-3), pytest.approx(0.75, abs=2e-3)]
    assert set(egp_fast.masked_layers(model)) == {"blocks.0.fc1", "blocks.1.fc1"}


def test_imp_prunes_every_layer_globally():
    model = torchvision.models.resnet18(num_classes=10)
    res = egp_fast.prune(model, _data(1), iterations=1, method="imp", progress=False)
    assert res.rounds[0].sparsity == pytest.approx(0.5, abs=1e-6)
    assert "fc" in egp_fast.masked_layers(model)
    assert "layer2.0.downsample.0" in egp_fast.masked_layers(model)


def test_stops_early_when_nothing_is_eligible():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].bias.fill_(100.0)  # every channel always ON: the only site has zero entropy
    res = egp_fast.prune(model, [torch.randn(8, 3)], iterations=5, progress=False)
    assert len(res.rounds) == 1 and res.rounds[0].pruned == 0
    assert res.rounds[0].zero_entropy_sites == ["2"]


def test_failure_in_finetune_restores_model_exactly():
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    before = _state(model)

    def boom(m, i):
        raise RuntimeError("fine-tune crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        egp_fast.prune(model, _data(1), iterations=2, finetune=boom, progress=False)
    after = model.state_dict()
    assert set(after) == set(before)  # no mask buffers left
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    for p in model.parameters():
        assert not p._backward_hooks


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"step": 1.0}, ConfigError, "step=1.0"),
        ({"step": 0}, ConfigError, "strictly between 0 and 1"),
        ({"iterations": 0}, ConfigError, "iterations=0"),
        ({"method": "random"}, ConfigError, "method='random'"),
    ],
)
def test_bad_arguments_leave_model_untouched(kwargs, err, match):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    before = _state(model)
    with pytest.raises(err, match=match):
        egp_fast.prune(model, [torch.randn(2, 3)], progress=False, **kwargs)
    assert _state(model).keys() == before.keys()


def test_no_activation_empty_data_and_bad_batches():
    with pytest.raises(ModelError):
        egp_fast.prune(nn.Linear(3, 3), [torch.randn(2, 3)], progress=False)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(DataError, match="no batches"):
        egp_fast.prune(model, [], progress=False)
    with pytest.raises(DataError):
        egp_fast.prune(model, [torch.randn(2, 9)], progress=False)
    assert not egp_fast.masked_layers(model)


def test_masked_linear_swap_shares_parameters_and_keeps_masks():
    from egp_fast.masks.linear import MaskedLinear

    model = TokenMLP()
    fc1 = model.blocks[0]["fc1"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    res = egp_fast.prune(model, [torch.randn(4, 7, 4)], iterations=1, progress=False, masked_linear=True)
    new = model.blocks[0]["fc1"]
    assert isinstance(new, MaskedLinear) and new.weight is fc1.weight
    assert res.rounds[0].sparsity == pytest.approx(0.5, abs=2e-3)
    pruned = ~new.weight_mask
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 7, 4)).sum().backward()
        opt.step()
    assert (new.weight[pruned] == 0).all()


def test_linearize_between_rounds_and_collapse_at_the_end():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 4),
    )
    with torch.no_grad():
        model[4].bias.fill_(60.0)  # the second ReLU is always ON: zero entropy from the start
    data = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    res = egp_fast.prune(model, data, iterations=2, linearize=True, collapse=True, progress=False)
    assert res.rounds[0].zero_entropy_sites == ["5"]
    # after linearising, the second round no longer sees site "5"
    assert [s["name"] for s in res.rounds[1].stats["sites"]] == ["2"]
    assert res.collapse is not None and res.model is res.collapse.model
    assert res.collapse.after["sites"] == 1
    x = torch.randn(2, 3, 4, 4)
    model.eval()
    assert torch.allclose(res.model(x), model(x), atol=1e-4)


def test_prune_collapse_passes_the_evidence_threshold():
    # 16 samples give a flip bound of ~17%: the default max_flip=0.01 keeps the zero-entropy site,
    # max_flip=1.0 removes it. Breaking the pass-through makes one of the two fail.
    def net():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        with torch.no_grad():
            m[0].bias += 100.0
        return m

    data = [torch.randn(16, 4)]
    kept = egp_fast.prune(net(), data, iterations=1, collapse=True, progress=False)
    assert kept.collapse.removed_sites == []
    assert any("flip bound" in e.get("reason", "") for e in kept.collapse.left)
    gone = egp_fast.prune(net(), data, iterations=1, collapse=True, max_flip=1.0, progress=False)
    assert gone.collapse.removed_sites == ["1"]
    with pytest.raises(egp_fast.ConfigError, match="max_flip"):
        egp_fast.prune(net(), data, iterations=1, max_flip=0.0, progress=False)


def test_prune_confidence_sets_the_evidence_collapse_and_measure_stop_need():
    def net():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        with torch.no_grad():
            m[0].bias += 100.0  # site "1" is always ON
        return m

    # 16 samples: the flip bound is 17.1% at 95% confidence and 4.2% at 50%; max_flip is 10%.
    data = [torch.randn(16, 4)]
    kept = egp_fast.prune(net(), data, iterations=1, collapse=True, max_flip=0.1, progress=False)
    assert kept.collapse.removed_sites == [] and kept.collapse.weak_sites == ["1"]
    assert any("95% confidence" in e.get("reason", "") for e in kept.collapse.left)
    gone = egp_fast.prune(net(), data, iterations=1, collapse=True, max_flip=0.1, confidence=0.5, progress=False)
    assert gone.collapse.removed_sites == ["1"] and gone.collapse.weak_sites == []
    assert gone.config["confidence"] == 0.5
    # measure_stop="decided": the site is decided after 29 samples at 95% (8 batches of 4) and
    # after 7 samples at 50% (2 batches).
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 4, generator=g) for _ in range(12)]
    strict = egp_fast.prune(net(), batches, iterations=1, measure_stop="decided", max_flip=0.1, progress=False)
    lenient = egp_fast.prune(net(), batches, iterations=1, measure_stop="decided", max_flip=0.1, confidence=0.5,
                             progress=False)
    assert strict.rounds[0].stats["batches"] == 8 and strict.stats.batches == 8
    assert lenient.rounds[0].stats["batches"] == 2 and lenient.stats.batches == 2
    with pytest.raises(egp_fast.ConfigError, match="confidence"):
        egp_fast.prune(net(), data, iterations=1, confidence=1.0, progress=False)
