"""The run directory of an ``egp-fast prune`` run: picked, checked and created before the run.

A new run gets ``--out DIR``, or ``--runs-root/--name``, or ``runs/<method>-<data>-<time>``;
nothing is written into a directory that is not empty. ``--resume RUN_DIR`` reads the run's
``config.json`` and refuses options that would change the results. Under ``torchrun`` rank 0
decides and the other ranks receive its choice (or its error).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from egp_fast import errors
from egp_fast.cli.data import parse_data_spec
from egp_fast.cli.defaults import DEFAULTS, RUNTIME_OPTIONS, options_hash
from egp_fast.errors import ConfigError, EGPError

__all__ = ["agree_on_run_dir", "is_nonempty_dir", "missing_ancestors", "prepare_run_dir"]


def is_nonempty_dir(path: str) -> bool:
    """Whether ``path`` is a directory with something in it (a run directory must not be).

    Args:
        path: any path.

    Returns:
        True for a directory holding at least one entry.

    Example:
        >>> is_nonempty_dir("/nonexistent/run")
        False
    """
    return os.path.isdir(path) and any(True for _ in os.scandir(path))


def prepare_run_dir(cfg: dict, given: dict) -> tuple[str, dict, bool]:
    """Pick and check the run directory; writes nothing.

    Args:
        cfg: the run's options (defaults filled in).
        given: the options given on the command line (a resumed run may change only the
            runtime ones: workers, progress, latency, threads, where the run lives).

    Returns:
        ``(run_dir, config, resuming)``; when resuming, the config is the run's own.

    Raises:
        ConfigError: the directory is not empty, not writable, a file, or (resuming) not a run
            directory, or its config differs from the given options or was edited.
    """
    if cfg["resume"] is not None:
        run_dir = os.path.abspath(cfg["resume"])
        cfg_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"--resume {cfg['resume']}: not an egp-fast run directory (no config.json)")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--resume {cfg['resume']}: config.json is unreadable ({e})") from None
        stored_opts = stored.get("options", {})
        for key, value in given.items():
            if key in RUNTIME_OPTIONS:
                continue
            if key not in stored_opts or stored_opts[key] != value:
                raise ConfigError(
                    f"--resume {cfg['resume']}: --{key.replace('_', '-')} {value} differs from the run's config "
                    f"({stored_opts.get(key)}); resume with the run's own options or start a new run")
        opts = {**DEFAULTS, **stored_opts, **{k: v for k, v in given.items() if k in RUNTIME_OPTIONS}}
        if stored.get("options_hash") != options_hash(opts):
            raise ConfigError(f"--resume {cfg['resume']}: config.json was written by another version or edited "
                              "by hand; start a new run")
        if not os.access(run_dir, os.W_OK):
            raise ConfigError(f"--resume {cfg['resume']}: run directory is not writable")
        return run_dir, opts, True
    if cfg["out"] is not None:
        run_dir = os.path.abspath(cfg["out"])
    else:
        root = os.path.abspath(cfg["runs_root"])
        if cfg["name"] is not None:
            run_dir = os.path.join(root, cfg["name"])
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = os.path.join(root, f"{cfg['method']}-{parse_data_spec(cfg['data'])[0]}-{stamp}")
            run_dir, i = base, 1
            while os.path.exists(run_dir):
                i += 1
                run_dir = f"{base}-{i}"
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} exists and is a file; choose another --out")
    if is_nonempty_dir(run_dir):
        raise ConfigError(f"run directory {run_dir} already exists and is not empty; pass --resume {run_dir} "
                          "to continue it, or choose another --out/--name")
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write run directory {run_dir}: {parent} is not a writable directory")
    return run_dir, cfg, False


def missing_ancestors(cfg: dict) -> list[str]:
    """The directories a new run would create above its run directory, deepest first.

    A run that fails before writing anything removes them again, so a mistyped ``--out``
    leaves nothing behind.

    Args:
        cfg: the run's options.

    Returns:
        Absolute paths that do not exist yet (none when resuming).

    Example:
        >>> missing_ancestors({"resume": "runs/old"})
        []
    """
    if cfg.get("resume") is not None:
        return []
    top = os.path.abspath(cfg["out"]) if cfg.get("out") else os.path.abspath(cfg["runs_root"])
    out = []
    while top and not os.path.exists(top):
        out.append(top)
        top = os.path.dirname(top)
    return out


def agree_on_run_dir(cfg: dict, given: dict, info) -> tuple[str, dict, bool]:
    """Rank 0 picks and creates the run directory; the other ranks get its choice (or its error).

    Args:
        cfg: the run's options.
        given: the options given on the command line.
        info: the job's :class:`~egp_fast.cli.distributed.DistInfo`.

    Returns:
        ``(run_dir, config, resuming)`` as :func:`prepare_run_dir`, the same on every rank.

    Raises:
        ConfigError: as :func:`prepare_run_dir`, or the directory cannot be created; raised on
            every rank.
    """
    result: list[Any] = [None]
    if info.is_main:
        try:
            run_dir, cfg2, resuming = prepare_run_dir(cfg, given)
            if not resuming:
                try:
                    os.makedirs(run_dir, exist_ok=True)
                except OSError as e:
                    raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
            result[0] = ("ok", run_dir, cfg2, resuming)
        except EGPError as e:
            result[0] = ("error", type(e).__name__, str(e), None)
    if info.distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(result, src=0)
    status, a, b, c = result[0]
    if status == "error":
        raise getattr(errors, a)(b)
    return a, b, c
