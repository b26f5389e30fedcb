"""Backbones by name: a small registry plus any timm model (``timm:<model name>``)."""

from __future__ import annotations

import difflib
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
    check_kwargs("backbone 'mlp'", MLP, kwargs, skip=("input_size",))
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
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"timm has no model {model_name!r} ({err}); timm.list_models() lists the names") from err
        if not pretrained or checkpoint_path is not None:
            raise
        raise _weights_error(model_name, err) from err
    except Exception as err:
        if not pretrained or checkpoint_path is not None:
            raise
        raise _weights_error(model_name, err) from err


def _weights_error(model_name: str, err: BaseException) -> ConfigError:
    return ConfigError(
        f"backbone timm:{model_name}: its pretrained weights could not be loaded ({type(err).__name__}: "
        f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'}). timm fetches them from the "
        "Hugging Face hub, which needs network access once (they are cached under ~/.cache/huggingface). "
        "Offline, download the weights elsewhere (e.g. the model's model.safetensors), copy the file here and "
        "pass it as backbone_kwargs: {checkpoint_path: /path/to/model.safetensors} (pretrained is then implied), "
        "or set pretrained: false to train from scratch.")


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
        close = difflib.get_close_matches(unknown[0], accepted, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        carry = (" Options of another backbone do not carry over: set backbone_kwargs for this one "
                 "(--model.backbone_kwargs='{}' for its defaults).") if where == "backbone_kwargs" else ""
        raise ConfigError(f"{owner} has no option(s) {', '.join(map(repr, unknown))} (in {where}){hint}; "
                          f"its options: {', '.join(accepted) or 'none'}.{carry}")
    for name in WIDTH_OPTIONS:
        value = kwargs.get(name)
        widths = [value] if isinstance(value, int) else value
        if value is not None and (not isinstance(widths, (list, tuple))
                                  or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)):
            raise ConfigError(f"{owner}: {name} must be positive layer widths (e.g. [100, 100]), got {value!r}")
