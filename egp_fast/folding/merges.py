"""The folding passes that merge two weight layers into one: residual shortcuts, composition
across a removed site, and dead channels.

:class:`MergePasses` is mixed into :class:`~egp_fast.folding.fold.Folder`, which supplies the
graph helpers these passes use (``mod``, ``shape``, ``layers``, ``add``, ``retarget``,
``refuse``, ``weight_node``) and runs them with the single-node passes until nothing changes.
Only pairs touched by a collapsed site are composed or merged (``egp_after_site`` and
``egp_merged`` node metadata); ``fold`` decides whether a costlier merged layer is built.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from egp_fast.folding.geometry import (
    _CONVS,
    _b,
    _conv_out,
    _dense,
    _geom,
    _new_conv,
    _new_linear,
    _rebuild,
    _w,
    compose_conv_weight,
    layer_flops,
)
from egp_fast.folding.plan import flops_cost, plan_chain

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def _add_operands(n: fx.Node) -> list[fx.Node] | None:
    """The two node operands of an addition node (``a + b``, ``torch.add``, ``x.add(y)``), else None."""
    is_add = (n.op == "call_function" and n.target in _ADD_FUNCS) or (
        n.op == "call_method" and n.target in ("add", "add_")
    )
    if not is_add or len(n.args) != 2 or n.kwargs:
        return None
    a, b = n.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return [a, b]


class MergePasses:
    """Residual, composition and dead-channel passes of :class:`~egp_fast.folding.fold.Folder`."""

    # ---- residual (parallel) merges
    def residual(self) -> bool:
        changed = False
        for n in list(self.g.nodes):
            ops = _add_operands(n)
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
    def _allowed(self, merged: int, parts: int, layers: list[str], what: str) -> str | None:
        """None when the pair may be composed, else the reason (cost, or the chain plan)."""
        if self.fold == "always":
            return None
        t = tuple(layers)
        if any(seg[:len(t)] == t for seg in self._planned):
            return None
        if merged > parts and self.cost is flops_cost:
            return (f"{what} costs {merged / 1e6:.2f} MFLOPs > {parts / 1e6:.2f} unfused (fold={self.fold!r}); "
                    "the site is still removed")
        return (f"the chain plan (fold={self.fold!r}, cost {getattr(self.cost, 'metric', 'cost')}) merges these "
                f"layers otherwise or not at all ({what}: {merged / 1e6:.2f} MFLOPs, {parts / 1e6:.2f} unfused)")

    def _plan_chains(self) -> None:
        """Plan every maximal run of layers joined by removed sites (:mod:`egp_fast.folding.plan`)."""
        nxt, prev = {}, {}
        for n, b, x, a in self._pairs_across_sites():
            if isinstance(a, nn.Linear) == isinstance(b, nn.Linear):
                nxt[x], prev[n] = n, x
        for start in [x for x in nxt if x not in prev]:
            chain = [start]
            while chain[-1] in nxt:
                chain.append(nxt[chain[-1]])
            shapes_in = [self.shape(c.args[0]) for c in chain]
            shapes_out = [self.shape(c) for c in chain]
            if any(s is None for s in shapes_in + shapes_out):
                continue
            ref = flops_cost if self.fold == "latency" and self.cost is not flops_cost else None
            p = plan_chain([self.mod(c) for c in chain], shapes_in, shapes_out, self.exact, self.cost,
                           residual=self._residual_of(chain), reference=ref,
                           margin=float(getattr(self.cost, "margin", 0.0)))
            if p is None:
                continue
            names = [self.layers(c) for c in chain]

            def named(segments, names=names):
                return [[l for k in range(i, j + 1) for l in names[k]] for i, j in segments]

            segs = named(p["segments"])
            for seg in segs:
                if len(seg) > 1:
                    self._planned.add(tuple(seg))
            flat = {l for ls in names for l in ls}
            if any(flat <= set(e["layers"]) for e in self.plan):
                continue  # re-planned after a merge: the first plan is the one reported
            entry = {"layers": [l for ls in names for l in ls], "segments": segs,
                     "predicted": p["cost"], "unmerged": p["unmerged"],
                     "segment_costs": p["segment_costs"], "metric": getattr(self.cost, "metric", "cost"),
                     "residual": p["residual"], "border_refused": named(p["border"])}
            if ref is not None:
                entry.update(reference_segments=named(p["reference_segments"]), reference=p["reference_cost"],
                             saving=p["saving"], noise=p["noise"], departed=p["departed"])
            self.plan.append(entry)

    def _residual_of(self, chain: list[fx.Node]) -> tuple[int, ...] | None:
        """The shape of ``u + chain(u)`` when the chain's output feeds only an addition with the
        chain's own input (a residual block whose inner sites are all removed), else None."""
        last, u = chain[-1], chain[0].args[0]
        if len(last.users) != 1:
            return None
        add = next(iter(last.users))
        ops = _add_operands(add)
        if ops is None or set(ops) != {last, u} or last is u:
            return None
        shp = self.shape(add)
        return shp if shp is not None and shp == self.shape(u) == self.shape(last) else None

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
        if self.fold in ("auto", "latency"):
            self._plan_chains()
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
        why = self._allowed(merged, parts, self.layers(x) + self.layers(n), "merged layer")
        if why is not None:
            return why
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
        why = self._allowed(merged, parts, self.layers(x) + self.layers(n), f"merged {'x'.join(map(str, span))} conv")
        if why is not None:
            return why
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
            na = _rebuild(a, w1[keep], b1[keep])
            nb = _rebuild(b, w2[:, keep], _b(b, w2.shape[0], w2) + extra)
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
