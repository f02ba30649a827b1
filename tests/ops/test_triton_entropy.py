"""Triton entropy epilogue against the float64 torch reference (within 1e-12)."""

from __future__ import annotations

import pytest
import torch

from egp_fast import ops

pytestmark = pytest.mark.requires_triton

TOL = 1e-12


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sites(lengths, obs_per_site, kinds=None, device="cpu"):
    counts, obs = [], []
    for i, (n, o) in enumerate(zip(lengths, obs_per_site)):
        kind = kinds[i] if kinds else "random"
        if kind == "random":
            c = torch.randint(0, o + 1, (n,))
        elif kind == "on":
            c = torch.full((n,), o)
        elif kind == "off":
            c = torch.zeros(n, dtype=torch.int64)
        elif kind == "mixed":
            c = torch.randint(0, o + 1, (n,))
            c[::3] = 0
            c[1::3] = o
        else:
            raise AssertionError(kind)
        counts.append(c)
        obs.append(torch.full((n,), o))
    offsets = torch.tensor([0, *lengths]).cumsum(0)

    def cat(xs):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)

    return cat(counts).to(device), cat(obs).to(device), offsets.to(device)


def _compare(counts, obs, offsets, **kw):
    ref = ops.reference_entropy(counts, obs, offsets)
    if kw:
        from egp_fast.kernels.entropy import entropy_triton

        got = ops.EntropyOut(*entropy_triton(counts, obs, offsets, **kw))
    else:
        got = ops.entropy(counts, obs, offsets, backend="triton")
    for name, g, r in zip(ref._fields, got, ref):
        assert g.dtype == torch.float64 and g.shape == r.shape and g.device == r.device, name
        assert torch.allclose(g, r, atol=TOL, rtol=0), (name, (g - r).abs().max())
        assert not torch.isnan(g).any(), name


def test_many_sites_mixed():
    lengths = [64, 1, 3, 0, 130, 17, 256]
    obs = [1000, 7, 1, 5, 2**40, 3, 123457]
    _compare(*_sites(lengths, obs, device=_dev()))


@pytest.mark.parametrize("kind", ["on", "off", "mixed"])
def test_constant_channels(kind):
    _compare(*_sites([5, 40, 1], [9, 100, 4], kinds=[kind] * 3, device=_dev()))


def test_all_constant_site_has_zero_layer_entropy():
    counts, obs, offsets = _sites([6], [10], kinds=["mixed"], device=_dev())
    counts[2::3] = 0  # every channel now constant (0 or all)
    out = ops.entropy(counts, obs, offsets, backend="triton")
    assert out.layer_entropy.tolist() == [0.0]


def test_half_on_is_one_bit():
    counts = torch.tensor([2, 5, 0], device=_dev())
    obs = torch.tensor([4, 10, 3], device=_dev())
    out = ops.entropy(counts, obs, torch.tensor([0, 3], device=_dev()), backend="triton")
    assert out.channel_entropy.tolist() == [1.0, 1.0, 0.0]
    assert out.layer_entropy.tolist() == [1.0]
    assert abs(out.layer_entropy_all.item() - 2 / 3) < TOL


def test_zero_observations():
    counts = torch.tensor([0, 0, 3], device=_dev())
    obs = torch.tensor([0, 0, 6], device=_dev())
    _compare(counts, obs, torch.tensor([0, 2, 3], device=_dev()))


def test_empty_sites_and_no_channels():
    _compare(*_sites([0, 0], [3, 3], device=_dev()))
    z = torch.zeros(0, dtype=torch.int64, device=_dev())
    _compare(z, z, torch.zeros(1, dtype=torch.int64, device=_dev()))


def test_site_longer_than_block_loops():
    # block 16 with 53 channels: four loop steps, the last one ragged.
    _compare(*_sites([53, 16, 17], [77, 5, 2**33], device=_dev()), block_size=16)


def test_extreme_probabilities():
    # p = 1/2^50 and 1 - 1/2^50: log terms near their limits.
    big = 2**50
    counts = torch.tensor([1, big - 1, big // 2], device=_dev())
    obs = torch.tensor([big, big, big], device=_dev())
    _compare(counts, obs, torch.tensor([0, 3], device=_dev()))


@pytest.mark.requires_cuda
def test_gpu_realistic_model():
    # ResNet-50-sized: 49 sites, 64..2048 channels each.
    lengths = [64, 64, 256] * 3 + [128, 128, 512] * 4 + [256, 256, 1024] * 6 + [512, 512, 2048] * 3
    lengths = lengths[:49]
    obs = [50000 * (i + 1) for i in range(len(lengths))]
    _compare(*_sites(lengths, obs, device="cuda"))
