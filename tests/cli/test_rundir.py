"""The run directory: a new one is never a non-empty directory, a resumed one keeps its config."""

from __future__ import annotations

import json
import os

import pytest

from egp_fast.cli.defaults import DEFAULTS, options_hash
from egp_fast.cli.distributed import DistInfo
from egp_fast.cli.rundir import agree_on_run_dir, missing_ancestors, prepare_run_dir
from egp_fast.errors import ConfigError


def test_new_run_dir_names_and_refusals(tmp_path):
    cfg = {**DEFAULTS, "runs_root": str(tmp_path / "runs")}
    run_dir, _, resuming = prepare_run_dir(cfg, {})
    assert not resuming and os.path.basename(run_dir).startswith("egp-digits-") and not os.path.exists(run_dir)
    assert prepare_run_dir({**cfg, "name": "mine"}, {})[0] == str(tmp_path / "runs" / "mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty; pass --resume"):
        prepare_run_dir({**cfg, "out": str(full)}, {})
    with pytest.raises(ConfigError, match="is a file"):
        prepare_run_dir({**cfg, "out": str(full / "x")}, {})


def test_missing_ancestors_deepest_first(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    assert missing_ancestors({**DEFAULTS, "out": str(out)}) == [str(out), str(out.parent), str(out.parent.parent)]


def test_resume_keeps_the_runs_config(tmp_path):
    opts = {**DEFAULTS, "step": 0.25}
    (tmp_path / "config.json").write_text(json.dumps({"options": opts, "options_hash": options_hash(opts)}))
    run_dir, cfg, resuming = prepare_run_dir({**DEFAULTS, "resume": str(tmp_path)}, {"workers": 0, "resume": "x"})
    assert resuming and run_dir == str(tmp_path) and cfg["step"] == 0.25 and cfg["workers"] == 0
    with pytest.raises(ConfigError, match="--step 0.5 differs"):
        prepare_run_dir({**DEFAULTS, "resume": str(tmp_path)}, {"step": 0.5})
    (tmp_path / "config.json").write_text(json.dumps({"options": opts, "options_hash": "edited"}))
    with pytest.raises(ConfigError, match="edited by hand"):
        prepare_run_dir({**DEFAULTS, "resume": str(tmp_path)}, {})


def test_agree_creates_the_directory_on_one_process(tmp_path):
    out = tmp_path / "new" / "run"
    run_dir, _, resuming = agree_on_run_dir({**DEFAULTS, "out": str(out)}, {}, DistInfo())
    assert run_dir == str(out) and out.is_dir() and not resuming
    with pytest.raises(ConfigError, match="not an egp-fast run directory"):
        agree_on_run_dir({**DEFAULTS, "resume": str(tmp_path / "none")}, {}, DistInfo())
