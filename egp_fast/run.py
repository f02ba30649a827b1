"""One ``egp-fast prune`` run: dense training, rounds of prune + fine-tune, collapse, report.

Split from :mod:`egp_fast.cli` (which parses options and picks the run directory); the run
writes ``config.json``, ``metrics.csv``, ``report.json``, plots, atomic checkpoints after every
epoch and round, and the collapsed model.
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

from egp_fast.cli import PROG, _options_hash
from egp_fast.errors import CheckpointError, ConfigError, EGPError


def _versions(device: torch.device) -> dict:
    from egp_fast import __version__

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
        self.stats = None  # the latest entropy measurement, valid while the model is unchanged

    # -- output helpers ---------------------------------------------------------------------
    def _say(self, text: str = "") -> None:
        if self.info.is_main:
            print(text, flush=True)

    def _setup(self) -> None:
        import egp_fast
        from egp_fast.data import load_data, make_loader
        from egp_fast.models import build_model, load_weights, model_in_channels
        from egp_fast.train import wrap_ddp

        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg["seed"])
        natural = 1 if cfg["data"].lower() == "digits" else 3
        self.src = load_data(cfg["data"], image_size=cfg["image_size"],
                             channels=model_in_channels(cfg["model"], natural), limit=cfg["limit"])
        model = build_model(cfg["model"], self.src.num_classes, in_channels=self.src.channels, width=cfg["width"])
        if cfg["weights"]:
            load_weights(model, cfg["weights"])
        model.to(self.device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model
        if cfg["batch_size"] % info.world_size:
            raise ConfigError(f"--batch-size {cfg['batch_size']} must be divisible by the number of processes "
                              f"({info.world_size})")
        common = {"rank": info.rank, "world_size": info.world_size, "workers": cfg["workers"],
                  "device": self.device, "channels_last": cfg["channels_last"]}
        self.train_loader = make_loader(self.src.train, cfg["batch_size"] // info.world_size, shuffle=True,
                                        seed=cfg["seed"], **common)
        self.test_loader = make_loader(self.src.test, cfg["eval_batch_size"], **common)
        self.measure_loader = make_loader(self.src.train_eval, cfg["eval_batch_size"], **common)
        example = next(iter(make_loader(self.src.test, 2, **{**common, "rank": 0, "world_size": 1})))[0]
        self.example = example
        # Masks are attached now (all kept), before DDP wraps the model, so every checkpoint has
        # the same keys and DDP sees the final set of buffers.
        self.pruner = egp_fast.Pruner(model, example, step=cfg["step"], method=cfg["method"],
                                      entropy_mode=cfg["entropy_mode"], progress=self.show)
        self.ddp = wrap_ddp(model, info)
        self.scaler = None

    def _optim(self, phase: str):
        from egp_fast.train import build_optimizer, build_scheduler, make_grad_scaler

        cfg = self.cfg
        lr, epochs = (cfg["dense_lr"], cfg["dense_epochs"]) if phase == "dense" else (cfg["lr"], cfg["epochs"])
        opt = build_optimizer(self.model, cfg["optimizer"], lr=lr, momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
        sch = build_scheduler(opt, cfg["schedule"], epochs=epochs, milestones=cfg["milestones"],
                              gamma=cfg["gamma"])
        self.scaler = make_grad_scaler(self.device, cfg["amp"])
        return opt, sch

    # -- checkpoints ------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.perf_counter()
        dt = now - self._mark
        self._mark = now
        self.state["elapsed"] += dt
        self.state["round_seconds"] += dt

    def _checkpoint(self, opt=None, sch=None) -> None:
        from egp_fast.report import write_metrics_csv
        from egp_fast.train import capture_rng_state, save_checkpoint

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
        from egp_fast import load_pruned_state_dict
        from egp_fast.train import load_checkpoint, restore_rng_state

        ck = load_checkpoint(self.ckpt_path, map_location=self.device)
        if ck.get("options_hash") != _options_hash(self.cfg):
            raise CheckpointError(f"{self.ckpt_path} was written by a run with another config; "
                                  "it cannot be resumed with this config.json")
        load_pruned_state_dict(self.model, ck["model"])
        self.state = json.loads(ck["state"])
        restore_rng_state(ck["rng"])
        return ck

    # -- one epoch --------------------------------------------------------------------------
    def _epoch(self, phase: str, rnd: int, e: int, opt, sch) -> None:
        from egp_fast.train import broadcast_buffers, evaluate, train_epoch

        cfg = self.cfg
        g = e if phase == "dense" else cfg["dense_epochs"] + (rnd - 1) * cfg["epochs"] + e
        self.train_loader.set_epoch(g)
        lr = opt.param_groups[0]["lr"]
        label = "dense" if phase == "dense" else f"round {rnd}"
        tr = train_epoch(self.ddp, self.train_loader, opt, device=self.device, amp=cfg["amp"],
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
        if self.stats is None:
            self.stats = self.pruner.measure(self.measure_loader, max_batches=self.cfg["measure_batches"])
        return self.stats

    def _check_masks_agree(self) -> None:
        # Every rank derived its masks from the same summed counts and the same weights; verify it,
        # because silently diverging masks would make DDP average gradients of different networks.
        if not self.info.distributed:
            return
        import torch.distributed as dist

        from egp_fast import masked_layers

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

    def _round_record(self, rnd: int, stats, ev: dict, plan: dict | None, seconds: float) -> dict:
        from egp_fast import masked_layers, weight_layers
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
        return {
            "round": rnd, "sparsity": self.pruner.sparsity(),
            "sparsity_all": _sparsity(self.model, weight_layers(self.model)),
            "accuracy": ev["acc"], "loss": ev["loss"], "n_sites": len(stats.sites), "n_zero": len(zero),
            "zero_entropy_sites": zero, "entropy": {n: s.entropy for n, s in stats.sites.items()},
            "allocation": {k: int(v) for k, v in (plan or {}).items() if v}, "pruned": int(sum((plan or {}).values())),
            "layers": layers, "seconds": seconds, "stats": stats.to_dict(channels=True),
        }

    def _finish_round(self, rnd: int, plan: dict | None) -> None:
        from egp_fast.report import round_table
        from egp_fast.train import evaluate

        ev = evaluate(self.model, self.test_loader, device=self.device, amp=self.cfg["amp"], progress=self.show,
                      desc="eval", dist=self.info)
        stats = self._measure()
        self._tick()
        rec = self._round_record(rnd, stats, ev, plan, self.state["round_seconds"])
        self.state["history"]["rounds"].append(rec)
        table = round_table([rec]).splitlines()
        if rnd == 0:
            self._say(table[0])
        self._say(table[1])

    # -- report -----------------------------------------------------------------------------
    def _write_report(self, extra: dict | None = None) -> None:
        from egp_fast.report import write_json

        if not self.info.is_main:
            return
        rep = {"config": self.cfg, "versions": self.versions, "data": self.src.describe(),
               "model": {"name": self.cfg["model"], "params": sum(p.numel() for p in self.model.parameters()),
                         "sites": [s.name for s in self.pruner.graph.sites], "prunable": self.pruner.prunable},
               "rounds": self.state["history"]["rounds"], "complete": False}
        if extra:
            rep.update(extra)
        self.report = rep
        write_json(os.path.join(self.run_dir, "report.json"), rep)

    def _write_config(self) -> None:
        from egp_fast.report import write_json

        if self.info.is_main:
            write_json(os.path.join(self.run_dir, "config.json"),
                       {"options": self.cfg, "options_hash": _options_hash(self.cfg), "versions": self.versions,
                        "world_size": self.info.world_size, "command": [PROG, *sys.argv[1:]]})

    # -- main -------------------------------------------------------------------------------
    def run(self) -> int:
        from egp_fast.report import round_table

        cfg = self.cfg
        t_setup = time.perf_counter()
        self._setup()
        self.versions = _versions(self.device)
        self.state = {"phase": "dense", "round": 0, "epoch": 0, "plan": None, "elapsed": 0.0,
                      "round_seconds": 0.0, "history": {"epochs": [], "rounds": []}}
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
                if ck is not None and ck["optimizer"] is not None:
                    opt.load_state_dict(ck["optimizer"])
                    sch.load_state_dict(ck["scheduler"])
                    if self.scaler is not None and ck["scaler"] is not None:
                        self.scaler.load_state_dict(ck["scaler"])
                for e in range(st["epoch"], cfg["dense_epochs"]):
                    self._epoch("dense", 0, e, opt, sch)
                    st["epoch"] = e + 1
                    self._checkpoint(opt, sch)
            self._finish_round(0, None)
            st.update(phase="round", round=1, epoch=-1, plan=None, round_seconds=0.0)
            self._checkpoint()
            ck = None
        while st["phase"] == "round" and st["round"] <= cfg["rounds"]:
            rnd = st["round"]
            opt, sch = self._optim("round")
            if st["epoch"] < 0:
                plan = self.pruner.plan(self._measure())
                self.pruner.apply(plan)
                self._check_masks_agree()
                self.stats = None
                st.update(epoch=0, plan={k: int(v) for k, v in plan.items()})
                self._checkpoint(opt, sch)
            elif ck is not None and ck["optimizer"] is not None:
                opt.load_state_dict(ck["optimizer"])
                sch.load_state_dict(ck["scheduler"])
                if self.scaler is not None and ck["scaler"] is not None:
                    self.scaler.load_state_dict(ck["scaler"])
            ck = None
            for e in range(st["epoch"], cfg["epochs"]):
                self._epoch("finetune", rnd, e, opt, sch)
                st["epoch"] = e + 1
                self._checkpoint(opt, sch)
            self._finish_round(rnd, st["plan"])
            st.update(round=rnd + 1, epoch=-1, plan=None, round_seconds=0.0)
            self._checkpoint()
        st["phase"] = "done"
        return self._final()

    def _collapse(self, stats) -> tuple[dict, dict]:
        """Collapse the zero-entropy sites, evaluate and save the collapsed model (rank 0)."""
        from egp_fast.collapse import collapse
        from egp_fast.train import evaluate

        cfg = self.cfg
        res = collapse(self.model, stats, self.example, exact=not cfg["approx_collapse"],
                       measure_latency=self.info.is_main and cfg["latency"])
        cmodel = res.model.to(self.device).eval()
        ev = evaluate(cmodel, self.test_loader, device=self.device, amp=cfg["amp"], progress=self.show,
                      desc="eval collapsed", dist=self.info)
        b, a = res.before, res.after
        summary = {"acc_collapsed": ev["acc"], "sites_before": b.get("sites"), "sites_after": a.get("sites"),
                   "depth_before": b.get("longest_path"), "depth_after": a.get("longest_path"),
                   "params_before": b.get("params"), "params_after": a.get("params"),
                   "flops_before": b.get("flops"), "flops_after": a.get("flops"),
                   "removed_sites": [e["site"] for e in res.removed  # linearised, or dead after a fold
                                     if e.get("kind") in ("linearize", "dead_code") and e.get("site")],
                   "collapse_exact": res.exact,
                   "max_deviation": res.max_deviation}
        if b.get("latency_ms_b64") is not None and a.get("latency_ms_b64") is not None:
            summary.update(latency_batch=64, latency_pruned_ms=b["latency_ms_b64"],
                           latency_collapsed_ms=a["latency_ms_b64"], latency_b1_pruned_ms=b.get("latency_ms_b1"),
                           latency_b1_collapsed_ms=a.get("latency_ms_b1"))
        rep = {**res.to_dict(), "accuracy": ev["acc"], "loss": ev["loss"]}
        if self.info.is_main:
            rep["saved"] = _save_collapsed(cmodel, self.example, self.run_dir)
        return summary, rep

    def _final(self) -> int:
        from egp_fast.report import render_run, summary_text
        from egp_fast.train import atomic_write_bytes, measure_latency

        cfg, st = self.cfg, self.state
        rounds = st["history"]["rounds"]
        stats = self._measure()
        summary = {"acc_dense": rounds[0]["accuracy"], "acc_pruned": rounds[-1]["accuracy"],
                   "sparsity": rounds[-1]["sparsity"], "zero_sites": rounds[-1]["n_zero"],
                   "sites_before": rounds[-1]["n_sites"], "device": str(self.device),
                   "world_size": self.info.world_size}
        if self.info.is_main:
            buf = io.BytesIO()
            torch.save(self.model.state_dict(), buf)
            atomic_write_bytes(os.path.join(self.run_dir, "model.pt"), buf.getvalue())
        extra: dict[str, Any] = {}
        if cfg["collapse"]:
            try:
                col_summary, extra["collapse"] = self._collapse(stats)
                summary.update(col_summary)
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


def _save_collapsed(model: torch.nn.Module, example: torch.Tensor, run_dir: str) -> dict:
    """Save the collapsed model so it reloads without egp_fast's classes.

    ``collapsed.pt2`` (``torch.export``; reload with ``torch.export.load(p).module()``) when the
    model exports, else ``collapsed.ts`` (TorchScript trace; ``torch.jit.load(p)``). The state_dict
    goes to ``collapsed_state_dict.pt`` either way.
    """
    from egp_fast.train import atomic_write_bytes

    model = model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(os.path.join(run_dir, "collapsed_state_dict.pt"), buf.getvalue())
    x = example.detach()
    try:
        ep = torch.export.export(model, (x,))
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        atomic_write_bytes(os.path.join(run_dir, "collapsed.pt2"), buf.getvalue())
        return {"file": "collapsed.pt2", "format": "torch.export", "load": "torch.export.load(path).module()"}
    except Exception as export_error:  # export is strict about dynamic Python; TorchScript is not
        with torch.no_grad():
            traced = torch.jit.trace(model, (x,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        atomic_write_bytes(os.path.join(run_dir, "collapsed.ts"), buf.getvalue())
        return {"file": "collapsed.ts", "format": "torchscript", "load": "torch.jit.load(path)",
                "export_error": f"{type(export_error).__name__}: {str(export_error)[:300]}"}


