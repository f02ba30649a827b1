"""Folding passes on the traced graph: what collapse does once sites are linearised.

Every pass rewrites one pattern of ``fx`` nodes into a new module and never mutates a module
in place (a module may be called from several nodes). Passes, repeated until nothing changes:

* ``functional_bn``: an eval-mode ``F.batch_norm`` on the model's own statistics (timm's
  ``BatchNormAct2d``) becomes the ``nn.BatchNorm`` module it equals;
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

:class:`Folder` here holds the graph helpers, the driver and the single-node passes
(``passthrough``, ``affine``, ``bn``, ``dead_branch``); the two-layer merges (``residual``,
``compose``, ``dead_channels``) are in :mod:`egp_fast.folding.merges` and the conv/linear
arithmetic in :mod:`egp_fast.folding.geometry`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_fast.folding.affine import ChannelAffine, _channel_affine
from egp_fast.folding.geometry import _CONVS, _b, _dense, _geom, _rebuild, _w
from egp_fast.folding.merges import MergePasses, _add_operands
from egp_fast.folding.plan import flops_cost

_PASSTHROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class Folder(MergePasses):
    """Runs the passes on ``gm`` (a private copy) and records what it did and why not."""

    def __init__(self, gm: fx.GraphModule, exact: bool, fold: str, site_nodes: dict[str, str] | None = None,
                 cost: Any = None) -> None:
        self.gm = gm
        self.cost = cost if cost is not None else flops_cost  # prices candidate layers for the chain plan
        self._planned: set[tuple[str, ...]] = set()  # layer runs the chain plan merges into one layer
        self.plan: list[dict[str, Any]] = []  # one entry per planned chain, for CollapseResult.plan
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
        passes = [self.functional_bn, self.passthrough, self.affine, self.bn, self.dead_branch, self.residual,
                  self.compose, self.dead_channels]
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

    def functional_bn(self) -> bool:
        # An eval-mode F.batch_norm on the model's own statistics (a batch norm written outside
        # torch.nn that fx traced through, such as timm's BatchNormAct2d) becomes the equivalent
        # nn.BatchNorm module, which the passes below fold like any other.
        changed = self._drop_rank_asserts()
        for n in list(self.g.nodes):
            if n.op != "call_function" or n.target is not F.batch_norm:
                continue
            a = dict(zip(_BN_ARGS, n.args)) | dict(n.kwargs)
            stats = [self._attr(a.get(k)) for k in ("running_mean", "running_var")]
            affine = [self._attr(a.get(k)) if a.get(k) is not None else None for k in ("weight", "bias")]
            shp = self.shape(a.get("input"))
            if (a.get("training", False) is not False or any(t is False for t in stats) or shp is None
                    or len(shp) not in _BN_CLASSES or any(t is False for t in affine)
                    or not isinstance(a.get("eps", 1e-5), float)):
                continue
            mean, var = stats
            bn = _BN_CLASSES[len(shp)](mean.numel(), eps=a.get("eps", 1e-5), device=mean.device, dtype=mean.dtype)
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.weight.copy_(affine[0] if affine[0] is not None else torch.ones_like(mean))
                bn.bias.copy_(affine[1] if affine[1] is not None else torch.zeros_like(mean))
            owner = a["running_mean"].target.rpartition(".")[0]
            with self.g.inserting_before(n):
                new = self.g.call_module(self.add(bn.eval(), "egp_bn"), (a["input"],))
            new.meta.update(n.meta)
            new.meta["egp_layers"] = [owner or n.name]
            n.replace_all_uses_with(new)
            self.g.erase_node(n)
            changed = True
        return changed

    def _drop_rank_asserts(self) -> bool:
        # torch._assert(x.ndim == k) (timm's norm layers check their input's rank) holds for good
        # in a graph whose shapes are known; left in, it is a second user of the layer before the
        # norm and blocks the fold.
        changed = False
        for n in list(self.g.nodes):
            if not (n.op == "call_function" and n.target is torch._assert and n.args):
                continue
            cond = n.args[0]
            if not (isinstance(cond, fx.Node) and cond.target is operator.eq and len(cond.args) == 2):
                continue
            rank, k = cond.args
            if not (isinstance(rank, fx.Node) and rank.target is getattr and rank.args[1:] == ("ndim",)
                    and isinstance(k, int) and self.shape(rank.args[0]) is not None):
                continue
            if len(self.shape(rank.args[0])) == k:
                self.g.erase_node(n)
                changed = True
        return changed

    def _attr(self, n: Any) -> torch.Tensor | bool:
        """The tensor a ``get_attr`` node reads; False for anything else (a computed value)."""
        if not (isinstance(n, fx.Node) and n.op == "get_attr"):
            return False
        obj: Any = self.gm
        for atom in n.target.split("."):
            obj = getattr(obj, atom, None)
        return obj.detach() if isinstance(obj, torch.Tensor) else False

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
            m = _rebuild(a, neww, newb)
            self.retarget(x, m)
            x.meta.setdefault("egp_after_site", []).append(aff.site)
            n.replace_all_uses_with(x)
            self.g.erase_node(n)
            self._note_site(aff.site, f"folded into {'+'.join(self.layers(x))}")
            changed = True
        return changed

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
            layers = self.layers(x) + self.layers(n)
            self.retarget(x, _rebuild(a, neww, newb.to(w.dtype)), layers)
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

    def dead_branch(self) -> bool:
        changed = False
        for n in list(self.g.nodes):
            ops = _add_operands(n)
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
