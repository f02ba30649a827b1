"""egp_fast: Entropy Guided Pruning for PyTorch.

Prune the weights of the layers whose activations have the lowest entropy until whole
layers become affine on the data, then fold those layers away.
"""

from egp_fast import ops
from egp_fast.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    DataError,
    EGPError,
    ModelError,
    NumericsError,
    PruneInterrupted,
)
from egp_fast.folding import CollapseResult, collapse, linearize
from egp_fast.graph import (
    Site,
    SiteGraph,
    activations,
    discover_sites,
    inspect,
    register_activation,
    trace,
    weight_layers,
)
from egp_fast.masks import MaskedLinear, attach_masks, load_pruned_state_dict, masked_layers, sparsity, strip_masks
from egp_fast.measurement import EntropyStats, SiteStats, measure_entropy
from egp_fast.ops import available_backends
from egp_fast.pruning import PruneResult, Pruner, RoundRecord, allocate, prune

from egp_fast._version import __version__

__all__ = [
    "BackendError",
    "CheckpointError",
    "CollapseResult",
    "ConfigError",
    "DataError",
    "EGPError",
    "EntropyStats",
    "MaskedLinear",
    "ModelError",
    "NumericsError",
    "PruneInterrupted",
    "PruneResult",
    "Pruner",
    "RoundRecord",
    "Site",
    "SiteGraph",
    "SiteStats",
    "__version__",
    "activations",
    "allocate",
    "attach_masks",
    "available_backends",
    "collapse",
    "discover_sites",
    "inspect",
    "linearize",
    "load_pruned_state_dict",
    "masked_layers",
    "measure_entropy",
    "ops",
    "prune",
    "register_activation",
    "sparsity",
    "strip_masks",
    "trace",
    "weight_layers",
]
