"""OnePrompt and OVOR (Huang et al., ICLR 2024).

**OnePrompt**: one set of prefix prompts placed like DualPrompt's (G at blocks [0, 1], length 10 = 5 keys +
5 values; E at blocks [2, 3, 4], length 40 = 20 + 20), shared by all tasks and trained on every task: no
pool, no keys, no query pass, no task prediction, prompt loss 0. With ViT-B that is 107,520 prompt
parameters, initialised U(0, 1). Inference: **1** ViT pass per image (the query-based methods need 2).

**OVOR** = OnePrompt + Virtual Outlier Regularisation (:mod:`clframe.strategies.prompt.ovor`), on by
default here; any prompt strategy takes ``vor={...}`` for the same regulariser. Defaults follow the OVOR
repository's CIFAR-100 recipe: Adam lr 1e-3, cosine per task, ``epochs = [0, 16, 4]`` (set
``trainer.epochs_per_task: 20`` and ``vor.epochs: 4``).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from clframe.errors import ConfigError
from clframe.strategies.prompt.base import PromptModule, PromptOutput
from clframe.strategies.prompt.dualprompt import layer_prefixes, merge_prefixes
from clframe.strategies.prompt.ovor import VORConfig
from clframe.strategies.prompt.pool import uniform_parameter
from clframe.strategies.prompt.vit import PromptViT


class OnePrompt(PromptModule):
    """OnePrompt: a single shared set of prefix prompts, no query pass.

    Args:
        g_layers, e_layers: blocks (0-based) of the two prompt groups (DualPrompt's placement).
        g_length, e_length: their lengths, keys + values (even).
        init_scale: prompts start ``U(0, init_scale)``.
        **kwargs: :class:`~clframe.strategies.prompt.base.PromptModule` arguments (``vor`` adds VOR).
    """

    query_passes = 0
    g_prompts: nn.Parameter
    e_prompts: nn.Parameter

    def __init__(self, g_layers: list[int] | None = None, e_layers: list[int] | None = None, g_length: int = 10,
                 e_length: int = 40, init_scale: float = 1.0, lr: float = 1e-3,
                 lr_schedule: Literal["constant", "cosine"] = "cosine", **kwargs: Any) -> None:
        g_layers = [0, 1] if g_layers is None else list(g_layers)
        e_layers = [2, 3, 4] if e_layers is None else list(e_layers)
        for name, layers, length in (("g", g_layers, g_length), ("e", e_layers, e_length)):
            if layers and (length < 2 or length % 2):
                raise ConfigError(f"{name}_length counts keys + values and must be even and positive, got {length}")
        if not g_layers and not e_layers:
            raise ConfigError("OnePrompt needs at least one prompted layer (g_layers or e_layers)")
        super().__init__(lr=lr, lr_schedule=lr_schedule, **kwargs)

    def build_prompts(self, vit: PromptViT) -> None:
        h = self.hparams
        dim, scale = vit.num_features, h.init_scale
        self.g_prompts = uniform_parameter(1, len(h.g_layers), h.g_length, dim, scale=scale)
        self.e_prompts = uniform_parameter(1, len(h.e_layers), h.e_length, dim, scale=scale)

    def encode(self, x: Tensor, task_ids: Tensor | None = None, train: bool = False) -> PromptOutput:
        h = self.hparams
        prefixes = merge_prefixes(layer_prefixes(h.g_layers, self.g_prompts) if h.g_layers else {},
                                  layer_prefixes(h.e_layers, self.e_prompts) if h.e_layers else {})
        feats = self.backbone.forward_tokens(x, prefixes=prefixes)[:, 0]
        return PromptOutput(feats, self.zero())


class OVOR(OnePrompt):
    """OVOR: OnePrompt with Virtual Outlier Regularisation switched on (``vor`` defaults to :class:`VORConfig`)."""

    def __init__(self, vor: VORConfig | None = None, **kwargs: Any) -> None:
        super().__init__(vor=vor if vor is not None else VORConfig(), **kwargs)
