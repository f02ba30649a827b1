"""Example inputs (egp_fast/graph/inputs.py): normalize_inputs, eval_mode, describe_inputs."""

import pytest
import torch
import torch.nn as nn

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
