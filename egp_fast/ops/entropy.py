"""entropy: channel and layer entropies of every site from ON counts, in one call.

Input is the flat concatenation of all sites' per-channel ON counts (site ``s`` owns
entries ``offsets[s]:offsets[s+1]``) with each entry's number of observations. Output,
all float64:

* ``p_on[t] = counts[t] / observations[t]``
* ``channel_entropy[t] = H(p_on[t])`` with ``H(p) = -p log2 p - (1-p) log2 (1-p)``,
  ``H(0) = H(1) = 0``
* ``layer_entropy[s]``: mean of ``channel_entropy`` over the site's *non-constant* channels
  (``0 < p < 1``), 0 when every channel is constant (the reference scripts' choice)
* ``layer_entropy_all[s]``: plain mean over all the site's channels (0 for no channels)

Entries with zero observations have ``p_on = 0`` and entropy 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from egp_fast.errors import ConfigError
from egp_fast.ops._dispatch import pick, register


class EntropyOut(NamedTuple):
    p_on: torch.Tensor
    channel_entropy: torch.Tensor
    layer_entropy: torch.Tensor
    layer_entropy_all: torch.Tensor


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """``H(p)`` in bits, float64, exactly 0 at ``p`` = 0 and 1."""
    p = p.to(torch.float64)
    q = 1.0 - p
    h = -(torch.xlogy(p, p) + torch.xlogy(q, q)) / torch.log(torch.tensor(2.0, dtype=p.dtype))
    return torch.where((p <= 0) | (p >= 1), torch.zeros_like(h), h)


@register("entropy", "torch")
def reference_entropy(
    counts: torch.Tensor, observations: torch.Tensor, offsets: torch.Tensor
) -> EntropyOut:
    """Reference implementation (float64 throughout)."""
    obs = observations.to(torch.float64)
    p = torch.where(obs > 0, counts.to(torch.float64) / obs.clamp_min(1), torch.zeros_like(obs))
    h = binary_entropy(p)
    n_sites = offsets.numel() - 1
    lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(n_sites, device=counts.device), lengths)
    nonconst = ((p > 0) & (p < 1)).to(torch.float64)
    sum_h = torch.zeros(n_sites, dtype=torch.float64, device=counts.device).index_add_(0, seg, h)
    n_nc = torch.zeros(n_sites, dtype=torch.float64, device=counts.device).index_add_(
        0, seg, nonconst
    )
    layer = torch.where(n_nc > 0, sum_h / n_nc.clamp_min(1), torch.zeros_like(sum_h))
    layer_all = torch.where(
        lengths > 0, sum_h / lengths.clamp_min(1).to(torch.float64), torch.zeros_like(sum_h)
    )
    return EntropyOut(p, h, layer, layer_all)


def entropy(
    counts: torch.Tensor,
    observations: torch.Tensor,
    offsets: torch.Tensor,
    backend: str | None = None,
) -> EntropyOut:
    """Channel and layer entropies of all sites at once (see the module docstring).

    Args:
        counts: int64 ``[T]``, ON counts of every channel of every site, concatenated.
        observations: int64 ``[T]``, observations behind each count (``counts <= observations``).
        offsets: int64 ``[S + 1]``, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == T``.
        backend: ``None`` (automatic), ``"torch"`` or ``"triton"``.

    Returns:
        ``EntropyOut(p_on, channel_entropy, layer_entropy, layer_entropy_all)``, float64,
        on ``counts``' device.

    Example:
        >>> import torch, egp_fast
        >>> out = egp_fast.ops.entropy(torch.tensor([2, 0, 1]), torch.tensor([4, 4, 4]),
        ...                            torch.tensor([0, 2, 3]))
        >>> out.layer_entropy.tolist()
        [1.0, 0.8112781244591328]
    """
    for name, t in (("counts", counts), ("observations", observations), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise ConfigError(f"entropy: {name} must be a 1-d int64 tensor")
        if t.device != counts.device:
            raise ConfigError(f"entropy: {name} is on {t.device} but counts on {counts.device}")
    if observations.numel() != counts.numel():
        raise ConfigError(
            f"entropy: observations has {observations.numel()} entries but counts has "
            f"{counts.numel()}; give one observation count per channel"
        )
    if offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != counts.numel():
        raise ConfigError(
            f"entropy: offsets must start at 0 and end at len(counts)={counts.numel()}"
        )
    _, fn = pick("entropy", backend, counts.device)
    return fn(counts, observations, offsets)
