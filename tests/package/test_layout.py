"""The package's shape: stages import only downwards, no import cycles, no oversized files.

Every ``import`` in ``egp_fast`` counts, including those inside functions and under
``TYPE_CHECKING``: a cycle that only closes at run time is still a cycle a reader must untangle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "egp_fast"

# Stage of each top-level part of the package; a module may import only from its own stage or
# the ones below. The order is the one README's "How the code is organised" describes.
STAGES = {
    "errors": 0, "_ext": 0, "_C": 0, "_version": 0, "_progress": 0,
    "kernels": 1, "ops": 1,
    "masks": 2,
    "graph": 3,
    "measurement": 4,
    "folding": 5,
    "pruning": 6,
    "cli": 7,
    "": 8,  # egp_fast/__init__.py: the public API re-exports
}
MAX_LINES = 520


def _modules() -> dict[str, pathlib.Path]:
    out = {"egp_fast._C": None}  # the compiled extension: imports nothing of ours
    # kernels/ is linked into the package (a symbolic link, which rglob does not follow)
    for path in sorted([*PKG.rglob("*.py"), *(PKG / "kernels").glob("*.py")]):
        rel = path.relative_to(PKG).with_suffix("")
        parts = ["egp_fast", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module an imported dotted name lands in (a module, or the package defining a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "egp_fast":
                target = _target(name)
                if target:
                    found.add(target)
    return found


GRAPH = {mod: _imports(path) - {mod} for mod, path in MODULES.items() if path is not None}


def _stage(mod: str) -> int:
    parts = mod.split(".")
    return STAGES[parts[1] if len(parts) > 1 else ""]


def test_every_part_of_the_package_has_a_stage():
    unknown = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(STAGES))
    assert not unknown, f"add these to STAGES (and README's layout section): {unknown}"


def test_no_import_cycles():
    # Tarjan's strongly connected components: any component with two or more modules is a cycle.
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_stages_import_only_downwards():
    upward = sorted(
        f"{src} -> {dst}" for src, dsts in GRAPH.items() for dst in dsts if _stage(dst) > _stage(src)
    )
    assert not upward, "imports from a later stage:\n" + "\n".join(upward)


def test_no_private_name_crosses_a_subpackage():
    crossing = []
    for mod, path in MODULES.items():
        home = mod.split(".")[:2]
        if path is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("egp_fast"):
                if node.module.split(".")[:2] == home:
                    continue
                if any(part.startswith("_") for part in node.module.split(".")[2:]):
                    crossing.append(f"{mod}: from {node.module} import ... (a private module)")
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and a.name not in ("_ext", "_C"):
                        crossing.append(f"{mod}: from {node.module} import {a.name}")
    assert not crossing, "private names imported across subpackages:\n" + "\n".join(crossing)


@pytest.mark.parametrize("mod", sorted(m for m, p in MODULES.items() if p is not None), ids=str)
def test_no_file_is_oversized(mod):
    n = len(MODULES[mod].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[mod].relative_to(PKG.parent)} has {n} lines; split it along its sections"
