"""One ``egp-fast prune`` run: dense training, rounds of prune + fine-tune, collapse, report.

Split from :mod:`egp_fast.cli` (which parses options and picks the run directory); the run
writes ``config.json``, ``metrics.csv``, ``report.json``, plots, atomic checkpoints after every
epoch and round, and the collapsed model.

Methods: ``egp``/``imp`` prune weights each round; ``easier`` removes activation sites (the
live site with the lowest entropy, plus every site already at zero) each step, fine-tunes,
evaluates on the validation split held out from the training data, stops at ``--max-drop``
below the dense model's validation accuracy (or when no site is left) and keeps the last
step within the tolerance (``best.pt``). A step's removed sites are recorded in the run state,
so a resumed run rebuilds the same structure before loading a checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
from typing import Any

import torch

from egp_fast.cli.defaults import PROG, default_workers
from egp_fast.cli.defaults import options_hash as _options_hash
from egp_fast.errors import CheckpointError, ConfigError, EGPError


def _versions(device: torch.device) -> dict:
    from egp_fast._version import __version__

    out = {"egp_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device), "platform": platform.platform()}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


class Run:
    """One ``egp-fast prune`` run: dense training, rounds of prune + fine-tune, collapse, report."""

    def __init__(self, cfg: dict, run_dir: str, resuming: bool, info) -> None:
        self.cfg, self.run_dir, self.resuming, self.info = cfg, run_dir, resuming, info
        self.show = info.is_main and cfg["progress"]
        self.device = info.device
        self.ckpt_path = os.path.join(run_dir, "checkpoint.pt")
        self.best_path = os.path.join(run_dir, "best.pt")
        self.stats = None  # the latest entropy measurement, valid while the model is unchanged
        self.easier = cfg["method"] == "easier"

    # -- output helpers ---------------------------------------------------------------------
    def _say(self, text: str = "") -> None:
        if self.info.is_main:
            print(text, flush=True)

    def _build_model(self) -> torch.nn.Module:
        from egp_fast.cli.models import build_model, load_weights

        cfg = self.cfg
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg["model"], self.src.num_classes, in_channels=self.src.channels, width=cfg["width"],
                            image_size=self.src.image_size)
        if cfg["weights"]:
            load_weights(model, cfg["weights"])
        model.to(self.device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        return model

    def _setup(self) -> None:
        from egp_fast.cli.data import hold_out, load_data, make_loader
        from egp_fast.cli.models import model_in_channels

        cfg, info = self.cfg, self.info
        natural = 1 if cfg["data"].lower() == "digits" else 3
        src = load_data(cfg["data"], image_size=cfg["image_size"],
                        channels=model_in_channels(cfg["model"], natural), limit=cfg["limit"])
        # Decisions (EASIER's tolerance, collapse's held-out check) use data held out from the
        # training split; the test split only reports.
        self.src = hold_out(src, cfg["val_fraction"], seed=cfg["seed"])
        if cfg["batch_size"] % info.world_size:
            raise ConfigError(f"--batch-size {cfg['batch_size']} must be divisible by the number of processes "
                              f"({info.world_size})")
        workers = cfg["workers"] if cfg["workers"] is not None else default_workers(info.world_size)
        common = {"rank": info.rank, "world_size": info.world_size, "workers": workers,
                  "device": self.device, "channels_last": cfg["channels_last"]}
        self.train_loader = make_loader(self.src.train, cfg["batch_size"] // info.world_size, shuffle=True,
                                        seed=cfg["seed"], **common)
        self.test_loader = make_loader(self.src.test, cfg["eval_batch_size"], **common)
        self.measure_loader = make_loader(self.src.train_eval, cfg["eval_batch_size"], **common)
        self.val_loader = None
        self.check_loader = None
        if self.src.val is not None:
            self.val_loader = make_loader(self.src.val, cfg["eval_batch_size"], **common)
            # collapse's held-out check runs on every rank over the whole split, so the flip
            # rates in the report do not depend on the number of processes.
            self.check_loader = make_loader(self.src.val, cfg["eval_batch_size"],
                                            **{**common, "rank": 0, "world_size": 1})
        self.example = next(iter(make_loader(self.src.test, 2, **{**common, "rank": 0, "world_size": 1})))[0]
        self._install(self._build_model())
        self.scaler = None

    def _install(self, model: torch.nn.Module) -> None:
        """Make ``model`` the run's model: its Pruner, its DDP wrapper, its compiled training view."""
        from egp_fast.pruning import Pruner

        cfg = self.cfg
        self.model = model
        # Masks are attached now (all kept), before DDP wraps the model, so every checkpoint has
        # the same keys and DDP sees the final set of buffers.
        kw = {"linearization": cfg["linearization"]} if self.easier else {}
        self.pruner = Pruner(model, self.example, step=cfg["step"], method=cfg["method"],
                                      entropy_mode=cfg["entropy_mode"], progress=self.show, **kw)
        self._wrap()

    def _wrap(self) -> None:
        """(Re)build the DDP and ``torch.compile`` wrappers after the model's structure changed."""
        from egp_fast.cli.train import wrap_ddp

        self.ddp = wrap_ddp(self.model, self.info)
        self.train_model = torch.compile(self.ddp) if self.cfg["compile"] else self.ddp
        self.stats = None

    def _optim(self, phase: str, model: torch.nn.Module | None = None):
        from egp_fast.cli.train import build_optimizer, build_scheduler, make_grad_scaler

        cfg = self.cfg
        lr, epochs = {"dense": (cfg["dense_lr"], cfg["dense_epochs"]), "round": (cfg["lr"], cfg["epochs"]),
                      "fold": (cfg["fold_lr"], cfg["fold_epochs"])}[phase]
        opt = build_optimizer(model if model is not None else self.model, cfg["optimizer"], lr=lr,
                              momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        sch = build_scheduler(opt, cfg["schedule"], epochs=epochs, milestones=cfg["milestones"],
                              gamma=cfg["gamma"])
        self.scaler = make_grad_scaler(self.device, cfg["amp"])
        return opt, sch

    # -- removed sites (EASIER): replayed on a fresh model when resuming ----------------------
    def _replay(self, model: torch.nn.Module, steps: list[list[dict]]) -> None:
        """Remove the recorded sites from a freshly built ``model``, step by step, in place.

        The structure is what matters here (each site becomes a ChannelAffine); the maps'
        values are buffers, restored by the state_dict loaded next.
        """
        import warnings

        from egp_fast.folding.affine import ChannelAffine, linearize
        from egp_fast.measurement.measure import measure_entropy

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
        from egp_fast.folding.affine import ChannelAffine

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
        from egp_fast.cli.report import write_metrics_csv
        from egp_fast.cli.train import capture_rng_state, save_checkpoint

        self._tick()
        if not self.info.is_main:
            return
        state = {
            "options_hash": _options_hash(self.cfg),
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
        from egp_fast.masks import load_pruned_state_dict
        from egp_fast.cli.train import load_checkpoint, restore_rng_state

        ck = load_checkpoint(self.ckpt_path, map_location=self.device)
        if ck.get("options_hash") != _options_hash(self.cfg):
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
        from egp_fast.cli.train import save_checkpoint

        self.state["best_round"] = rnd
        if self.info.is_main:
            save_checkpoint(self.best_path, {"model": self.model.state_dict(), "round": rnd})

    def _restore_best(self) -> None:
        """EASIER: go back to the last step within the tolerance (a fresh model, replayed)."""
        from egp_fast.cli.train import load_checkpoint

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

    # -- one epoch --------------------------------------------------------------------------
    def _epoch(self, phase: str, rnd: int, e: int, opt, sch) -> None:
        from egp_fast.cli.train import broadcast_buffers, evaluate, train_epoch

        cfg = self.cfg
        g = e if phase == "dense" else cfg["dense_epochs"] + (rnd - 1) * cfg["epochs"] + e
        self.train_loader.set_epoch(g)
        lr = opt.param_groups[0]["lr"]
        label = "dense" if phase == "dense" else f"round {rnd}"
        tr = train_epoch(self.train_model, self.train_loader, opt, device=self.device, amp=cfg["amp"],
                         scaler=self.scaler, progress=self.show, desc=f"{label} epoch {e + 1}", dist=self.info)
        sch.step()
        broadcast_buffers(self.model, self.info)
        ev = evaluate(self.model, self.test_loader, device=self.device, amp=cfg["amp"], progress=self.show,
                      desc="eval", dist=self.info)
        self.state["history"]["epochs"].append({
            "phase": phase, "round": rnd, "epoch": e + 1, "global_epoch": g + 1, "lr": lr,
            "train_loss": tr["loss"], "train_acc": tr["acc"], "test_loss": ev["loss"], "test_acc": ev["acc"],
            "sparsity": self.pruner.sparsity(), "seconds": tr["seconds"]})
        self.stats = None

    def _measure(self):
        cfg = self.cfg
        if self.stats is None:
            kw: dict[str, Any] = {}
            if cfg["measure"] == "auto":
                kw = {"stop": "decided", "max_flip": cfg["max_flip"], "confidence": cfg["confidence"]}
            self.stats = self.pruner.measure(self.measure_loader, max_batches=cfg["measure_batches"], **kw)
        return self.stats

    def _check_masks_agree(self) -> None:
        # Every rank derived its masks from the same summed counts and the same weights; verify it,
        # because silently diverging masks would make DDP average gradients of different networks.
        if not self.info.distributed:
            return
        import torch.distributed as dist

        from egp_fast.masks import masked_layers

        kept = torch.tensor([float(m.weight_mask.sum()) for m in masked_layers(self.model).values()]
                            + [float(m.weight_mask.flatten().nonzero().sum())
                               for m in masked_layers(self.model).values()], dtype=torch.float64,
                            device=self.device)
        lo, hi = kept.clone(), kept.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise CheckpointError("ranks derived different pruning masks; check that every rank sees the same "
                                  "data and weights (same --seed, same files)")

    def _round_record(self, rnd: int, stats, ev: dict, val: dict | None, plan: dict | None,
                      seconds: float) -> dict:
        from egp_fast.graph import weight_layers
        from egp_fast.masks import masked_layers
        from egp_fast.masks import sparsity as _sparsity

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
            "sparsity_all": _sparsity(self.model, weight_layers(self.model)),
            "accuracy": ev["acc"], "loss": ev["loss"],
            "val_accuracy": None if val is None else val["acc"],
            "n_sites": len(stats.sites) + removed_total, "n_zero": len(zero),
            "zero_entropy_sites": zero, "entropy": {n: s.entropy for n, s in stats.sites.items()},
            "allocation": {k: int(v) for k, v in (plan or {}).items() if v}, "pruned": int(sum((plan or {}).values())),
            "layers": layers, "seconds": seconds,
            "measure_batches": getattr(stats, "batches", None),
            "measure_stopped_early": getattr(stats, "stopped_early", None),
            "stats": stats.to_dict(channels=True),
        }
        if self.easier:
            step = self.state["removed"][rnd - 1] if 0 < rnd <= len(self.state["removed"]) else []
            rec.update(removed_sites=[e["site"] for e in step], n_removed=removed_total)
        return rec

    def _finish_round(self, rnd: int, plan: dict | None) -> dict:
        from egp_fast.cli.report import round_table
        from egp_fast.cli.train import evaluate

        ev = evaluate(self.model, self.test_loader, device=self.device, amp=self.cfg["amp"], progress=self.show,
                      desc="eval", dist=self.info)
        val = None
        if self.val_loader is not None:
            val = evaluate(self.model, self.val_loader, device=self.device, amp=self.cfg["amp"],
                           progress=self.show, desc="eval val", dist=self.info)
        stats = self._measure()
        self._tick()
        rec = self._round_record(rnd, stats, ev, val, plan, self.state["round_seconds"])
        self.state["history"]["rounds"].append(rec)
        table = round_table([rec]).splitlines()
        if rnd == 0:
            self._say(table[0])
        self._say(table[1])
        return rec

    # -- report -----------------------------------------------------------------------------
    def _write_report(self, extra: dict | None = None) -> None:
        from egp_fast.cli.report import write_json

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
                             "linearization": self.cfg["linearization"]}
        if extra:
            rep.update(extra)
        self.report = rep
        write_json(os.path.join(self.run_dir, "report.json"), rep)

    def _write_config(self) -> None:
        from egp_fast.cli.report import write_json

        if self.info.is_main:
            write_json(os.path.join(self.run_dir, "config.json"),
                       {"options": self.cfg, "options_hash": _options_hash(self.cfg), "versions": self.versions,
                        "world_size": self.info.world_size, "command": [PROG, *sys.argv[1:]]})

    # -- main -------------------------------------------------------------------------------
    def _load_optim(self, ck, opt, sch) -> None:
        if ck is not None and ck["optimizer"] is not None:
            opt.load_state_dict(ck["optimizer"])
            sch.load_state_dict(ck["scheduler"])
            if self.scaler is not None and ck["scaler"] is not None:
                self.scaler.load_state_dict(ck["scaler"])

    def _apply_step(self, rnd: int) -> bool:
        """Measure, plan and apply round ``rnd``; False when there is nothing left to do (EASIER)."""
        st = self.state
        stats = self._measure()
        plan = self.pruner.plan(stats)
        removed = self.pruner.apply(plan, stats)
        if self.easier:
            if not removed:
                return False
            st["removed"].append(self._removed_entries(list(removed)))
            st["applied"] = rnd
            self._wrap()  # new modules: DDP and compile see the new structure
            st.update(plan=None)
        else:
            self._check_masks_agree()
            st.update(plan={k: int(v) for k, v in plan.items()})
        self.stats = None
        return True

    def run(self) -> int:
        from egp_fast.cli.report import round_table

        cfg = self.cfg
        t_setup = time.perf_counter()
        self._setup()
        self.versions = _versions(self.device)
        self.state = {"phase": "dense", "round": 0, "epoch": 0, "plan": None, "elapsed": 0.0,
                      "round_seconds": 0.0, "history": {"epochs": [], "rounds": []},
                      "removed": [], "applied": 0, "best_round": 0, "stopped": None,
                      "sites0": [s.name for s in self.pruner.graph.sites]}
        ck = None
        if self.resuming and os.path.isfile(self.ckpt_path):
            ck = self._restore()
            self._say(f"resuming {self.run_dir}: {self.state['phase']} round {self.state['round']}, "
                      f"epoch {max(self.state['epoch'], 0)}")
        elif not self.resuming:
            self._write_config()
        if self.resuming and self.info.is_main:
            for entry in os.scandir(self.run_dir):  # leftovers of a write cut short by the kill
                if ".tmp-" in entry.name and entry.is_file():
                    os.unlink(entry.path)
        self._mark = t_setup  # setup (data, model, tracing) counts towards the wall time
        st = self.state
        if st["history"]["rounds"]:
            self._say(round_table(st["history"]["rounds"]))
        else:
            self._say(f"run directory: {self.run_dir}")
        if st["phase"] == "dense":
            if st["epoch"] < cfg["dense_epochs"]:
                opt, sch = self._optim("dense")
                self._load_optim(ck, opt, sch)
                for e in range(st["epoch"], cfg["dense_epochs"]):
                    self._epoch("dense", 0, e, opt, sch)
                    st["epoch"] = e + 1
                    self._checkpoint(opt, sch)
            self._finish_round(0, None)
            if self.easier:
                self._save_best(0)
            st.update(phase="round", round=1, epoch=-1, plan=None, round_seconds=0.0)
            self._checkpoint()
            ck = None
        while st["phase"] == "round" and st["round"] <= cfg["rounds"]:
            rnd = st["round"]
            if st["epoch"] < 0:
                if not self._apply_step(rnd):
                    st.update(phase="done", stopped="no activation site left")
                    self._checkpoint()
                    break
                st["epoch"] = 0
                opt, sch = self._optim("round")
                self._checkpoint(opt, sch)
            else:
                opt, sch = self._optim("round")
                self._load_optim(ck, opt, sch)
            ck = None
            for e in range(st["epoch"], cfg["epochs"]):
                self._epoch("finetune", rnd, e, opt, sch)
                st["epoch"] = e + 1
                self._checkpoint(opt, sch)
            rec = self._finish_round(rnd, st["plan"])
            st.update(round=rnd + 1, epoch=-1, plan=None, round_seconds=0.0)
            if self.easier:
                from egp_fast.pruning.easier import within_tolerance

                dense_val = st["history"]["rounds"][0]["val_accuracy"]
                if within_tolerance(rec["val_accuracy"], dense_val, cfg["max_drop"]):
                    self._save_best(rnd)  # the latest step within the tolerance has the most sites removed
                else:
                    st.update(phase="done", stopped=f"validation accuracy {100 * rec['val_accuracy']:.1f}% is more "
                              f"than {100 * cfg['max_drop']:g} pt below the dense {100 * dense_val:.1f}%")
                if st["phase"] == "round" and not self.pruner.graph.sites:
                    st.update(phase="done", stopped="no activation site left")
            self._checkpoint()
        if self.easier and st.get("stopped") is None and st["phase"] != "done":
            st["stopped"] = f"--rounds {cfg['rounds']} reached"
        st["phase"] = "done"
        if self.easier:
            self._restore_best()
        return self._final()

    def _collapse(self, stats) -> tuple[dict, dict, torch.nn.Module]:
        """Collapse the zero-entropy sites (and the removed ones), evaluate; returns the collapsed model."""
        from egp_fast.folding.collapser import collapse
        from egp_fast.cli.train import evaluate

        cfg = self.cfg
        res = collapse(self.model, stats, self.example, exact=not cfg["approx_collapse"],
                       measure_latency=self.info.is_main and cfg["latency"], max_flip=cfg["max_flip"],
                       confidence=cfg["confidence"], check=self.check_loader)
        cmodel = res.model.to(self.device).eval()
        ev = evaluate(cmodel, self.test_loader, device=self.device, amp=cfg["amp"], progress=self.show,
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
                   "evidence": _evidence_rows(res),
                   "left_weak": [{"site": e.get("site"), "reason": e.get("reason")} for e in res.left
                                 if e.get("kind") == "evidence"]}
        summary.update(_latency_summary(getattr(res, "latency", None) or {}))
        rep = {**res.to_dict(), "accuracy": ev["acc"], "loss": ev["loss"]}
        return summary, rep, cmodel

    def _fold_finetune(self, cmodel: torch.nn.Module) -> tuple[dict, torch.nn.Module]:
        """Fine-tune the collapsed model itself for --fold-epochs; accuracy before and after."""
        from egp_fast.cli.train import broadcast_buffers, evaluate, train_epoch, wrap_ddp

        cfg = self.cfg
        evs = {}
        for key, loader in (("test", self.test_loader), ("val", self.val_loader)):
            if loader is not None:
                evs[key] = evaluate(cmodel, loader, device=self.device, amp=cfg["amp"], dist=self.info)["acc"]
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
            tr = train_epoch(net, self.train_loader, opt, device=self.device, amp=cfg["amp"], scaler=self.scaler,
                             progress=self.show, desc=f"fold-finetune epoch {e + 1}", dist=self.info)
            sch.step()
            broadcast_buffers(cmodel, self.info)
            ev = evaluate(cmodel, self.test_loader, device=self.device, amp=cfg["amp"], dist=self.info)
            epochs.append({"epoch": e + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "test_acc": ev["acc"]})
        cmodel.eval()
        out = {"epochs": cfg["fold_epochs"], "lr": cfg["fold_lr"], "acc_before": evs.get("test"),
               "val_acc_before": evs.get("val"), "history": epochs,
               "acc_after": evaluate(cmodel, self.test_loader, device=self.device, amp=cfg["amp"],
                                     dist=self.info)["acc"]}
        if self.val_loader is not None:
            out["val_acc_after"] = evaluate(cmodel, self.val_loader, device=self.device, amp=cfg["amp"],
                                            dist=self.info)["acc"]
        return out, cmodel

    def _final(self) -> int:
        from egp_fast.cli.report import render_run, summary_text
        from egp_fast.cli.train import atomic_write_bytes, measure_latency

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
                   "world_size": self.info.world_size}
        if self.easier:
            summary.update(best_round=st.get("best_round", 0), stopped=st.get("stopped"),
                           easier_removed=[e["site"] for step in st["removed"][:st.get("best_round", 0)]
                                           for e in step])
        if self.info.is_main:
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
                    extra["collapse"]["saved"] = _save_collapsed(cmodel, self.example, self.run_dir)
            except EGPError as e:  # the pruned run stands; say why the collapse did not
                extra["collapse"] = {"error": str(e)}
                self._say(f"collapse skipped: {e}")
        if self.info.is_main and cfg["latency"] and summary.get("latency_pruned_ms") is None:
            xb = next(iter(self.test_loader))[0] if len(self.test_loader) else self.example
            summary.update(latency_batch=int(xb.shape[0]), latency_pruned_ms=measure_latency(self.model, xb))
        self._tick()
        summary["wall_seconds"] = st["elapsed"]
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


