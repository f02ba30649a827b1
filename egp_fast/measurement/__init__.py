"""Measurement: ON counts, entropies, evidence and stop rules, tracking during training.

Stage 4 of the package (imports ``errors``, ``ops`` and ``graph``). Modules, lowest first:
``stats`` (the :class:`SiteStats` / :class:`EntropyStats` records), ``decide`` (flip bounds and
the stopping rules), ``batches`` (what a batch holds), ``discover`` (cached site discovery),
``counting`` (the device counts and the entropies computed from them), ``recorders`` (the hooks
and the instrumented graph that feed the counts), ``measure`` (:func:`measure_entropy`) and
``track`` (:func:`track_entropy`, counting during training).
"""

from egp_fast.measurement.batches import batch_size, model_device, split_batch
from egp_fast.measurement.counting import paper_batch_entropy
from egp_fast.measurement.decide import (
    check_confidence,
    check_fraction,
    check_plan,
    flip_bound,
    samples_needed,
)
from egp_fast.measurement.discover import cached_graph
from egp_fast.measurement.measure import measure_entropy
from egp_fast.measurement.stats import EntropyStats, SiteStats
from egp_fast.measurement.track import EntropyTracker, track_entropy

__all__ = [
    "EntropyStats",
    "EntropyTracker",
    "SiteStats",
    "batch_size",
    "cached_graph",
    "check_confidence",
    "check_fraction",
    "check_plan",
    "flip_bound",
    "measure_entropy",
    "model_device",
    "paper_batch_entropy",
    "samples_needed",
    "split_batch",
    "track_entropy",
]
