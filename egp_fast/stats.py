"""Entropy measurement: ON counts per site and channel over a data pass, then entropies.

Exact counting (the default) accumulates integer counts of ``z > breakpoint`` for every
site, channel and breakpoint over the whole pass, on the model's device, and computes the
entropies once at the end (order-free, and summable across processes with ``all_reduce``).
``mode="paper"`` reproduces the reference scripts: an entropy per batch, with ``p`` clamped to
``[1e-5, 1 - 1e-5]`` inside the logs, averaged over batches.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast import ops
from egp_fast.errors import ConfigError, DataError, EGPError, NumericsError
from egp_fast.graph import Site, SiteGraph, _describe, _unwrap, discover_sites, eval_mode
from egp_fast.ops._dispatch import backend_for

LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_PAPER_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Records.


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

    @property
    def collapsible(self) -> bool:
        """True when every channel stays in one piece on the data (the site is affine)."""
        return bool((self.piece >= 0).all()) and self.observations > 0

    def to_dict(self, channels: bool = False) -> dict[str, Any]:
        d = {
            "name": self.name,
            "kind": self.kind,
            "producers": list(self.producers),
            "channel_dim": self.channel_dim,
            "channels": self.channels,
            "breakpoints": list(self.breakpoints),
            "exact": self.exact,
            "observations": self.observations,
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
    """Result of :func:`measure_entropy`: one :class:`SiteStats` per site, in execution order."""

    sites: dict[str, SiteStats]
    mode: str
    batches: int
    seconds: float = 0.0

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
        return {
            "mode": self.mode,
            "batches": self.batches,
            "seconds": self.seconds,
            "zero_entropy_sites": self.zero_entropy_sites(),
            "sites": [s.to_dict(channels) for s in self.sites.values()],
        }


# --------------------------------------------------------------------------------------------
# Batches.


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model inputs of one batch, as ``(args, kwargs)``.

    Rule: a tensor is the input; a tuple or list is ``(input, *labels)`` and only its first
    element is passed; a dict is passed as keyword arguments, minus the label keys
    ``label, labels, target, targets, y``.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("a batch is an empty tuple/list; yield (inputs, labels) or inputs")
        return (batch[0],), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    raise DataError(
        f"a batch has type {type(batch).__name__}; data must yield tensors, (inputs, labels) "
        "tuples, or dicts of keyword inputs"
    )


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _check_device(args: tuple, kwargs: dict, device: torch.device, index: int) -> None:
    for t in _tensors(args) + _tensors(kwargs):
        if t.device != device:
            raise DataError(
                f"batch {index} is on {t.device} but the model is on {device}; move the data "
                f"to the model's device (e.g. x.to('{device}')) or the model to the data's"
            )


# --------------------------------------------------------------------------------------------
# Counting.


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
        self.first: list[torch.Tensor] = []
        self.rest: list[list[torch.Tensor]] = []
        off = 0
        for c in sizes:
            self.first.append(self.flat[off : off + c])
            off += c
        for s, c in zip(sites, sizes):
            views = []
            for _ in s.breakpoints[1:]:
                views.append(self.flat[off : off + c])
                off += c
            self.rest.append(views)
        self.observations = [0] * len(sites)
        self.paper = paper
        self.paper_sum = torch.zeros(len(sites), dtype=torch.float64, device=device) if paper else None
        self.batches = 0
        self.backend: str | None = None
        self._impl: dict[tuple[torch.dtype, torch.device], Any] = {}

    def record(self, i: int, z: torch.Tensor) -> None:
        s = self.sites[i]
        cdim = s.channel_dim % z.dim() if z.dim() else 0
        if z.dim() == 0 or z.shape[cdim] != s.channels:
            raise DataError(
                f"site {s.name!r} saw a tensor of shape {tuple(z.shape)} but has {s.channels} "
                f"channels along dim {s.channel_dim} on the example inputs; measure with batches "
                "of the same layout as example_inputs"
            )
        obs = z.numel() // s.channels
        if self.paper:
            before = self.first[i].clone()
        key = (z.dtype, z.device)
        fn = self._impl.get(key)
        if fn is None or z.numel() == 0:
            # First call for this dtype/device: the public op validates everything and picks
            # the backend; later calls go straight to that implementation (tens of microseconds
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
        self.observations[i] += obs
        if self.paper and obs > 0:
            p = ((self.first[i] - before).to(torch.float64) / obs).clamp(_PAPER_EPS, 1 - _PAPER_EPS)
            h = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
            self.paper_sum[i] += h.mean()


class _Recorder(nn.Module):
    """Inserted before each activation node of the traced graph; counts, returns nothing."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def forward(self, index: int, z: torch.Tensor) -> None:
        self.counter.record(index, z)


