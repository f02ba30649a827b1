"""Depth report: how deep and costly a model is, before and after collapse.

:func:`depth_report` counts the nonlinear sites, the weight layers on the longest
input-to-output path, the weight layer calls, parameters and FLOPs (``torch.utils.flop_counter``)
of a model on an example batch, and can time it alone on the CPU. :func:`egp_fast.collapse`
reports it for the input and the collapsed model; to compare the latency of two models use
:func:`egp_fast.folding.compare_latency`, which times them interleaved.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from egp_fast.errors import DataError, ModelError
from egp_fast.folding.latency import _batched
from egp_fast.graph import WEIGHT_TYPES, describe_inputs, discover_sites, eval_mode, normalize_inputs, trace, unwrap_model

__all__ = ["depth_report"]


def _longest_path(model: nn.Module, gm: fx.GraphModule | None = None) -> tuple[int | None, int | None]:
    if gm is None:
        try:
            gm = trace(model)
        except Exception:
            return None, None
    mods = dict(gm.named_modules())
    depth: dict[fx.Node, int] = {}
    calls = 0
    for n in gm.graph.nodes:
        w = 1 if n.op == "call_module" and isinstance(mods.get(n.target), WEIGHT_TYPES) else 0
        calls += w
        depth[n] = w + max((depth[p] for p in n.all_input_nodes), default=0)
    return max(depth.values(), default=0), calls


def _latency_ms(model: nn.Module, example_inputs: Any, b: int, budget_s: float, max_runs: int = 15) -> float:
    args, kwargs = _batched(example_inputs, b)
    with eval_mode(model):
        model(*args, **kwargs)  # warm-up: allocator, lazy init
        times = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < 3 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            model(*args, **kwargs)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def depth_report(model: nn.Module, example_inputs: Any, measure_latency: bool = True) -> dict[str, Any]:
    """Depth and cost of ``model`` on ``example_inputs``.

    Args:
        model: any network.
        example_inputs: a batch it accepts; FLOPs are counted on it as given.
        measure_latency: also time it on this machine's CPU threads at batch 1 and 64
            (the first sample repeated; median of up to 15 runs after a warm-up). To compare
            two models use :func:`compare_latency`, which times them interleaved.

    Returns:
        dict with ``sites`` (nonlinear sites), ``longest_path`` (weight layers on the
        longest input-to-output path; None if fx cannot trace), ``weight_layers`` (weight
        layer calls), ``params``, ``nonzero_params``, ``flops`` and, when measured,
        ``latency_ms_b1``, ``latency_ms_b64`` and ``threads``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> depth_report(net, torch.randn(2, 4), measure_latency=False)["longest_path"]
        2
    """
    model = unwrap_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = None
        try:
            found = discover_sites(model, example_inputs)
            n_sites, gm = len(found.sites), found.graph_module
        except ModelError:
            n_sites = 0
    longest, calls = _longest_path(model, gm)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    args, kwargs = normalize_inputs(example_inputs)
    with eval_mode(model):
        try:
            with FlopCounterMode(display=False) as fc:
                model(*args, **kwargs)
        except Exception as e:
            try:  # the counter's module tracker rejects some no_grad views of parameters (timm's
                # CaiT and PiT expand a class token): count again with gradients on
                with torch.enable_grad(), FlopCounterMode(display=False) as fc:
                    model(*args, **kwargs)
            except Exception:
                raise DataError(f"the model failed on example_inputs ({describe_inputs(args, kwargs)}): "
                                f"{type(e).__name__}: {e}") from e
    rep: dict[str, Any] = {
        "sites": n_sites,
        "longest_path": longest,
        "weight_layers": calls,
        "params": int(params),
        "nonzero_params": int(nonzero),
        "flops": int(fc.get_total_flops()),
    }
    if measure_latency:
        rep["latency_ms_b1"] = _latency_ms(model, example_inputs, 1, budget_s=1.0)
        rep["latency_ms_b64"] = _latency_ms(model, example_inputs, 64, budget_s=4.0, max_runs=7)
        rep["threads"] = torch.get_num_threads()
    return rep
