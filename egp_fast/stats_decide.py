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
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from egp_fast.errors import ConfigError
from egp_fast.ops.entropy import reference_entropy

JACKKNIFE_GROUPS = 20
Z_95 = 1.959963984540054  # two-sided 95% normal quantile used for the entropy tolerance


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


def flip_bound(samples: int, zero_entropy: bool, confidence: float = 0.95) -> float:
    """Upper confidence bound on the chance that a new sample flips a site.

    Args:
        samples: input samples the site saw.
        zero_entropy: True when no neuron of the site changed state on those samples.
        confidence: one-sided confidence level, in (0, 1).

    Returns:
        ``1 - (1 - confidence) ** (1 / samples)`` for a zero-entropy site seen on
        ``samples > 0`` samples (never 0.0 for finite ``samples``); 1.0 otherwise.

    Raises:
        ConfigError: ``confidence`` is not in (0, 1).

    Example:
        >>> round(flip_bound(8, True), 3), round(flip_bound(1437, True), 4), flip_bound(8, False)
        (0.312, 0.0021, 1.0)
    """
    c = check_confidence(confidence)
    if not zero_entropy or samples <= 0:
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
        rows: int64 ``[R, L]``: counter buffers (layout of ``egp_fast.stats._Counter.flat``).
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

    def should_check(self, batches: int) -> bool:
        return batches >= self.min_batches and batches % self.every == 0

    def decided(self, batches: int, reduce) -> bool:
        """True when every site is decided and every used entropy is within ``tol``.

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
        return True


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1
