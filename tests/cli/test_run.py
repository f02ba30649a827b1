"""The run's manners on a terminal and off it: progress bars only on a terminal; in a log (standard
output or error redirected to a file or a pipe) one plain line per epoch and per round, and no
carriage returns."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from egp_fast.cli import run as run_module
from egp_fast.cli.defaults import DEFAULTS
from egp_fast.cli.distributed import DistInfo

# Two dense epochs, one round of one fine-tune epoch; no collapse or latency (a few seconds).
ARGS = ["prune", "--width", "4", "--image-size", "8", "--limit", "120", "--dense-epochs", "2", "--epochs", "1",
        "--rounds", "1", "--batch-size", "32", "--eval-batch-size", "64", "--no-latency", "--no-collapse"]
EPOCH = re.compile(rb"^(dense|finetune) round (\d+) epoch (\d+)/(\d+)  loss \d+\.\d{4}  train acc [\d.]+%  "
                   rb"test acc [\d.]+%  [\d.]+s$", re.M)
ROUND = re.compile(rb"^round (\d+)  sparsity ([\d.]+)%  zero-entropy sites \d+/17  accuracy [\d.]+%  "
                   rb"val acc [\d.]+%  [\d.]+s "
                   rb"\(train [\d.]+s, eval [\d.]+s, measure [\d.]+s, select\+masks [\d.]+s\)$", re.M)


def _cli(tmp_path, progress: str | None) -> tuple[bytes, bytes]:
    """Run the command with standard output and error to pipes (bytes: a carriage return stays one)."""
    env = {k: v for k, v in os.environ.items() if k != "EGP_FAST_PROGRESS"}
    if progress is not None:
        env["EGP_FAST_PROGRESS"] = progress
    proc = subprocess.run([sys.executable, "-m", "egp_fast.cli", *ARGS, "--out", str(tmp_path / "run")],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout, proc.stderr


def test_a_piped_run_is_a_plain_log(tmp_path):
    out, err = _cli(tmp_path, None)
    assert b"\r" not in out and b"\r" not in err, (out[-500:], err[-500:])
    epochs = [(m[0], int(m[1]), int(m[2]), int(m[3])) for m in EPOCH.findall(out)]
    assert epochs == [(b"dense", 0, 1, 2), (b"dense", 0, 2, 2), (b"finetune", 1, 1, 1)], out.decode()
    rounds = [(int(m[0]), float(m[1])) for m in ROUND.findall(out)]
    assert rounds == [(0, 0.0), (1, 50.0)], out.decode()
    # the epoch and round lines come in the order they happen
    lines = out.decode().splitlines()
    order = [ln.split()[0] for ln in lines if EPOCH.match(ln.encode()) or ROUND.match(ln.encode())]
    assert order == ["dense", "dense", "round", "finetune", "round"]
    assert b"summary:" in out and b"outputs:" in out


def test_bars_are_drawn_when_forced(tmp_path):
    out, err = _cli(tmp_path, "1")
    assert b"\r" in err  # tqdm redraws its bars with carriage returns
    assert b"\r" not in out and len(EPOCH.findall(out)) == 3  # standard output is still a pipe: the log


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("stdout_tty, bars, progress, plain", [
    (True, True, True, False),  # a terminal: bars, and the round table
    (False, True, True, True),  # `egp-fast demo > log.txt`: bars on the terminal, lines in the log
    (True, False, True, True),  # standard error redirected (or EGP_FAST_PROGRESS=0): no bars, lines
    (True, True, False, True),  # --no-progress: lines instead of bars
])
def test_plain_lines_whenever_no_bar_is_drawn_or_output_is_a_log(monkeypatch, stdout_tty, bars, progress, plain):
    monkeypatch.setattr(run_module, "on_terminal", lambda: bars)
    monkeypatch.setattr(sys, "stdout", _Stream(stdout_tty))
    run = run_module.Run({**DEFAULTS, "progress": progress}, "/nonexistent", False, DistInfo())
    assert run.plain is plain
    other_rank = run_module.Run({**DEFAULTS, "progress": progress}, "/nonexistent", False, DistInfo(rank=1))
    assert other_rank.plain is False  # only rank 0 prints
