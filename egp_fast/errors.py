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


class PruneInterrupted(EGPError, RuntimeError):
    """:func:`egp_fast.prune` failed after at least one round had completed.

    The model was restored to the end of the last completed round (weights, masks, hooks,
    training flags, linearised modules): the work of the finished rounds is kept. The
    exception that stopped the run is ``.original`` (and ``__cause__``).

    Attributes:
        result: a :class:`egp_fast.PruneResult` of the completed rounds (``result.rounds``, each
            with its entropy statistics in ``.stats``); ``result.model`` is the restored model;
            ``result.stats`` is ``None`` (no measurement was taken after the last round).
        original: the exception raised inside the round.
    """

    def __init__(self, result: object, original: BaseException) -> None:
        self.result = result
        self.original = original
        rounds = getattr(result, "rounds", [])
        done = len(rounds)
        super().__init__(
            f"prune() stopped after {done} completed round(s) by {type(original).__name__}: "
            f"{original}; the model holds the end of round {done - 1} (0-based) and .result has "
            "the completed rounds"
        )

    def __reduce__(self):  # picklable despite the two-argument constructor
        return (type(self), (self.result, self.original))


__all__ = [
    "BackendError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EGPError",
    "ModelError",
    "NumericsError",
    "PruneInterrupted",
]