def _evidence_rows(res) -> list[dict]:
    """Per removed site: the samples behind its zero entropy, its flip bound and the held-out flips."""
    rows = []
    for e in res.removed:
        if e.get("kind") != "linearize" or not e.get("site"):
            continue
        held = e.get("held_out") or {}
        rows.append({"site": e["site"], "samples": e.get("samples"), "flip_bound": e.get("flip_bound"),
                     "held_out_samples": held.get("samples"), "held_out_flipped": held.get("flipped_samples"),
                     "held_out_flip_rate": held.get("flip_rate")})
    return rows


def _latency_summary(lat: dict) -> dict:
    """Summary fields from collapse's interleaved latency comparison (pruned = a, collapsed = b)."""
    rows = lat.get("batches") or {}
    out: dict[str, Any] = {}
    for bs, row in sorted(((int(k), v) for k, v in rows.items())):
        key = "" if bs == 64 else f"_b{bs}"
        out.update({f"latency{key}_pruned_ms": row["a_ms"], f"latency{key}_collapsed_ms": row["b_ms"],
                    f"latency{key}_speedup": row.get("speedup"), f"latency{key}_speedup_iqr": row.get("speedup_iqr"),
                    f"latency{key}_inside_noise": row.get("inside_noise"), f"latency{key}_rounds": row.get("rounds")})
    if rows:
        out["latency_batch"] = 64 if any(int(k) == 64 for k in rows) else int(next(iter(rows)))
        out["latency_threads"] = lat.get("threads")
    return out


