"""The results of a measurement: :class:`SiteStats` per site and :class:`EntropyStats` per pass.

Both are plain records built by the counting epilogue (``counting._finish``) from the integer
counts of a pass; they carry the per-channel counts and entropies, the layer entropy (see
docs/algorithm.md, "Entropy") and the samples behind each site, from which
:meth:`SiteStats.flip_bound` gives the evidence of a zero-entropy site (docs/algorithm.md,
"How sure is \"zero entropy\"?").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from egp_fast.measurement import decide


@dataclass
class SiteStats:
    """Entropy statistics of one site (see :class:`egp_fast.graph.Site` for the site fields).

    Attributes:
        observations: observations behind each channel's counts (batch x spatial/token positions).
        on_counts: int64 ``[C]``, how often ``z > 0`` (``z > breakpoints[0]``).
        piece_counts: int64 ``[P, C]``, observations in each linear piece of the activation
            (``P = len(breakpoints) + 1``; piece 0 is below the first breakpoint).
        p_on: float64 ``[C]``, ``on_counts / observations``.
        channel_entropy: float64 ``[C]``, entropy of each channel's piece distribution in bits
            (``H(p_on)`` for two-piece activations).
        piece: int64 ``[C]``, the piece a constant channel always sits in, -1 if it moves
            (ReLU: 0 = always OFF, 1 = always ON).
        entropy: layer entropy, the mean of ``channel_entropy`` over non-constant channels
            (0 when every channel is constant); in paper mode the per-batch average.
        entropy_all: plain mean of ``channel_entropy`` over all channels.
        exact_entropy: the exact-count layer entropy (equals ``entropy`` in exact mode).
        samples: input samples the site saw (the batch size, dim 0 of the first input tensor,
            summed over the batches in which the site ran; positions are not samples).
    """

    name: str
    kind: str
    producers: list[str]
    channel_dim: int
    channels: int
    breakpoints: tuple[float, ...]
    exact: bool
    observations: int
    on_counts: torch.Tensor
    piece_counts: torch.Tensor
    p_on: torch.Tensor
    channel_entropy: torch.Tensor
    piece: torch.Tensor
    entropy: float
    entropy_all: float
    exact_entropy: float
    samples: int = 0

    @property
    def collapsible(self) -> bool:
        """True when every channel stays in one piece on the data (the site is affine)."""
        return bool((self.piece >= 0).all()) and self.observations > 0

    def flip_bound(self, confidence: float = 0.95) -> float:
        """Upper confidence bound on the chance that a new sample flips this site.

        For a zero-entropy site seen on ``n = samples`` samples with no state change, the
        exact one-sided (Clopper-Pearson) bound ``1 - (1 - confidence) ** (1 / n)`` (about
        ``3 / n`` at 95%); never 0.0 for finite ``n``. 1.0 when the site already changes
        state (non-zero entropy) or saw no sample.

        Args:
            confidence: one-sided confidence level, strictly between 0 and 1.

        Returns:
            A probability in (0, 1].

        Raises:
            ConfigError: ``confidence`` is not in (0, 1).

        Example:
            >>> import torch, egp_fast
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
            >>> with torch.no_grad():
            ...     _ = net[0].bias.fill_(100.0)  # always ON: zero entropy
            >>> s = egp_fast.measure_entropy(net, [torch.randn(8, 2)], progress=False).sites["1"]
            >>> s.samples, round(s.flip_bound(), 3)
            (8, 0.312)
        """
        bound = decide.flip_bound(self.samples, confidence)  # validates confidence in every case
        return bound if self.collapsible else 1.0

    def to_dict(self, channels: bool = False) -> dict[str, Any]:
        """A JSON-safe summary (``flip_bound_95``: :meth:`flip_bound` at 95%).

        Args:
            channels: also list the per-channel ``p_on``, ``channel_entropy`` and ``piece``.

        Returns:
            A dict of plain Python values.
        """
        d = {
            "name": self.name,
            "kind": self.kind,
            "producers": list(self.producers),
            "channel_dim": self.channel_dim,
            "channels": self.channels,
            "breakpoints": list(self.breakpoints),
            "exact": self.exact,
            "observations": self.observations,
            "samples": self.samples,
            "flip_bound_95": self.flip_bound(0.95),
            "entropy": self.entropy,
            "entropy_all": self.entropy_all,
            "exact_entropy": self.exact_entropy,
            "collapsible": self.collapsible,
            "constant_channels": int((self.piece >= 0).sum()),
            "always_off": int((self.piece == 0).sum()),
        }
        if channels:
            d["p_on"] = self.p_on.cpu().tolist()
            d["channel_entropy"] = self.channel_entropy.cpu().tolist()
            d["piece"] = self.piece.cpu().tolist()
        return d


@dataclass
class EntropyStats:
    """Result of :func:`measure_entropy`: one :class:`SiteStats` per site, in execution order.

    Attributes:
        sites: site name -> :class:`SiteStats`.
        mode: ``"exact"`` or ``"paper"``.
        batches: batches measured (fewer than the data's when ``stopped_early``).
        seconds: wall time of the pass.
        samples: input samples measured (sum of the batch sizes).
        stopped_early: True when ``stop="decided"`` ended the pass before the data did.
        unmeasured: sites the measurement could not see (functional activations under
            :func:`track_entropy`'s hooks); they are absent from ``sites``.
    """

    sites: dict[str, SiteStats]
    mode: str
    batches: int
    seconds: float = 0.0
    samples: int = 0
    stopped_early: bool = False
    unmeasured: list[str] = field(default_factory=list)

    def zero_entropy_sites(self) -> list[str]:
        """Names of the collapsible sites (every channel constant on the data)."""
        return [n for n, s in self.sites.items() if s.collapsible]

    def layer_entropy(self) -> dict[str, float]:
        """Producer layer -> entropy of the site(s) it feeds (the largest, if several)."""
        out: dict[str, float] = {}
        for s in self.sites.values():
            for p in s.producers:
                out[p] = max(out.get(p, 0.0), s.entropy)
        return out

    def to_dict(self, channels: bool = False) -> dict[str, Any]:
        """A JSON-safe summary of the pass and of every site (see :meth:`SiteStats.to_dict`).

        Args:
            channels: include the per-channel values of every site.

        Returns:
            A dict of plain Python values.
        """
        return {
            "mode": self.mode,
            "batches": self.batches,
            "samples": self.samples,
            "stopped_early": self.stopped_early,
            "unmeasured": list(self.unmeasured),
            "seconds": self.seconds,
            "zero_entropy_sites": self.zero_entropy_sites(),
            "sites": [s.to_dict(channels) for s in self.sites.values()],
        }


__all__ = ["EntropyStats", "SiteStats"]
