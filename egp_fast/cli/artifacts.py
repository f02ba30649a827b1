"""What a finished ``egp-fast`` run leaves behind besides its report: versions, evidence rows,
latency fields and the collapsed model saved so it reloads without egp_fast.

:func:`versions` records the software and device a run used (``config.json``, ``report.json``);
:func:`evidence_rows` and :func:`latency_summary` turn a :class:`~egp_fast.folding.CollapseResult`
into the summary's fields; :func:`save_collapsed` writes the collapsed model (``torch.export``
with a dynamic batch, checked after reloading by :func:`export_checked`, else TorchScript).
"""

from __future__ import annotations

import io
import os
import platform
from typing import Any

import torch

from egp_fast._version import __version__
from egp_fast.cli.checkpoints import atomic_write_bytes

__all__ = ["evidence_rows", "export_checked", "latency_summary", "save_collapsed", "versions"]


def versions(device: torch.device) -> dict:
    """The versions and machine behind a run: egp_fast, torch, torchvision, Python, device, GPU.

    Args:
        device: the device the run computes on.

    Returns:
        A JSON-safe dict of strings.

    Example:
        >>> sorted(versions(torch.device("cpu")))[:3]
        ['device', 'egp_fast', 'platform']
    """
    out = {"egp_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "platform": platform.platform()}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def evidence_rows(res) -> list[dict]:
    """Per removed site: the samples behind its zero entropy, its flip bound and the held-out flips."""
    rows = []
    for e in res.removed:
        if e.get("kind") != "linearize" or not e.get("site"):
            continue
        held = e.get("held_out") or {}
        rows.append({"site": e["site"], "samples": e.get("samples"), "flip_bound": e.get("flip_bound"),
                     "held_out_samples": held.get("samples"), "held_out_flipped": held.get("flipped_samples"),
                     "held_out_flip_rate": held.get("flip_rate")})
    return rows


def latency_summary(lat: dict) -> dict:
    """Summary fields from collapse's interleaved latency comparison (pruned = a, collapsed = b)."""
    rows = lat.get("batches") or {}
    out: dict[str, Any] = {}
    for bs, row in sorted(((int(k), v) for k, v in rows.items())):
        key = "" if bs == 64 else f"_b{bs}"
        out.update({f"latency{key}_pruned_ms": row["a_ms"], f"latency{key}_collapsed_ms": row["b_ms"],
                    f"latency{key}_speedup": row.get("speedup"), f"latency{key}_speedup_iqr": row.get("speedup_iqr"),
                    f"latency{key}_inside_noise": row.get("inside_noise"), f"latency{key}_rounds": row.get("rounds")})
    if rows:
        out["latency_batch"] = 64 if any(int(k) == 64 for k in rows) else int(next(iter(rows)))
        out["latency_threads"] = lat.get("threads")
    return out


def save_collapsed(model: torch.nn.Module, example: torch.Tensor, run_dir: str) -> dict:
    """Save the collapsed model so it reloads without egp_fast's classes, at any batch size.

    ``collapsed.pt2`` (``torch.export``; reload with ``torch.export.load(p).module()``) with a
    dynamic batch dimension, and dynamic height/width too when the model allows it (a model
    with fixed position embeddings or a precomputed border map does not: it keeps the example's
    spatial size). The file is loaded back and run at batch 1, 7 and 64 against ``model``
    before it is reported. When the model does not export, ``collapsed.ts`` (TorchScript trace;
    ``torch.jit.load(p)``). The state_dict goes to ``collapsed_state_dict.pt`` either way.
    """
    model = model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(os.path.join(run_dir, "collapsed_state_dict.pt"), buf.getvalue())
    x = example.detach()
    errors = []
    for dims in (("batch", "height", "width"), ("batch",)):
        if len(dims) > 1 and x.dim() != 4:
            continue
        try:
            ep, batches = export_checked(model, x, dims)
        except Exception as e:  # export is strict about dynamic Python; try fewer dynamic dims
            errors.append(f"dynamic {'/'.join(dims)}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
            continue
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        atomic_write_bytes(os.path.join(run_dir, "collapsed.pt2"), buf.getvalue())
        out = {"file": "collapsed.pt2", "format": "torch.export", "load": "torch.export.load(path).module()",
               "dynamic": list(dims), "checked_batches": batches}
        if errors:
            out["static_dims_because"] = errors
        return out
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    atomic_write_bytes(os.path.join(run_dir, "collapsed.ts"), buf.getvalue())
    return {"file": "collapsed.ts", "format": "torchscript", "load": "torch.jit.load(path)",
            "export_error": "; ".join(errors)[:600]}


def export_checked(model: torch.nn.Module, x: torch.Tensor, dims: tuple[str, ...]):
    """torch.export ``model`` with the named dimensions dynamic, reload it from bytes and check it
    against ``model`` at batch 1, 7 and 64 (and a larger image when height/width are dynamic)."""
    from torch.export import Dim

    spec = {0: Dim("batch", min=1, max=1 << 16)}
    if "height" in dims:
        spec.update({2: Dim("height", min=2, max=4096), 3: Dim("width", min=2, max=4096)})
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=({**spec},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    batches = [1, 7, 64]
    shapes = [(b, *x.shape[1:]) for b in batches]
    if "height" in dims:
        shapes.append((3, x.shape[1], x.shape[2] * 2, x.shape[3] * 2))
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for shape in shapes:
            xb = torch.randn(shape, generator=g).to(x.device, x.dtype)
            want, got = model(xb), loaded(xb)
            tol = 1e-4 * max(1.0, float(want.abs().max()))
            if got.shape != want.shape or float((got - want).abs().max()) > tol:
                raise RuntimeError(f"the exported model differs from the collapsed model at input {list(shape)}")
    return ep, batches

