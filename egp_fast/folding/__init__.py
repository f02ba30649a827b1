"""Collapse: replace zero-entropy sites by affine maps and fold the layers around them.

Stage 5 of the package (imports ``errors``, ``masks``, ``graph`` and ``measurement``). The
public entry point is :func:`egp_fast.collapse`. Modules: ``affine`` (ChannelAffine and the
per-site maps), ``linearizer`` (linearize in place), ``geometry`` (conv/linear arithmetic),
``fold`` and ``merges`` (the folding passes), ``evidence`` (flip bounds, held-out checks),
``plan`` (chain-level fold planning), ``groups`` (which sites must go together for a merge to
pay, and the predicted speed-up), ``latency`` (compare_latency), ``depth`` (depth_report), ``collapser`` (collapse).
"""

from egp_fast.folding.affine import ChannelAffine, site_affine
from egp_fast.folding.collapser import CollapseResult, collapse
from egp_fast.folding.depth import depth_report
from egp_fast.folding.geometry import compose_conv_weight, layer_flops
from egp_fast.folding.groups import LayerChain, RemovalGroup, layer_chains, predicted_speedup, removal_groups
from egp_fast.folding.latency import compare_latency
from egp_fast.folding.linearizer import linearize, linearize_sites, unremovable_sites
from egp_fast.folding.plan import LatencyCost, LayerSpec, flops_cost, plan_chain

__all__ = [
    "ChannelAffine",
    "CollapseResult",
    "LatencyCost",
    "LayerChain",
    "LayerSpec",
    "RemovalGroup",
    "collapse",
    "compare_latency",
    "compose_conv_weight",
    "depth_report",
    "flops_cost",
    "layer_chains",
    "layer_flops",
    "linearize",
    "linearize_sites",
    "plan_chain",
    "predicted_speedup",
    "removal_groups",
    "site_affine",
    "unremovable_sites",
]
