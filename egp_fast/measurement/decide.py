"""How sure a measurement is: flip bounds of zero-entropy sites and early stopping.

Two questions decide whether a measurement pass can stop (see ``docs/confidence.md``):

* **Is a zero-entropy site really constant?** No neuron of the site changed state on ``n``
  input samples. The exact one-sided (Clopper-Pearson) upper bound on the probability ``q``
  that a new sample from the same data flips it, at confidence ``c``, solves
  ``(1 - q) ** n = 1 - c``: ``q = 1 - (1 - c) ** (1 / n)`` (about ``3 / n`` at 95%). Samples,
  not positions, are the unit: the positions of one image are not independent draws.
* **Is a non-zero layer entropy known well enough?** The estimator of its uncertainty is a
  delete-a-group jackknife over batches (batches are the sampling unit): the batches are dealt
  round-robin into at most :data:`JACKKNIFE_GROUPS` groups, the layer entropy is recomputed
  from the pooled counts with each group left out (``H_(g)``), and
  ``se = sqrt((G - 1) / G * sum_g (H_(g) - mean H_(.)) ** 2)``. The entropy is "known within
  ``tol`` bits" when ``1.96 * se <= tol``. In ``mode="paper"`` (a mean of per-batch values)
  the standard error of that mean is used instead.
* **Is the decision the entropies feed known?** (optional: ``measure_entropy(plan=...)``, which
  :meth:`egp_fast.Pruner.measure` passes for EGP and EASIER.) A *plan* maps the per-site
  entropies to amounts (EGP: the weights each layer would be pruned, before rounding down;
  EASIER: 1 for each site it would remove). The same jackknife runs on the amounts: the plan
  is computed from the pooled counts and from each leave-one-group-out row, and every amount
  ``a`` must satisfy ``t * se(a) <= max(plan_tol * |a|, 0.5)``, with ``t`` the 97.5% Student-t
  quantile with ``G - 1`` degrees of freedom (a jackknife variance from ``G`` groups has
  ``G - 1``) and ``se`` scaled by the finite-population factor ``sqrt(1 - n / N)`` when the
  pass length ``N`` is known (see :class:`Decider`). The 0.5 keeps amounts of a few weights
  decidable: the rounded-down amounts then differ by at most ``plan_tol * a`` plus one weight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from numbers import Real

import torch

from egp_fast.errors import ConfigError
from egp_fast.ops import reference_entropy

JACKKNIFE_GROUPS = 20
Z_95 = 1.959963984540054  # two-sided 95% normal quantile used for the entropy tolerance
# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..JACKKNIFE_GROUPS - 1 (a jackknife
# variance from G groups has G - 1 degrees of freedom); used by the plan rule.
T_975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.13145, 2.119905, 2.109816, 2.100922, 2.093024,
)
#: Absolute slack of the plan rule, in the plan's units (weights): an amount is known when its
#: 95% interval is within ``max(plan_tol * |amount|, PLAN_SLACK)``.
PLAN_SLACK = 0.5

PlanFn = Callable[[list, list], Mapping]


def check_confidence(confidence: object, name: str = "confidence") -> float:
    """``confidence`` as a float in (0, 1), or a :class:`ConfigError` naming the argument."""
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0.0 < float(confidence) < 1.0:
        raise ConfigError(f"{name}={confidence!r} must be a number strictly between 0 and 1 (e.g. 0.95)")
    return float(confidence)


def check_fraction(value: object, name: str, *, allow_one: bool = True) -> float:
    """``value`` as a float in (0, 1] (or (0, 1)), or a :class:`ConfigError` naming ``name``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and 0.0 < float(value) <= 1.0
    if ok and not allow_one and float(value) >= 1.0:
        ok = False
    if not ok:
        hi = "1]" if allow_one else "1)"
        raise ConfigError(f"{name}={value!r} must be a number in (0, {hi}")
    return float(value)


def check_plan(plan: object, plan_tol: object) -> tuple[PlanFn | None, float | None]:
    """Validate ``measure_entropy``'s ``plan`` / ``plan_tol`` (see :class:`Decider`).

    Returns:
        ``(plan, plan_tol)``; ``plan_tol`` is ``None`` when ``plan`` is (no plan rule).

    Raises:
        ConfigError: ``plan`` is not callable, or ``plan_tol`` is not in (0, 1] (or ``None``).
    """
    if plan is not None and not callable(plan):
        raise ConfigError(
            f"plan must be a callable plan(entropy, constant) -> {{key: amount}} or None, got "
            f"{type(plan).__name__}"
        )
    if plan_tol is None:
        return None, None  # plan_tol=None switches the plan rule off
    ok = isinstance(plan_tol, Real) and not isinstance(plan_tol, bool) and 0.0 < float(plan_tol) <= 1.0
    if not ok:
        raise ConfigError(
            f"plan_tol={plan_tol!r} must be a number in (0, 1] (a relative tolerance on each "
            "planned amount, e.g. 0.01 for 1%), or None to stop on the entropies alone"
        )
    return plan, (float(plan_tol) if plan is not None else None)


