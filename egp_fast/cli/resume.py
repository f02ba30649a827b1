"""Checkpoints and resuming of an ``egp-fast`` run (a mixin of :class:`~egp_fast.cli.run.Run`).

After every epoch and every round the run's state (phase, round, epoch, history, EASIER's
removed sites), model, optimizer, scheduler, grad scaler and RNG state go into one atomic
``checkpoint.pt``; :meth:`ResumeMixin._restore` puts them back so a killed run continues
exactly where it stopped. EASIER changes the model's structure each step: the removed sites
are replayed on a freshly built model before its state_dict is loaded, and ``best.pt`` keeps
the last step within the tolerance.

The mixin uses the run's ``cfg``, ``info``, ``device``, ``model``, ``example``, ``state``,
``scaler``, ``run_dir``, ``ckpt_path`` and ``best_path``, and its ``_build_model``,
``_install`` and ``_write_report``.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import torch

from egp_fast.cli.checkpoints import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from egp_fast.cli.defaults import options_hash
from egp_fast.cli.report import write_metrics_csv
from egp_fast.errors import CheckpointError
from egp_fast.folding import ChannelAffine, linearize
from egp_fast.masks import load_pruned_state_dict
from egp_fast.measurement import measure_entropy


class ResumeMixin:
    """Checkpoint, restore and EASIER's replay of removed sites, for :class:`~egp_fast.cli.run.Run`."""

    # -- removed sites (EASIER): replayed on a fresh model when resuming ----------------------
    def _replay(self, model: torch.nn.Module, steps: list[list[dict]]) -> None:
        """Remove the recorded sites from a freshly built ``model``, step by step, in place.

        The structure is what matters here (each site becomes a ChannelAffine); the maps'
        values are buffers, restored by the state_dict loaded next.
        """
        for step in steps:
            names = [e["site"] for e in step]
            if not names:
                continue
            stats = measure_entropy(model, [self.example], progress=False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                done = linearize(model, stats, sites=names, how="identity")
            if sorted(done) != sorted(names):
                why = "; ".join(str(w.message) for w in caught)[:300]
                raise CheckpointError(f"cannot rebuild the run's model: sites {sorted(set(names) - set(done))} "
                                      f"could not be removed again ({why}); start a new run")
            info = {e["site"]: e for e in step}
            for m in model.modules():
                if isinstance(m, ChannelAffine) and m.site in info:
                    m.exact, m.how = bool(info[m.site]["exact"]), info[m.site]["how"]

    def _removed_entries(self, names: list[str]) -> list[dict]:
        by_site = {m.site: m for m in self.model.modules() if isinstance(m, ChannelAffine)}
        return [{"site": n, "how": getattr(by_site.get(n), "how", self.cfg["linearization"]),
                 "exact": bool(getattr(by_site.get(n), "exact", False))} for n in names]

    # -- checkpoints ------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.perf_counter()
        dt = now - self._mark
        self._mark = now
        self.state["elapsed"] += dt
        self.state["round_seconds"] += dt

    def _checkpoint(self, opt=None, sch=None) -> None:
        self._tick()
        if not self.info.is_main:
            return
        state = {
            "options_hash": options_hash(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None,
            "scheduler": sch.state_dict() if sch is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(),
            "state": json.dumps(self.state),
        }
        save_checkpoint(self.ckpt_path, state)
        write_metrics_csv(os.path.join(self.run_dir, "metrics.csv"), self.state["history"]["epochs"])
        self._write_report()

    def _restore(self):
        ck = load_checkpoint(self.ckpt_path, map_location=self.device)
        if ck.get("options_hash") != options_hash(self.cfg):
            raise CheckpointError(f"{self.ckpt_path} was written by a run with another config; "
                                  "it cannot be resumed with this config.json")
        self.state = json.loads(ck["state"])
        if self.state.get("removed"):
            self._replay(self.model, self.state["removed"])
            self._install(self.model)
        load_pruned_state_dict(self.model, ck["model"])
        restore_rng_state(ck["rng"])
        return ck

    def _save_best(self, rnd: int) -> None:
        """EASIER: round ``rnd`` is within the tolerance; keep its model (rank 0 writes best.pt)."""
        self.state["best_round"] = rnd
        if self.info.is_main:
            save_checkpoint(self.best_path, {"model": self.model.state_dict(), "round": rnd})

    def _restore_best(self) -> None:
        """EASIER: go back to the last step within the tolerance (a fresh model, replayed)."""
        st = self.state
        best = st.get("best_round", 0)
        if best >= st["applied"]:
            return
        if self.info.distributed:
            import torch.distributed as dist

            dist.barrier()  # rank 0 wrote best.pt before anyone reads it
        ck = load_checkpoint(self.best_path, map_location=self.device)
        model = self._build_model()
        self._replay(model, st["removed"][:best])
        model.load_state_dict(ck["model"])
        self._install(model)

    def _load_optim(self, ck, opt, sch) -> None:
        if ck is not None and ck["optimizer"] is not None:
            opt.load_state_dict(ck["optimizer"])
            sch.load_state_dict(ck["scheduler"])
            if self.scaler is not None and ck["scaler"] is not None:
                self.scaler.load_state_dict(ck["scaler"])
