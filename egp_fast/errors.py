"""Exceptions raised by egp_fast.

Every error a user can cause is an :class:`EGPError`. The subclasses also derive from the
matching built-in (``ValueError``, ``RuntimeError``...) so existing ``except`` clauses keep
working. Messages name the offending argument and say how to fix it.
"""

from __future__ import annotations


class EGPError(Exception):
    """Base class of every error egp_fast raises on purpose."""


class ConfigError(EGPError, ValueError):
    """An argument or option has a value egp_fast cannot use."""


class DataError(EGPError, ValueError):
    """The data (batches, example inputs) cannot be used with the model."""


class ModelError(EGPError, ValueError):
    """The model has a structure egp_fast cannot work with."""


class NumericsError(EGPError, FloatingPointError):
    """NaN or Inf appeared where a finite number is required."""


class BackendError(EGPError, RuntimeError):
    """A requested compute backend is not available on this install or device."""


class CheckpointError(EGPError, RuntimeError):
    """A checkpoint or run directory is missing, truncated, unsafe or from another run."""


__all__ = [
    "BackendError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EGPError",
    "ModelError",
    "NumericsError",
]
