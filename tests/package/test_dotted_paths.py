"""Every dotted path the documentation names resolves.

README.md, docs/*.md and the package's own docstrings name things as ``egp_fast.x.y``. A path
that moved must not keep living in the prose: each one is imported (longest module prefix) and
then looked up attribute by attribute.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PATH = re.compile(r"(?<![\w./-])egp_fast(?:\.[A-Za-z_]\w*)+(?![\w/])")
# Strings that look like paths but are names of something else (a file format tag).
NOT_PATHS = {"egp_fast.checkpoint"}


def _sources() -> list[pathlib.Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted(p for p in (ROOT / "egp_fast").rglob("*.py"))
    files += sorted((ROOT / "kernels").glob("*.py"))
    return files


def _paths() -> dict[str, str]:
    found: dict[str, str] = {}
    for f in _sources():
        for m in PATH.finditer(f.read_text()):
            path = m.group(0).rstrip(".")
            if path not in NOT_PATHS:
                found.setdefault(path, str(f.relative_to(ROOT)))
    return found


PATHS = _paths()


def _resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def test_the_documentation_names_paths():
    assert len(PATHS) > 20  # the scan works: README and docs name many


@pytest.mark.parametrize("path", sorted(PATHS), ids=str)
def test_documented_path_resolves(path):
    if path.startswith("egp_fast.kernels"):
        pytest.importorskip("triton")
    try:
        _resolve(path)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{PATHS[path]} names {path}, which does not resolve: {e}")
