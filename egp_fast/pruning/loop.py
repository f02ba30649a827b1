"""The pruning loop, once, for every method: :func:`prune` runs whole rounds.

Each round is one :meth:`egp_fast.Pruner.round` (measure, plan, apply, with whichever registered
method the Pruner runs), then the caller's fine-tuning and evaluation; the loop records it,
keeps each completed round when a later one fails, rolls back a round outside the accuracy
tolerance, and can fold the result with :func:`egp_fast.collapse` at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.nn as nn

from egp_fast.errors import ConfigError, DataError, PruneInterrupted
from egp_fast.folding import collapse as collapse_model
from egp_fast.graph import unwrap_model
from egp_fast.measurement import check_confidence, check_fraction
from egp_fast.pruning.checks import check_accuracy, check_linearization, check_max_drop, check_step, within_tolerance
from egp_fast.pruning.methods import EasierMethod, get_method
from egp_fast.pruning.pruner import Pruner
from egp_fast.pruning.records import ModelSnapshot, PruneResult, RoundRecord

__all__ = ["prune"]


def prune(
    model: nn.Module,
    data: Iterable[Any],
    *,
    finetune: Callable[[nn.Module, int], Any] | None = None,
    iterations: int = 9,
    step: float = 0.5,
    method: str = "egp",
    example_inputs: Any = None,
    max_batches: int | None = None,
    collapse: bool = False,
    progress: bool = True,
    backend: str | None = None,
    linearize: bool = False,
    entropy_mode: str = "exact",
    masked_linear: bool = False,
    evaluate: Callable[[nn.Module], float] | None = None,
    max_drop: float | None = None,
    linearization: str = "identity",
    measure_stop: str | None = None,
    max_flip: float = 0.01,
    confidence: float = 0.95,
    objective: str = "sites",
    target_speedup: float | None = None,
    fold: str = "auto",
    exact: bool = True,
) -> PruneResult:
    """Prune ``model`` in rounds with EGP, IMP or EASIER, fine-tuning after each round.

    Each round measures the activation entropies on ``data`` and then, by ``method``:

    * ``"egp"``: prunes ``step`` of the remaining weights of the eligible layers, shared by
      entropy and magnitude; ``"imp"``: one global magnitude threshold. Masks keep pruned
      weights at zero through your optimizer. Stops early when no layer is eligible.
    * ``"easier"``: replaces the live activation site with the lowest entropy (ties: the
      first in execution order), and every site already at zero entropy, by an affine map
      (``linearization``); stops early when no site is left. With ``objective="latency"`` it
      removes instead the *group* of sites whose removal lets collapse merge layers (both
      activations of an inverted residual, a transformer MLP's activation, the inner pair of a
      bottleneck) with the least entropy per unit of predicted time saved (docs/algorithm.md,
      "EASIER"), and stops once the predicted speed-up reaches ``target_speedup``.

    Then it calls ``finetune(model, round)`` and, if given, ``evaluate(model)``. With
    ``evaluate`` and a tolerance (``max_drop``; EASIER always has one) the dense model is
    evaluated once before the first round, and the run stops at the first round whose
    accuracy is more than ``max_drop`` below it: that round is rolled back (its record stays,
    with ``kept=False``) and the model of the last round within the tolerance is returned.

    Rounds are atomic. If anything fails inside a round (measure, plan, apply, ``finetune``,
    ``evaluate``), the model goes back to the end of the last *completed* round (weights,
    masks, hooks, ``training`` flags, linearised modules) and:

    * an ``Exception`` is re-raised as :class:`~egp_fast.errors.PruneInterrupted` (``from``
      the original): ``.result`` is a :class:`PruneResult` of the completed rounds,
      ``.original`` the exception;
    * a ``KeyboardInterrupt`` (Ctrl-C) or other ``BaseException`` is re-raised unchanged, with
      the same partial :class:`PruneResult` attached as its ``.result`` attribute, so Ctrl-C
      still stops your script but nothing finished is lost.

    A failure before the first round completes (bad batches, a crash in the first
    fine-tune) restores the model exactly as it was passed and re-raises the original
    exception. Optimizers and schedulers are yours and are not rolled back: build them anew
    before training the restored model further.

    Args:
        model: the network, changed in place.
        data: measurement batches (tensors, ``(inputs, labels)``, or dicts), on the model's device.
        finetune: ``finetune(model, round_index)`` called after each round; ``None`` skips it.
        iterations: number of rounds, >= 1 (the paper uses 9).
        step: fraction pruned per round, in (0, 1) (the paper uses 0.5; unused by ``easier``).
        method: ``"egp"``, ``"imp"`` or ``"easier"``, or a name added with
            :func:`egp_fast.pruning.register_method`.
        example_inputs: a batch for tracing (default: the first batch of ``data``).
        max_batches: cap on measurement batches per round.
        collapse: after the last round, fold zero-entropy and linearised layers away
            (:func:`egp_fast.collapse`); ``result.model`` is then the collapsed model.
        progress: show progress bars.
        backend: force a compute backend (``None``: automatic).
        linearize: ``egp``/``imp``: replace zero-entropy sites by affine maps between rounds.
        entropy_mode: ``"exact"`` or ``"paper"``.
        masked_linear: swap pruned ``nn.Linear`` layers for tile-skipping
            :class:`~egp_fast.MaskedLinear` modules.
        evaluate: ``evaluate(model) -> float``, the accuracy in [0, 1] on a *validation*
            split (never the test split); required for ``easier``.
        max_drop: the largest accepted accuracy drop below the dense model, as a fraction
            (0.01 = one point); default 0.01 for ``easier``, no tolerance for ``egp``/``imp``
            (set it, with ``evaluate``, to get the same roll-back there).
        linearization: ``easier``: ``"identity"`` (EASIER's choice: the site becomes
            ``y = z``) or ``"majority"`` (per channel: identity when mostly ON, zero when
            mostly OFF).
        measure_stop: passed to each round's measurement as ``stop`` (``None``: a whole pass;
            ``"decided"``: stop when every site is decided and the round's plan is known, see
            :meth:`Pruner.measure`; the final measurement, which only feeds ``collapse``, waits
            for the sites alone).
        max_flip, confidence: the evidence a zero-entropy site needs (its flip bound at
            ``confidence``, :meth:`SiteStats.flip_bound`, at most ``max_flip``) to be removed by
            ``collapse=True``, and to count as decided with ``measure_stop="decided"``;
            ``max_flip=1.0`` trusts any amount of data.
        objective: ``easier``: ``"sites"`` (EASIER's rule: the lowest-entropy site each round)
            or ``"latency"`` (the removal group with the least entropy per unit of predicted
            saving; when no group saves anything, the lowest-entropy site). Each round's record
            then gives the ``group``, the ``predicted_speedup`` of the collapsed model and the
            ``measured_speedup`` (collapsed vs uncollapsed, timed interleaved on
            ``example_inputs``, about a second per round).
        target_speedup: ``objective="latency"``: stop after the first kept round whose
            predicted speed-up reaches this (> 1.0; ``None``: only ``iterations`` and
            ``max_drop`` stop).
        fold: how ``collapse=True`` folds (``"auto"``, ``"latency"``, ``"always"`` or ``"never"``,
            see :func:`egp_fast.collapse`); with ``objective="latency"`` also what prices the
            savings: ``"auto"`` counts FLOPs, ``"latency"`` times each candidate layer on the
            model's device (cached per shape).
        exact: as :func:`egp_fast.collapse`'s ``exact``, for ``collapse=True`` and the
            predictions of ``objective="latency"``: True counts only merges that keep every
            output; CNNs with zero-padded convs usually need ``exact=False`` for a merge to pay
            (e.g. an inverted residual becoming one dense 3x3 conv).

    Returns:
        :class:`PruneResult`: the model, one :class:`RoundRecord` per round (with
        ``removed_sites``, ``accuracy`` and, with ``objective="latency"``, ``group``,
        ``predicted_speedup`` and ``measured_speedup``), the final statistics,
        ``dense_accuracy`` and ``best_round``.

    Raises:
        ConfigError: a bad argument (named in the message), e.g. ``easier`` without
            ``evaluate``.
        DataError: the data cannot be used with the model.
        PruneInterrupted: a round failed after at least one had completed (see above).

    Example:
        >>> import torch, egp_fast
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> data = [torch.randn(64, 4)]
        >>> result = egp_fast.prune(net, data, iterations=2, progress=False)
        >>> [r.sparsity for r in result.rounds]
        [0.5, 0.75]
        >>> deep = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
        ...                            torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> result = egp_fast.prune(deep, data, method="easier", evaluate=lambda m: 0.9,
        ...                         iterations=5, progress=False)
        >>> [r.removed_sites for r in result.rounds], result.best_round
        ([['3'], ['1']], 1)
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations={iterations!r} must be an int >= 1 (the number of pruning rounds)")
    if finetune is not None and not callable(finetune):
        raise ConfigError("finetune must be a callable finetune(model, round_index) or None")
    if evaluate is not None and not callable(evaluate):
        raise ConfigError("evaluate must be a callable evaluate(model) -> accuracy in [0, 1], or None")
    check_step(step)
    check_linearization(linearization)
    if fold not in ("auto", "latency", "always", "never"):
        raise ConfigError(f"fold={fold!r}; use 'auto', 'latency', 'always' or 'never' (see egp_fast.collapse)")
    if not isinstance(exact, bool):
        raise ConfigError(f"exact={exact!r} must be True or False")
    options: dict[str, Any] = {"linearization": linearization}
    by_latency = objective != "sites" or target_speedup is not None
    if by_latency:
        options.update(objective=objective, target_speedup=target_speedup, fold=fold, exact=exact)
    probe = get_method(method, linearization=linearization)
    if by_latency and not isinstance(probe, EasierMethod):
        raise ConfigError(
            f"objective={objective!r}, target_speedup={target_speedup!r}: only method='easier' chooses its "
            f"removals by the speed they unlock; use method='easier' or drop objective/target_speedup "
            f"(method={method!r})"
        )
    if by_latency:
        probe = get_method(method, **options)
    default_max_drop = probe.default_max_drop
    if default_max_drop is not None:
        if evaluate is None:
            raise ConfigError(
                f"method={method!r} needs evaluate=fn: fn(model) -> accuracy in [0, 1] on a validation "
                "split; it keeps the last model within max_drop of the dense accuracy"
            )
        max_drop = default_max_drop if max_drop is None else max_drop
    if max_drop is not None:
        max_drop = check_max_drop(max_drop)
        if evaluate is None:
            raise ConfigError(f"max_drop={max_drop} needs evaluate=fn to measure the accuracy drop")
    max_flip = check_fraction(max_flip, "max_flip")
    confidence = check_confidence(confidence)
    if measure_stop not in (None, "decided"):
        raise ConfigError(f"measure_stop={measure_stop!r}; use None (a whole pass) or 'decided'")
    if data is None:
        raise DataError("data is None; pass an iterable of batches")
    config = {
        "iterations": iterations,
        "step": step,
        "method": method,
        "max_batches": max_batches,
        "collapse": collapse,
        "linearize": linearize,
        "entropy_mode": entropy_mode,
        "backend": backend,
        "masked_linear": masked_linear,
        "max_drop": max_drop,
        "linearization": linearization,
        "measure_stop": measure_stop,
        "max_flip": max_flip,
        "confidence": confidence,
        "objective": objective,
        "target_speedup": target_speedup,
        "fold": fold,
        "exact": exact,
    }
    target = unwrap_model(model)
    # The state a failure returns to: the model as passed, then the end of each completed round.
    snapshot = ModelSnapshot(target)
    completed = False
    rounds: list[RoundRecord] = []
    result = PruneResult(target, rounds, None, None, config)
    measure_options = (
        {"stop": measure_stop, "max_flip": max_flip, "confidence": confidence} if measure_stop is not None else {}
    )
    try:
        pruner = Pruner(
            target,
            example_inputs,
            step=step,
            method=method,
            linearize=linearize,
            backend=backend,
            entropy_mode=entropy_mode,
            progress=progress,
            masked_linear=masked_linear,
            linearization=linearization,
            method_options={k: v for k, v in options.items() if k != "linearization"},
        )
        if evaluate is not None:
            result.dense_accuracy = check_accuracy(evaluate(model), "before the first round")
        for i in range(iterations):
            if pruner._graph is not None and len(pruner._graph) == 0:
                break  # EASIER removed every site
            record = pruner.round(data, max_batches, **measure_options)
            if isinstance(pruner.method_impl, EasierMethod):
                pruner.method_impl.annotate(record, target, pruner.example_inputs)
            if not pruner.method_impl.progressed(record):
                rounds.append(record)  # the record says why: nothing eligible, or no site left
                result.best_round = len(rounds) - 1
                break
            if finetune is not None:
                finetune(model, i)
            if evaluate is not None:
                record.accuracy = check_accuracy(evaluate(model), f"after round {i}")
            rounds.append(record)
            if max_drop is not None and not within_tolerance(record.accuracy, result.dense_accuracy, max_drop):
                record.kept = False
                pruner.restore(snapshot)  # back to the best model: the last round within tolerance
                break
            snapshot.take(target)
            completed = True
            result.best_round = len(rounds) - 1
            if target_speedup is not None and (record.predicted_speedup or 1.0) >= target_speedup:
                break  # the latency budget is met: no further removal is needed
        # The last measurement feeds collapse, not a plan: no plan rule to wait for.
        final_options = dict(measure_options, plan_tol=None) if measure_options else {}
        result.stats = pruner.measure(data, max_batches, **final_options)
        if collapse:
            cost = probe.layer_cost(target) if by_latency and fold == "latency" else None
            result.collapse = collapse_model(
                target, result.stats, pruner.example_inputs, exact=exact, fold=fold, max_flip=max_flip,
                confidence=confidence, cost=cost,
            )
            result.model = result.collapse.model
        return result
    except BaseException as e:
        if snapshot.complete:
            snapshot.restore()
        elif rounds and rounds[-1].kept:
            # Interrupted while recording the round that had just completed: the model is at
            # its end, untouched; the half-written snapshot is what must not be used.
            completed = True
            result.best_round = len(rounds) - 1
        if not completed:
            raise
        partial = PruneResult(target, list(rounds), None, None, config, result.dense_accuracy, result.best_round)
        if isinstance(e, Exception):
            raise PruneInterrupted(partial, e) from e
        e.result = partial  # KeyboardInterrupt, SystemExit: keep their type, attach the work done
        raise
