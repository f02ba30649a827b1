"""Site discovery: where the activations are, which layers produce them, their channel axis.

Stage 3 of the package (imports ``errors`` and the activation registry only).
"""

from egp_fast.graph import activations
from egp_fast.graph.activations import ACTIVATION_KINDS, activation_info, register_activation, registered_activations
from egp_fast.graph.sites import (
    FUNCTION_KINDS,
    LABEL_KEYS,
    METHOD_KINDS,
    WEIGHT_TYPES,
    Site,
    SiteGraph,
    describe_inputs,
    discover_sites,
    discover_sites_sampled,
    eval_mode,
    function_params,
    functional_site_name,
    inspect,
    module_kind,
    module_params,
    normalize_inputs,
    placeholder_args,
    propagate_shapes,
    trace,
    unwrap_model,
    weight_layers,
)

__all__ = [
    "ACTIVATION_KINDS",
    "FUNCTION_KINDS",
    "LABEL_KEYS",
    "METHOD_KINDS",
    "WEIGHT_TYPES",
    "Site",
    "SiteGraph",
    "activation_info",
    "activations",
    "describe_inputs",
    "discover_sites",
    "discover_sites_sampled",
    "eval_mode",
    "function_params",
    "functional_site_name",
    "inspect",
    "module_kind",
    "module_params",
    "normalize_inputs",
    "placeholder_args",
    "propagate_shapes",
    "register_activation",
    "registered_activations",
    "trace",
    "unwrap_model",
    "weight_layers",
]