def _cached_instrument(graph: SiteGraph, counter: _Counter) -> fx.GraphModule:
    # Building the instrumented module costs a few ms per pass (resnet18: ~3.5 ms); a Pruner
    # measures the same graph every round, so keep it on the SiteGraph and swap the counter.
    gm = getattr(graph, "_egp_instrumented", None)
    if gm is None:
        gm = _instrument(graph, counter)
        graph._egp_instrumented = gm
    gm._egp_recorder.counter = counter
    return gm


def _instrument(graph: SiteGraph, counter: _Counter) -> fx.GraphModule:
    gm = graph.graph_module
    new_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    index = {s.node: i for i, s in enumerate(graph.sites)}
    for node in gm.graph.nodes:
        if node.name in index:
            inp = node.args[0] if node.args else node.kwargs["input"]
            new_graph.call_module("_egp_recorder", (index[node.name], env[inp]))
        env[node] = new_graph.node_copy(node, lambda n: env[n])
    # GraphModule copies the attributes the graph references from `holder` by reference:
    # the instrumented module shares every parameter with the model.
    holder = nn.Module()
    for name, mod in gm.named_children():
        holder.add_module(name, mod)
    for name, _ in gm.named_parameters(recurse=False):
        setattr(holder, name, getattr(gm, name))
    for name, _ in gm.named_buffers(recurse=False):
        holder.register_buffer(name, getattr(gm, name))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in node.target and not hasattr(holder, node.target):
            setattr(holder, node.target, getattr(gm, node.target))
    holder.add_module("_egp_recorder", _Recorder(counter))
    return fx.GraphModule(holder, new_graph, "EGPMeasure")


