"""Counting: the device-resident ON counts of a pass, and the entropies computed from them.

:class:`_Counter` holds, for every site, integer counts of ``z > breakpoint`` per channel and
breakpoint in one flat int64 buffer on the model's device (cheap to ``all_reduce``), plus the
observations and samples each site saw; in ``mode="paper"`` it also accumulates the per-batch
entropies of :func:`paper_batch_entropy`. At the end of a pass :func:`_all_reduce` sums the
counts across processes and :func:`_finish` turns them into :class:`EntropyStats` (see
docs/algorithm.md, "Entropy"). The recorders that feed a counter live in ``recorders.py``.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch

from egp_fast import ops
from egp_fast.errors import BackendError, DataError
from egp_fast.graph import Site
from egp_fast.measurement.stats import EntropyStats, SiteStats
from egp_fast.ops import backend_for

_PAPER_EPS = 1e-5


class _Counter:
    """Device-resident counts of every site; one flat int64 buffer for cheap all_reduce.

    Layout: the counts of the first breakpoint of all sites, concatenated (what the entropy op
    reads), then the counts of further breakpoints (ReLU6/Hardtanh upper clip).
    """

    def __init__(self, sites: list[Site], device: torch.device, paper: bool) -> None:
        self.sites = sites
        sizes = [s.channels for s in sites]
        extra = [s.channels * (len(s.breakpoints) - 1) for s in sites]
        total = sum(sizes) + sum(extra)
        self.flat = torch.zeros(total, dtype=torch.int64, device=device)
        self.multi: dict[int, tuple[int, int]] = {}  # site -> (offset of its extra counts, how many)
        off = sum(sizes)
        for i, (s, c) in enumerate(zip(sites, sizes)):
            if len(s.breakpoints) > 1:
                self.multi[i] = (off, len(s.breakpoints) - 1)
                off += c * (len(s.breakpoints) - 1)
        self._bind_views()
        self.observations = [0] * len(sites)
        self.samples = [0] * len(sites)
        self.total_samples = 0
        self.current_n = 0  # samples in the batch being measured
        self.paper = paper
        self.paper_sum = torch.zeros(len(sites), dtype=torch.float64, device=device) if paper else None
        self.paper_sq = torch.zeros(len(sites), dtype=torch.float64, device=device) if paper else None
        self.batches = 0
        self.backend: str | None = None
        self._impl: dict[tuple[torch.dtype, torch.device], Any] = {}

    def _bind_views(self) -> None:
        """Point the per-site views at ``flat``: ``first[i]`` the site's first-breakpoint
        counts, ``rest[i]`` those of its further breakpoints."""
        off = 0
        self.first: list[torch.Tensor] = []
        for s in self.sites:
            self.first.append(self.flat[off : off + s.channels])
            off += s.channels
        self.rest: list[list[torch.Tensor]] = []
        for s in self.sites:
            views = []
            for _ in s.breakpoints[1:]:
                views.append(self.flat[off : off + s.channels])
                off += s.channels
            self.rest.append(views)

    def snapshot(self) -> _Counter:
        """A copy with its own count buffers: summing or finishing it leaves this one counting."""
        c = copy.copy(self)
        c.flat = self.flat.clone()
        c._bind_views()
        if self.paper:
            c.paper_sum = self.paper_sum.clone()
            c.paper_sq = self.paper_sq.clone()
        c.observations = list(self.observations)
        c.samples = list(self.samples)
        c._impl = dict(self._impl)
        return c

    def _check_layout(self, i: int, z: torch.Tensor) -> Site:
        s = self.sites[i]
        cdim = s.channel_dim % z.dim() if z.dim() else 0
        if z.dim() == 0 or z.shape[cdim] != s.channels:
            raise DataError(
                f"site {s.name!r} saw a tensor of shape {tuple(z.shape)} but has {s.channels} "
                f"channels along dim {s.channel_dim} on the example inputs; measure with batches "
                "of the same layout as example_inputs"
            )
        return s

    def _counted(self, i: int, obs: int, before: torch.Tensor | None) -> None:
        """Bookkeeping after site ``i`` counted ``obs`` observations (``before``: its counts
        before, in paper mode)."""
        self.observations[i] += obs
        self.samples[i] += self.current_n
        if self.paper and obs > 0:
            value = paper_batch_entropy(self.first[i] - before, obs)
            self.paper_sum[i] += value
            self.paper_sq[i] += value * value

    def record(self, i: int, z: torch.Tensor) -> None:
        s = self._check_layout(i, z)
        if z.requires_grad:
            z = z.detach()  # training-time tracking: counting is not part of the autograd graph
        obs = z.numel() // s.channels
        before = self.first[i].clone() if self.paper else None
        key = (z.dtype, z.device)
        fn = self._impl.get(key)
        if fn is None or z.numel() == 0:
            # First call for this dtype/device: the public op validates everything and picks
            # the backend; later calls go straight to that implementation (the checks cost time
            # per site and batch that a hot loop need not pay again).
            ops.sign_count_(z, self.first[i], s.channel_dim, s.breakpoints[0], backend=self.backend)
            for b, view in zip(s.breakpoints[1:], self.rest[i]):
                ops.sign_count_(z, view, s.channel_dim, b, backend=self.backend)
            if z.numel():
                self._impl[key] = ops.pick("sign_count", self.backend, z.device)[1]
        else:
            fn(z, self.first[i], s.channel_dim, float(s.breakpoints[0]))
            for b, view in zip(s.breakpoints[1:], self.rest[i]):
                fn(z, view, s.channel_dim, float(b))
        self._counted(i, obs, before)

    def _relu_impl(self, z: torch.Tensor) -> Any:
        """The fused ReLU-and-count kernel for ``z``'s dtype and device, or None where counting
        and ReLU stay apart: no fused kernel, or the count would use another backend."""
        key = ("relu", z.dtype, z.device)
        if key not in self._impl:
            # (a dtype a kernel does not take goes to the reference inside the backend)
            try:
                count_backend = ops.pick("sign_count", self.backend, z.device)[0]
                name, impl = ops.pick("relu_sign_count", self.backend, z.device)
            except BackendError:
                count_backend = name = impl = None
            self._impl[key] = impl if name not in (None, "torch") and name == count_backend else None
        return self._impl[key]

    def record_relu(self, i: int, z: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Record site ``i`` (a ReLU, breakpoint 0) and return ``relu(z)`` (in place with
        ``inplace``), both from one read of ``z`` where a fused kernel serves it; otherwise
        :meth:`record`, then ``F.relu``. The output is what ``nn.ReLU`` returns either way."""
        fn = self._relu_impl(z) if type(z) is torch.Tensor and z.numel() else None
        if fn is None or (z.requires_grad and torch.is_grad_enabled()):
            self.record(i, z)
            return torch.nn.functional.relu(z, inplace=inplace)
        s = self._check_layout(i, z)
        before = self.first[i].clone() if self.paper else None
        out = fn(z, self.first[i], s.channel_dim, inplace)
        self._counted(i, z.numel() // s.channels, before)
        return out


def paper_batch_entropy(on: torch.Tensor, observations: int) -> torch.Tensor:
    """One batch's layer entropy the reference scripts' way (``mode="paper"``).

    ``p_c = on_c / observations``; channels with ``p_c`` 0 or 1 in this batch are left out;
    the value is the mean of ``-(p log2 p' + (1 - p) log2 (1 - p'))`` over the others, with
    ``p' = clamp(p, 1e-5, 1 - 1e-5)`` (the clamp only inside the logs); 0 when every channel
    is constant. Stays on the device (no host sync).

    Args:
        on: ON counts of one site in one batch, ``[C]``.
        observations: observations per channel in that batch (samples x positions).

    Returns:
        A float64 0-d tensor, in bits.

    Example:
        >>> round(float(paper_batch_entropy(torch.tensor([2, 0, 4, 1]), 4)), 6)  # 2 of 4 move
        0.905639
    """
    p = on.to(torch.float64) / observations
    pc = p.clamp(_PAPER_EPS, 1 - _PAPER_EPS)
    h = -(p * torch.log2(pc) + (1 - p) * torch.log2(1 - pc))
    moving = (on > 0) & (on < observations)
    n = moving.sum()
    return torch.where(n > 0, (h * moving).sum() / n.clamp_min(1), torch.zeros((), dtype=torch.float64, device=on.device))


# --------------------------------------------------------------------------------------------
# Entropies from counts.


def _piece_counts(s: Site, first: torch.Tensor, rest: list[torch.Tensor], obs: int) -> torch.Tensor:
    # counts of z > b_j are non-increasing in j: pieces are their differences.
    above = [first] + rest
    pieces = [obs - above[0]]
    for j in range(1, len(above)):
        pieces.append(above[j - 1] - above[j])
    pieces.append(above[-1])
    return torch.stack(pieces)


def _finish(
    sites: list[Site], counter: _Counter, mode: str, backend: str | None, seconds: float
) -> EntropyStats:
    device = counter.flat.device
    sizes = [s.channels for s in sites]
    offsets = [0, *itertools.accumulate(sizes)]
    t = offsets[-1]
    obs_per_entry = torch.repeat_interleave(
        torch.tensor(counter.observations, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64)
    ).to(device)
    out = ops.entropy(
        counter.flat[:t], obs_per_entry, torch.tensor(offsets, dtype=torch.int64, device=device),
        backend=backend_for("entropy", backend),
    )
    layer_h = out.layer_entropy.tolist()
    layer_all = out.layer_entropy_all.tolist()
    paper = (counter.paper_sum / max(counter.batches, 1)).tolist() if counter.paper else None
    # Two-piece sites (ReLU-like, the common case) get their counts, piece counts and constant
    # pieces from a few whole-buffer ops split into per-site views; only multi-piece sites
    # (ReLU6, Hardtanh) are done one by one.
    on_all = counter.flat[:t].clone()  # the stats own their counts; the counter may be reused
    pieces_all = torch.stack([obs_per_entry - on_all, on_all])
    piece_all = torch.where(
        (on_all == obs_per_entry) & (obs_per_entry > 0),
        torch.ones_like(on_all),
        torch.where((on_all == 0) & (obs_per_entry > 0), torch.zeros_like(on_all), torch.full_like(on_all, -1)),
    )
    per_site = zip(
        on_all.split(sizes), pieces_all.split(sizes, dim=1), piece_all.split(sizes),
        out.p_on.split(sizes), out.channel_entropy.split(sizes),
    )
    result: dict[str, SiteStats] = {}
    for i, (s, (on, pieces, piece, p_on, h)) in enumerate(zip(sites, per_site)):
        obs = counter.observations[i]
        ent, ent_all = layer_h[i], layer_all[i]
        if len(s.breakpoints) > 1:
            # Multi-piece activations: entropy of the piece distribution, in bits.
            pieces = _piece_counts(s, on, counter.rest[i], obs)
            q = pieces.to(torch.float64) / max(obs, 1)
            h = -(torch.xlogy(q, q).sum(0)) / math.log(2)
            nonconst = (pieces < obs).all(0)
            ent = float(h[nonconst].mean()) if bool(nonconst.any()) else 0.0
            ent_all = float(h.mean()) if h.numel() else 0.0
            full = pieces == obs
            piece = torch.where(
                full.any(0), full.to(torch.int64).argmax(0), torch.full_like(on, -1)
            ) if obs > 0 else torch.full_like(on, -1)
        result[s.name] = SiteStats(
            name=s.name,
            kind=s.kind,
            producers=list(s.producers),
            channel_dim=s.channel_dim,
            channels=s.channels,
            breakpoints=tuple(s.breakpoints),
            exact=s.exact,
            observations=obs,
            on_counts=on,
            piece_counts=pieces,
            p_on=p_on,
            channel_entropy=h,
            piece=piece,
            entropy=paper[i] if paper is not None else ent,
            entropy_all=ent_all,
            exact_entropy=ent,
            samples=int(counter.samples[i]),
        )
    return EntropyStats(result, mode, counter.batches, seconds, samples=int(counter.total_samples))


# --------------------------------------------------------------------------------------------
# Across processes (torch.distributed).


def _sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed in place over all ranks (``t`` itself without a process group)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.all_reduce(t)
    return t


def _all_reduce(counter: _Counter) -> None:
    """Sum the counts, observations, samples and batches of every rank into ``counter``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    dist = torch.distributed
    dist.all_reduce(counter.flat)
    meta = torch.tensor(
        counter.observations + counter.samples + [counter.batches, counter.total_samples],
        dtype=torch.int64,
        device=counter.flat.device,
    )
    dist.all_reduce(meta)
    s = len(counter.observations)
    values = [int(v) for v in meta.tolist()]
    counter.observations = values[:s]
    counter.samples = values[s : 2 * s]
    counter.batches, counter.total_samples = values[2 * s], values[2 * s + 1]
    if counter.paper_sum is not None:
        dist.all_reduce(counter.paper_sum)
        dist.all_reduce(counter.paper_sq)


__all__ = ["paper_batch_entropy"]
