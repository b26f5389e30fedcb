"""Bring every image of a source to one square size once, at load time.

Several MNIST protocols feed 32x32 inputs (MNIST zero-padded by 2 pixels on each side), so that
pixel permutations and network widths match the published setting. Padding keeps every original
pixel; bilinear resizing rescales the image instead.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.nn import functional as F

from clframe.data.scenarios import ScenarioError
from clframe.data.sources import SourceData

RESIZE_MODES = ("pad", "bilinear")


def check_resize(image_size: int | None, mode: str) -> None:
    """Refuse sizes and modes that cannot work, before any data is loaded."""
    if mode not in RESIZE_MODES:
        raise ScenarioError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ScenarioError(f"image_size must be a positive int (or unset to keep the sizes), got {image_size!r}")


def _pad(x: Tensor, size: int, name: str) -> Tensor:
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ScenarioError(
            f"source {name!r} has {h}x{w} images, larger than image_size={size}; padding cannot shrink them. "
            "Set resize='bilinear' or a larger image_size."
        )
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))  # zeros around the image


def _bilinear(x: Tensor, size: int) -> Tensor:
    out = torch.empty(*x.shape[:2], size, size, dtype=torch.uint8)
    for start in range(0, len(x), 4096):  # in chunks: a float copy of a whole data set would be large
        chunk = F.interpolate(x[start:start + 4096].float(), size=(size, size), mode="bilinear", align_corners=False)
        out[start:start + 4096] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def resize_source(source: SourceData, image_size: int, mode: str = "pad") -> SourceData:
    """The source with every image ``image_size`` x ``image_size`` (unchanged if already that size).

    Normalisation statistics are kept from the original images (zero padding shifts them slightly).
    """
    check_resize(image_size, mode)
    if tuple(source.train_x.shape[-2:]) == (image_size, image_size):
        return source
    fn = (lambda x: _pad(x, image_size, source.name)) if mode == "pad" else (lambda x: _bilinear(x, image_size))
    return replace(source, name=f"{source.name}_{image_size}px", train_x=fn(source.train_x), test_x=fn(source.test_x))
