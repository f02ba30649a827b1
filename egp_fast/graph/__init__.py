"""Site discovery: where the activations are, which layers produce them, their channel axis.

Stage 3 of the package (imports ``errors`` only). Its modules, lowest first: ``activations``
(which modules are activations: torch.nn classes, a registry, probing), ``sites`` (the
:class:`Site` and :class:`SiteGraph` records, weight layer types, site kinds), ``inputs``
(example inputs, eval mode), ``tracer`` and ``tracing`` (torch.fx tracing, :func:`trace`),
``shapes`` (the shape pass, :func:`propagate_shapes`), ``walk`` (producers and channel axis)
and ``discovery`` (:func:`discover_sites`, :func:`inspect`).
"""

from egp_fast.graph import activations
from egp_fast.graph.activations import ACTIVATION_KINDS, activation_info, register_activation, registered_activations
from egp_fast.graph.discovery import (
    discover_sites,
    discover_sites_sampled,
    functional_site_name,
    inspect,
    unwrap_model,
    weight_layers,
)
from egp_fast.graph.inputs import LABEL_KEYS, describe_inputs, eval_mode, normalize_inputs, placeholder_args
from egp_fast.graph.sites import (
    FUNCTION_KINDS,
    METHOD_KINDS,
    WEIGHT_TYPES,
    Site,
    SiteGraph,
    function_params,
    module_kind,
    module_params,
)
from egp_fast.graph.shapes import propagate_shapes
from egp_fast.graph.tracing import trace

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
