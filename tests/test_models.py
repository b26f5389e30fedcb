"""Backbones: shapes, feature widths, the registry and timm models by name."""

from __future__ import annotations

import pytest
import torch

from clframe.models import MLP, ResNet18, backbone_names, create_backbone


def test_mlp_is_the_der_network():
    net = create_backbone("mlp", (1, 28, 28), hidden_sizes=[100, 100])
    assert isinstance(net, MLP) and net.num_features == 100
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100), (100, 100)]
    assert all(torch.all(m.bias == 0) for m in linears)  # Xavier init with zero biases, as Mammoth
    assert net(torch.rand(4, 1, 28, 28)).shape == (4, 100)


@pytest.mark.parametrize("name,nf", [("resnet18", 64), ("reduced_resnet18", 20)])
def test_resnet18_for_small_images(name, nf):
    net = create_backbone(name, (3, 32, 32))
    assert isinstance(net, ResNet18) and net.num_features == 8 * nf
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 8 * nf)
    n_params = sum(p.numel() for p in net.parameters())
    assert (n_params > 11e6) if nf == 64 else (1e6 < n_params < 2e6)


def test_timm_models_by_name():
    net = create_backbone("timm:resnet10t", (3, 32, 32))
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, net.num_features)
    grey = create_backbone("timm:resnet10t", (1, 28, 28))
    assert grey(torch.rand(2, 1, 28, 28)).shape[0] == 2


def test_unknown_backbone_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: .*mlp.*timm:<model name>"):
        create_backbone("resnet9000", (3, 32, 32))
    assert "mlp" in backbone_names()
