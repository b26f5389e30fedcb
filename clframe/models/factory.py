"""Backbones by name: a small registry plus any timm model (``timm:<model name>``)."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
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


def _timm(model_name: str, input_shape: Sequence[int], pretrained: bool = False, checkpoint_path: str | None = None,
          **kwargs: Any) -> nn.Module:
    """A timm model without its classifier. ``checkpoint_path``: local pretrained weights (a timm/PyTorch state
    dict or ``.safetensors``, loaded as tensors only), used instead of a download; ``pretrained``: timm's weights
    from the Hugging Face hub (or its local cache)."""
    import timm

    if checkpoint_path is not None:
        if not Path(checkpoint_path).is_file():
            raise ConfigError(f"backbone timm:{model_name}: checkpoint_path {checkpoint_path!r} is not a file")
        pretrained, kwargs["pretrained_cfg_overlay"] = True, {"file": str(checkpoint_path)}
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, in_chans=input_shape[0], **kwargs)
    except TypeError as err:
        if (bad := re.search(r"unexpected keyword argument '(\w+)'", str(err))) is None:
            raise
        options = _timm_options(model_name, str(err))
        listed = f"; its options: {', '.join(options)}" if options else ""
        raise ConfigError(
            f"backbone timm:{model_name} has no option {bad.group(1)!r} (in backbone_kwargs){listed}. Options of "
            "another backbone do not carry over: set backbone_kwargs for this one (--model.backbone_kwargs='{}' "
            "for its defaults).") from err
    except Exception as err:
        if not pretrained or checkpoint_path is not None:
            raise
        raise ConfigError(
            f"backbone timm:{model_name}: its pretrained weights could not be loaded ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}). timm fetches them from the "
            "Hugging Face hub, which needs network access once (they are cached under ~/.cache/huggingface). "
            "Offline, download the weights elsewhere (e.g. the model's model.safetensors), copy the file here and "
            "pass it as backbone_kwargs: {checkpoint_path: /path/to/model.safetensors} (pretrained is then implied), "
            "or set pretrained: false to train from scratch.") from err


def _timm_options(model_name: str, message: str) -> list[str]:
    """The keyword options of the timm model class named in a TypeError (best effort, for error messages)."""
    try:
        import importlib

        from timm.models._registry import _model_to_module

        cls_name = re.match(r"(\w+)\.__init__\(\)", message)
        module = importlib.import_module(f"timm.models.{_model_to_module[model_name]}")
        cls = getattr(module, cls_name.group(1)) if cls_name else None
        params = inspect.signature(cls).parameters if cls is not None else {}
    except Exception:  # noqa: BLE001 - only the hint is lost
        return []
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def backbone_names() -> list[str]:
    return sorted(_REGISTRY) + ["timm:<model name>"]


def create_backbone(name: str, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build a feature extractor whose output width is ``module.num_features``."""
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], input_shape, **kwargs)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; allowed: {', '.join(backbone_names())}")
    accepted = registered_options(name)
    if unknown := [k for k in kwargs if accepted is not None and k not in accepted]:
        raise ConfigError(
            f"backbone {name!r} has no option {unknown[0]!r} (in backbone_kwargs){_close(unknown[0], accepted)}; its "
            f"options: {', '.join(accepted)}. "
            "Options of another backbone do not carry over: set backbone_kwargs for this one "
            "(--model.backbone_kwargs='{}' for its defaults).")
    return _REGISTRY[name](input_shape, **kwargs)


def _close(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def registered_options(name: str) -> list[str] | None:
    """The keyword options a registered backbone accepts (``None``: any, it forwards ``**kwargs``)."""
    fn = _REGISTRY[name]
    params = list(inspect.signature(fn).parameters.values())[1:]  # after input_shape
    if any(p.kind is p.VAR_KEYWORD for p in params):
        if name == "mlp":  # forwards to MLP
            params = list(inspect.signature(MLP).parameters.values())[1:]  # after input_size
        else:
            return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
