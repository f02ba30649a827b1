"""The ``egp-fast`` command: options, runs, checkpoints, data, models, training, reports.

Stage 7, the top of the package. ``python -m egp_fast.cli`` and the ``egp-fast`` script both
call :func:`main`.
"""

from egp_fast.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
