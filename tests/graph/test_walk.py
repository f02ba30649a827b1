"""The producer walk and channel axis (egp_fast/graph/walk.py), seen through discover_sites."""

import torch
import torch.nn as nn
import torchvision

import egp_fast


def test_resnet18_reused_relu_is_two_sites_with_block_producers():
    g = egp_fast.discover_sites(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    names = [s.name for s in g.sites]
    assert len(names) == 17
    assert names[1:3] == ["layer1.0.relu", "layer1.0.relu:1"]
    # relu after the residual add maps to the block's last conv, not the shortcut
    assert g.site("layer1.0.relu:1").producers == ["layer1.0.conv2"]
    assert g.site("layer2.0.relu:1").producers == ["layer2.0.conv2"]  # not downsample.0
    assert g.site("relu").producers == ["conv1"]
    assert all(s.channel_dim == 1 for s in g.sites)
    assert g.site("layer4.1.relu").channels == 512


def test_inplace_relu_and_bn_between():
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(inplace=True), nn.Conv2d(5, 2, 1))
    g = egp_fast.discover_sites(net, torch.randn(2, 3, 8, 8))
    assert [(s.name, s.producers, s.channels) for s in g.sites] == [("2", ["0"], 5)]


def test_token_layouts_use_last_dim():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    for shape in [(2, 5, 8), (2, 3, 3, 8)]:
        (s,) = egp_fast.discover_sites(Mlp(), torch.randn(*shape)).sites
        assert (s.channel_dim, s.channels, s.producers) == (-1, 16, ["fc1"])


def test_swin_and_vit_sites():
    g = egp_fast.discover_sites(torchvision.models.swin_t(), torch.randn(1, 3, 64, 64))
    assert len(g.sites) == 12 and all(s.kind == "gelu" and s.channel_dim == -1 for s in g.sites)
    assert g.sites[0].producers == ["features.1.0.mlp.0"]
