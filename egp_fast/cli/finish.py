"""The end of an ``egp-fast`` run and its records (a mixin of :class:`~egp_fast.cli.run.Run`).

Each round becomes a record of ``report.json`` (accuracy, sparsity, entropies, per-layer
allocation); at the end the run measures once more, saves the pruned model, collapses the
zero-entropy sites (:func:`egp_fast.folding.collapse`), optionally fine-tunes the collapsed
model (``--fold-epochs``), saves it (:func:`~egp_fast.cli.artifacts.save_collapsed`), writes the
summary and the plots and prints the summary. ``config.json`` and ``report.json`` are written
here too.

The mixin uses the run's ``cfg``, ``info``, ``device``, ``model``, ``pruner``, ``example``,
``state``, ``src``, ``versions``, ``easier``, ``plain``, ``show`` and loaders, and its ``_say``,
``_measure``, ``_optim``, ``_phase`` and ``_tick``. The end of the run is timed like a round
(``summary["time_final"]``: collapse, latency, saving...; :mod:`egp_fast.cli.timing`).
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import torch

from egp_fast.cli import artifacts, train
from egp_fast.cli.checkpoints import atomic_write_bytes
from egp_fast.cli.defaults import PROG, options_hash
from egp_fast.cli.distributed import broadcast_buffers, wrap_ddp
from egp_fast.cli.plots import render_run
from egp_fast.cli.report import epoch_line, summary_text, write_json
from egp_fast.errors import ConfigError, EGPError
from egp_fast.cli.timing import round_split, time_summary
from egp_fast.folding import collapse, compare_latency
from egp_fast.graph import weight_layers
from egp_fast.masks import masked_layers
from egp_fast.masks import sparsity as masked_sparsity


class FinishMixin:
    """Round records, collapse, fold-finetune, report and config files, for :class:`~egp_fast.cli.run.Run`."""

    # -- records ----------------------------------------------------------------------------
    def _round_record(self, rnd: int, stats, ev: dict, val: dict | None, plan: dict | None,
                      seconds: float) -> dict:
        zero = stats.zero_entropy_sites()
        layer_h = stats.layer_entropy()
        sites_of: dict[str, list[str]] = {}
        for s in stats.sites.values():
            for p in s.producers:
                sites_of.setdefault(p, []).append(s.name)
        layers = []
        masked = masked_layers(self.model)
        for n in self.pruner.prunable:
            mask = masked[n].weight_mask
            layers.append({"name": n, "sites": sites_of.get(n, []), "entropy": layer_h.get(n),
                           "kept": int(mask.sum()), "total": mask.numel(),
                           "sparsity": 1.0 - float(mask.sum()) / mask.numel(),
                           "pruned": int((plan or {}).get(n, 0))})
        removed_total = sum(len(step) for step in self.state.get("removed", []))
        rec = {
            "round": rnd, "sparsity": self.pruner.sparsity(),
            "sparsity_all": masked_sparsity(self.model, weight_layers(self.model)),
            "accuracy": ev["acc"], "loss": ev["loss"],
            "val_accuracy": None if val is None else val["acc"],
            "n_sites": len(stats.sites) + removed_total, "n_zero": len(zero),
            "zero_entropy_sites": zero, "entropy": {n: s.entropy for n, s in stats.sites.items()},
            "allocation": {k: int(v) for k, v in (plan or {}).items() if v}, "pruned": int(sum((plan or {}).values())),
            "layers": layers, "seconds": seconds,
            "measure_batches": getattr(stats, "batches", None),
            "measure_stopped_early": (getattr(stats, "stopped_early", None)
                                      if getattr(self, "stats_source", "pass") == "pass" else None),
            # "track": counted during the round's last training epoch; "pass": a measurement pass
            "measure_source": getattr(self, "stats_source", "pass"),
            "stats": stats.to_dict(channels=True),
        }
        if getattr(self, "measure_note", None) and rec["measure_source"] == "pass":
            rec["measure_note"] = self.measure_note  # --measure track fell back to a pass: why
        if self.easier:
            step = self.state["removed"][rnd - 1] if 0 < rnd <= len(self.state["removed"]) else []
            rec.update(removed_sites=[e["site"] for e in step], n_removed=removed_total)
        return rec

    # -- report -----------------------------------------------------------------------------
    def _write_report(self, extra: dict | None = None) -> None:
        if not self.info.is_main:
            return
        rep = {"config": self.cfg, "versions": self.versions, "data": self.src.describe(),
               "model": {"name": self.cfg["model"], "params": sum(p.numel() for p in self.model.parameters()),
                         "sites": list(self.state.get("sites0") or [s.name for s in self.pruner.graph.sites]),
                         "prunable": self.pruner.prunable},
               "rounds": self.state["history"]["rounds"], "complete": False}
        if self.easier:
            rep["easier"] = {"best_round": self.state.get("best_round"), "stopped": self.state.get("stopped"),
                             "removed": self.state.get("removed", []), "max_drop": self.cfg["max_drop"],
                             "linearization": self.cfg["linearization"], "objective": self.cfg["objective"],
                             "speedups": self.state.get("speedups", [])}
        if extra:
            rep.update(extra)
        self.report = rep
        write_json(os.path.join(self.run_dir, "report.json"), rep)

    def _write_config(self) -> None:
        if self.info.is_main:
            write_json(os.path.join(self.run_dir, "config.json"),
                       {"options": self.cfg, "options_hash": options_hash(self.cfg), "versions": self.versions,
                        "world_size": self.info.world_size, "command": [PROG, *sys.argv[1:]]})

    # -- the end of the run -----------------------------------------------------------------
    def _collapse(self, stats) -> tuple[dict, dict, torch.nn.Module]:
        """Collapse the zero-entropy sites (and the removed ones), evaluate; returns the collapsed model."""
        cfg = self.cfg
        with self._phase("collapse"):
            res = collapse(self.model, stats, self.example, exact=not cfg["approx_collapse"],
                           measure_latency=False, max_flip=cfg["max_flip"],
                           confidence=cfg["confidence"], check=self.check_loader)
        if self.info.is_main and cfg["latency"]:
            with self._phase("latency"):  # what collapse(measure_latency=True) records, timed on its own
                res.latency = compare_latency(self.model, res.model, self.example)
            for bs, row in res.latency["batches"].items():
                res.before[f"latency_ms_b{bs}"], res.after[f"latency_ms_b{bs}"] = row["a_ms"], row["b_ms"]
            res.before["threads"] = res.after["threads"] = res.latency["threads"]
            if res.plan:
                res.plan["measured"] = {str(bs): {"before_ms": row["a_ms"], "after_ms": row["b_ms"]}
                                        for bs, row in res.latency["batches"].items()}
        cmodel = res.model.to(self.device).eval()
        with self._phase("eval"):
            ev = train.evaluate(cmodel, self.test_loader, device=self.device, amp=cfg["amp"], progress=self.show,
                                desc="eval collapsed", dist=self.info)
        b, a = res.before, res.after
        # sites_before stays the original model's count (EASIER has already removed some sites
        # from the model collapse sees); the collapse's own before/after are in report["collapse"].
        summary = {"acc_collapsed": ev["acc"], "sites_after": a.get("sites"),
                   "depth_before": b.get("longest_path"), "depth_after": a.get("longest_path"),
                   "params_before": b.get("params"), "params_after": a.get("params"),
                   "flops_before": b.get("flops"), "flops_after": a.get("flops"),
                   "removed_sites": [e["site"] for e in res.removed  # linearised, or dead after a fold
                                     if e.get("kind") in ("linearize", "dead_code") and e.get("site")],
                   "collapse_exact": res.exact,
                   "max_deviation": res.max_deviation,
                   "relative_deviation": getattr(res, "relative_deviation", None),
                   "max_flip": cfg["max_flip"], "confidence": cfg["confidence"],
                   "evidence": artifacts.evidence_rows(res),
                   "left_weak": [{"site": e.get("site"), "reason": e.get("reason")} for e in res.left
                                 if e.get("kind") == "evidence"]}
        summary.update(artifacts.latency_summary(getattr(res, "latency", None) or {}))
        rep = {**res.to_dict(), "accuracy": ev["acc"], "loss": ev["loss"]}
        return summary, rep, cmodel

    def _fold_finetune(self, cmodel: torch.nn.Module) -> tuple[dict, torch.nn.Module]:
        """Fine-tune the collapsed model itself for --fold-epochs; accuracy before and after."""
        cfg = self.cfg
        evs = {}
        for key, loader in (("test", self.test_loader), ("val", self.val_loader)):
            if loader is not None:
                evs[key] = train.evaluate(cmodel, loader, device=self.device, amp=cfg["amp"], dist=self.info)["acc"]
        trainable = [p for p in cmodel.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("--fold-epochs: the collapsed model has no trainable parameters")
        cmodel.train()
        net = wrap_ddp(cmodel, self.info)
        opt, sch = self._optim("fold", cmodel)
        epochs = []
        base = cfg["dense_epochs"] + cfg["rounds"] * cfg["epochs"]
        for e in range(cfg["fold_epochs"]):
            self.train_loader.set_epoch(base + e)
            with self._phase("train"):
                tr = train.train_epoch(net, self.train_loader, opt, device=self.device, amp=cfg["amp"],
                                       scaler=self.scaler, progress=self.show,
                                       desc=f"fold-finetune epoch {e + 1}", dist=self.info)
            sch.step()
            broadcast_buffers(cmodel, self.info)
            ev = train.evaluate(cmodel, self.test_loader, device=self.device, amp=cfg["amp"], dist=self.info)
            epochs.append({"epoch": e + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "test_acc": ev["acc"],
                           "seconds": tr["seconds"]})
            if self.plain:
                self._say(epoch_line({"phase": "fold-finetune", **epochs[-1]}, cfg["fold_epochs"]))
        cmodel.eval()
        out = {"epochs": cfg["fold_epochs"], "lr": cfg["fold_lr"], "acc_before": evs.get("test"),
               "val_acc_before": evs.get("val"), "history": epochs,
               "acc_after": train.evaluate(cmodel, self.test_loader, device=self.device, amp=cfg["amp"],
                                           dist=self.info)["acc"]}
        if self.val_loader is not None:
            out["val_acc_after"] = train.evaluate(cmodel, self.val_loader, device=self.device, amp=cfg["amp"],
                                                  dist=self.info)["acc"]
        return out, cmodel

    def _final(self) -> int:
        """Measure, save the pruned model, collapse (and fold-finetune), write the report, print it."""
        cfg, st = self.cfg, self.state
        rounds = st["history"]["rounds"]
        final_round = rounds[-1]
        if self.easier:
            final_round = next(r for r in rounds if r["round"] == st.get("best_round", 0))
        stats = self._measure()
        summary = {"acc_dense": rounds[0]["accuracy"], "acc_pruned": final_round["accuracy"],
                   "val_acc_dense": rounds[0].get("val_accuracy"), "val_acc_pruned": final_round.get("val_accuracy"),
                   "sparsity": final_round["sparsity"], "zero_sites": len(stats.zero_entropy_sites()),
                   "sites_before": final_round["n_sites"], "device": str(self.device),
                   "world_size": self.info.world_size, "measure_source": self.stats_source}
        if self.easier:
            summary.update(best_round=st.get("best_round", 0), stopped=st.get("stopped"),
                           easier_removed=[e["site"] for step in st["removed"][:st.get("best_round", 0)]
                                           for e in step])
            kept = [e for e in st.get("speedups", []) if e["round"] <= st.get("best_round", 0)]
            if kept:
                summary.update(easier_predicted_speedup=kept[-1]["predicted"],
                               easier_measured_speedup=kept[-1]["measured"])
        if self.info.is_main:
            with self._phase("save"):
                buf = io.BytesIO()
                torch.save(self.model.state_dict(), buf)
                atomic_write_bytes(os.path.join(self.run_dir, "model.pt"), buf.getvalue())
        extra: dict[str, Any] = {}
        if cfg["collapse"]:
            try:
                col_summary, extra["collapse"], cmodel = self._collapse(stats)
                summary.update(col_summary)
                if cfg["fold_epochs"] > 0:
                    extra["fold_finetune"], cmodel = self._fold_finetune(cmodel)
                    summary.update(acc_fold_before=extra["fold_finetune"]["acc_before"],
                                   acc_fold_after=extra["fold_finetune"]["acc_after"])
                if self.info.is_main:
                    with self._phase("save"):
                        extra["collapse"]["saved"] = artifacts.save_collapsed(cmodel, self.example, self.run_dir)
            except EGPError as e:  # the pruned run stands; say why the collapse did not
                extra["collapse"] = {"error": str(e)}
                self._say(f"collapse skipped: {e}")
        if self.info.is_main and cfg["latency"] and summary.get("latency_pruned_ms") is None:
            xb = next(iter(self.test_loader))[0] if len(self.test_loader) else self.example
            with self._phase("latency"):
                summary.update(latency_batch=int(xb.shape[0]),
                               latency_pruned_ms=train.measure_latency(self.model, xb))
        self._tick()
        summary["wall_seconds"] = st["elapsed"]
        summary.update(time_summary(rounds, round_split(st["round_time"], st["round_seconds"]),
                                    cfg["epochs"]))
        extra["summary"] = summary
        extra["complete"] = True
        self._write_report(extra)
        if self.info.is_main:
            try:
                render_run({"dir": self.run_dir, "name": os.path.basename(self.run_dir), "config": self.cfg,
                            "report": self.report})
            except ConfigError as e:  # matplotlib missing: the run itself succeeded
                self._say(f"(plots skipped: {e})")
            self._say()
            self._say(summary_text(self.report))
            self._say(f"outputs: {self.run_dir}")
        return 0
