"""Site records and kinds (egp_fast/graph/sites.py): Site, SiteGraph, WEIGHT_TYPES, module_kind."""

import pytest
import torch.nn as nn

from egp_fast.graph import WEIGHT_TYPES, Site, SiteGraph, module_kind


def _site(name, producers):
    return Site(name=name, kind="relu", node=name, module=None, producers=producers, channel_dim=1,
                channels=4, breakpoints=(0.0,), shape=(2, 4))


def test_site_graph_lookup_order_and_producers():
    g = SiteGraph([_site("a", ["fc1"]), _site("b", ["fc2", "fc1"])], None, [])
    assert not g.traced and len(g) == 2 and [s.name for s in g] == ["a", "b"]
    assert g.site("b").producers == ["fc2", "fc1"]
    assert g.producer_layers() == ["fc1", "fc2"]  # each once, in site order
    with pytest.raises(KeyError, match="no site named 'c'; sites are: a, b"):
        g.site("c")


def test_site_to_dict_is_plain_data():
    d = _site("a", ["fc1"]).to_dict()
    assert d == {"name": "a", "kind": "relu", "node": "a", "module": None, "producers": ["fc1"],
                 "channel_dim": 1, "channels": 4, "breakpoints": [0.0], "params": {}, "exact": True,
                 "shape": [2, 4]}


def test_weight_types_and_module_kind():
    assert isinstance(nn.Conv2d(1, 1, 1), WEIGHT_TYPES) and not isinstance(nn.Embedding(2, 2), WEIGHT_TYPES)
    assert module_kind(nn.ReLU()) == "relu" and module_kind(nn.Linear(2, 2)) is None
