"""Backbones by name: a small registry plus any timm model (``timm:<model name>``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from clframe.errors import ConfigError
from clframe.models.mlp import MLP
from clframe.models.resnet import ResNet18

BackboneBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make ``fn(input_shape, **kwargs) -> nn.Module`` (with ``num_features``) buildable by name."""

    def wrap(fn: BackboneBuilder) -> BackboneBuilder:
        _REGISTRY[name] = fn
        return fn

    return wrap


@register_backbone("mlp")
def _mlp(input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    return MLP(math.prod(input_shape), **kwargs)


@register_backbone("resnet18")
def _resnet18(input_shape: Sequence[int], nf: int = 64) -> nn.Module:
    return ResNet18(in_channels=input_shape[0], nf=nf)


@register_backbone("reduced_resnet18")
def _reduced_resnet18(input_shape: Sequence[int], nf: int = 20) -> nn.Module:
    return ResNet18(in_channels=input_shape[0], nf=nf)


def _timm(model_name: str, input_shape: Sequence[int], pretrained: bool = False, **kwargs: Any) -> nn.Module:
    import timm

    model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, in_chans=input_shape[0], **kwargs)
    return model


def backbone_names() -> list[str]:
    return sorted(_REGISTRY) + ["timm:<model name>"]


def create_backbone(name: str, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build a feature extractor whose output width is ``module.num_features``."""
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], input_shape, **kwargs)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; allowed: {', '.join(backbone_names())}")
    return _REGISTRY[name](input_shape, **kwargs)
