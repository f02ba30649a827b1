"""The reference scripts' way of running one EGP round, re-implemented as the speed baseline.

This is what the EGP paper's scripts do (docs/algorithm.md, "Entropy" and "One pruning round"), written
plainly and independently of egp_fast (nothing here imports it), so the end-to-end benchmarks
compare egp_fast against the same work done the usual PyTorch way, and the tests can check
egp_fast's ``mode="paper"`` against it:

1. **Measure**: a forward hook on every ``nn.ReLU`` module appends the module's output to a
   list (one list per call of the module in a forward, so torchvision's BasicBlock ``relu``,
   called twice, is two sites, named ``relu`` and ``relu:1``). After each batch, every stored
   activation goes through ``torch.heaviside`` (``1`` where the output is positive; a ReLU's
   output is positive exactly where its input is) and is averaged over the batch and spatial
   positions into a per-channel ``p``. The channels with ``p`` 0 or 1 *in that batch* are left
   out; the batch value is the mean, over the others, of ``-(p log2 p' + (1-p) log2 (1-p'))``
   with ``p' = clamp(p, 1e-5, 1 - 1e-5)`` (the clamp only inside the logs), or 0 when every
   channel is constant. The site's entropy is the sum of the batch values over the number of
   batches. The lists are emptied after each batch.
2. **Allocate**: EGP's allocation written out: irrelevance ``I_l = sum_k s_k / s_l`` with
   ``s_l = H_l * mean|w_l|`` over the nonzero weights, ``softmax(I)`` shares of the budget,
   water-filling for layers asked for more than they have, counts rounded down.
3. **Apply**: ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount=n_l)`` per layer;
   on a layer pruned before, torch's ``PruningContainer`` prunes ``n_l`` more among the kept
   weights, which is the iterative schedule of the scripts.

The scripts name the weight layer that feeds each ReLU in a hand-written table; here that
table is :func:`site_producers`: the last Conv/Linear run before each ReLU call, shortcut
projections (``downsample``) skipped -- what the hand-written tables say for ResNets.

Example:
    >>> model = torchvision.models.resnet18(num_classes=10).eval()      # doctest: +SKIP
    >>> table = site_producers(model, batches[0])                        # doctest: +SKIP
    >>> entropies = measure_paper_entropy(model, batches)               # doctest: +SKIP
    >>> plan = paper_plan(model, entropies, table)                       # doctest: +SKIP
    >>> apply_l1_unstructured(model, plan)                               # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

PAPER_EPS = 1e-5


class ActivationLists:
    """Forward hooks on every ``nn.ReLU`` that store the outputs of one batch in lists.

    ``outputs[name]`` holds one tensor per call of the module in the current forward; the
    ``k``-th call is site ``name`` (``k = 0``) or ``name:k``, egp_fast's naming.
    """

    def __init__(self, model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.ReLU,)) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, types):
                self.outputs[name] = []
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[name].append(output.detach())

        return hook

    def items(self):
        """``(site name, activation)`` for every stored call, in module order."""
        for name, acts in self.outputs.items():
            for k, a in enumerate(acts):
                yield (name if k == 0 else f"{name}:{k}"), a

    def clear(self) -> None:
        for acts in self.outputs.values():
            acts.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def batch_entropy(activation: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Layer entropy of one batch: heaviside, per-channel mean, constant channels left out.

    Args:
        activation: a ReLU's output for one batch.
        channel_dim: the channel axis (1 for ``[N, C, H, W]``).

    Returns:
        A float64 scalar tensor, in bits (0 when every channel is constant in this batch).
    """
    on = torch.heaviside(activation, torch.zeros((), dtype=activation.dtype, device=activation.device))
    dims = [d for d in range(on.dim()) if d != channel_dim % on.dim()]
    # The mean in the activation's dtype, as the scripts do; the logs in float64 (C values only).
    p = on.mean(dim=dims).to(torch.float64)
    keep = (p > 0) & (p < 1)
    if not bool(keep.any()):
        return torch.zeros((), dtype=torch.float64, device=p.device)
    p = p[keep]
    pc = p.clamp(PAPER_EPS, 1 - PAPER_EPS)
    return (-(p * torch.log2(pc) + (1 - p) * torch.log2(1 - pc))).sum() / keep.sum()