def _save_collapsed(model: torch.nn.Module, example: torch.Tensor, run_dir: str) -> dict:
    """Save the collapsed model so it reloads without egp_fast's classes, at any batch size.

    ``collapsed.pt2`` (``torch.export``; reload with ``torch.export.load(p).module()``) with a
    dynamic batch dimension, and dynamic height/width too when the model allows it (a model
    with fixed position embeddings or a precomputed border map does not: it keeps the example's
    spatial size). The file is loaded back and run at batch 1, 7 and 64 against ``model``
    before it is reported. When the model does not export, ``collapsed.ts`` (TorchScript trace;
    ``torch.jit.load(p)``). The state_dict goes to ``collapsed_state_dict.pt`` either way.
    """
    from egp_fast.cli.train import atomic_write_bytes

    model = model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(os.path.join(run_dir, "collapsed_state_dict.pt"), buf.getvalue())
    x = example.detach()
    errors = []
    for dims in (("batch", "height", "width"), ("batch",)):
        if len(dims) > 1 and x.dim() != 4:
            continue
        try:
            ep, batches = _export_checked(model, x, dims)
        except Exception as e:  # export is strict about dynamic Python; try fewer dynamic dims
            errors.append(f"dynamic {'/'.join(dims)}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
            continue
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        atomic_write_bytes(os.path.join(run_dir, "collapsed.pt2"), buf.getvalue())
        out = {"file": "collapsed.pt2", "format": "torch.export", "load": "torch.export.load(path).module()",
               "dynamic": list(dims), "checked_batches": batches}
        if errors:
            out["static_dims_because"] = errors
        return out
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    atomic_write_bytes(os.path.join(run_dir, "collapsed.ts"), buf.getvalue())
    return {"file": "collapsed.ts", "format": "torchscript", "load": "torch.jit.load(path)",
            "export_error": "; ".join(errors)[:600]}


def _export_checked(model: torch.nn.Module, x: torch.Tensor, dims: tuple[str, ...]):
    """torch.export ``model`` with the named dimensions dynamic, reload it from bytes and check it
    against ``model`` at batch 1, 7 and 64 (and a larger image when height/width are dynamic)."""
    from torch.export import Dim

    spec = {0: Dim("batch", min=1, max=1 << 16)}
    if "height" in dims:
        spec.update({2: Dim("height", min=2, max=4096), 3: Dim("width", min=2, max=4096)})
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=({**spec},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    batches = [1, 7, 64]
    shapes = [(b, *x.shape[1:]) for b in batches]
    if "height" in dims:
        shapes.append((3, x.shape[1], x.shape[2] * 2, x.shape[3] * 2))
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for shape in shapes:
            xb = torch.randn(shape, generator=g).to(x.device, x.dtype)
            want, got = model(xb), loaded(xb)
            tol = 1e-4 * max(1.0, float(want.abs().max()))
            if got.shape != want.shape or float((got - want).abs().max()) > tol:
                raise RuntimeError(f"the exported model differs from the collapsed model at input {list(shape)}")
    return ep, batches
