"""SupSup's Erdős–Rényi layer-wise sparsity: per-layer densities from the official formula, masks that keep
exactly that many weights, and a checkpoint that rebuilds the same densities."""

from __future__ import annotations

import math

import pytest

from clframe import ContinualDataModule
from clframe.strategies import SupSup
from clframe.strategies.supermask.layers import er_density


def test_er_density_formula() -> None:
    assert er_density((100, 784), 1.0) == pytest.approx((100 + 784) / (100 * 784))
    assert er_density((64, 32, 3, 3), 8.0) == pytest.approx(8 * (64 + 32) / (64 * 32 * 9))
    assert er_density((10, 4), 32.0) == 0.5  # capped at one half, as the official code does


def test_supsup_er_sparsity_sets_per_layer_densities_and_masks() -> None:
    data = ContinualDataModule(source="digits", scenario="task", n_tasks=2, batch_size=32)
    model = SupSup(backbone="mlp", backbone_kwargs={"hidden_sizes": [64, 32]}, er_sparsity=4.0)
    model.bind_stream(data.stream)
    layers = model.masked_layers()
    shapes = [tuple(layer.weight.shape) for layer in layers]
    assert [layer.density for layer in layers] == [er_density(s, 4.0) for s in shapes]
    assert len({layer.density for layer in layers}) > 1  # wide layers keep less than narrow ones
    for layer in layers:
        kept = int(layer.live_mask().sum())
        assert kept == max(1, math.floor(layer.density * layer.weight.numel() + 1e-9))
    fresh = SupSup(backbone="mlp", backbone_kwargs={"hidden_sizes": [64, 32]}, er_sparsity=4.0)
    fresh.bind_stream(data.stream)
    fresh.load_state_dict(model.state_dict())
    assert [layer.density for layer in fresh.masked_layers()] == [layer.density for layer in layers]


def test_er_sparsity_needs_topk_masks() -> None:
    with pytest.raises(ValueError, match="er_sparsity"):
        SupSup(er_sparsity=2.0, mask_rule="threshold")
    with pytest.raises(ValueError, match="er_sparsity"):
        SupSup(er_sparsity=0.0)
