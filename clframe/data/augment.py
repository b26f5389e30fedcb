"""Input pipelines for training and evaluation: presets and torchvision v2 transforms from a config.

The data module serves raw uint8 batches; the strategy applies the pipelines on the device
(see ``ContinualModule.augment_inputs`` / ``preprocess``). Keeping augmentation out of the loader means a
replay buffer stores the raw sample and every replayed copy is augmented afresh, as Mammoth does for
ER, DER, DER++ and iCaRL (its buffers keep ``not_aug_inputs``).

A pipeline is given as
- a preset name: ``cifar_crop_flip`` / ``tiny_imagenet_crop_flip`` (zero-pad 4, random crop back to the
  input size, horizontal flip with p=0.5: the CIFAR-10 and Tiny-ImageNet protocols of the DER paper),
  done per sample but as one batched gather, or ``none``;
- a list of torchvision v2 transforms, each a class name (``RandomHorizontalFlip``) or a mapping
  ``{class_path: RandomCrop, init_args: {size: 32, padding: 4}}``. Only classes of
  ``torchvision.transforms.v2`` are accepted (a config never names arbitrary code); they run per sample,
  so every sample gets its own random parameters;
- from Python, any callable taking and returning a uint8 batch ``(B, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.errors import ConfigError

TransformSpec = str | list[str | dict[str, Any]] | None
"""What ``train_transforms`` / ``eval_transforms`` accept from a config."""


def crop_flip(x: Tensor, padding: int = 4) -> Tensor:
    """Per-row random crop (zero padding) and horizontal flip of an image batch, in one gather."""
    b, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, None, :, None]
    cols = torch.arange(w, device=x.device)[None].expand(b, w)
    flip = torch.rand(b, device=x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    return xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
              rows, cols[:, None, None, :]]


class CropFlip(nn.Module):
    """Batched random crop (zero padding ``padding``) + horizontal flip, a new draw for every sample."""

    def __init__(self, padding: int = 4) -> None:
        super().__init__()
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        return crop_flip(x, self.padding) if x.dim() == 4 else x

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


PRESETS: dict[str, Callable[[], nn.Module | None]] = {
    "none": lambda: None,
    "cifar_crop_flip": lambda: CropFlip(4),
    "tiny_imagenet_crop_flip": lambda: CropFlip(4),
}


class PerSample(nn.Module):
    """Applies torchvision transforms to each sample of a batch on its own (its own random draw)."""

    def __init__(self, transforms: Sequence[Callable[[Tensor], Tensor]]) -> None:
        super().__init__()
        self.transforms = list(transforms)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return x
        out = []
        for xi in x:
            for t in self.transforms:
                xi = t(xi)
            out.append(xi)
        return torch.stack(out)

    def extra_repr(self) -> str:
        return ", ".join(type(t).__name__ for t in self.transforms)


def _v2_class(name: str, key: str) -> type:
    from torchvision.transforms import v2

    short = name.rsplit(".", 1)[-1]
    if "." in name and name.rsplit(".", 1)[0] not in ("torchvision.transforms.v2", "v2"):
        raise ConfigError(f"{key}: {name!r} is not a torchvision.transforms.v2 class; a transform list may only name "
                          "classes of torchvision.transforms.v2 (e.g. RandomCrop, RandomHorizontalFlip, ColorJitter)")
    cls = getattr(v2, short, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        import difflib

        names = [n for n in dir(v2) if isinstance(getattr(v2, n), type)]
        hint = difflib.get_close_matches(short, names, n=1)
        raise ConfigError(f"{key}: torchvision.transforms.v2 has no transform {short!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + "; use a v2 class name, optionally with init_args, or a preset: " + ", ".join(PRESETS))
    return cls


def build_pipeline(spec: Any, key: str = "train_transforms") -> Callable[[Tensor], Tensor] | None:
    """The batch-level callable a config's ``spec`` describes (``None`` for no transform)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        preset = PRESETS.get(spec.lower())
        if preset is None:
            import difflib

            hint = difflib.get_close_matches(spec.lower(), list(PRESETS), n=1)
            raise ConfigError(f"{key}: unknown preset {spec!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; presets: {', '.join(PRESETS)}, or give a list of torchvision.transforms.v2 classes")
        return preset()
    if callable(spec) and not isinstance(spec, Sequence):
        return spec
    if not isinstance(spec, Sequence):
        raise ConfigError(f"{key}: expected a preset name or a list of transforms, got {type(spec).__name__}")
    transforms = []
    for i, item in enumerate(spec):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            transforms.append(_v2_class(item, where)())
        elif isinstance(item, Mapping):
            unknown = set(item) - {"class_path", "init_args"}
            if "class_path" not in item or unknown:
                raise ConfigError(f"{where}: a transform is a class name or {{class_path: ..., init_args: {{...}}}}; "
                                  f"got keys {sorted(item)}")
            cls = _v2_class(str(item["class_path"]), where)
            try:
                transforms.append(cls(**dict(item.get("init_args") or {})))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{where}: {cls.__name__}({item.get('init_args')}) failed: {err}") from err
        elif callable(item):
            transforms.append(item)
        else:
            raise ConfigError(f"{where}: expected a transform class name or mapping, got {item!r}")
    return PerSample(transforms) if transforms else None
