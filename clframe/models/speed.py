"""Speed options of a backbone that leave its results and its checkpoints unchanged.

- ``memory_format="channels_last"``: convolution weights and 4-D inputs in NHWC layout, which tensor-core
  convolutions (cuDNN under bf16/fp16 autocast) run without layout conversions. Parameter names, shapes and
  values are unchanged, so checkpoints load either way.
- ``compile_backbone``: ``torch.compile`` of the backbone's forward, in place (``nn.Module.compile``), so its
  parameters keep their names (no ``_orig_mod.`` prefix) and checkpoints stay interchangeable with
  uncompiled runs. The first steps pay the compilation (tens of seconds for a ResNet-18).

Mixed precision is Lightning's (``--trainer.precision=bf16-mixed``): autocast around every step, no change here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from clframe.errors import ConfigError

MemoryFormat = Literal["contiguous", "channels_last"]


def check_memory_format(memory_format: str) -> None:
    if memory_format not in ("contiguous", "channels_last"):
        raise ConfigError(f"memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")


def prepare_backbone(backbone: nn.Module, memory_format: MemoryFormat = "contiguous", compile: bool = False) -> None:
    """Apply the speed options to ``backbone`` in place."""
    check_memory_format(memory_format)
    if memory_format == "channels_last":
        backbone.to(memory_format=torch.channels_last)
    if compile:
        backbone.compile()


def to_float(x: Tensor, memory_format: MemoryFormat, dtype: torch.dtype = torch.float32) -> Tensor:
    """A fresh floating-point copy of an input batch in ``dtype`` (the model's: float32, or float64 / bfloat16 when
    Lightning's ``64-true`` / ``bf16-true`` precision converted the weights), 4-D batches in the backbone's layout
    (one copy for both)."""
    if memory_format == "channels_last" and x.dim() == 4:
        return x.to(dtype=dtype, memory_format=torch.channels_last)
    return x.to(dtype)