def measure_paper_entropy(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Per-site entropy averaged over batches, the reference scripts' measurement.

    Args:
        model: the network (run in eval mode under ``no_grad``; its mode is restored).
        batches: input tensors on the model's device.

    Returns:
        ``{site name: entropy}`` in bits.
    """
    lists = ActivationLists(model)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                for name, a in lists.items():
                    h = batch_entropy(a)
                    sums[name] = sums[name] + h if name in sums else h
                lists.clear()
                n += 1
    finally:
        lists.remove()
        model.train(was_training)
    return {name: float(s) / n for name, s in sums.items()}


def site_producers(model: nn.Module, example: torch.Tensor) -> dict[str, list[str]]:
    """The scripts' hand-written "which conv feeds which ReLU" table, for any plain CNN.

    One eval forward with hooks: each ReLU call is fed by the last Conv/Linear that ran before
    it, shortcut projections (modules under a ``downsample`` name) excepted -- in torchvision's
    ResNets they run after the block's last conv, which is the layer the tables name.
    Not part of any timed region.

    Returns:
        ``{site name: [layer name]}`` (an empty list when no weight layer ran before).
    """
    names = {m: n for n, m in model.named_modules()}
    table: dict[str, list[str]] = {}
    calls: dict[str, int] = {}
    last: list[str] = []
    handles = []

    def on_weight(module, inputs, output):
        name = names[module]
        if "downsample" not in name.split("."):
            last[:] = [name]

    def on_relu(module, inputs, output):
        name = names[module]
        k = calls.get(name, 0)
        calls[name] = k + 1
        table[name if k == 0 else f"{name}:{k}"] = list(last)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(on_weight))
        elif isinstance(module, nn.ReLU):
            handles.append(module.register_forward_hook(on_relu))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return table


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight  # with torch's prune re-parametrisation: weight_orig * weight_mask


def paper_plan(
    model: nn.Module,
    entropies: Mapping[str, float],
    producers: Mapping[str, Sequence[str]],
    step: float = 0.5,
) -> dict[str, int]:
    """How many more weights to prune per producer layer (the EGP allocation).

    Args:
        model: the network, possibly already pruned with ``torch.nn.utils.prune``.
        entropies: from :func:`measure_paper_entropy`.
        producers: from :func:`site_producers`.
        step: fraction of the eligible layers' remaining weights pruned this round.

    Returns:
        ``{layer name: count}``.
    """
    modules = dict(model.named_modules())
    layer_h: dict[str, float] = {}
    for site, layers in producers.items():
        for layer in layers:
            layer_h[layer] = max(layer_h.get(layer, 0.0), entropies.get(site, 0.0))
    remaining, magnitude = {}, {}
    with torch.no_grad():
        for layer in layer_h:
            w = _weight(modules[layer])
            nz = int(torch.count_nonzero(w))
            remaining[layer] = nz
            magnitude[layer] = float(w.abs().sum(dtype=torch.float64)) / nz if nz else 0.0
    eligible = [n for n in layer_h if layer_h[n] > 0 and remaining[n] > 0]
    budget = step * sum(remaining[n] for n in eligible)
    return allocate_budget(layer_h, magnitude, remaining, budget)


def allocate_budget(
    entropy: Mapping[str, float],
    magnitude: Mapping[str, float],
    remaining: Mapping[str, int],
    budget: float,
) -> dict[str, int]:
    """EGP's allocation (docs/algorithm.md, "One pruning round", steps 4-6), written out with plain Python floats.

    Layers with zero entropy or nothing left get 0. For the others, ``s_l = H_l * mean|w_l|``,
    ``I_l = sum_k s_k / s_l``, share ``softmax(I)_l`` of the budget; a layer asked for more than
    it has gets everything it has and leaves the pool (budget and sums recomputed without it),
    until nothing is capped; counts are rounded down.

    Returns:
        ``{layer name: count}`` for every layer of ``entropy``.
    """
    plan = {name: 0 for name in entropy}
    pool = [n for n in entropy if entropy[n] > 0 and remaining[n] > 0 and magnitude[n] > 0]
    left = float(budget)
    while pool and left > 0:
        score = {n: entropy[n] * magnitude[n] for n in pool}
        total = sum(score.values())
        irrelevance = {n: total / score[n] for n in pool}
        top = max(irrelevance.values())
        weight = {n: math.exp(irrelevance[n] - top) for n in pool}
        norm = sum(weight.values())
        share = {n: left * weight[n] / norm for n in pool}
        capped = [n for n in pool if share[n] > remaining[n]]
        if not capped:
            for n in pool:
                plan[n] = int(math.floor(share[n]))
            break
        for n in capped:
            plan[n] = int(remaining[n])
            left -= remaining[n]
            pool.remove(n)
    return plan


def apply_l1_unstructured(model: nn.Module, plan: Mapping[str, int]) -> None:
    """``prune.l1_unstructured(layer, "weight", amount=n)`` for every layer with ``n > 0``."""
    modules = dict(model.named_modules())
    for layer, n in plan.items():
        if n > 0:
            torch_prune.l1_unstructured(modules[layer], "weight", amount=int(n))


def paper_round(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    producers: Mapping[str, Sequence[str]],
    step: float = 0.5,
) -> dict[str, int]:
    """One round the reference scripts' way: hooks + heaviside measure, allocate, l1_unstructured.

    Returns:
        The plan that was applied.
    """
    entropies = measure_paper_entropy(model, batches)
    plan = paper_plan(model, entropies, producers, step)
    apply_l1_unstructured(model, plan)
    return plan


def remove_reparametrization(model: nn.Module) -> None:
    """Undo ``torch.nn.utils.prune`` on every module (weights keep their zeros)."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_orig"):
            torch_prune.remove(module, "weight")