def flip_bound(samples: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper bound on the flip probability after ``samples`` samples, no flip.

    For a site none of whose neurons changed state on ``n = samples`` independent samples, any
    probability ``q`` that a new sample flips it above ``1 - (1 - confidence) ** (1 / n)``
    would have shown a flip with probability at least ``confidence`` (Clopper-Pearson for zero
    events; about ``3 / n`` at 95%). A site that already changes state has no such bound: its
    :meth:`SiteStats.flip_bound` is 1.0 (see docs/algorithm.md, "How sure is \"zero entropy\"?").

    Args:
        samples: input samples the site was seen on without a flip (0 gives 1.0: no evidence).
        confidence: one-sided confidence level, in (0, 1).

    Returns:
        The bound, in (0, 1]; never 0.0 for a finite number of samples.

    Raises:
        ConfigError: ``confidence`` is not in (0, 1).

    Example:
        >>> round(flip_bound(8), 3), round(flip_bound(1437), 4), flip_bound(0)
        (0.312, 0.0021, 1.0)
    """
    c = check_confidence(confidence)
    if samples <= 0:
        return 1.0
    # -expm1(log1p(-c) / n) == 1 - (1 - c) ** (1 / n) without cancellation: stays > 0 for huge n.
    return -math.expm1(math.log1p(-c) / samples)


def samples_needed(max_flip: float, confidence: float = 0.95) -> int:
    """Fewest samples without a flip for which :func:`flip_bound` is ``<= max_flip``.

    Example:
        >>> samples_needed(0.01), samples_needed(0.001)
        (299, 2995)
    """
    c = check_confidence(confidence)
    if max_flip >= 1.0:
        return 1
    n = math.ceil(math.log1p(-c) / math.log1p(-max_flip))
    while n > 1 and -math.expm1(math.log1p(-c) / (n - 1)) <= max_flip:  # guard float rounding
        n -= 1
    while -math.expm1(math.log1p(-c) / n) > max_flip:
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# Layer entropies of several count vectors at once (the jackknife's leave-one-group-out rows).


def layer_entropies(
    rows: torch.Tensor,
    obs: torch.Tensor,
    sizes: list[int],
    multi: dict[int, tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer entropy and "every channel constant" of every site, for each row of counts.

    Args:
        rows: int64 ``[R, L]``: counter buffers (the layout of ``_Counter.flat`` in counting.py).
        obs: int64 ``[R, S]``: observations per site in each row.
        sizes: channels per site (``S`` entries); the first ``sum(sizes)`` entries of a row
            are the first-breakpoint counts of every site.
        multi: site index -> (offset of its further-breakpoint counts, how many further
            breakpoints) for multi-piece sites (ReLU6, Hardtanh).

    Returns:
        ``(entropy [R, S] float64, constant [R, S] bool)``: the exact-mode layer entropy
        (mean over non-constant channels) and whether the site is at zero entropy.
    """
    r, s = obs.shape
    t = sum(sizes)
    device = rows.device
    size_t = torch.tensor(sizes, dtype=torch.int64, device=device)
    obs_e = torch.repeat_interleave(obs, size_t, dim=1)  # [R, t]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), size_t.repeat(r).cumsum(0)])
    out = reference_entropy(rows[:, :t].reshape(-1), obs_e.reshape(-1), offsets)
    ent = out.layer_entropy.view(r, s).clone()
    on = rows[:, :t]
    moving = ((on > 0) & (on < obs_e)).to(torch.int64)
    seg = torch.repeat_interleave(torch.arange(s, device=device), size_t)
    n_moving = torch.zeros(r, s, dtype=torch.int64, device=device).index_add_(1, seg, moving)
    constant = (n_moving == 0) & (obs > 0)
    starts = [0]
    for c in sizes:
        starts.append(starts[-1] + c)
    for i, (off, k) in multi.items():
        c = sizes[i]
        above = [on[:, starts[i] : starts[i + 1]]] + [rows[:, off + j * c : off + (j + 1) * c] for j in range(k)]
        o = obs[:, i : i + 1]
        pieces = [o - above[0]] + [above[j - 1] - above[j] for j in range(1, len(above))] + [above[-1]]
        pc = torch.stack(pieces, dim=1)  # [R, P, C]
        q = pc.to(torch.float64) / o.clamp_min(1).unsqueeze(1).to(torch.float64)
        h = -(torch.xlogy(q, q).sum(1)) / math.log(2)
        nonconst = (pc < o.unsqueeze(1)).all(1)
        n_nc = nonconst.sum(1)
        ent[:, i] = torch.where(n_nc > 0, (h * nonconst).sum(1) / n_nc.clamp_min(1), torch.zeros_like(h[:, 0]))
        constant[:, i] = (n_nc == 0) & (o[:, 0] > 0)
    return ent, constant


class Decider:
    """Early-stopping state of one measurement pass (``measure_entropy(stop="decided")``).

    Keeps, per jackknife group, the counts and observations the group's batches added (device
    tensors; no host transfer until :meth:`decided` runs).

    With ``plan`` (a callable ``plan(entropy, constant) -> {key: amount}``, ``entropy`` and
    ``constant`` lists in site order) the pass is decided only when, besides the rules above,
    every amount of the plan is known: ``t * se <= max(plan_tol * |amount|, PLAN_SLACK)``, ``se``
    the jackknife standard error of the amount over the leave-one-group-out rows (all computed
    from counts summed across ranks, so every rank decides alike), ``t`` the 97.5% Student-t
    quantile with ``G - 1`` degrees of freedom. When ``total`` (the batches a whole pass would
    measure, on this rank) is known, ``se`` is multiplied by the finite-population factor
    ``sqrt(1 - n / total)``: the plan is compared with the plan of the whole pass over the same
    data, and the ``n`` batches already measured are part of it. ``plan`` runs only when every
    other rule already holds.
    """

    def __init__(
        self,
        counter,
        *,
        max_flip: float,
        confidence: float,
        tol: float,
        min_batches: int,
        used: list[bool],
        plan: PlanFn | None = None,
        plan_tol: float | None = None,
        total: int | None = None,
    ) -> None:
        self.counter = counter
        self.max_flip = max_flip
        self.confidence = confidence
        self.tol = tol
        self.min_batches = min_batches
        self.used = used  # per site: its entropy feeds the allocation (it has producers)
        self.needed = samples_needed(max_flip, confidence)
        flat = counter.flat
        self.groups = torch.zeros(JACKKNIFE_GROUPS, flat.numel(), dtype=torch.int64, device=flat.device)
        self.group_obs = [[0] * len(counter.sites) for _ in range(JACKKNIFE_GROUPS)]
        self.last = flat.clone()
        self.last_obs = list(counter.observations)
        # Host syncs are free on the CPU; on an accelerator they stall the queue: check less often.
        self.every = 1 if flat.device.type == "cpu" else 4
        self.checks = 0
        self.entropy_se: list[float] | None = None
        self.plan = plan if plan_tol is not None else None
        self.plan_tol = plan_tol
        self.total = total
        self.plan_se: dict | None = None  # per key: the finite-population-scaled jackknife se
        self.plan_seconds = 0.0  # time spent in the plan callback (all checks)
        self.plan_calls = 0
        self.group_batches = [0] * JACKKNIFE_GROUPS
        if counter.paper and self.plan is not None:
            self.paper_groups = torch.zeros(
                JACKKNIFE_GROUPS, len(counter.sites), dtype=torch.float64, device=flat.device
            )
            self.last_paper = counter.paper_sum.clone()

    def after_batch(self, index: int) -> None:
        """Add the batch's counts to its group (``index`` is the 0-based batch number)."""
        g = index % JACKKNIFE_GROUPS
        flat = self.counter.flat
        self.groups[g] += flat - self.last
        self.last.copy_(flat)
        obs = self.counter.observations
        row = self.group_obs[g]
        for i, (o, lo) in enumerate(zip(obs, self.last_obs)):
            row[i] += o - lo
        self.last_obs = list(obs)
        self.group_batches[g] += 1
        if self.counter.paper and self.plan is not None:
            self.paper_groups[g] += self.counter.paper_sum - self.last_paper
            self.last_paper.copy_(self.counter.paper_sum)

    def should_check(self, batches: int) -> bool:
        return batches >= self.min_batches and batches % self.every == 0

    def decided(self, batches: int, reduce) -> bool:
        """True when every site is decided, every used entropy is within ``tol`` and (with a
        ``plan``) every planned amount is known within ``plan_tol``.

        Args:
            batches: batches seen so far.
            reduce: callable summing a tensor across processes (identity without DDP), so
                every rank takes the same decision.
        """
        self.checks += 1
        counter = self.counter
        device = counter.flat.device
        n_sites = len(counter.sites)
        g_used = min(batches, JACKKNIFE_GROUPS)
        flat = reduce(counter.flat.clone())
        groups = reduce(self.groups[:g_used].clone())
        meta = torch.tensor(
            [counter.observations, counter.samples] + [self.group_obs[g] for g in range(g_used)],
            dtype=torch.int64,
            device=device,
        )
        meta = reduce(meta)
        obs, samples, gobs = meta[0], meta[1].tolist(), meta[2:]
        sizes = [s.channels for s in counter.sites]
        rows = torch.cat([flat.unsqueeze(0), flat.unsqueeze(0) - groups])
        obs_rows = torch.cat([obs.unsqueeze(0), obs.unsqueeze(0) - gobs])
        ent, const = layer_entropies(rows, obs_rows, sizes, counter.multi)
        const_full = const[0].tolist()
        if counter.paper:
            psum = reduce(counter.paper_sum.clone())
            psq = reduce(counter.paper_sq.clone())
            b = batches * _world()
            mean = psum / b
            var = (psq / b - mean * mean).clamp_min(0) * b / max(b - 1, 1)
            se = (var / b).sqrt().tolist()
        else:
            loo = ent[1:]
            gg = loo.shape[0]
            dev = loo - loo.mean(0, keepdim=True)
            se = ((gg - 1) / gg * (dev * dev).sum(0)).sqrt().tolist() if gg > 1 else [math.inf] * n_sites
        self.entropy_se = se
        for i in range(n_sites):
            if int(obs[i]) == 0:
                return False  # a site not seen yet is not decided
            if const_full[i]:
                if samples[i] < self.needed:
                    return False
            elif self.used[i] and not Z_95 * se[i] <= self.tol:
                return False
        if self.plan is None:
            return True
        if g_used < 2:
            return False  # one group: no spread to judge the plan by
        if counter.paper:
            # The plan reads paper-mode entropies: means of per-batch values, per row (psum is
            # the reduced sum of per-batch values from above).
            gb = reduce(torch.tensor(self.group_batches[:g_used], dtype=torch.float64, device=device))
            pg = reduce(self.paper_groups[:g_used].clone())
            b_all = gb.sum()
            ent = torch.cat([(psum / b_all).unsqueeze(0), (psum.unsqueeze(0) - pg) / (b_all - gb).unsqueeze(1)])
        return self._plan_known(ent, const, batches)

    def _plan_known(self, ent: torch.Tensor, const: torch.Tensor, batches: int) -> bool:
        """The plan rule on the entropy rows (row 0: all batches; then leave-one-group-out).

        The leave-one-group-out plans are computed one by one; after 2, 4, 8 and 16 of them the
        spread so far (a lower bound of the full jackknife sum of squares: fewer terms, each
        around its own mean) is tested, so a plan still far from known costs a few callbacks,
        not ``G + 1``.
        """
        start = time.perf_counter()
        try:
            return self._plan_rule(ent.tolist(), const.tolist(), batches)
        finally:
            self.plan_seconds += time.perf_counter() - start

    def _plan_rule(self, ent_rows: list, const_rows: list, batches: int) -> bool:
        self.plan_se = None
        g = len(ent_rows) - 1
        if g < 2:
            return False
        fpc = 1.0
        if self.total is not None and self.total > 0:
            fpc = math.sqrt(max(0.0, 1.0 - batches / self.total))  # both counted on this rank
        # known when t * se <= allowed, with se = fpc * sqrt((g - 1) / g * sum of squares)
        t = T_975[min(g - 1, len(T_975)) - 1]
        se_per_root_ss = fpc * math.sqrt((g - 1) / g)
        full = self.plan(ent_rows[0], const_rows[0])
        loo: list = []
        self.plan_calls += 1
        for r in range(1, g + 1):
            loo.append(self.plan(ent_rows[r], const_rows[r]))
            self.plan_calls += 1
            if r in (2, 4, 8, 16) or r == g:
                spread = self._spread(full, loo)
                if any(t * se_per_root_ss * math.sqrt(ss) > allowed for ss, allowed in spread.values()):
                    return False
        self.plan_se = {k: se_per_root_ss * math.sqrt(ss) for k, (ss, _) in spread.items()}
        return True

    def _spread(self, full: Mapping, loo: list) -> dict:
        """Per key: (sum of squared deviations of the leave-one-out amounts, allowed half-width)."""
        keys = dict.fromkeys(full)
        for p in loo:
            keys.update(dict.fromkeys(p))
        n = len(loo)
        out = {}
        for k in keys:
            v = [float(p.get(k, 0.0)) for p in loo]
            m = math.fsum(v) / n
            ss = math.fsum((x - m) ** 2 for x in v)
            out[k] = (ss, max(self.plan_tol * abs(float(full.get(k, 0.0))), PLAN_SLACK))
        return out


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1
