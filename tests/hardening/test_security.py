"""Loading never executes code: crafted pickles are refused; option paths stay put.

Each crafted file, if unpickled, would create a marker file; the tests assert the loader
refused the file with a clear error and the marker does not exist.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn as nn

from egp_fast.errors import CheckpointError, ModelError


class _Payload:
    """Unpickling this runs exec(): writes ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.exec, (f"open({self.path!r}, 'w').write('pwned')",))


def _torch_pickle(path: str, marker: str) -> None:
    # A real torch.save zip archive whose data.pkl holds the payload next to real tensors.
    torch.save({"format": "egp_fast.checkpoint.v1", "model": nn.Linear(2, 2).state_dict(),
                "evil": _Payload(marker)}, path)


def _plain_pickle(path: str, marker: str) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f)


def _check_payload_works(tmp_path) -> None:
    # The crafted files must really be dangerous, or the tests below prove nothing.
    marker = str(tmp_path / "control")
    path = str(tmp_path / "control.pt")
    _torch_pickle(path, marker)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)
    os.unlink(marker)


@pytest.mark.parametrize("make", [_torch_pickle, _plain_pickle], ids=["torch_zip", "plain_pickle"])
def test_checkpoint_with_code_is_refused(tmp_path, make):
    from egp_fast.cli.checkpoints import load_checkpoint

    _check_payload_works(tmp_path)
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "checkpoint.pt")
    make(path, marker)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("make", [_torch_pickle, _plain_pickle], ids=["torch_zip", "plain_pickle"])
def test_weights_with_code_are_refused(tmp_path, make):
    from egp_fast.cli.models import load_weights

    marker = str(tmp_path / "marker")
    path = str(tmp_path / "weights.pt")
    make(path, marker)
    with pytest.raises(ModelError, match="cannot be read as a state_dict"):
        load_weights(nn.Linear(2, 2), path)
    assert not os.path.exists(marker)


def test_cli_weights_with_code_are_refused(tmp_path, capsys, monkeypatch):
    from egp_fast.cli.commands import main

    marker = str(tmp_path / "marker")
    path = str(tmp_path / "weights.pt")
    _torch_pickle(path, marker)
    monkeypatch.chdir(tmp_path)
    rc = main(["prune", "--weights", path, "--limit", "20", "--dense-epochs", "0", "--epochs", "0",
               "--rounds", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot be read as a state_dict" in err and "Traceback" not in err
    assert not os.path.exists(marker)


def test_report_json_that_is_a_pickle_is_refused(tmp_path):
    from egp_fast.cli.report import load_run

    marker = str(tmp_path / "marker")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "egp"}))
    _plain_pickle(str(run / "report.json"), marker)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_run(run)
    assert not os.path.exists(marker)


def test_checkpoint_zip_with_a_foreign_global_is_refused(tmp_path):
    # A hand-edited archive: the data.pkl of a valid checkpoint swapped for one that names
    # os.system. weights_only's unpickler must refuse the global, not import it.
    from egp_fast.cli.checkpoints import load_checkpoint, save_checkpoint

    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"epoch": 1})
    evil = pickle.dumps(_Payload(str(tmp_path / "marker")), protocol=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = evil if item.filename.endswith("data.pkl") else zin.read(item.filename)
            zout.writestr(item, data)
    open(path, "wb").write(buf.getvalue())
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not os.path.exists(tmp_path / "marker")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    # A crash while writing (here: in fsync) must leave the previous checkpoint intact and
    # no temporary file behind.
    from egp_fast.cli.checkpoints import load_checkpoint, save_checkpoint

    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"epoch": 1})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -1])
def test_truncated_checkpoint_is_detected(tmp_path, cut):
    from egp_fast.cli.checkpoints import load_checkpoint, save_checkpoint

    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"model": nn.Linear(16, 16).state_dict(), "epoch": 3})
    data = open(path, "rb").read()
    n = int(len(data) * cut) if isinstance(cut, float) else (len(data) + cut if cut < 0 else cut)
    open(path, "wb").write(data[:n])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "..", ".", "", "a/../../b"])
def test_run_name_cannot_escape_runs_root(tmp_path, capsys, monkeypatch, name):
    from egp_fast.cli.commands import main

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    rc = main(["prune", "--runs-root", str(root), "--name", name])
    err = capsys.readouterr().err
    assert rc == 2 and "--name" in err, err
    assert list(root.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["root"]

