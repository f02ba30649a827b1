"""Evidence behind a collapse: flip bounds per site and observed flips on held-out data.

A zero-entropy site is affine on the data it was measured on; that is evidence, not proof
(docs/algorithm.md, "How sure is zero entropy?"). :func:`evidence` reads how many samples a site was seen
on and its one-sided upper confidence bound on the probability that a new sample flips it;
:func:`observed_flips` runs the model on held-out batches and counts, per site, the samples on
which any neuron left the piece the statistics fixed it in. :func:`egp_fast.collapse` uses both
(``max_flip``, ``confidence``, ``check``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.errors import ConfigError, DataError
from egp_fast.measurement import check_confidence, check_fraction, flip_bound, samples_needed

__all__ = ["affine_gaps", "evidence", "observed_flips", "samples_needed"]


def check_max_flip(max_flip: float) -> None:
    """Raise :class:`ConfigError` unless ``max_flip`` is a number in (0, 1]."""
    try:
        check_fraction(max_flip, "max_flip")
    except ConfigError:
        raise ConfigError(
            f"max_flip={max_flip!r} must be a number in (0, 1]: the largest tolerated bound on the "
            "probability that a new sample flips a collapsed site (1.0 collapses on any evidence)"
        ) from None


def evidence(st: Any, confidence: float = 0.95) -> tuple[int | None, float | None]:
    """``(samples, flip bound)`` of one site's statistics; ``(None, None)`` when unknown.

    Uses ``SiteStats.flip_bound(confidence)`` when the statistics have it, else the bound from
    ``SiteStats.samples``.

    Args:
        st: a :class:`egp_fast.measurement.SiteStats` (or any object with ``samples``).
        confidence: one-sided confidence level of the bound.

    Returns:
        The number of samples (None if the statistics do not say) and the bound (None if
        unknown; 1.0 for a site that already flips).

    Example:
        >>> from types import SimpleNamespace
        >>> n, b = evidence(SimpleNamespace(samples=8))
        >>> n, round(b, 3)
        (8, 0.312)
    """
    check_confidence(confidence)
    n = getattr(st, "samples", None)
    n = int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None
    fb = getattr(st, "flip_bound", None)
    if callable(fb):
        return n, float(fb(confidence))
    if n is None:
        return None, None
    return n, flip_bound(n, confidence)


def pct(x: float) -> str:
    """``0.312 -> '31.2%'``, ``0.01 -> '1%'``, ``0.00208 -> '0.208%'``."""
    return f"{100.0 * x:.3g}%"


def weak_reason(name: str, n: int | None, bound: float | None, max_flip: float, confidence: float) -> str | None:
    """Why a zero-entropy site is not collapsed, or None when its evidence suffices."""
    if max_flip >= 1.0:
        return None
    need = samples_needed(max_flip, confidence)
    if bound is None:
        return (f"number of samples behind the statistics unknown, so no flip bound; measure with "
                f"egp_fast.measure_entropy (about {need} samples for a {pct(max_flip)} bound) or pass "
                f"max_flip=1.0 to collapse anyway")
    if bound <= max_flip:
        return None
    seen = f"seen on {n} samples" if n is not None else "seen on too few samples"
    return (f"{seen}: flip bound {pct(bound)} > {pct(max_flip)} (at {pct(confidence)} confidence); "
            f"measure on about {need} samples or pass max_flip=1.0 to collapse anyway")


# --------------------------------------------------------------------------------------------
# Observed flips on held-out data.


class _Probe:
    """Per site: samples seen, samples with any neuron out of its fixed piece, channels that left."""

    wants_output = False  # record() sees the site's input; output() is not called

    def __init__(self, piece: torch.Tensor, breakpoints: tuple[float, ...], channel_dim: int) -> None:
        self.piece = piece.to(torch.int64)
        self.breakpoints = tuple(float(b) for b in breakpoints)
        self.channel_dim = channel_dim
        self.samples = 0
        self.flipped = 0
        self.channels: torch.Tensor | None = None  # bool [C], on the activations' device

    def record(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() < 2:
            raise DataError("held-out check: a site's input has no batch dimension; pass batches of samples")
        cd = self.channel_dim % z.dim()
        state = torch.zeros(z.shape, dtype=torch.int64, device=z.device)
        for b in self.breakpoints:
            state += z > b  # the piece index, as egp_fast.measurement counts it (z == breakpoint is below)
        shape = [1] * z.dim()
        shape[cd] = -1
        moved = state != self.piece.to(z.device).view(shape)
        self.samples += int(z.shape[0])
        self.flipped += int(moved.reshape(z.shape[0], -1).any(dim=1).sum())
        per_channel = moved.movedim(cd, -1).reshape(-1, z.shape[cd]).any(dim=0)
        self.channels = per_channel if self.channels is None else self.channels | per_channel

    def report(self) -> dict[str, Any]:
        changed = int(self.channels.sum()) if self.channels is not None else 0
        return {
            "samples": self.samples,
            "flipped_samples": self.flipped,
            "flip_rate": self.flipped / self.samples if self.samples else None,
            "channels_changed": changed,
            "channels": int(self.piece.numel()),
            "per": "sample",
        }


class _Gap:
    """Per site: how far its affine replacement lands from what the activation computed (the
    largest absolute difference, and the largest input or output magnitude it is measured
    against)."""

    wants_output = True

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int) -> None:
        self.scale, self.shift, self.channel_dim = scale, shift, channel_dim
        self.gap = 0.0
        self.range = 0.0
        self._z: torch.Tensor | None = None

    def record(self, z: torch.Tensor) -> None:
        self._z = z.detach().clone()  # before the call: an in-place activation overwrites it

    def output(self, y: torch.Tensor) -> None:
        z, self._z = self._z, None
        shape = [1] * z.dim()
        shape[self.channel_dim % z.dim()] = -1
        scale = self.scale.to(z.device, torch.float64).view(shape)
        shift = self.shift.to(z.device, torch.float64).view(shape)
        diff = y.detach().double() - (z.double() * scale + shift)
        self.gap = max(self.gap, float(diff.abs().max()) if diff.numel() else 0.0)
        if y.numel():  # the scale rounding is relative to: the larger of input and output
            self.range = max(self.range, float(z.double().abs().max()), float(y.detach().double().abs().max()))

    def report(self) -> dict[str, float]:
        return {"gap": self.gap, "range": self.range}


class _ProbeInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, probes: dict[str, Any]) -> None:
        super().__init__(gm)
        self.probes = probes

    def run_node(self, n: fx.Node) -> Any:
        probe = self.probes.get(n.name)
        if probe is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        probe.record(args[0] if args else kwargs["input"])
        out = super().run_node(n)
        if probe.wants_output:
            probe.output(out)
        return out


def _batches(data: Any) -> Iterable[Any]:
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]  # one batch (iterating a tensor would yield its rows)
    if not isinstance(data, Iterable):
        raise ConfigError(f"check={type(data).__name__}: pass held-out data as an iterable of batches "
                          "(a DataLoader, a list of tensors or (inputs, labels) tuples)")
    return data


def _to(v: Any, device: torch.device | None) -> Any:
    if device is None:
        return v
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, Mapping):
        return {k: _to(x, device) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(_to(x, device) for x in v)
    return v


def observed_flips(model: nn.Module, graph: Any, sites: Mapping[str, Any], data: Any) -> dict[str, dict[str, Any]]:
    """Run ``model`` on held-out ``data`` and count, per site, samples that leave the fixed pieces.

    Args:
        model: the original network (eval mode and no_grad are set here, flags restored).
        graph: its :class:`egp_fast.graph.SiteGraph` (the fx graph when traced, else module hooks).
        sites: site name -> :class:`egp_fast.measurement.SiteStats` of the sites to check (their
            ``piece`` is the piece each neuron was fixed in).
        data: an iterable of batches (tensors, ``(inputs, labels)`` tuples or dicts), as
            :func:`egp_fast.measure_entropy` takes; a single tensor or dict is one batch.

    Returns:
        site -> ``{"samples", "flipped_samples", "flip_rate", "channels_changed", "channels",
        "per": "sample"}``: ``flip_rate`` is the fraction of held-out samples on which at least
        one neuron of the site was outside its piece (any position), ``channels_changed`` how
        many neurons left their piece on at least one sample.

    Raises:
        DataError: no batch in ``data``, or the model rejects a batch.
    """
    from egp_fast.measurement import split_batch

    by_name = {s.name: s for s in graph.sites}
    probes = {n: _Probe(st.piece, by_name[n].breakpoints, by_name[n].channel_dim)
              for n, st in sites.items() if n in by_name}
    if not probes:
        return {}
    seen = _run_probes(model, graph, probes, (split_batch(b) for b in _batches(data)), "held-out check")
    if seen == 0:
        raise DataError("check= gave no batches; pass held-out data (an iterable of batches)")
    return {n: p.report() for n, p in probes.items()}


def affine_gaps(model: nn.Module, graph: Any, sites: Mapping[str, Any], example_inputs: Any) -> dict[str, dict[str, float]]:
    """Run ``model`` on ``example_inputs`` and measure, per site, how far the affine map that would replace
    it (:func:`egp_fast.folding.site_affine` of its fixed pieces) is from the activation's output.

    A GELU or SiLU site at zero entropy is affine only approximately; far enough from 0 the gap
    is below float rounding, and :func:`egp_fast.collapse` with ``exact=True`` removes such a
    site only then.

    Args:
        model, graph: as :func:`observed_flips`.
        sites: site name -> statistics whose every channel is constant (``piece`` >= 0).
        example_inputs: one batch the model accepts (tensor, tuple of positional inputs, dict).

    Returns:
        site -> ``{"gap": largest |activation - affine|, "range": largest |input| or |activation|}``.

    Raises:
        DataError: the model rejects ``example_inputs``.
    """
    from egp_fast.folding.affine import site_affine
    from egp_fast.graph import normalize_inputs

    by_name = {s.name: s for s in graph.sites}
    probes = {}
    for n, st in sites.items():
        if n in by_name:
            site = by_name[n]
            scale, shift = site_affine(site.kind, st.piece, site.params, dtype=torch.float64)
            probes[n] = _Gap(scale, shift, site.channel_dim)
    if not probes:
        return {}
    _run_probes(model, graph, probes, [normalize_inputs(example_inputs)], "affine check")
    return {n: p.report() for n, p in probes.items()}


def _run_probes(model: nn.Module, graph: Any, probes: dict[str, Any], batches: Iterable[tuple[tuple, dict]],
                what: str) -> int:
    """Run ``model`` on every ``(args, kwargs)`` of ``batches`` (eval mode, no_grad), handing each
    probed site's input to its probe (and its output, when the probe wants it): through the fx
    graph when traced, else module hooks. Returns the number of batches run."""
    from egp_fast.graph import eval_mode, placeholder_args
    from egp_fast.measurement import model_device

    by_name = {s.name: s for s in graph.sites}
    device = model_device(model)
    seen = 0
    handles = []
    try:
        if graph.traced:
            gm = graph.graph_module
            run = _ProbeInterpreter(gm, {by_name[n].node: p for n, p in probes.items()})
        else:
            modules = dict(model.named_modules())
            calls: dict[str, int] = {}
            current: dict[str, Any] = {}  # module -> the probe of the call in progress
            for n, site in by_name.items():
                if n in probes and site.module in modules and site.module not in {h[0] for h in handles}:
                    def hook(mod, inp, _name=site.module):
                        k = calls.get(_name, 0)
                        calls[_name] = k + 1
                        p = probes.get(_name if k == 0 else f"{_name}:{k}")
                        if p is not None:
                            p.record(inp[0])
                            current[_name] = p

                    def after(mod, inp, out, _name=site.module):
                        p = current.pop(_name, None)
                        if p is not None and p.wants_output:
                            p.output(out)

                    m = modules[site.module]
                    handles.append((site.module, m.register_forward_pre_hook(hook)))
                    handles.append((site.module, m.register_forward_hook(after)))
        with eval_mode(model):
            for args, kwargs in batches:
                args, kwargs = _to(args, device), _to(kwargs, device)
                try:
                    if graph.traced:
                        run.run(*placeholder_args(model, gm, args, kwargs)[0])
                    else:
                        calls.clear()
                        model(*args, **kwargs)
                except Exception as e:
                    raise DataError(f"{what}: the model failed on batch {seen}: {type(e).__name__}: {e}") from e
                seen += 1
    finally:
        for _, h in handles:
            h.remove()
    return seen
