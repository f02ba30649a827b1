"""Progress bars that appear only on a terminal.

A bar redraws itself with carriage returns: on a terminal that is one line, in a log file or a
pipe it is thousands. So a bar is drawn only when standard error is a terminal; elsewhere the
callers print one plain line per epoch or round instead. ``EGP_FAST_PROGRESS=1`` forces bars on
(for a terminal that does not say it is one), ``EGP_FAST_PROGRESS=0`` turns them off.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any


def on_terminal() -> bool:
    """Whether progress bars should be drawn: standard error is a terminal (or forced)."""
    forced = os.environ.get("EGP_FAST_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def progress_bar(iterable: Any = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one when ``iterable`` is None), or no bar.

    Args:
        iterable: what to iterate, or None for a bar advanced with ``update``.
        total: number of steps, if known.
        desc: label in front of the bar.
        unit: unit name shown with the rate.
        enabled: the caller's wish; a bar is drawn only if also :func:`on_terminal`.

    Returns:
        A tqdm object; else ``iterable`` itself (None when ``iterable`` is None).

    Example:
        >>> for x in progress_bar(range(3), enabled=False): pass
    """
    if not (enabled and on_terminal()):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but never fail a run over a bar
        warnings.warn("tqdm is not installed; no progress bar", stacklevel=3)
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
