"""Collapse: replace zero-entropy sites by affine maps and fold the layers around them.

Stage 5 of the package (imports ``errors``, ``masks``, ``graph`` and ``measurement``). The
public entry point is :func:`egp_fast.collapse`.
"""

from egp_fast.folding.affine import ChannelAffine, linearize, linearize_sites, site_affine, unremovable_sites
from egp_fast.folding.collapser import CollapseResult, collapse, depth_report
from egp_fast.folding.latency import compare_latency

__all__ = [
    "ChannelAffine",
    "CollapseResult",
    "collapse",
    "compare_latency",
    "depth_report",
    "linearize",
    "linearize_sites",
    "site_affine",
    "unremovable_sites",
]
