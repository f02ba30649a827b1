"""Nothing at the top of the repository shadows an installed package.

`python -m ...` and `python -c ...` put the current directory first on sys.path. Run from a
checkout, a top-level package of ours with an installed distribution's name wins the import:
on 2026-12-04 our `kernels/` hid Hugging Face's `kernels`, and transformers 5.25 failed to
import. These tests start a fresh interpreter in the repository root, as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

_PROBE = r"""
import importlib.metadata, importlib.util, json, os, sys

root = os.path.realpath(sys.argv[1])
out = {"hub_kernels": None, "specs": {}}
try:
    import transformers.integrations.hub_kernels  # noqa: F401  (imports HF's kernels)
except Exception as e:  # report, the test decides
    out["hub_kernels"] = f"{type(e).__name__}: {e}"

prefixes = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix)}

def inside(path):  # in the checkout, not in a virtual environment kept there (.venv)
    real = path and os.path.realpath(path) + os.sep
    return bool(real) and real.startswith(root + os.sep) and not any(map(real.startswith, prefixes))

dists = importlib.metadata.packages_distributions()
names = set()
for entry in os.listdir(root):
    full = os.path.join(root, entry)
    name = entry[:-3] if entry.endswith(".py") else entry
    if (os.path.isdir(full) or entry.endswith(".py")) and name.isidentifier():
        names.add(name)
for name in sorted(names | {"kernels"}):
    if name == "egp_fast" or (name not in dists and name != "kernels"):
        continue
    spec = importlib.util.find_spec(name)
    locs = list(spec.submodule_search_locations or []) if spec else []
    out["specs"][name] = {
        "installed_by": dists.get(name),
        "origin": spec.origin if spec else None,
        "inside": bool(spec) and (inside(spec.origin) or any(inside(p) for p in locs)),
    }
print(json.dumps(out))
"""


def _probe() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_transformers_hub_kernels_imports_from_the_repository_root():
    out = _probe()
    assert out["hub_kernels"] is None, (
        f"`import transformers.integrations.hub_kernels` failed when run from {ROOT}: {out['hub_kernels']}"
    )
    kernels = out["specs"]["kernels"]
    assert not kernels["inside"], f"`import kernels` resolves into the repository: {kernels}"


def test_no_top_level_name_shadows_an_installed_distribution():
    shadowing = {name: s for name, s in _probe()["specs"].items() if s["inside"]}
    assert not shadowing, f"top-level names of the repository shadow installed packages: {shadowing}"


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_triton_sources_refuse_to_load_as_a_top_level_kernels_package(path):
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must not be a regular package"
    spec = importlib.util.spec_from_file_location(f"kernels.{path.stem}", path)
    with pytest.raises(ImportError, match="only as egp_fast.kernels"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_kernels_are_importable_as_egp_fast_kernels():
    pytest.importorskip("triton")
    import egp_fast.kernels.sign_count as k

    assert k.__name__ == "egp_fast.kernels.sign_count"
    assert pathlib.Path(k.__file__).resolve().parent == (ROOT / "kernels").resolve()
