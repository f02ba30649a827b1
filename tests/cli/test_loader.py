"""Loaders: epoch-seeded shuffles, disjoint evaluation shards, equal training shards, batching."""

from __future__ import annotations

import pytest
import torch

from egp_fast.cli.data import TensorDataset
from egp_fast.cli.loader import EpochSampler, make_loader
from egp_fast.errors import ConfigError


def test_epoch_sampler_shuffle_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, shuffle=True, seed=7), EpochSampler(50, shuffle=True, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert a.indices() == b.indices() and sorted(a.indices()) == list(range(50))
    b.set_epoch(4)
    assert a.indices() != b.indices()


@pytest.mark.parametrize("n, world", [(11, 2), (10, 3), (2, 4)])
def test_eval_shards_are_disjoint_and_complete(n, world):
    shards = [EpochSampler(n, shuffle=False, rank=r, world_size=world).indices() for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))
    for r in range(world):
        assert len(EpochSampler(n, shuffle=False, rank=r, world_size=world)) == len(shards[r])


@pytest.mark.parametrize("n, world", [(11, 2), (10, 3)])
def test_train_shards_equal_length_and_cover(n, world):
    shards = []
    for r in range(world):
        s = EpochSampler(n, shuffle=True, seed=1, rank=r, world_size=world)
        s.set_epoch(2)
        shards.append(s.indices())
    assert len({len(s) for s in shards}) == 1
    assert set(i for s in shards for i in s) == set(range(n))


def test_loader_batches_drop_last_and_channels_last():
    ds = TensorDataset(torch.randn(10, 2, 4, 4), torch.arange(10))
    ld = make_loader(ds, 4, shuffle=True, seed=0)
    ld.set_epoch(0)
    sizes = [x.shape[0] for x, _ in ld]
    assert sizes == [4, 4] and len(ld) == 2
    ev = make_loader(ds, 4)
    ys = torch.cat([y for _, y in ev])
    assert torch.equal(ys, torch.arange(10)) and len(ev) == 3
    cl = make_loader(ds, 4, channels_last=True)
    x, _ = next(iter(cl))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="--batch-size"):
        make_loader(ds, 0)
