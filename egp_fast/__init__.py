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
)
from egp_fast.ops import available_backends

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EGPError",
    "ModelError",
    "NumericsError",
    "__version__",
    "available_backends",
    "ops",
]
