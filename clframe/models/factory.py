"""Backbones by name: a small registry plus any timm model (``timm:<model name>``)."""

from __future__ import annotations

import inspect
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
    check_kwargs("backbone 'mlp'", MLP, kwargs, skip=("input_size",))
    return MLP(math.prod(input_shape), **kwargs)


@register_backbone("resnet18")
def _resnet18(input_shape: Sequence[int], nf: int = 64) -> nn.Module:
    return ResNet18(in_channels=input_shape[0], nf=nf)


@register_backbone("reduced_resnet18")
def _reduced_resnet18(input_shape: Sequence[int], nf: int = 20) -> nn.Module:
    return ResNet18(in_channels=input_shape[0], nf=nf)


def _timm(model_name: str, input_shape: Sequence[int], pretrained: bool = False, **kwargs: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, in_chans=input_shape[0], **kwargs)
    except TypeError as e:  # timm passes unknown keywords on to the model class
        if "unexpected keyword" not in str(e):
            raise
        raise ConfigError(f"backbone 'timm:{model_name}' does not accept backbone_kwargs {sorted(kwargs)} ({e}); "
                          "see that model's constructor in timm for its options") from e
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ConfigError(f"timm has no model {model_name!r} ({e}); timm.list_models() lists the names") from e


def backbone_names() -> list[str]:
    return sorted(_REGISTRY) + ["timm:<model name>"]


def create_backbone(name: str, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build a feature extractor whose output width is ``module.num_features``."""
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], input_shape, **kwargs)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; allowed: {', '.join(backbone_names())}")
    check_kwargs(f"backbone {name!r}", _REGISTRY[name], kwargs, skip=("input_shape",))
    return _REGISTRY[name](input_shape, **kwargs)


WIDTH_OPTIONS = ("hidden_sizes", "channels", "nf")  # layer widths: a zero or negative one fails deep inside torch


def check_kwargs(owner: str, fn: Callable[..., Any], kwargs: dict[str, Any], skip: Sequence[str] = (),
                 closed: bool = False, where: str = "backbone_kwargs") -> None:
    """Refuse keywords ``fn`` does not take, naming ``owner`` and what it accepts (a TypeError would not),
    and layer widths that are not positive.

    ``skip`` are parameters the caller fills itself (the input shape). A function taking ``**kwargs``
    is checked where it passes them on, unless ``closed`` (its ``**kwargs`` are filled by the caller).
    """
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in skip and p.name != "self"]
    if not closed and any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{owner} has no option(s) {', '.join(map(repr, unknown))} (in {where}); "
                          f"its options: {', '.join(accepted) or 'none'}")
    for name in WIDTH_OPTIONS:
        value = kwargs.get(name)
        widths = [value] if isinstance(value, int) else value
        if value is not None and (not isinstance(widths, (list, tuple))
                                  or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)):
            raise ConfigError(f"{owner}: {name} must be positive layer widths (e.g. [100, 100]), got {value!r}")
