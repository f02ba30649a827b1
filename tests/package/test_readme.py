"""The README's quickstart runs as written, and its two commands are the real ones."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {name}", 1)[1].split("\n## ", 1)[0]


def test_quickstart_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", _section("Quickstart"), re.S)[0]
    exec(compile(code, "README-quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "sparsity 50.0%" in out and "sparsity 75.0%" in out
    assert "layer1.0.relu:1" in out  # the inspect table


def test_two_commands_exist_and_ci_runs_the_test_command():
    cmds = re.findall(r"^(\./dev\.sh \w+)", _section("The two commands"), re.M)
    assert cmds == ["./dev.sh demo", "./dev.sh test"]
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text()


def _blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(section), re.S)


def test_easier_example_runs_after_the_quickstart(capsys):
    ns: dict = {}
    exec(compile(_blocks("Quickstart")[0], "README-quickstart", "exec"), ns)
    capsys.readouterr()
    exec(compile(_blocks("Which method? EGP, EASIER or IMP")[0], "README-easier", "exec"), ns)
    out = capsys.readouterr().out
    result = ns["result"]
    assert result.rounds and result.rounds[0].removed_sites, out  # the first step removed a site
    assert "best round:" in out


def test_huggingface_example_prints_what_the_readme_says(capsys):
    import pytest

    pytest.importorskip("transformers")
    section = _section("Hugging Face transformers")
    exec(compile(_blocks("Hugging Face transformers")[0], "README-hf", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    shown = section.split("```")[3].strip().splitlines()  # the plain block after the code
    assert out[1] == shown[1]  # 8 -> 7 weight layers on the longest path
    assert out[2].split(" output change")[0] == shown[2].split(" output change")[0]  # the folds
    assert float(out[2].rsplit(" ", 1)[1]) < 1e-4  # exact up to rounding (the value varies with the init)
    assert out[3] == shown[3]
    assert float(out[0]) == pytest.approx(0.5, abs=1e-3)
