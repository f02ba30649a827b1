"""entropy benchmarks: the float64 reference vs the one-launch Triton epilogue.

``.venv/bin/python -m pytest benchmarks/bench_entropy.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA_DEVICE, backend_of, machine, providers, run_timed

from egp_fast import ops

DEVICE = "cuda" if HAS_CUDA_DEVICE else "cpu"

# ResNet-18 (17 sites, 64..512 channels), ResNet-50-like (49 sites up to 2048) and a Swin-T-like
# token model (12 GELU sites of 384..3072 channels).
MODELS = {
    "resnet18": [64] + [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4,
    "resnet50": ([64, 64, 256] * 3 + [128, 128, 512] * 4 + [256, 256, 1024] * 6 + [512, 512, 2048] * 3)[:49],
    "swin_t": [384] * 2 + [768] * 2 + [1536] * 6 + [3072] * 2,
}


def _inputs(lengths):
    obs = torch.cat([torch.full((n,), 100000 * (i + 1)) for i, n in enumerate(lengths)])
    counts = (torch.rand(obs.shape, dtype=torch.float64) * obs).to(torch.int64)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return counts.to(DEVICE), obs.to(DEVICE), offsets.to(DEVICE)


@pytest.mark.benchmark(group="entropy")
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("provider", providers("entropy", DEVICE))
def test_entropy(benchmark, provider, model):
    counts, obs, offsets = _inputs(MODELS[model])
    out = run_timed(benchmark, ops.entropy, counts, obs, offsets, device=DEVICE, backend=backend_of(provider))
    ref = ops.reference_entropy(counts, obs, offsets)
    assert torch.allclose(out.layer_entropy, ref.layer_entropy, atol=1e-12, rtol=0)
    benchmark.extra_info.update(device=machine(), sites=len(MODELS[model]), channels=int(counts.numel()))
