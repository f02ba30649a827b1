"""Every user-facing error in docs/errors.md, one test per row.

Each row: an id, the surface (API call or CLI), the bad input, the error class, and a
fragment of the message. The API rows must raise exactly that EGPError subclass with the
fragment in the message; the CLI rows must exit with the listed status and print one line
``egp-fast: error: ...`` containing the fragment, with no traceback. ``test_docs_table``
keeps docs/errors.md and this table identical, row by row.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import egp_fast
from egp_fast import ops
from egp_fast.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    NumericsError,
)
from egp_fast.masks.core import set_masks

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 4)


def _stats(net):
    return egp_fast.measure_entropy(net, [_x()], progress=False)


def _pruner():
    return egp_fast.Pruner(_net(), _x(), progress=False)


class _XYNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, y):
        return self.net(x + y)


def _all_linearised() -> nn.Module:
    net = _net()
    egp_fast.linearize(net, _stats(net), sites=["1"], how="identity")
    return net


B, M1 = torch.randn(4), torch.ones(4, dtype=torch.bool)
I64 = torch.zeros(3, dtype=torch.int64)


def _ckpt(tmp, kind: str) -> str:
    from egp_fast.cli.checkpoints import save_checkpoint

    path = os.path.join(tmp, "checkpoint.pt")
    if kind == "truncated":
        save_checkpoint(path, {"model": _net().state_dict()})
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "foreign":
        torch.save({"model": _net().state_dict()}, path)
    return path


def _load_ckpt(kind: str):
    import tempfile

    from egp_fast.cli.checkpoints import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(_ckpt(tmp, kind))


def _env_backend():
    old = os.environ.get("EGP_FAST_BACKEND")
    os.environ["EGP_FAST_BACKEND"] = "fastest"
    try:
        ops.sign_count_(torch.randn(2, 3), I64.clone(), 1)
    finally:
        if old is None:
            del os.environ["EGP_FAST_BACKEND"]
        else:
            os.environ["EGP_FAST_BACKEND"] = old


# (id, surface, bad input, error, message fragment, call)
API = [
    ("A01", "Pruner / prune", "model is not an nn.Module", ConfigError, "model must be a torch.nn.Module",
     lambda: egp_fast.Pruner("resnet18")),
    ("A02", "prune", "iterations=0", ConfigError, "iterations=0 must be an int >= 1",
     lambda: egp_fast.prune(_net(), [_x()], iterations=0)),
    ("A03", "prune", "step=1.5 (also 0, True, '0.5')", ConfigError, "must be a number strictly between 0 and 1",
     lambda: egp_fast.prune(_net(), [_x()], step=1.5)),
    ("A04", "prune", "method='magnitude'", ConfigError, "is not a pruning method; use 'egp' or 'imp'",
     lambda: egp_fast.prune(_net(), [_x()], method="magnitude")),
    ("A05", "prune", "finetune=3 (not callable)", ConfigError, "finetune must be a callable",
     lambda: egp_fast.prune(_net(), [_x()], finetune=3)),
    ("A06", "prune", "data=None", DataError, "data is None",
     lambda: egp_fast.prune(_net(), None)),
    ("A07", "prune", "entropy_mode='fast'", ConfigError, "entropy_mode='fast'; use 'exact' or 'paper'",
     lambda: egp_fast.prune(_net(), [_x()], entropy_mode="fast", progress=False)),
    ("A08", "prune", "backend='fastest'", BackendError, "is not a backend egp_fast knows",
     lambda: egp_fast.prune(_net(), [_x()], backend="fastest", progress=False)),
    ("A09", "measure_entropy", "mode='approx'", ConfigError, "is not a measurement mode",
     lambda: egp_fast.measure_entropy(_net(), [_x()], mode="approx")),
    ("A10", "measure_entropy", "max_batches=0 (or True, 2.5)", ConfigError, "must be a positive int or None",
     lambda: egp_fast.measure_entropy(_net(), [_x()], max_batches=0)),
    ("A11", "measure_entropy", "data=[] (no batches)", DataError, "data yielded no batches",
     lambda: egp_fast.measure_entropy(_net(), [], progress=False)),
    ("A12", "measure_entropy", "data=5 (not iterable)", DataError, "which is not iterable",
     lambda: egp_fast.measure_entropy(_net(), 5, progress=False)),
    ("A13", "measure_entropy", "a batch is a string", DataError, "a batch has type str",
     lambda: egp_fast.measure_entropy(_net(), ["abc"], progress=False)),
    ("A14", "measure_entropy", "a batch on another device than the model", DataError,
     "but the model is on cpu; move the data",
     lambda: egp_fast.measure_entropy(_net(), [_x().to("meta")], progress=False)),
    ("A15", "measure_entropy", "a later batch the model rejects (wrong feature size)", DataError,
     "the model failed on batch 1",
     lambda: egp_fast.measure_entropy(_net(), [_x(), torch.randn(2, 5)], progress=False)),
    ("A16", "measure_entropy", "a batch with NaN inputs", NumericsError, "NaN or Inf in the input of site '1'",
     lambda: egp_fast.measure_entropy(_net(), [torch.full((2, 4), float("nan"))], progress=False)),
    ("A17", "measure_entropy / discover_sites", "a model without any supported activation", ModelError,
     "has no supported activation",
     lambda: egp_fast.measure_entropy(nn.Sequential(nn.Linear(4, 4)), [_x()], progress=False)),
    ("A18", "discover_sites / inspect", "example_inputs the model rejects", DataError,
     "the model failed on example_inputs",
     lambda: egp_fast.inspect(_net(), torch.randn(2, 9), file=open(os.devnull, "w"))),
    ("A19", "discover_sites", "example_inputs='x' (not a tensor/tuple/dict)", DataError,
     "example_inputs has type str",
     lambda: egp_fast.discover_sites(_net(), "x")),
    ("A20", "Pruner", "layers=['nosuch']", ConfigError, "are not Conv/Linear layers of the model",
     lambda: egp_fast.Pruner(_net(), _x(), layers=["nosuch"])),
    ("A21", "Pruner", "entropy_mode='x'", ConfigError, "use 'exact' or 'paper'",
     lambda: egp_fast.Pruner(_net(), _x(), entropy_mode="x")),
    ("A22", "Pruner.measure", "no example_inputs and no batches", DataError, "data yielded no batches",
     lambda: egp_fast.Pruner(_net(), progress=False).measure([])),
    ("A23", "Pruner.plan", "stats is not an EntropyStats", ConfigError, "stats must be the EntropyStats",
     lambda: _pruner().plan({"0": 0.5})),
    ("A24", "Pruner.apply", "plan names a layer the pruner does not prune", ConfigError,
     "plan names layers this pruner does not prune",
     lambda: _pruner().apply({"nosuch": 3})),
    ("A25", "Pruner.apply", "plan asks for more weights than a layer has left", ConfigError,
     "still unpruned; ask for at most that many",
     lambda: _pruner().apply({"0": 10**6})),
    ("A26", "Pruner.apply", "plan has a negative count", ConfigError, "is negative; counts must be >= 0",
     lambda: _pruner().apply({"0": -1})),
    ("A27", "attach_masks / sparsity", "a layer name the model does not have", ConfigError,
     "the model has no layer named 'nosuch'",
     lambda: egp_fast.attach_masks(_net(), ["nosuch"])),
    ("A28", "attach_masks", "a layer without a weight (a ReLU)", ModelError, "has no floating-point weight to prune",
     lambda: egp_fast.attach_masks(_net(), ["1"])),
    ("A29", "set_masks", "a mask of the wrong shape or dtype", ConfigError, "must be bool with shape (8, 4)",
     lambda: set_masks(_net(), {"0": torch.ones(4, 8, dtype=torch.bool)})),
    ("A30", "load_pruned_state_dict", "a state_dict from another architecture", CheckpointError,
     "the state_dict does not fit the model",
     lambda: egp_fast.load_pruned_state_dict(
         nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), _net().state_dict())),
    ("A31", "load_pruned_state_dict", "a mask for a layer the model does not have", CheckpointError,
     "has a mask 'extra.weight_mask' but the model has no layer",
     lambda: egp_fast.load_pruned_state_dict(_net(), {"extra.weight_mask": M1})),
    ("A32", "allocate", "an entropy that is NaN or negative", NumericsError, "must be finite and >= 0",
     lambda: egp_fast.allocate({"a": float("nan")}, {"a": 1.0}, {"a": 1}, 1)),
    ("A33", "allocate", "remaining that is negative or fractional", ConfigError, "must be a non-negative integer",
     lambda: egp_fast.allocate({"a": 0.5}, {"a": 1.0}, {"a": 1.5}, 1)),
    ("A34", "allocate", "dicts with different keys", ConfigError, "give all three dicts the same keys",
     lambda: egp_fast.allocate({"a": 0.5}, {}, {"a": 1}, 1)),
    ("A35", "allocate", "budget negative or NaN", ConfigError, "must be finite and >= 0",
     lambda: egp_fast.allocate({"a": 0.5}, {"a": 1.0}, {"a": 1}, -1)),
    ("A36", "ops.select_smallest", "one mask fewer than weights", ConfigError, "pass one mask per weight",
     lambda: ops.select_smallest([B, B], [M1], [1, 1])),
    ("A37", "ops.select_smallest", "a float mask", ConfigError, "must be a bool tensor (True = kept)",
     lambda: ops.select_smallest([B], [torch.ones(4)], [1])),
    ("A38", "ops.select_smallest", "mask shape differs from the weight", ConfigError,
     "each mask must match its weight",
     lambda: ops.select_smallest([B], [torch.ones(5, dtype=torch.bool)], [1])),
    ("A39", "ops.select_smallest", "integer weights", ConfigError, "must be a floating-point tensor",
     lambda: ops.select_smallest([torch.arange(4)], [M1], [1])),
    ("A40", "ops.select_smallest", "fewer counts than layers", ConfigError, "pass one count per layer",
     lambda: ops.select_smallest([B], [M1], [])),
    ("A41", "ops.global_smallest", "count above the unpruned total", ConfigError, "must be in [0, 4]",
     lambda: ops.global_smallest([B], [M1], 5)),
    ("A42", "ops.sign_count_", "channel_dim out of range", ConfigError, "channel_dim=3 is out of range",
     lambda: ops.sign_count_(torch.randn(2, 3), I64.clone(), 3)),
    ("A43", "ops.sign_count_", "counts not int64", ConfigError, "counts must be int64",
     lambda: ops.sign_count_(torch.randn(2, 3), torch.zeros(3), 1)),
    ("A44", "ops.sign_count_", "counts of the wrong length", ConfigError, "counts must have shape [3]",
     lambda: ops.sign_count_(torch.randn(2, 3), torch.zeros(4, dtype=torch.int64), 1)),
    ("A45", "ops.sign_count_", "a 0-d activation", ConfigError, "got a 0-d tensor",
     lambda: ops.sign_count_(torch.tensor(1.0), torch.zeros(1, dtype=torch.int64), 0)),
    ("A46", "ops.sign_count_", "a complex or bool activation", ConfigError, "must be a real floating or integer",
     lambda: ops.sign_count_(torch.ones(2, 3, dtype=torch.bool), I64.clone(), 1)),
    ("A47", "ops.entropy", "float counts", ConfigError, "counts must be a 1-d int64 tensor",
     lambda: ops.entropy(torch.zeros(3), I64, torch.tensor([0, 3]))),
    ("A48", "ops.entropy", "offsets not ending at len(counts)", ConfigError, "offsets must start at 0 and end",
     lambda: ops.entropy(I64, I64, torch.tensor([0, 2]))),
    ("A49", "ops.masked_linear", "x's last dim differs from in_features", ConfigError,
     "has 3 features in its last dim but weight expects 4",
     lambda: ops.masked_linear(torch.randn(2, 3), torch.randn(4, 4), torch.ones(4, 4, dtype=torch.bool))),
    ("A50", "any op", "backend='cuda' with CPU tensors", BackendError, "backend='cuda' cannot run sign_count",
     lambda: ops.sign_count_(torch.randn(2, 3), I64.clone(), 1, backend="cuda")),
    ("A51", "any op", "EGP_FAST_BACKEND=fastest", BackendError, "backend='fastest' is not a backend",
     _env_backend),
    ("A52", "collapse", "fold='maybe'", ConfigError, "fold='maybe'; use one of",
     lambda: egp_fast.collapse(_net(), _stats(_net()), _x(), fold="maybe")),
    ("A53", "collapse", "sites names a site the stats do not have", ConfigError, "that stats does not have",
     lambda: egp_fast.collapse(_net(), _stats(_net()), _x(), sites=["nosuch"])),
    ("A54", "collapse", "stats is not an EntropyStats", ConfigError, "stats must be the EntropyStats",
     lambda: egp_fast.collapse(_net(), "stats", _x())),
    ("A55", "train.load_checkpoint", "a checkpoint that does not exist", CheckpointError, "does not exist",
     lambda: _load_ckpt("missing")),
    ("A56", "train.load_checkpoint", "a truncated checkpoint", CheckpointError, "is truncated or corrupt",
     lambda: _load_ckpt("truncated")),
    ("A57", "train.load_checkpoint", "a torch.save file that is not an egp_fast checkpoint", CheckpointError,
     "is not an egp_fast checkpoint",
     lambda: _load_ckpt("foreign")),
    ('A58', 'prune', "method='easier' without evaluate", ConfigError, "method='easier' needs evaluate=fn",
     lambda: egp_fast.prune(_net(), [_x()], method="easier", progress=False)),
    ('A59', 'prune', 'max_drop=-1', ConfigError, 'max_drop=-1 must be a number >= 0',
     lambda: egp_fast.prune(_net(), [_x()], method="easier", evaluate=lambda m: 0.9, max_drop=-1, progress=False)),
    ('A60', 'prune', 'max_drop without evaluate', ConfigError, 'needs evaluate=fn to measure the accuracy drop',
     lambda: egp_fast.prune(_net(), [_x()], max_drop=0.01, progress=False)),
    ('A61', 'prune', 'evaluate returns 93 (a percentage)', ConfigError, 'return a fraction in [0, 1]',
     lambda: egp_fast.prune(_net(), [_x()], method="easier", evaluate=lambda m: 93.0, progress=False)),
    ('A62', 'prune', "linearization='zero'", ConfigError, "linearization='zero'; use 'identity'",
     lambda: egp_fast.prune(_net(), [_x()], method="easier", evaluate=lambda m: 0.9, linearization="zero", progress=False)),
    ('A63', 'prune / collapse', 'max_flip=0 (also 2)', ConfigError, 'must be a number in (0, 1]',
     lambda: egp_fast.prune(_net(), [_x()], max_flip=0, progress=False)),
    ('A64', 'measure_entropy', "stop='soon'", ConfigError, 'is not a stopping rule; use None',
     lambda: egp_fast.measure_entropy(_net(), [_x()], stop="soon", progress=False)),
    ('A65', 'measure_entropy / SiteStats.flip_bound', 'confidence=1.0', ConfigError, 'must be a number strictly between 0 and 1',
     lambda: egp_fast.measure_entropy(_net(), [_x()], stop="decided", confidence=1.0, progress=False)),
    ('A66', 'linearize', "how='zero'", ConfigError, 'is not a linearisation',
     lambda: egp_fast.linearize(_net(), _stats(_net()), sites=["1"], how="zero")),
    ('A67', 'linearize', "how='identity' without sites", ConfigError, 'so name them: pass sites=[...]',
     lambda: egp_fast.linearize(_net(), _stats(_net()), how="identity")),
    ('A68', 'register_activation', "kind='tanhish'", ConfigError, "kind='tanhish' is not supported",
     lambda: egp_fast.register_activation(nn.Tanh, "tanhish")),
    ('A69', 'register_activation', 'an instance or a string instead of a class', ConfigError, 'cls must be an nn.Module subclass',
     lambda: egp_fast.register_activation("relu", "relu")),
    ('A70', 'measure_entropy / Pruner.measure', 'plan_tol=0 (also 1.5, True)', ConfigError, 'plan_tol=0 must be a number in (0, 1]',
     lambda: egp_fast.Pruner(_net(), _x(), progress=False).measure([_x()], stop="decided", plan_tol=0)),
    ('A71', 'measure_entropy', 'plan={...} (not callable)', ConfigError, 'plan must be a callable plan(entropy, constant)',
     lambda: egp_fast.measure_entropy(_net(), [_x()], stop="decided", plan={"a": 1}, progress=False)),
    ("A72", "ops.relu_sign_count", "counts of the wrong length", ConfigError, "relu_sign_count: counts must have shape [3]",
     lambda: ops.relu_sign_count(torch.randn(2, 3), torch.zeros(4, dtype=torch.int64), 1)),
    ("A73", "ops.relu_sign_count", "inplace=1 (not a bool)", ConfigError, "inplace must be True or False",
     lambda: ops.relu_sign_count(torch.randn(2, 3), I64.clone(), 1, inplace=1)),
    ("A74", "discover_sites / collapse", "example_inputs=(x, labels) (a data batch)", DataError,
     "gives 2 positional inputs, but the model takes 1",
     lambda: egp_fast.discover_sites(_net(), (_x(), torch.zeros(4)))),
    ("A75", "discover_sites / measure_entropy", "a model input named y in dict batches", DataError,
     "has a name egp_fast reserves for labels",
     lambda: egp_fast.discover_sites(_XYNet(), {"x": _x(), "y": _x()})),
    ("A76", "measure_entropy", "a model whose every site was linearised", ModelError,
     "has been linearised",
     lambda: egp_fast.measure_entropy(_all_linearised(), [_x()], progress=False)),
]

# (id, arguments, bad input, exit status, message fragment)
CLI = [
    ("C01", "", "no command", 2, "choose a command"),
    ("C02", "prune --bogus", "an unknown option", 2, "unrecognized arguments: --bogus"),
    ("C03", "prune --step 2", "--step outside (0, 1) (also nan)", 2, "--step (zeta) must be strictly between 0 and 1"),
    ("C04", "prune --rounds x", "a non-integer count", 2, "argument --rounds: invalid int value"),
    ("C05", "prune --model nosuch", "an unknown model", 2, "--model: unknown model 'nosuch'"),
    ("C06", "prune --data nosuch", "an unknown data kind", 2, "unknown data kind 'nosuch'"),
    ("C07", "prune --data cifar10:/nonexistent/egp", "a data directory that does not exist", 1,
     "directory /nonexistent/egp does not exist"),
    ("C08", "prune --weights /nonexistent/egp.pt", "a --weights file that does not exist", 2, "no such file"),
    ("C09", "prune --name ../escape", "a run name that leaves --runs-root", 2, "must be a plain directory name"),
    ("C10", "prune --out /dev/null", "--out that is a file", 2, "exists and is a file"),
    ("C11", "prune --resume /nonexistent/egp", "--resume of a directory that is not a run", 2,
     "not an egp-fast run directory"),
    ("C12", "report /nonexistent/egp", "report of a directory that is not a run", 2,
     "is not an egp-fast run directory"),
    ("C13", "prune --milestones a,b", "milestones that are not numbers", 2, "expected comma-separated numbers"),
    ("C14", "prune --lr -1", "a learning rate <= 0", 2, "--lr must be > 0"),
    ("C15", "prune --batch-size 0", "a batch size < 1", 2, "--batch-size must be a positive integer"),
    ("C16", "prune --measure-batches 0", "a measurement cap < 1", 2, "--measure-batches must be a positive integer"),
    ("C17", "prune --device tpu", "an unknown device", 2, "argument --device: invalid choice: 'tpu'"),
    ("C18", "prune --method foo", "an unknown method", 2, "argument --method: invalid choice: 'foo'"),
    ("C19", "prune --gamma 5", "a decay outside (0, 1]", 2, "--gamma in (0, 1]"),
    ("C20", "prune --workers -1", "a negative worker count", 2, "--workers must be >= 0"),
    ("C21", "prune --width 0", "a width < 1", 2, "--width must be a positive integer"),
    ('C22', 'prune --max-drop -1', 'a tolerance outside [0, 1)', 2, '--max-drop must be a fraction in [0, 1)'),
    ('C23', 'prune --val-fraction 1.5', 'a validation fraction outside [0, 1)', 2, '--val-fraction must be in [0, 1)'),
    ('C24', 'prune --max-flip 0', 'a flip bound outside (0, 1]', 2, '--max-flip must be in (0, 1]'),
    ('C25', 'prune --fold-epochs -1', 'a negative fold-finetune epoch count', 2, '--fold-epochs must be >= 0'),
    ('C26', 'prune --linearization zero', 'an unknown linearisation', 2, "argument --linearization: invalid choice: 'zero'"),
]


def _cls_name(e) -> str:
    return e.__name__


@pytest.mark.parametrize("row", API, ids=[r[0] for r in API])
def test_api_error(row):
    _id, _surface, _input, exc, fragment, call = row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as info:
            call()
    assert type(info.value) is exc, f"{_id}: raised {type(info.value).__name__}, documented {exc.__name__}"
    assert fragment in str(info.value), f"{_id}: message {str(info.value)!r} lacks {fragment!r}"


@pytest.mark.parametrize("row", CLI, ids=[r[0] for r in CLI])
def test_cli_error(row, capsys, tmp_path, monkeypatch):
    from egp_fast.cli.commands import main

    _id, args, _input, status, fragment = row
    monkeypatch.chdir(tmp_path)  # a run directory, if any, would land here
    rc = main(args.split())
    out, err = capsys.readouterr()
    assert rc == status, (rc, err)
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("egp-fast: error: "), err
    assert len(lines) == 1, f"{_id}: expected one line, got {err!r}"
    assert "Traceback" not in err + out
    assert fragment in lines[0], (fragment, lines[0])
    if status == 2:
        assert not any(tmp_path.iterdir()), f"{_id}: a usage error created files"


def test_cli_bad_data_leaves_no_empty_run_dir(capsys, tmp_path, monkeypatch):
    from egp_fast.cli.commands import main

    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--data", "cifar10:/nonexistent/egp"]) == 1
    assert not list(tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_step_variants():
    # the same row (A03) for the other bad spellings
    for step in (0, 1, True, "0.5", float("nan"), -0.1):
        with pytest.raises(ConfigError):
            egp_fast.Pruner(_net(), _x(), step=step)


def _doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(r"[AC]\d\d", cells[0]):
            rows.append(cells)
    return rows


def _unescape(cell: str) -> str:
    return cell.replace("\\|", "|").strip("`")


def test_docs_table():
    rows = {r[0]: r for r in _doc_rows()}
    assert list(rows) == [r[0] for r in API] + [r[0] for r in CLI], "docs/errors.md and this file disagree"
    for _id, surface, inp, exc, fragment, _ in API:
        r = rows[_id]
        assert _unescape(r[1]) == surface and r[2] == inp and _unescape(r[3]) == exc.__name__, r
        assert fragment in _unescape(r[4]), (_id, fragment, r[4])
    for _id, args, inp, status, fragment in CLI:
        r = rows[_id]
        assert _unescape(r[1]) == f"egp-fast {args}".strip() and r[2] == inp, r
        assert r[3] == f"exit {status}" and fragment in _unescape(r[4]), r


def render_doc() -> str:
    """The docs/errors.md text for the tables above (run this file as a script to rewrite it)."""
    out = [
        "# Errors",
        "",
        "Every error a user can cause, the input that triggers it, and what it says. Library calls",
        "raise a subclass of `egp_fast.EGPError` (each also derives from the matching built-in:",
        "`ConfigError`, `DataError`, `ModelError` are `ValueError`s, `BackendError` and",
        "`CheckpointError` are `RuntimeError`s, `NumericsError` is a `FloatingPointError`). The",
        "`egp-fast` command prints one line `egp-fast: error: <message>` on stderr, never a",
        "traceback, and exits with 2 for usage/option errors, 1 for other errors, 130 when",
        "interrupted. Each row is a test in `tests/hardening/test_errors.py` (same id); the message",
        "column shows the part of the message the test checks, the real message goes on to say how",
        "to fix it.",
        "",
        "## Library",
        "",
        "| id | call | bad input | error | message contains |",
        "|---|---|---|---|---|",
    ]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    for _id, surface, inp, exc, fragment, _ in API:
        out.append(f"| {_id} | `{surface}` | {esc(inp)} | `{exc.__name__}` | `{esc(fragment)}` |")
    out += ["", "## Command line", "", "| id | command | bad input | result | message contains |",
            "|---|---|---|---|---|"]
    for _id, args, inp, status, fragment in CLI:
        out.append(f"| {_id} | `{('egp-fast ' + args).strip()}` | {esc(inp)} | exit {status} | `{esc(fragment)}` |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render_doc())
