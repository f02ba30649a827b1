"""Example inputs (egp_fast/graph/inputs.py): normalize_inputs, eval_mode, describe_inputs."""

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.errors import DataError
from egp_fast.graph import describe_inputs, eval_mode, normalize_inputs


def test_normalize_inputs_forms_and_label_keys():
    x = torch.randn(2, 3)
    assert normalize_inputs(x) == ((x,), {})
    assert normalize_inputs([x, 1]) == ((x, 1), {})
    args, kwargs = normalize_inputs({"input_ids": x, "labels": x, "y": x})
    assert args == () and list(kwargs) == ["input_ids"]  # labels are never model inputs
    with pytest.raises(DataError, match="example_inputs is None"):
        normalize_inputs(None)
    with pytest.raises(DataError, match="has type int"):
        normalize_inputs(3)


def test_eval_mode_restores_each_modules_flag():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    net.train()
    net[0].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules()) and not torch.is_grad_enabled()
    assert [m.training for m in net.modules()] == [True, False, True]


def test_describe_inputs():
    assert describe_inputs((torch.zeros(2, 3),), {"mask": None}) == "tensor[2, 3], mask=NoneType"
    assert describe_inputs((), {}) == "no inputs"


def test_a_model_input_named_like_a_label_key_gets_an_explanation():
    class XY(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(7, 4)

        def forward(self, x, y):
            return torch.relu(self.a(x)) + self.b(y)

    batch = {"x": torch.randn(2, 5), "y": torch.randn(2, 7)}
    with pytest.raises(DataError, match="'y' has a name egp_fast reserves for labels.*Wrap the model"):
        egp_fast.discover_sites(XY(), batch)
    assert len(egp_fast.discover_sites(XY(), (batch["x"], batch["y"]))) == 1  # positional: fine


def test_an_inputs_and_labels_batch_as_example_inputs_is_a_clear_error():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, labels = torch.randn(2, 3), torch.tensor([0, 1])
    for call in (lambda: egp_fast.discover_sites(net, (x, labels)),
                 lambda: egp_fast.collapse(net, egp_fast.measure_entropy(net, [(x, labels)], progress=False),
                                           (x, labels), measure_latency=False)):
        with pytest.raises(DataError, match="gives 2 positional inputs, but the model takes 1 .*inputs only"):
            call()
