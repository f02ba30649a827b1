"""Helpers for the collapse tests: force chosen sites to zero entropy on the data."""

from __future__ import annotations

import torch
import torch.fx as fx

from egp_fast.graph import discover_sites


def bias_module(model, x, site_name, g=None):
    """Qualified name of the module right before ``site_name`` that carries a bias."""
    g = g if g is not None else discover_sites(model, x)
    site = g.site(site_name)
    node = {n.name: n for n in g.graph_module.graph.nodes}[site.node]
    inp = node.args[0]
    while isinstance(inp, fx.Node) and inp.op == "call_module":
        m = g.graph_module.get_submodule(inp.target)
        if getattr(m, "bias", None) is not None:
            return inp.target
        inp = inp.args[0]
    raise AssertionError(f"no biased module right before {site_name}")


def force(model, x, plan, margin=10.0):
    """Shift the bias before each site so its pre-activation is always > margin (+1) or < -margin (-1).

    ``plan``: list of ``(site name, +1 | -1)``, applied in order (later sites see the change).
    Returns the names of the biased modules.
    """
    names = []
    g = discover_sites(model, x)  # biases change below, the graph does not
    for site_name, sign in plan:
        name = bias_module(model, x, site_name, g)
        mod = model.get_submodule(name)
        box = {}
        h = mod.register_forward_hook(lambda m, i, o, box=box: box.__setitem__("max", float(o.detach().abs().max())))
        with torch.no_grad():
            model(x)
        h.remove()
        with torch.no_grad():
            mod.bias += sign * (2.0 * box["max"] + margin)
        names.append(name)
    return names
