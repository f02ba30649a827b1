"""One ``egp-fast prune`` run: dense training, rounds of prune + fine-tune, collapse, report.

Split from :mod:`egp_fast.cli.commands` (which parses options and picks the run directory); the
run writes ``config.json``, ``metrics.csv``, ``report.json``, plots, atomic checkpoints after
every epoch and round, and the collapsed model.

Methods: ``egp``/``imp`` prune weights each round; ``easier`` removes activation sites (the
live site with the lowest entropy, plus every site already at zero) each step, fine-tunes,
evaluates on the validation split held out from the training data, stops at ``--max-drop``
below the dense model's validation accuracy (or when no site is left) and keeps the last
step within the tolerance (``best.pt``). A step's removed sites are recorded in the run state,
so a resumed run rebuilds the same structure before loading a checkpoint.

:class:`Run` holds the training phases (setup, epochs, rounds, the main loop); checkpoints and
resuming come from :class:`~egp_fast.cli.resume.ResumeMixin`, the round records, collapse,
fold-finetune and the report files from :class:`~egp_fast.cli.finish.FinishMixin`.

Entropies: ``--measure full``/``auto`` run a measurement pass (eval mode) whenever the weights
changed; ``--measure track`` counts the signs during the last training epoch of each round
(``Pruner.track``) and measures with a pass only where no epoch was tracked (no dense epochs, a
resumed run, EASIER's return to its best step), saying so in the log and the round record.

Output: progress bars appear only on a terminal. When they are not drawn, or standard output
is a file or a pipe, every epoch and every round is one plain line on standard output
(:func:`~egp_fast.cli.report.epoch_line`, :func:`~egp_fast.cli.report.round_line`), so a
redirected run is a readable log.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import torch

from egp_fast._progress import on_terminal
from egp_fast.cli import artifacts, train
from egp_fast.cli.data import hold_out, load_data
from egp_fast.cli.defaults import default_workers
from egp_fast.cli.distributed import broadcast_buffers, wrap_ddp
from egp_fast.cli.finish import FinishMixin
from egp_fast.cli.loader import make_loader
from egp_fast.cli.models import build_model, load_weights, model_in_channels
from egp_fast.cli.report import epoch_line, round_line, round_table
from egp_fast.cli.resume import ResumeMixin
from egp_fast.cli.timing import PhaseClock, round_split
from egp_fast.errors import CheckpointError, ConfigError
from egp_fast.masks import masked_layers
from egp_fast.pruning import Pruner, within_tolerance


def _is_terminal(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


class Run(ResumeMixin, FinishMixin):
    """One ``egp-fast prune`` run: dense training, rounds of prune + fine-tune, collapse, report."""

    def __init__(self, cfg: dict, run_dir: str, resuming: bool, info) -> None:
        self.cfg, self.run_dir, self.resuming, self.info = cfg, run_dir, resuming, info
        self.show = info.is_main and cfg["progress"]
        # Bars redraw themselves with carriage returns, so they are drawn only on a terminal
        # (egp_fast._progress). A log (standard output redirected) or a run without bars gets
        # one plain line per epoch and per round instead.
        self.plain = info.is_main and not (self.show and on_terminal() and _is_terminal(sys.stdout))
        self.device = info.device
        self.ckpt_path = os.path.join(run_dir, "checkpoint.pt")
        self.best_path = os.path.join(run_dir, "best.pt")
        self.stats = None  # the latest entropy measurement, valid while the model is unchanged
        self.stats_source = "pass"  # where self.stats came from: "pass" (measurement) or "track" (training)
        self.resumed = False  # a resumed run: the counts of the epoch before the stop are gone
        self.measure_note = None  # --measure track: why the latest statistics come from a pass
        self.easier = cfg["method"] == "easier"
        self.clock = PhaseClock(self.device)

    def _phase(self, name: str):
        """Time a block as phase ``name`` of the current round (:mod:`egp_fast.cli.timing`)."""
        return self.clock.phase(self.state["round_time"], name)

    # -- output helpers ---------------------------------------------------------------------
    def _say(self, text: str = "") -> None:
        if self.info.is_main:
            print(text, flush=True)

    # -- setup ------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
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
        cfg, info = self.cfg, self.info
        natural = 1 if cfg["data"].lower() in ("digits", "digits-hard") else 3
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
        cfg = self.cfg
        self.model = model
        # Masks are attached now (all kept), before DDP wraps the model, so every checkpoint has
        # the same keys and DDP sees the final set of buffers.
        kw = {"linearization": cfg["linearization"]} if self.easier else {}
        if self.easier and cfg.get("objective", "sites") != "sites":
            kw["method_options"] = {"objective": cfg["objective"], "exact": not cfg["approx_collapse"],
                                    "target_speedup": cfg["target_speedup"]}
        self.pruner = Pruner(model, self.example, step=cfg["step"], method=cfg["method"],
                             entropy_mode=cfg["entropy_mode"], progress=self.show, **kw)
        self._wrap()

    def _wrap(self) -> None:
        """(Re)build the DDP and ``torch.compile`` wrappers after the model's structure changed."""
        self.ddp = wrap_ddp(self.model, self.info)
        self.train_model = torch.compile(self.ddp) if self.cfg["compile"] else self.ddp
        self.stats = None

    def _optim(self, phase: str, model: torch.nn.Module | None = None):
        cfg = self.cfg
        lr, epochs = {"dense": (cfg["dense_lr"], cfg["dense_epochs"]), "round": (cfg["lr"], cfg["epochs"]),
                      "fold": (cfg["fold_lr"], cfg["fold_epochs"])}[phase]
        opt = train.build_optimizer(model if model is not None else self.model, cfg["optimizer"], lr=lr,
                                    momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
        sch = train.build_scheduler(opt, cfg["schedule"], epochs=epochs, milestones=cfg["milestones"],
                                    gamma=cfg["gamma"])
        self.scaler = train.make_grad_scaler(self.device, cfg["amp"])
        return opt, sch

    # -- one epoch --------------------------------------------------------------------------
    def _epoch(self, phase: str, rnd: int, e: int, opt, sch) -> None:
        cfg = self.cfg
        g = e if phase == "dense" else cfg["dense_epochs"] + (rnd - 1) * cfg["epochs"] + e
        self.train_loader.set_epoch(g)
        lr = opt.param_groups[0]["lr"]
        label = "dense" if phase == "dense" else f"round {rnd}"
        # --measure track: the phase's last epoch is counted (its hooks run eagerly, so it skips
        # torch.compile); its statistics replace the measurement pass of the round.
        track = cfg["measure"] == "track" and e + 1 == (cfg["dense_epochs"] if phase == "dense" else cfg["epochs"])
        with self._phase("train"):
            with (self.pruner.track() if track else contextlib.nullcontext()) as tracker:
                tr = train.train_epoch(self.ddp if track else self.train_model, self.train_loader, opt,
                                       device=self.device, amp=cfg["amp"], scaler=self.scaler, progress=self.show,
                                       desc=f"{label} epoch {e + 1}", dist=self.info)
            sch.step()
            broadcast_buffers(self.model, self.info)
        with self._phase("eval"):
            ev = train.evaluate(self.model, self.test_loader, device=self.device, amp=cfg["amp"],
                                progress=self.show, desc="eval", dist=self.info)
        rec = {"phase": phase, "round": rnd, "epoch": e + 1, "global_epoch": g + 1, "lr": lr,
               "train_loss": tr["loss"], "train_acc": tr["acc"], "test_loss": ev["loss"], "test_acc": ev["acc"],
               "sparsity": self.pruner.sparsity(), "seconds": tr["seconds"]}
        self.state["history"]["epochs"].append(rec)
        if self.plain:
            self._say(epoch_line(rec, cfg["dense_epochs"] if phase == "dense" else cfg["epochs"]))
        self.stats = None
        if track:
            with self._phase("measure"):  # summing the counts over the ranks; the counting is in "train"
                self.stats = tracker.stats()
            self.stats_source, self.resumed, self.measure_note = "track", False, None

    def _untracked(self) -> str:
        """Why a ``--measure track`` run has no tracked statistics for the current weights."""
        st, cfg = self.state, self.cfg
        if self.resumed:
            return "the run was resumed after its last tracked epoch (the counts were not saved)"
        if st["phase"] == "dense" and cfg["dense_epochs"] == 0:
            return "--dense-epochs 0 leaves no dense epoch to track"
        if st["phase"] == "round" and cfg["epochs"] == 0:
            return "--epochs 0 leaves no fine-tune epoch to track"
        return "the model changed after its last tracked epoch"

    def _measure(self):
        cfg = self.cfg
        if self.stats is None:
            kw: dict[str, Any] = {}
            if cfg["measure"] == "track":
                self.measure_note = self._untracked()
                self._say(f"--measure track: {self.measure_note}; measuring with a pass that stops once every "
                          "site is decided (as --measure auto)")
            if cfg["measure"] in ("auto", "track"):
                kw = {"stop": "decided", "max_flip": cfg["max_flip"], "confidence": cfg["confidence"]}
            with self._phase("measure"):
                self.stats = self.pruner.measure(self.measure_loader, max_batches=cfg["measure_batches"], **kw)
            self.stats_source = "pass"
        return self.stats

    def _check_masks_agree(self) -> None:
        # Every rank derived its masks from the same summed counts and the same weights; verify it,
        # because silently diverging masks would make DDP average gradients of different networks.
        if not self.info.distributed:
            return
        import torch.distributed as dist

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

    # -- one round --------------------------------------------------------------------------
    def _finish_round(self, rnd: int, plan: dict | None) -> dict:
        with self._phase("eval"):
            ev = train.evaluate(self.model, self.test_loader, device=self.device, amp=self.cfg["amp"],
                                progress=self.show, desc="eval", dist=self.info)
            val = None
            if self.val_loader is not None:
                val = train.evaluate(self.model, self.val_loader, device=self.device, amp=self.cfg["amp"],
                                     progress=self.show, desc="eval val", dist=self.info)
        stats = self._measure()
        self._tick()
        rec = self._round_record(rnd, stats, ev, val, plan, self.state["round_seconds"])
        rec["time"] = round_split(self.state["round_time"], self.state["round_seconds"])
        self.state["history"]["rounds"].append(rec)
        if self.plain:
            self._say(round_line(rec))
        else:
            table = round_table([rec]).splitlines()
            if rnd == 0:
                self._say(table[0])
            self._say(table[1])
        return rec

    def _apply_step(self, rnd: int) -> bool:
        """Measure, plan and apply round ``rnd``; False when there is nothing left to do (EASIER)."""
        st = self.state
        stats = self._measure()
        with self._phase("select"):
            plan = self.pruner.plan(stats)
        with self._phase("masks"):
            removed = self.pruner.apply(plan, stats)
            if self.easier and removed:
                self._wrap()  # new modules: DDP and compile see the new structure
            elif not self.easier:
                self._check_masks_agree()
        if self.easier:
            if not removed:
                return False
            st["removed"].append(self._removed_entries(list(removed)))
            last = getattr(self.pruner.method_impl, "last", None)
            if self.cfg.get("objective", "sites") == "latency" and last is not None:
                st.setdefault("speedups", []).append({
                    "round": rnd, "group": list(last["group"]), "predicted": last["predicted_speedup"],
                    "measured": self.pruner.method_impl.measure_speedup(self.model, self.example)})
            st["applied"] = rnd
            st.update(plan=None)
        else:
            st.update(plan={k: int(v) for k, v in plan.items()})
        self.stats = None
        return True

    # -- main -------------------------------------------------------------------------------
    def run(self) -> int:
        """Run (or resume) every phase and write the outputs; returns the exit status (0)."""
        cfg = self.cfg
        t_setup = time.perf_counter()
        self._setup()
        self.versions = artifacts.versions(self.device)
        setup_s = time.perf_counter() - t_setup
        self.state = {"phase": "dense", "round": 0, "epoch": 0, "plan": None, "elapsed": 0.0,
                      "round_seconds": 0.0, "round_time": {}, "history": {"epochs": [], "rounds": []},
                      "removed": [], "applied": 0, "best_round": 0, "stopped": None,
                      "sites0": [s.name for s in self.pruner.graph.sites]}
        ck = None
        if self.resuming and os.path.isfile(self.ckpt_path):
            ck = self._restore()
            self.resumed = True
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
        st.setdefault("round_time", {})  # a checkpoint written before the time split had none
        st["round_time"]["setup"] = st["round_time"].get("setup", 0.0) + setup_s
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
            st.update(phase="round", round=1, epoch=-1, plan=None, round_seconds=0.0, round_time={})
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
            st.update(round=rnd + 1, epoch=-1, plan=None, round_seconds=0.0, round_time={})
            if self.easier:
                dense_val = st["history"]["rounds"][0]["val_accuracy"]
                if within_tolerance(rec["val_accuracy"], dense_val, cfg["max_drop"]):
                    self._save_best(rnd)  # the latest step within the tolerance has the most sites removed
                else:
                    st.update(phase="done", stopped=f"validation accuracy {100 * rec['val_accuracy']:.1f}% is more "
                              f"than {100 * cfg['max_drop']:g} pt below the dense {100 * dense_val:.1f}%")
                target, done = cfg.get("target_speedup"), (st.get("speedups") or [{}])[-1]
                if st["phase"] == "round" and target and done.get("round") == rnd and done["predicted"] >= target:
                    st.update(phase="done", stopped=f"predicted speed-up {done['predicted']:.2f}x reached "
                              f"--target-speedup {target:g}")
                if st["phase"] == "round" and not self.pruner.graph.sites:
                    st.update(phase="done", stopped="no activation site left")
            self._checkpoint()
        if self.easier and st.get("stopped") is None and st["phase"] != "done":
            st["stopped"] = f"--rounds {cfg['rounds']} reached"
        st["phase"] = "done"
        if self.easier:
            self._restore_best()
        return self._final()
