"""Folding passes on the traced graph: what collapse does once sites are linearised.

Every pass rewrites one pattern of ``fx`` nodes into a new module and never mutates a module
in place (a module may be called from several nodes). Passes, repeated until nothing changes:

* ``bn``: eval BatchNorm into the conv/linear before it (exact);
* ``affine``: a linearised site (:class:`ChannelAffine`) into the conv/linear before it, or
  removed when it is the identity (exact);
* ``dead_branch``: ``add(c, y)`` where ``c`` is a per-channel constant (a branch whose weights
  are all zero, possibly through more layers) becomes ``y + c`` (exact: the constant is checked
  to be position-independent, which a zero-padded conv of a non-zero constant is not);
* ``residual``: ``add(conv_a(u), u)`` or ``add(conv_a(u), conv_b(u))`` becomes one conv (the
  identity or the smaller kernel is embedded in the larger one; exact);
* ``compose``: conv∘conv / linear∘linear across a removed site. Exact when the second conv has
  no padding (or the first conv's output is zero wherever the second one pads); otherwise only
  with ``exact=False``. Cost-aware (``fold``);
* ``dead_channels``: output channels of the first layer that are constant zero (or a constant
  the next layer can absorb exactly) are removed from it and from the next layer's input.

Only pairs touched by a collapsed site are composed or merged, so ``collapse(..., sites=[])``
only folds BatchNorm.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.folding.affine import ChannelAffine, _channel_affine

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_PASSTHROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def _w(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    mask = getattr(m, "weight_mask", None)
    return w * mask.to(w.dtype) if isinstance(mask, torch.Tensor) else w


def _b(m: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    return m.bias.detach() if getattr(m, "bias", None) is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


def _geom(m: nn.Module) -> dict[str, Any] | None:
    """Conv geometry with integer padding, or None when unsupported (non-zero padding modes)."""
    if not isinstance(m, _CONVS) or m.padding_mode != "zeros" or getattr(m, "transposed", False):
        return None
    nd = m.weight.dim() - 2
    k = tuple(m.kernel_size)
    d = tuple(m.dilation)
    s = tuple(m.stride)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            p = (0,) * nd
        else:  # "same": symmetric only when every total padding is even
            tot = [di * (ki - 1) for di, ki in zip(d, k)]
            if any(t % 2 for t in tot):
                return None
            p = tuple(t // 2 for t in tot)
    else:
        p = tuple(m.padding)
    return {"nd": nd, "k": k, "s": s, "d": d, "p": p, "g": m.groups}


def _new_conv(nd: int, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation, groups: int) -> nn.Module:
    cls = _CONVS[nd - 1]
    cout, cin_g = weight.shape[:2]
    # skip_init: no random initialisation of weights that are overwritten at once.
    conv = torch.nn.utils.skip_init(cls, cin_g * groups, cout, tuple(weight.shape[2:]), stride=tuple(stride),
                                    padding=tuple(padding), dilation=tuple(dilation), groups=groups, bias=True,
                                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def _new_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=True, device=weight.device,
                                   dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return lin


def _dense(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Block-diagonal ``[Cout, Cin, *k]`` weight of a grouped conv."""
    if groups == 1:
        return w
    cout, cin_g = w.shape[:2]
    og = cout // groups
    out = w.new_zeros((cout, cin_g * groups) + tuple(w.shape[2:]))
    for i in range(groups):
        out[i * og:(i + 1) * og, i * cin_g:(i + 1) * cin_g] = w[i * og:(i + 1) * og]
    return out


