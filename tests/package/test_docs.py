"""Every docstring example of the package runs and prints what it says.

A docstring whose examples are all marked ``# doctest: +SKIP`` runs nothing, so a test over it
could never fail. Each docstring that has examples must therefore run at least one of them,
unless it is listed in ``ALL_SKIPPED`` below with the reason it cannot run inside the test suite.
Stale entries of that list fail too, so the list only ever names docstrings that really skip.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import egp_fast

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Modules whose import needs something optional; they are tested when it is installed.
OPTIONAL = {
    "egp_fast.kernels": "triton",
    "egp_fast.ops._triton_backend": "triton",
}

# Docstrings whose every example is skipped, with the reason. Keys are doctest names
# (``module.object``). Keep this list short: prefer an example that runs on a tiny model.
ALL_SKIPPED: dict[str, str] = {
    "egp_fast.cli.commands.main": "its example runs the egp-fast command end to end (reads a run folder made "
    "by training); tests/cli/test_commands.py runs the command itself",
}

# Docstrings whose examples are all skipped although a runnable example is possible (a tiny
# model or a run report built in the example). Until their owners make one run, the module's
# test is an expected failure (xfail) *after* every example that does run has passed; once an
# example runs, the entry is stale and the test fails until it is removed here.
PENDING: dict[str, str] = {}


def _modules() -> list[str]:
    """Every module of the package (the compiled extension has no Python docstrings)."""
    names = ["egp_fast"]
    for info in pkgutil.walk_packages(egp_fast.__path__, prefix="egp_fast."):
        if info.name.split(".")[-1] in {"_C"}:
            continue
        names.append(info.name)
    return sorted(names)


MODULES = _modules()


def _import(name: str):
    for prefix, package in OPTIONAL.items():
        if name == prefix or name.startswith(prefix + "."):
            pytest.importorskip(package)
    return importlib.import_module(name)


def run_examples(module) -> dict[str, doctest.TestResults]:
    """Run every docstring example of ``module``; one result per docstring that has examples."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    results: dict[str, doctest.TestResults] = {}
    for test in finder.find(module, module.__name__):
        if not test.examples:
            continue
        res = runner.run(test, out=lambda s: None)
        results[test.name] = res
        if res.failed:
            # Re-run with a reporter so the failure text reaches the assertion message.
            lines: list[str] = []
            doctest.DocTestRunner(optionflags=FLAGS, verbose=False).run(test, out=lines.append)
            results[test.name] = doctest.TestResults(res.failed, res.attempted)
            raise AssertionError(f"{res.failed} of {res.attempted} examples of {test.name} failed:\n"
                                 + "".join(lines)[-4000:])
    return results


@pytest.mark.parametrize("name", MODULES)
def test_docs(name):
    module = _import(name)
    results = run_examples(module)
    skipped_only = sorted(t for t, r in results.items() if r.attempted == 0)
    unexplained = [t for t in skipped_only if t not in ALL_SKIPPED and t not in PENDING]
    assert not unexplained, (
        f"these docstrings have examples but every one is skipped, so nothing is tested: {unexplained}; "
        "make at least one example runnable (tiny model, tiny data) or list it in ALL_SKIPPED with the reason"
    )
    listed = {**ALL_SKIPPED, **PENDING}
    stale = [t for t in listed if t.rpartition(".")[0] == name and t in results and results[t].attempted]
    assert not stale, f"ALL_SKIPPED/PENDING name docstrings whose examples now run; remove them: {stale}"
    pending = [t for t in skipped_only if t in PENDING]
    if results and not pending:
        assert sum(r.attempted for r in results.values()) > 0, f"no example of {name} ran"
    if pending:
        pytest.xfail("every example skipped (nothing tested) in: "
                     + "; ".join(f"{t} ({PENDING[t]})" for t in pending))


def test_all_skipped_entries_exist():
    """An entry for a docstring that no longer exists (renamed, removed) is an error too."""
    missing = []
    for full in [*ALL_SKIPPED, *PENDING]:
        mod_name, _, obj = full.rpartition(".")
        module = _import(mod_name)
        if not hasattr(module, obj):
            missing.append(full)
    assert not missing, f"ALL_SKIPPED names objects that do not exist: {missing}"


def _fake_module(source: str):
    import types

    fake = types.ModuleType("fake_mod")
    exec(compile(source, "fake_mod.py", "exec"), fake.__dict__)
    return fake


SKIPPED_ONLY = '''
def f():
    """Example:
    >>> 1 + 1  # doctest: +SKIP
    3
    """
'''

WRONG = '''
def g():
    """Example:
    >>> 1 + 1
    3
    """
'''


def test_a_fully_skipped_docstring_is_caught():
    """The checks themselves can fail: an all-skipped docstring runs 0 examples; a wrong one fails."""
    assert run_examples(_fake_module(SKIPPED_ONLY)) == {"fake_mod.f": doctest.TestResults(0, 0)}
    with pytest.raises(AssertionError, match="1 of 1 examples of fake_mod.g failed"):
        run_examples(_fake_module(WRONG))
