"""The README's quickstart runs as written, and its two commands are the real ones."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