def compose_conv_weight(w1: torch.Tensor, w2: torch.Tensor, s1, d1, d2, groups: int = 1) -> torch.Tensor:
    """Kernel of ``conv2 ∘ conv1`` (no bias): span ``(k1-1)·d1 + (k2-1)·d2·s1 + 1`` per dim.

    Args:
        w1: ``[M, Cin/g, *k1]``; w2: ``[Cout, M/g, *k2]``; both grouped by ``groups``.
        s1, d1: stride and dilation of conv1; d2: dilation of conv2 (tuples).

    Returns:
        ``[Cout, Cin/g, *K]`` for a conv of stride ``s1·s2``, dilation 1, ``groups`` groups.
    """
    nd = w1.dim() - 2
    m, cin_g = w1.shape[:2]
    cout = w2.shape[0]
    g = groups
    k1, k2 = w1.shape[2:], w2.shape[2:]
    span = [(k1[i] - 1) * d1[i] + (k2[i] - 1) * d2[i] * s1[i] + 1 for i in range(nd)]
    a = w1.reshape(g, m // g, cin_g, *k1)
    b = w2.reshape(g, cout // g, m // g, *k2)
    out = w1.new_zeros((g, cout // g, cin_g, *span))
    for j in itertools.product(*[range(x) for x in k2]):
        part = torch.einsum("gom,gmc...->goc...", b[(slice(None),) * 3 + j], a)
        idx = [slice(j[i] * d2[i] * s1[i], j[i] * d2[i] * s1[i] + (k1[i] - 1) * d1[i] + 1, d1[i]) for i in range(nd)]
        out[(slice(None),) * 3 + tuple(idx)] += part
    return out.reshape(cout, cin_g, *span)


def _conv_out(size: int, k: int, s: int, d: int, p: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def layer_flops(m: nn.Module, out_shape: tuple[int, ...]) -> int:
    """Multiply-add FLOPs (2 per MAC) of a conv/linear producing ``out_shape``."""
    numel = 1
    for x in out_shape:
        numel *= int(x)
    if isinstance(m, _CONVS):
        per = (m.in_channels // m.groups)
        for k in m.kernel_size:
            per *= k
        return 2 * numel * per
    if isinstance(m, nn.Linear):
        return 2 * numel * m.in_features
    return 0


class Folder:
    """Runs the passes on ``gm`` (a private copy) and records what it did and why not."""

    def __init__(self, gm: fx.GraphModule, exact: bool, fold: str, site_nodes: dict[str, str] | None = None) -> None:
        self.gm = gm
        self.site_nodes = dict(site_nodes or {})  # fx node name -> site name, for dead-code reports
        self.g = gm.graph
        self.exact = exact
        self.fold = fold
        self.removed: list[dict[str, Any]] = []
        self.left: list[dict[str, Any]] = []
        self._refused: set[tuple[str, ...]] = set()
        self._count = 0

    # ---------------------------------------------------------------- helpers
    def mod(self, n: Any) -> nn.Module | None:
        if isinstance(n, fx.Node) and n.op == "call_module":
            return self.gm.get_submodule(n.target)
        return None

    def add(self, m: nn.Module, prefix: str = "egp_merged") -> str:
        self._count += 1
        name = f"{prefix}_{self._count}"
        while hasattr(self.gm, name):
            self._count += 1
            name = f"{prefix}_{self._count}"
        self.gm.add_submodule(name, m)
        return name

    def layers(self, n: fx.Node) -> list[str]:
        return list(n.meta.get("egp_layers") or ([n.target] if n.op == "call_module" else [n.name]))

    def retarget(self, n: fx.Node, m: nn.Module, layers: list[str] | None = None) -> None:
        """Point ``n`` at a new module (the old one may be used by other nodes)."""
        old_layers = self.layers(n)
        n.target = self.add(m)
        n.meta["egp_layers"] = layers if layers is not None else old_layers

    def shape(self, n: Any) -> tuple[int, ...] | None:
        return n.meta.get("egp_shape") if isinstance(n, fx.Node) else None

    def weight_node(self, n: Any) -> bool:
        return isinstance(self.mod(n), (*_CONVS, nn.Linear))

    def refuse(self, key: tuple[str, ...], entry: dict[str, Any]) -> None:
        if key not in self._refused:
            self._refused.add(key)
            self.left.append(entry)

    # ---------------------------------------------------------------- driver
    def run(self) -> None:
        passes = [self.passthrough, self.affine, self.bn, self.dead_branch, self.residual, self.compose,
                  self.dead_channels]
        for _ in range(200):
            if not any(p() for p in passes):
                break
            self._dce()
        self._dce()
        self.g.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    def _dce(self) -> None:
        # A site inside a branch that became dead (its output no longer reaches the output)
        # goes with it: report it, it is not a site the statistics chose.
        before = {n.name for n in self.g.nodes}
        self.g.eliminate_dead_code()
        gone = before - {n.name for n in self.g.nodes}
        for node_name, site in self.site_nodes.items():
            if node_name in gone:
                self.removed.append({"kind": "dead_code", "site": site, "exact": True,
                                     "note": "activation in a branch whose output is no longer used"})

    # ---------------------------------------------------------------- passes
    def passthrough(self) -> bool:
        # Dropout and Identity are the identity in eval; the collapsed model is an inference model.
        changed = False
        for n in list(self.g.nodes):
            if isinstance(self.mod(n), _PASSTHROUGH) and n.args:
                n.replace_all_uses_with(n.args[0])
                self.g.erase_node(n)
                changed = True
        return changed

    def _ndim_dim(self, n: fx.Node, dim: int) -> int | None:
        shp = self.shape(n)
        if shp is None:
            return None
        return dim % len(shp)

    def affine(self) -> bool:
        changed = False
        for n in list(self.g.nodes):
            aff = self.mod(n)
            if not isinstance(aff, ChannelAffine):
                continue
            x = n.args[0]
            if aff.is_identity():
                # Marks the producer so the layers around the removed site may be composed.
                if isinstance(x, fx.Node):
                    x.meta.setdefault("egp_after_site", []).append(aff.site)
                n.replace_all_uses_with(x)
                self.g.erase_node(n)
                self._note_site(aff.site, "identity: removed")
                changed = True
                continue
            a = self.mod(x)
            if not isinstance(a, (*_CONVS, nn.Linear)) or len(x.users) != 1:
                continue
            dim = self._ndim_dim(n, aff.channel_dim)
            want = 1 if isinstance(a, _CONVS) else (len(self.shape(n) or ()) - 1)
            if dim is None or dim != want:
                continue
            w, nout = _w(a), _w(a).shape[0]
            s = aff.scale.to(w.dtype)
            t = aff.shift.to(w.dtype)
            neww = w * s.view(-1, *([1] * (w.dim() - 1)))
            newb = _b(a, nout, w) * s + t
            m = self._rebuild(a, neww, newb)
            self.retarget(x, m)
            x.meta.setdefault("egp_after_site", []).append(aff.site)
            n.replace_all_uses_with(x)
            self.g.erase_node(n)
            self._note_site(aff.site, f"folded into {'+'.join(self.layers(x))}")
            changed = True
        return changed

    def _rebuild(self, a: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
        if isinstance(a, nn.Linear):
            return _new_linear(w, b)
        g = _geom(a)
        return _new_conv(g["nd"], w, b, g["s"], g["p"], g["d"], g["g"])

    def bn(self) -> bool:
        changed = False
        for n in list(self.g.nodes):
            bn = self.mod(n)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
                continue
            x = n.args[0]
            a = self.mod(x)
            if len(getattr(x, "users", ())) != 1:
                continue
            if isinstance(a, nn.Linear):
                if len(self.shape(x) or ()) != 2:
                    continue  # BatchNorm1d on [N, L, C] normalises L, not the linear's features
            elif not (isinstance(a, _CONVS) and _geom(a) is not None):
                continue
            w = _w(a)
            scale = (bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(
                bn.running_var + bn.eps
            )
            beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
            neww = w * scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
            newb = (_b(a, w.shape[0], w) - bn.running_mean) * scale + beta
            layers = self.layers(x) + [n.target]
            self.retarget(x, self._rebuild(a, neww, newb.to(w.dtype)), layers)
            if "egp_after_site" in n.meta:
                x.meta.setdefault("egp_after_site", []).extend(n.meta["egp_after_site"])
            n.replace_all_uses_with(x)
            self.g.erase_node(n)
            self.removed.append({"kind": "bn_fold", "layers": layers, "exact": True})
            changed = True
        return changed

    # ---- constants
    def const_of(self, n: Any, depth: int = 0) -> tuple[torch.Tensor, int] | None:
        """``(value [C], channel dim)`` when ``n`` is the same per-channel constant everywhere."""
        if not isinstance(n, fx.Node) or depth > 64:
            return None
        m = self.mod(n)
        shp = self.shape(n)
        if shp is None:
            return None
        if isinstance(m, (*_CONVS, nn.Linear)):
            w = _w(m)
            b = _b(m, w.shape[0], w)
            dim = 1 if isinstance(m, _CONVS) else len(shp) - 1
            if not bool(w.any()):
                return b, dim
            inp = self.const_of(n.args[0], depth + 1)
            if inp is None:
                return None
            v, _ = inp
            if not bool(v.any()):
                return b, dim
            if isinstance(m, nn.Linear):
                return b + w @ v, dim
            g = _geom(m)
            if g is None or any(g["p"]):
                return None  # a zero-padded conv of a non-zero constant depends on the position
            wd = _dense(w, g["g"]).sum(dim=tuple(range(2, w.dim())))
            return b + wd @ v, dim
        if isinstance(m, ChannelAffine):
            inp = self.const_of(n.args[0], depth + 1)
            if inp is None or self._ndim_dim(n, m.channel_dim) != inp[1]:
                return None
            return inp[0] * m.scale.to(inp[0].dtype) + m.shift.to(inp[0].dtype), inp[1]
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            inp = self.const_of(n.args[0], depth + 1)
            if inp is None or inp[1] != 1:
                return None
            v = inp[0]
            scale = (m.weight.detach() if m.weight is not None else 1.0) / torch.sqrt(m.running_var + m.eps)
            beta = m.bias.detach() if m.bias is not None else 0.0
            return (v - m.running_mean) * scale + beta, 1
        return None

    def _add_operands(self, n: fx.Node) -> list[fx.Node] | None:
        is_add = (n.op == "call_function" and n.target in _ADD_FUNCS) or (
            n.op == "call_method" and n.target in ("add", "add_")
        )
        if not is_add or len(n.args) != 2 or n.kwargs:
            return None
        a, b = n.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return None
        return [a, b]

    def dead_branch(self) -> bool:
        changed = False
        for n in list(self.g.nodes):
            ops = self._add_operands(n)
            if ops is None:
                continue
            for x, y in (ops, ops[::-1]):
                if self.shape(x) is None or self.shape(x) != self.shape(y) or self.shape(x) != self.shape(n):
                    continue
                c = self.const_of(x)
                if c is None:
                    continue
                v, dim = c
                aff = ChannelAffine(torch.ones_like(v), v, dim, True, "")
                with self.g.inserting_after(n):
                    new = self.g.call_module(self.add(aff, "egp_const"), (y,))
                new.meta["egp_shape"] = self.shape(n)
                if n.meta.get("egp_after_site"):
                    new.meta["egp_after_site"] = list(n.meta["egp_after_site"])
                n.replace_all_uses_with(new)
                self.g.erase_node(n)
                self.removed.append({"kind": "dead_branch", "layers": self._chain(x), "exact": True,
                                     "note": "constant branch replaced by its per-channel value"})
                changed = True
                break
        return changed

    def _chain(self, n: fx.Node) -> list[str]:
        """Layers of the constant branch ending at ``n`` (walking back while it stays constant)."""
        out: list[str] = []
        cur: Any = n
        while isinstance(cur, fx.Node) and cur.op == "call_module" and len(out) < 64 and self.const_of(cur):
            if not isinstance(self.mod(cur), ChannelAffine):
                out = self.layers(cur) + out
            cur = cur.args[0] if cur.args else None
        return out

    # ---- residual (parallel) merges
    def residual(self) -> bool:
        changed = False
        for n in list(self.g.nodes):
            ops = self._add_operands(n)
            if ops is None or self.shape(ops[0]) != self.shape(ops[1]):
                continue
            for x, y in (ops, ops[::-1]):
                if not self.weight_node(x) or len(x.users) != 1:
                    continue
                if not (x.meta.get("egp_merged") or (self.weight_node(y) and y.meta.get("egp_merged"))):
                    continue
                u = x.args[0]
                if y is u:
                    m = self._plus_identity(self.mod(x), self.shape(x), self.shape(u))
                    kind, layers = "residual_identity", self.layers(x)
                elif self.weight_node(y) and len(y.users) == 1 and y.args[0] is u:
                    m = self._plus_parallel(self.mod(x), self.mod(y))
                    kind, layers = "residual_parallel", self.layers(x) + self.layers(y)
                else:
                    continue
                if m is None:
                    self.refuse(("res", n.name), {"layers": self.layers(x), "kind": "residual",
                                                  "reason": "shortcut does not line up with the merged kernel "
                                                            "(stride, padding or channel count)"})
                    continue
                with self.g.inserting_after(n):
                    new = self.g.call_module(self.add(m), (u,))
                new.meta.update(egp_shape=self.shape(n), egp_layers=layers, egp_merged=True)
                # A removed site after the add (EASIER's identity ReLU after a residual) now
                # follows the merged layer: the next layer may compose with it.
                if n.meta.get("egp_after_site"):
                    new.meta["egp_after_site"] = list(n.meta["egp_after_site"])
                n.replace_all_uses_with(new)
                self.g.erase_node(n)
                self.removed.append({"kind": kind, "layers": layers, "exact": True})
                changed = True
                break
        return changed

    def _plus_identity(self, a: nn.Module, out_shape, in_shape) -> nn.Module | None:
        w = _w(a).clone()
        b = _b(a, w.shape[0], w)
        if out_shape != in_shape:
            return None
        if isinstance(a, nn.Linear):
            if w.shape[0] != w.shape[1]:
                return None
            return _new_linear(w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device), b)
        g = _geom(a)
        if g is None or any(s != 1 for s in g["s"]):
            return None
        cout, cin_g = w.shape[:2]
        if cout != cin_g * g["g"]:
            return None
        centre = []
        for k, d, p in zip(g["k"], g["d"], g["p"]):
            if p % d or p // d > k - 1:
                return None
            centre.append(p // d)
        idx = torch.arange(cout)
        w[(idx, idx % cin_g) + tuple(centre)] += 1
        return _new_conv(g["nd"], w, b, g["s"], g["p"], g["d"], g["g"])

    def _plus_parallel(self, a: nn.Module, c: nn.Module) -> nn.Module | None:
        if isinstance(a, nn.Linear) and isinstance(c, nn.Linear):
            if _w(a).shape != _w(c).shape:
                return None
            return _new_linear(_w(a) + _w(c), _b(a, a.out_features, _w(a)) + _b(c, c.out_features, _w(c)))
        ga, gc = _geom(a), _geom(c)
        if ga is None or gc is None or ga["nd"] != gc["nd"] or ga["s"] != gc["s"]:
            return None
        for big, small, gb, gs in ((a, c, ga, gc), (c, a, gc, ga)):
            if any(d != 1 for d in gb["d"]):
                continue
            offs = [pb - ps for pb, ps in zip(gb["p"], gs["p"])]
            if any(o < 0 or o + (ks - 1) * ds > kb - 1 for o, ks, ds, kb in zip(offs, gs["k"], gs["d"], gb["k"])):
                continue
            groups = gb["g"] if gb["g"] == gs["g"] else 1
            wb = _w(big) if groups == gb["g"] else _dense(_w(big), gb["g"])
            ws = _w(small) if groups == gs["g"] else _dense(_w(small), gs["g"])
            if wb.shape[:2] != ws.shape[:2]:
                return None
            w = wb.clone()
            idx = tuple(slice(o, o + (ks - 1) * ds + 1, ds) for o, ks, ds in zip(offs, gs["k"], gs["d"]))
            w[(slice(None), slice(None)) + idx] += ws
            b = _b(big, w.shape[0], w) + _b(small, w.shape[0], w)
            return _new_conv(gb["nd"], w, b, gb["s"], gb["p"], gb["d"], groups)
        return None

    # ---- composition
    def _allowed(self, merged: int, parts: int) -> bool:
        return self.fold == "always" or (self.fold == "auto" and merged <= parts)

    def _pairs_across_sites(self):
        """Yield ``(n, b, x, a)``: weight layer ``b`` (node ``n``) fed only by weight layer ``a``
        (node ``x``) through a removed site. A generator on purpose: the passes rewrite the graph
        while iterating, so each pair is read from the graph as it is when its turn comes."""
        for n in list(self.g.nodes):
            b = self.mod(n)
            if not isinstance(b, (*_CONVS, nn.Linear)) or not n.args:
                continue
            x = n.args[0]
            a = self.mod(x)
            if isinstance(a, (*_CONVS, nn.Linear)) and len(x.users) == 1 and x.meta.get("egp_after_site"):
                yield n, b, x, a

    def compose(self) -> bool:
        changed = False
        for n, b, x, a in self._pairs_across_sites():
            key = (x.name, n.name)
            layers = self.layers(x) + self.layers(n)
            if self.fold == "never":
                self.refuse(key, {"layers": layers, "kind": "compose", "reason": "fold='never'"})
                continue
            if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
                res = self._compose_linear(a, b, x, n)
                kind = "compose_linear"
            elif isinstance(a, _CONVS) and isinstance(b, _CONVS):
                res = self._compose_conv(a, b, x, n)
                kind = "compose_conv"
            else:
                continue
            if isinstance(res, str):
                self.refuse(key, {"layers": layers, "kind": kind, "reason": res})
                continue
            m, exact = res
            with self.g.inserting_after(n):
                new = self.g.call_module(self.add(m), (x.args[0],))
            after = list(n.meta.get("egp_after_site", [])) if "egp_after_site" in n.meta else None
            new.meta.update(egp_shape=self.shape(n), egp_layers=layers, egp_merged=True)
            if after is not None:
                new.meta["egp_after_site"] = after
            n.replace_all_uses_with(new)
            self.g.erase_node(n)
            self.g.erase_node(x)
            self.removed.append({"kind": kind, "layers": layers, "exact": exact,
                                 "sites": list(x.meta["egp_after_site"])})
            changed = True
        return changed

    def _compose_linear(self, a: nn.Linear, b: nn.Linear, x: fx.Node, n: fx.Node):
        w1, w2 = _w(a), _w(b)
        out = self.shape(n)
        if out is None:
            return "no shape recorded"
        numel = 1
        for d in out:
            numel *= d
        merged = 2 * numel * w1.shape[1]
        parts = layer_flops(a, self.shape(x)) + layer_flops(b, out)
        if not self._allowed(merged, parts):
            return f"merged layer costs {merged / 1e6:.2f} MFLOPs > {parts / 1e6:.2f} unfused (fold='auto')"
        return _new_linear(w2 @ w1, w2 @ _b(a, w1.shape[0], w1) + _b(b, w2.shape[0], w2)), True

    def _compose_conv(self, a: nn.Module, b: nn.Module, x: fx.Node, n: fx.Node):
        ga, gb = _geom(a), _geom(b)
        if ga is None or gb is None or ga["nd"] != gb["nd"]:
            return "unsupported conv (padding mode or string padding)"
        inp = self.shape(x.args[0]) if x.args else None
        out = self.shape(n)
        if inp is None or out is None:
            return "no shape recorded"
        w1, w2 = _w(a), _w(b)
        b1 = _b(a, w1.shape[0], w1)
        zero_a = not bool(w1.any()) and not bool(b1.any())
        pointwise_a = all(k == 1 for k in ga["k"]) and not any(ga["p"]) and not bool(b1.any())
        exact = not any(gb["p"]) or zero_a or pointwise_a
        if not exact and self.exact:
            return ("the second conv is zero-padded: the composed kernel differs at the border; "
                    "pass exact=False to compose anyway (deviation is measured)")
        nd = ga["nd"]
        stride = tuple(s1 * s2 for s1, s2 in zip(ga["s"], gb["s"]))
        pad = tuple(p1 + p2 * s1 for p1, p2, s1 in zip(ga["p"], gb["p"], ga["s"]))
        span = [(ga["k"][i] - 1) * ga["d"][i] + (gb["k"][i] - 1) * gb["d"][i] * ga["s"][i] + 1 for i in range(nd)]
        for i in range(nd):
            if _conv_out(inp[2 + i], span[i], stride[i], 1, pad[i]) != out[2 + i]:
                return "composed conv would produce another output size (stride/padding do not line up)"
        groups = ga["g"] if ga["g"] == gb["g"] else 1
        merged_per = (w1.shape[1] * ga["g"] // groups)
        for k in span:
            merged_per *= k
        numel = 1
        for s in out:
            numel *= s
        merged = 2 * numel * merged_per
        parts = layer_flops(a, self.shape(x)) + layer_flops(b, out)
        if not self._allowed(merged, parts):
            return (f"merged {'x'.join(map(str, span))} conv costs {merged / 1e6:.2f} MFLOPs > "
                    f"{parts / 1e6:.2f} unfused (fold='auto'); the site is still removed")
        wa = w1 if groups == ga["g"] else _dense(w1, ga["g"])
        wb = w2 if groups == gb["g"] else _dense(w2, gb["g"])
        w = compose_conv_weight(wa, wb, ga["s"], ga["d"], gb["d"], groups)
        bias = _b(b, w2.shape[0], w2) + _dense(w2, gb["g"]).sum(dim=tuple(range(2, w2.dim()))) @ b1
        return _new_conv(nd, w, bias, stride, pad, (1,) * nd, groups), exact

    # ---- dead channels
    def dead_channels(self) -> bool:
        changed = False
        for n, b, x, a in self._pairs_across_sites():
            if type(a) is not type(b) and not (isinstance(a, _CONVS) and isinstance(b, _CONVS)):
                continue
            if getattr(a, "groups", 1) != 1 or getattr(b, "groups", 1) != 1:
                continue
            w1, w2 = _w(a), _w(b)
            b1 = _b(a, w1.shape[0], w1)
            zero_rows = ~w1.reshape(w1.shape[0], -1).any(dim=1)
            gb = _geom(b) if isinstance(b, _CONVS) else None
            absorb = isinstance(b, nn.Linear) or (gb is not None and not any(gb["p"]))
            dead = zero_rows & ((b1 == 0) | absorb)
            k = int(dead.sum())
            if k == 0 or k == w1.shape[0]:
                continue
            keep = ~dead
            v = torch.where(dead, b1, torch.zeros_like(b1))
            extra = w2.sum(dim=tuple(range(2, w2.dim()))) @ v if bool(v.any()) else 0.0
            na = self._rebuild(a, w1[keep], b1[keep])
            nb = self._rebuild(b, w2[:, keep], _b(b, w2.shape[0], w2) + extra)
            self.retarget(x, na)
            self.retarget(n, nb)
            shp = list(self.shape(x))
            cd = 1 if isinstance(a, _CONVS) else len(shp) - 1
            shp[cd] -= k
            x.meta["egp_shape"] = tuple(shp)
            self.removed.append({"kind": "dead_channels", "layers": self.layers(x) + self.layers(n),
                                 "channels": k, "exact": True})
            changed = True
        return changed

    # ---- reporting
    def _note_site(self, site: str, how: str) -> None:
        for e in self.removed:
            if e.get("kind") == "linearize" and e.get("site") == site:
                e["fold"] = how


def normalise_wrapped_affines(gm: fx.GraphModule, known: dict[str, ChannelAffine] | None = None) -> list[ChannelAffine]:
    """Turn traced ``_channel_affine`` calls (ChannelAffine modules fx traced into) back into modules.

    Args:
        gm: the traced model (edited in place).
        known: qualified name -> the :class:`ChannelAffine` of the model that was traced. fx keeps
            only the buffers of a traced-through module (its owner becomes a bare ``nn.Module``),
            so the site name, ``exact`` and ``how`` are read from here.

    Returns:
        The new :class:`ChannelAffine` modules, in graph order.
    """
    known = known or {}
    found = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not _channel_affine:
            continue
        x, sc, sh, dim = n.args
        if not (isinstance(sc, fx.Node) and sc.op == "get_attr" and isinstance(sh, fx.Node) and sh.op == "get_attr"):
            continue
        owner_path = sc.target.rpartition(".")[0]
        owner = known.get(owner_path)
        if owner is None:
            sub = gm.get_submodule(owner_path) if owner_path else gm
            owner = sub if isinstance(sub, ChannelAffine) else None
        exact = owner.exact if owner is not None else True
        site = owner.site if owner is not None else ""
        aff = ChannelAffine(gm.get_buffer(sc.target), gm.get_buffer(sh.target), dim, exact, site)
        aff.how = getattr(owner, "how", "data")
        name = f"egp_lin_{len(found)}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, aff)
        n.op, n.target, n.args, n.kwargs = "call_module", name, (x,), {}
        found.append(aff)
    return found
