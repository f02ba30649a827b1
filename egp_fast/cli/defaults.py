"""Pieces shared by the ``egp-fast`` option parser (:mod:`egp_fast.cli.commands`) and the run
(:mod:`egp_fast.cli.run`): the program name, every option's default, the options hash that
ties a checkpoint to its config, and the DataLoader worker default. Both modules import from
here; the run never imports the parser. Private to the command: nothing outside
:mod:`egp_fast.cli` imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

PROG = "egp-fast"

#: every option of ``prune``/``demo`` with its default (None = derived from the data/method)
DEFAULTS: dict[str, Any] = {
    "model": "cifar_resnet18", "width": None, "weights": None,
    "data": "digits", "image_size": None, "limit": None, "val_fraction": 0.1,
    "method": "egp", "rounds": None, "step": 0.5, "dense_epochs": 15, "epochs": None,
    "max_drop": 0.01, "linearization": "identity", "objective": "sites", "target_speedup": None,
    "optimizer": None, "dense_lr": None, "lr": None, "momentum": 0.9, "weight_decay": 1e-4,
    "schedule": "cosine", "milestones": [0.5, 0.75], "gamma": 0.1,
    "batch_size": 64, "eval_batch_size": 256, "amp": False, "channels_last": False, "seed": 0,
    "collapse": True, "approx_collapse": False, "measure_batches": None, "entropy_mode": "exact",
    "measure": "full", "max_flip": 0.01, "confidence": 0.95, "fold_epochs": 0, "fold_lr": None,
    "compile": False,
    "workers": None, "device": "auto", "out": None, "name": None, "runs_root": "runs",
    "resume": None, "progress": True, "latency": True, "threads": None,
}
#: ``--measure``: an eval-mode pass over the training split (``full``), the same pass stopped once
#: every site is decided (``auto``), or counts taken during each round's last training epoch
#: (``track``, no extra pass)
MEASURE_MODES = ("full", "auto", "track")
#: options that may differ when resuming (they do not change the results)
RUNTIME_OPTIONS = frozenset({"workers", "progress", "resume", "out", "name", "runs_root", "latency",
                             "threads"})
#: per-method defaults of the options whose DEFAULTS entry is None
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "egp": {"rounds": 4, "epochs": 8},
    "imp": {"rounds": 4, "epochs": 8},
    # EASIER removes one site per step: up to every site of the model (stopped by --max-drop),
    # with a shorter fine-tune per step so the digits demo stays within minutes.
    "easier": {"rounds": 17, "epochs": 2},
}
METHODS = tuple(METHOD_DEFAULTS)
#: optimizer defaults by model family: the EGP recipe (SGD) for convolutional networks, AdamW
#: for the transformer (SGD at lr 0.1 trains the digits ViT poorly)
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {"optimizer": "adamw", "dense_lr": 1e-3, "lr": 5e-4},
    "other": {"optimizer": "sgd", "dense_lr": 0.1, "lr": 0.01},
}


def options_hash(cfg: dict) -> str:
    """A short hash of the options that change a run's results (not the runtime ones).

    Args:
        cfg: the run's options (missing keys count as ``None``).

    Returns:
        16 hex digits.

    Example:
        >>> options_hash(DEFAULTS) == options_hash({**DEFAULTS, "progress": False})
        True
    """
    keys = sorted(k for k in DEFAULTS if k not in RUNTIME_OPTIONS)
    blob = json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``, else ``os.cpu_count``).

    Returns:
        At least 1.

    Example:
        >>> available_cores() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(world_size: int = 1) -> int:
    """DataLoader workers per process: at most 4, and no more than the cores each process gets.

    A 2-core machine gets 2 (1 per rank under a 2-process torchrun); PyTorch warns once per
    epoch when a loader asks for more workers than there are cores.

    Args:
        world_size: processes sharing this machine's cores.

    Returns:
        A worker count >= 0 (0 means loading in the main process).

    Example:
        >>> 0 <= default_workers() <= 4
        True
    """
    per_rank = available_cores() // max(1, int(world_size))
    return max(0, min(4, per_rank))
