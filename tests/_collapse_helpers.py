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


def remove_sites(model, stats, names, how="identity"):
    """Replace activation *modules* (called once) by what EASIER leaves behind, in place.

    ``how="identity"``: ``y = z`` on every channel; ``"majority"``: identity where the neuron was
    ON at least half the time, zero otherwise. Independent of ``egp_fast.linearize`` so the
    collapse tests do not depend on it; the ChannelAffine is built the same way.
    """
    from egp_fast.folding.affine import ChannelAffine

    for name in names:
        st = stats.sites[name]
        c = int(st.piece.numel())
        scale = torch.ones(c) if how == "identity" else (st.p_on >= 0.5).float()
        parent, _, attr = name.rpartition(".")
        ref = next(model.parameters())
        aff = ChannelAffine(scale.to(ref), torch.zeros(c).to(ref), st.channel_dim, False, name)
        aff.how = how
        setattr(model.get_submodule(parent) if parent else model, attr, aff)
    return model


class Conv1D(torch.nn.Module):
    """Same semantics as transformers' ``Conv1D`` (GPT-2): weight ``[in, out]``, ``y = x W + b``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.05)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2MLPBlock(torch.nn.Module):
    """GPT-2's block MLP with its residual: ``x + c_proj(act(c_fc(ln(x))))``."""

    def __init__(self, d=16, h=64, act=None):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.c_fc = Conv1D(h, d)
        self.act = act if act is not None else torch.nn.GELU(approximate="tanh")
        self.c_proj = Conv1D(d, h)

    def forward(self, x):
        return x + self.c_proj(self.act(self.c_fc(self.ln(x))))


class ViTBlock(torch.nn.Module):
    """A pre-norm transformer MLP block: ``x + fc2(gelu(fc1(ln(x))))``."""

    def __init__(self, d=32, h=128):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, h)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class Branchy(torch.nn.Module):
    """fc1 -> ReLU -> fc2 behind data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 1e9:
            return x[:, :2]
        return self.fc2(self.act(self.fc1(x)))


def stats_of(model, x):
    """Entropy statistics of ``model`` on the one batch ``x``."""
    from egp_fast.measurement import measure_entropy

    return measure_entropy(model, [x], progress=False)


def rel(a, b):
    """Max |a - b| over max |a|: the output change relative to the output's size."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)


def kinds(result):
    """The ``kind`` of every change a CollapseResult reports, in order."""
    return [e["kind"] for e in result.removed]
