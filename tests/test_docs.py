"""Every docstring example of the public modules runs and prints what it says."""

import doctest
import importlib

import pytest

MODULES = [
    "egp_fast.graph",
    "egp_fast.stats",
    "egp_fast.budget",
    "egp_fast.masks",
    "egp_fast.prune",
    "egp_fast.collapse",
    "egp_fast.collapse_affine",
    "egp_fast.modules",
    "egp_fast.ops._dispatch",
    "egp_fast.ops.select",
    "egp_fast.ops.sign_count",
    "egp_fast.ops.entropy",
    "egp_fast.ops.masked_linear",
    "egp_fast.data",
    "egp_fast.models",
    "egp_fast.train",
    "egp_fast.report",
    "egp_fast.cli",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
