"""Measurement: ON counts, entropies, evidence and stop rules, tracking during training.

Stage 4 of the package (imports ``errors``, ``ops`` and ``graph``).
"""

from egp_fast.measurement.decide import check_confidence, check_fraction, check_plan, flip_bound, samples_needed
from egp_fast.measurement.measure import (
    EntropyStats,
    SiteStats,
    batch_size,
    measure_entropy,
    model_device,
    split_batch,
)
from egp_fast.measurement.track import EntropyTracker, track_entropy

__all__ = [
    "EntropyStats",
    "EntropyTracker",
    "SiteStats",
    "batch_size",
    "check_confidence",
    "check_fraction",
    "check_plan",
    "flip_bound",
    "measure_entropy",
    "model_device",
    "samples_needed",
    "split_batch",
    "track_entropy",
]
