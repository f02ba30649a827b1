"""What a batch holds: inputs passed to the model, samples counted, the device checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast.errors import DataError
from egp_fast.measurement import batch_size, model_device, split_batch


def test_split_batch_takes_the_inputs_and_drops_the_labels():
    x, y = torch.randn(3, 2), torch.zeros(3)
    assert split_batch(x)[0][0] is x and split_batch(x)[1] == {}
    args, kwargs = split_batch((x, y))
    assert len(args) == 1 and args[0] is x and kwargs == {}
    args, kwargs = split_batch({"pixel_values": x, "labels": y, "y": y, "mask": y})
    assert args == () and set(kwargs) == {"pixel_values", "mask"}
    with pytest.raises(DataError, match="empty tuple"):
        split_batch(())
    with pytest.raises(DataError, match="has type int"):
        split_batch(3)


def test_batch_size_is_dim_0_of_the_first_tensor():
    assert batch_size((torch.randn(5, 2),), {}) == 5
    assert batch_size((), {"a": torch.randn(7, 1), "b": torch.randn(2)}) == 7
    assert batch_size((torch.tensor(1.0),), {}) == 1
    assert batch_size((), {}) == 0


def test_model_device_reads_parameters_then_buffers():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")  # buffers only
    assert model_device(nn.ReLU()) == torch.device("cpu")  # neither
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


class KW(nn.Module):
    """A model that takes its input by keyword, as Hugging Face vision models do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = nn.ReLU()

    def forward(self, pixel_values):
        return self.act(self.fc(pixel_values))


def test_data_formats_tuple_dict_and_max_batches():
    x = torch.randn(5, 2)
    tup = egp_fast.measure_entropy(KW(), [(x, torch.zeros(5))] * 3, max_batches=2, progress=False)
    assert tup.batches == 2 and tup.sites["act"].observations == 10
    net = KW()
    d = egp_fast.measure_entropy(net, [{"pixel_values": x, "labels": torch.zeros(5)}], progress=False)
    assert d.sites["act"].observations == 5


def test_samples_of_dict_and_tuple_batches():
    x = torch.randn(6, 2)
    d = egp_fast.measure_entropy(KW(), [{"pixel_values": x, "labels": torch.zeros(6)}], progress=False)
    t = egp_fast.measure_entropy(KW(), [(x, torch.zeros(6))] * 2, progress=False)
    assert d.sites["act"].samples == 6 and t.sites["act"].samples == 12
