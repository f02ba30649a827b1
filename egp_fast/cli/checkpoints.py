"""Checkpoints of an ``egp-fast`` run: RNG state, atomic file writes, save and load.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (state_dicts of models,
optimizers and schedulers qualify) tagged with :data:`CHECKPOINT_FORMAT`. It is written
atomically (temporary file, fsync, ``os.replace``), so a run killed mid-write leaves the old
file, and read with ``torch.load(..., weights_only=True)``, so a file never runs code; a
truncated or foreign file raises :class:`~egp_fast.errors.CheckpointError`.
:func:`capture_rng_state` and :func:`restore_rng_state` put every RNG into such a dict, so a
resumed run draws exactly the numbers an uninterrupted run draws.
"""

from __future__ import annotations

import io
import os
import random
from typing import Any

import torch

from egp_fast.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "egp_fast.checkpoint/1"


# ----------------------------------------------------------------------------------------------
# RNG state
def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states, in a ``weights_only``-loadable dict.

    Returns:
        A dict of tensors, ints and tuples.

    Example:
        >>> s = capture_rng_state(); a = torch.rand(1); restore_rng_state(s)
        >>> bool(torch.rand(1) == a)
        True
    """
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": [py_version, list(py_state), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured.

    Args:
        state: the captured dict.

    Example:
        >>> restore_rng_state(capture_rng_state())
    """
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# ----------------------------------------------------------------------------------------------
# atomic files and checkpoints
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    Args:
        path: destination.
        data: file contents.

    Example:
        >>> atomic_write_bytes("/tmp/egp_demo.bin", b"ok")
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text.

    Args:
        path: destination.
        text: contents.

    Example:
        >>> atomic_write_text("/tmp/egp_demo.txt", "ok")
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save a checkpoint atomically (temporary file, fsync, ``os.replace``).

    The dict must hold only what ``torch.load(weights_only=True)`` accepts: tensors, numbers,
    strings, lists, tuples, dicts (state_dicts of models, optimizers and schedulers qualify).
    A ``"format"`` tag is added so foreign files are recognised on load.

    Args:
        path: destination file.
        state: the checkpoint contents.

    Example:
        >>> save_checkpoint("/tmp/egp_ckpt.pt", {"model": torch.nn.Linear(2, 2).state_dict()})
    """
    buf = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded.

    Returns:
        The saved dict.

    Raises:
        CheckpointError: missing, truncated/corrupt, or not an egp_fast checkpoint.

    Example:
        >>> save_checkpoint("/tmp/egp_ckpt.pt", {"epoch": 3})
        >>> load_checkpoint("/tmp/egp_ckpt.pt")["epoch"]
        3
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; nothing to resume from")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle errors of every kind mean the same thing to the user
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); "
            "delete it to restart the run, or restore it from a backup") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an egp_fast checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state