class _HookRecorder:
    def __init__(self, model: nn.Module, graph: SiteGraph, counter: _Counter) -> None:
        self.handles = []
        by_module: dict[str, list[int]] = {}
        for i, s in enumerate(graph.sites):
            by_module.setdefault(s.module, []).append(i)
        self.calls: dict[str, int] = {}
        modules = dict(model.named_modules())
        for name, idxs in by_module.items():
            def hook(mod, inp, name=name, idxs=idxs):
                k = self.calls.get(name, 0)
                self.calls[name] = k + 1
                if k < len(idxs):
                    counter.record(idxs[k], inp[0])

            self.handles.append(modules[name].register_forward_pre_hook(hook))

    def reset(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
    graph: SiteGraph, counter: _Counter, mode: str, backend: str | None, seconds: float
) -> EntropyStats:
    sites = graph.sites
    device = counter.flat.device
    sizes = torch.tensor([s.channels for s in sites], dtype=torch.int64)
    offsets = torch.zeros(len(sites) + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    obs_per_entry = torch.repeat_interleave(
        torch.tensor(counter.observations, dtype=torch.int64), sizes
    ).to(device)
    t = int(offsets[-1])
    out = ops.entropy(counter.flat[:t], obs_per_entry, offsets.to(device), backend=backend_for("entropy", backend))
    result: dict[str, SiteStats] = {}
    layer_h = out.layer_entropy.cpu()
    layer_all = out.layer_entropy_all.cpu()
    paper = (counter.paper_sum / max(counter.batches, 1)).cpu() if counter.paper else None
    # Two-piece sites (ReLU-like, the common case) get their piece counts and constant pieces
    # from a few whole-buffer ops; only multi-piece sites (ReLU6, Hardtanh) are done one by one.
    on_all = counter.flat[:t]
    pieces_all = torch.stack([obs_per_entry - on_all, on_all])
    piece_all = torch.where(
        (on_all == obs_per_entry) & (obs_per_entry > 0),
        torch.ones_like(on_all),
        torch.where((on_all == 0) & (obs_per_entry > 0), torch.zeros_like(on_all), torch.full_like(on_all, -1)),
    )
    for i, s in enumerate(sites):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        obs = counter.observations[i]
        first = counter.first[i]
        p_on = out.p_on[lo:hi]
        h = out.channel_entropy[lo:hi]
        ent, ent_all = float(layer_h[i]), float(layer_all[i])
        if len(s.breakpoints) > 1:
            # Multi-piece activations: entropy of the piece distribution, in bits.
            pieces = _piece_counts(s, first, counter.rest[i], obs)
            q = pieces.to(torch.float64) / max(obs, 1)
            h = -(torch.xlogy(q, q).sum(0)) / math.log(2)
            nonconst = (pieces < obs).all(0)
            ent = float(h[nonconst].mean()) if bool(nonconst.any()) else 0.0
            ent_all = float(h.mean()) if h.numel() else 0.0
            full = pieces == obs
            piece = torch.where(
                full.any(0), full.to(torch.int64).argmax(0), torch.full_like(first, -1)
            ) if obs > 0 else torch.full_like(first, -1)
        else:
            pieces = pieces_all[:, lo:hi]
            piece = piece_all[lo:hi]
        result[s.name] = SiteStats(
            name=s.name,
            kind=s.kind,
            producers=list(s.producers),
            channel_dim=s.channel_dim,
            channels=s.channels,
            breakpoints=tuple(s.breakpoints),
            exact=s.exact,
            observations=obs,
            on_counts=first.clone(),
            piece_counts=pieces,
            p_on=p_on,
            channel_entropy=h,
            piece=piece,
            entropy=float(paper[i]) if paper is not None else ent,
            entropy_all=ent_all,
            exact_entropy=ent,
        )
    return EntropyStats(result, mode, counter.batches, seconds)


# --------------------------------------------------------------------------------------------
# Public entry point.


def _is_reiterable(data: Any) -> bool:
    return iter(data) is not data


def measure_entropy(
    model: nn.Module,
    data: Iterable[Any],
    example_inputs: Any = None,
    max_batches: int | None = None,
    mode: str = "exact",
    progress: bool = True,
    backend: str | None = None,
    graph: SiteGraph | None = None,
) -> EntropyStats:
    """Measure the activation entropy of every site of ``model`` over ``data``.

    The model runs in eval mode under ``no_grad`` (its training flags are restored after);
    counts stay on the model's device until the pass ends; under ``torch.distributed`` the
    counts of all ranks are summed, so every rank gets the same statistics.

    Args:
        model: the network (a DDP/DataParallel wrapper is unwrapped).
        data: an iterable of batches on the model's device: tensors, ``(inputs, labels)``
            tuples, or dicts of keyword inputs (label keys dropped; see :func:`split_batch`).
        example_inputs: a batch for tracing; default: the inputs of the first batch.
        max_batches: measure at most this many batches (``None``: all).
        mode: ``"exact"`` (integer counts over the whole pass) or ``"paper"`` (per-batch
            entropies with clamped ``p``, averaged: the reference scripts' way).
        progress: show a progress bar over batches (rank 0 only).
        backend: force a backend for the counting ops (``None``: automatic).
        graph: a :class:`SiteGraph` from :func:`discover_sites` to reuse.

    Returns:
        :class:`EntropyStats`.

    Raises:
        DataError: no batches, batches on another device, or batches the model rejects.
        NumericsError: NaN/Inf appeared in an activation (the message names the site).

    Example:
        >>> import torch, egp_fast
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> stats = egp_fast.measure_entropy(net, [torch.randn(16, 4)], progress=False)
        >>> list(stats.sites)
        ['1']
    """
    if mode not in ("exact", "paper"):
        raise ConfigError(f"mode={mode!r} is not a measurement mode; use 'exact' or 'paper'")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ConfigError(f"max_batches={max_batches!r} must be a positive int or None")
    if data is None:
        raise DataError("data is None; pass an iterable of batches (a DataLoader, a list of tensors...)")
    model = _unwrap(model)
    device = model_device(model)
    start = time.perf_counter()
    try:
        iterator = iter(data)
    except TypeError:
        raise DataError(
            f"data has type {type(data).__name__}, which is not iterable; pass an iterable of "
            "batches (a DataLoader, a list of tensors...)"
        ) from None
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError("data yielded no batches; measuring entropy needs at least one batch") from None
    # Before tracing on it: a batch on the wrong device deserves this message, not a trace error.
    _check_device(*split_batch(first), device, 0)
    if example_inputs is None:
        a, k = split_batch(first)
        example_inputs = k if k else (a[0] if len(a) == 1 else a)
    if graph is None:
        graph = discover_sites(model, example_inputs)
    counter = _Counter(graph.sites, device, paper=(mode == "paper"))
    counter.backend = backend_for("sign_count", backend)
    runner = _cached_instrument(graph, counter) if graph.traced else None
    hooks = None if runner is not None else _HookRecorder(model, graph, counter)
    total = None
    if hasattr(data, "__len__"):
        total = len(data)
        if max_batches is not None:
            total = min(total, max_batches)
    elif max_batches is not None:
        total = max_batches
    bar = _progress(total, progress, "measuring entropy")
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with eval_mode(model):
            index = 0
            batch = first
            while True:
                args, kwargs = split_batch(batch)
                _check_device(args, kwargs, device, index)
                try:
                    if runner is not None:
                        out = runner(*_bind(graph, model, args, kwargs))
                    else:
                        hooks.reset()
                        out = model(*args, **kwargs)
                except EGPError:  # ours already says what is wrong (bad backend, bad layout...)
                    raise
                except Exception as e:
                    raise DataError(
                        f"the model failed on batch {index} ({_describe(args, kwargs)}): "
                        f"{type(e).__name__}: {e}"
                    ) from e
                for t in _tensors(out):
                    if t.is_floating_point():
                        nonfinite += (~torch.isfinite(t)).any()
                counter.batches += 1
                index += 1
                if bar is not None:
                    bar.update(1)
                if max_batches is not None and index >= max_batches:
                    break
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
    finally:
        if hooks is not None:
            hooks.remove()
        if runner is not None:
            runner._egp_recorder.counter = None  # the cached module keeps no counts alive
        if bar is not None:
            bar.close()
    _all_reduce(counter)
    if int(nonfinite) > 0:  # the one host sync of the pass (besides the end)
        raise NumericsError(_locate_nonfinite(model, data, graph, max_batches))
    return _finish(graph, counter, mode, backend, time.perf_counter() - start)


def _bind(graph: SiteGraph, model: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    if not kwargs:
        return list(args)
    from egp_fast.graph import _placeholder_args

    values, _ = _placeholder_args(model, graph.graph_module, args, kwargs)
    return values


def _all_reduce(counter: _Counter) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    dist = torch.distributed
    dist.all_reduce(counter.flat)
    meta = torch.tensor(counter.observations + [counter.batches], dtype=torch.int64,
                        device=counter.flat.device)
    dist.all_reduce(meta)
    counter.observations = [int(v) for v in meta[:-1].tolist()]
    counter.batches = int(meta[-1])
    if counter.paper_sum is not None:
        dist.all_reduce(counter.paper_sum)


def _locate_nonfinite(model: nn.Module, data: Any, graph: SiteGraph, max_batches: int | None) -> str:
    """Find the first site whose pre-activation is not finite (a second, checking pass)."""
    generic = (
        "NaN or Inf appeared in the model's output during the entropy pass; check the inputs "
        "for NaN/Inf and the weights (e.g. a diverged fine-tune)"
    )
    if not graph.traced or not _is_reiterable(data):
        return generic + " (the site could not be located: the data can only be iterated once)"
    culprit: list[str] = []

    class _Check(nn.Module):
        def forward(self, index: int, z: torch.Tensor) -> None:
            if not culprit and not bool(torch.isfinite(z).all()):
                culprit.append(graph.sites[index].name)

    counter = _Counter(graph.sites, model_device(model), paper=False)
    gm = _instrument(graph, counter)
    gm._egp_recorder = _Check()
    with eval_mode(model):
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            args, kwargs = split_batch(batch)
            gm(*_bind(graph, model, args, kwargs))
            if culprit:
                return (
                    f"NaN or Inf in the input of site {culprit[0]!r} (batch {i}); check the data "
                    "and the weights of the layers feeding that site"
                )
    return generic


def _progress(total: int | None, enabled: bool, desc: str):
    if not enabled or not _is_rank0():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but never fail a measurement over a bar
        warnings.warn("tqdm is not installed; no progress bar", stacklevel=3)
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False)


def _is_rank0() -> bool:
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0
