"""CODA-Prompt (Smith et al., CVPR 2023).

At every prompted block ``l``: components ``P ∈ R^{M×L_p×D}``, keys ``K ∈ R^{M×D}``, attention vectors
``A ∈ R^{M×D}``. With ``T`` tasks each task owns ``M/T`` contiguous components; task ``t`` uses
``[0, f)``, ``f = (t+1)·M/T``, and in training the earlier rows ``[0, s)``, ``s = t·M/T``, are detached
(frozen: exactly zero gradient). The prompt is an input-conditioned weighted sum, no softmax, no top-k:
``α_m = cos(q ⊙ A_m, K_m)``, ``p = Σ_m α_m P_m``, split into key/value prefixes; the classifier reads [CLS].

Loss: ``CE_masked + μ Σ_l [O(K_l) + O(A_l) + O(P_l)]``, ``O(B) = mean((B Bᵀ − I)²)`` over the rows in use.
clframe follows the current reference code: ``μ = 0`` with Gram–Schmidt initialisation (at each task start
the new block is redrawn Gaussian, orthogonalised against all earlier rows and normalised; K, A and
flattened P separately); the paper's penalty is ``ortho_weight`` (≈ 0.1). Defaults: M = 100, L_p = 8
(4 + 4), blocks [0..4], Adam lr 1e-3, cosine schedule per task. Prompt parameters get no weight decay
(decay would move the frozen rows). Inference: 2 ViT passes per image.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.data.stream import Task
from clframe.errors import ConfigError
from clframe.strategies.prompt.base import PromptModule, PromptOutput
from clframe.strategies.prompt.pool import gram_schmidt_rows_, ortho_penalty, uniform_parameter
from clframe.strategies.prompt.vit import PromptViT, split_prefix


class CODAPrompt(PromptModule):
    """CODA-Prompt: attention-weighted sums of prompt components, new components per task, old ones frozen.

    Args:
        pool_size: ``M`` components per layer (divisible by the number of tasks).
        prompt_length: ``L_p``, keys + values (even).
        layers: prompted blocks (0-based).
        ortho_weight: ``μ`` of the orthogonality penalty (reference code 0, paper ≈ 0.1).
        init_scale: components, keys and attention vectors start ``U(0, init_scale)`` (reference 1.0).
        **kwargs: :class:`~clframe.strategies.prompt.base.PromptModule` arguments.
    """

    components: nn.Parameter
    keys: nn.Parameter
    attention: nn.Parameter

    def __init__(self, pool_size: int = 100, prompt_length: int = 8, layers: list[int] | None = None,
                 ortho_weight: float = 0.0, init_scale: float = 1.0, lr: float = 1e-3,
                 lr_schedule: Literal["constant", "cosine"] = "cosine", **kwargs: Any) -> None:
        layers = [0, 1, 2, 3, 4] if layers is None else list(layers)
        if prompt_length < 2 or prompt_length % 2:
            raise ConfigError(f"prompt_length counts keys + values and must be even and positive, got {prompt_length}")
        if not layers or pool_size < 1 or ortho_weight < 0:
            raise ConfigError("CODA-Prompt needs prompted layers, pool_size >= 1 and ortho_weight >= 0")
        super().__init__(lr=lr, lr_schedule=lr_schedule, **kwargs)

    def build_prompts(self, vit: PromptViT) -> None:
        h = self.hparams
        n, m, dim, scale = len(h.layers), h.pool_size, vit.num_features, h.init_scale
        self.components = uniform_parameter(n, m, h.prompt_length, dim, scale=scale)
        self.keys = uniform_parameter(n, m, dim, scale=scale)
        self.attention = uniform_parameter(n, m, dim, scale=scale)

    def bind_stream(self, stream) -> None:
        super().bind_stream(stream)
        if self.hparams.pool_size % len(stream):
            raise ConfigError(f"CODA-Prompt's pool_size ({self.hparams.pool_size}) must be divisible by the number of "
                              f"tasks ({len(stream)}): every task owns pool_size / tasks components")

    def task_block(self, task: int) -> tuple[int, int]:
        """Rows ``[s, f)`` owned by ``task``."""
        tasks = self.num_tasks or 1
        per = self.hparams.pool_size // tasks
        return task * per, (task + 1) * per

    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        start, stop = self.task_block(task.id)
        for layer in range(len(self.hparams.layers)):
            for weight in (self.components, self.keys, self.attention):
                gram_schmidt_rows_(weight.data[layer], start, stop)

    def _rows(self, weight: Tensor, train: bool) -> Tensor:
        start, stop = self.task_block(int(self.current_task))
        if not train:
            return weight[:, :stop]
        return torch.cat([weight[:, :start].detach(), weight[:, start:stop]], dim=1)

    def weights(self, q: Tensor, keys: Tensor, attention: Tensor) -> Tensor:
        """``α_m = cos(q ⊙ A_m, K_m)`` for every sample and component: ``(batch, rows)``."""
        return (F.normalize(q.unsqueeze(1) * attention.unsqueeze(0), dim=-1) * F.normalize(keys, dim=-1).unsqueeze(0)).sum(-1)

    def encode(self, x: Tensor, task_ids: Tensor | None = None, train: bool = False) -> PromptOutput:
        h, vit = self.hparams, self.backbone
        q = vit.query(x)
        comps, keys, attn = (self._rows(w, train) for w in (self.components, self.keys, self.attention))
        prefixes = {}
        for j, layer in enumerate(h.layers):
            alpha = self.weights(q, keys[j], attn[j])
            prefixes[layer] = split_prefix(torch.einsum("bm,mld->bld", alpha, comps[j]))
        feats = vit.forward_tokens(x, prefixes=prefixes)[:, 0]
        loss = self.zero()
        if train and h.ortho_weight > 0:
            loss = h.ortho_weight * sum(ortho_penalty(keys[j]) + ortho_penalty(attn[j]) + ortho_penalty(comps[j])
                                        for j in range(len(h.layers)))
        return PromptOutput(feats, loss)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Prompt parameters without weight decay: decay would move the frozen rows of earlier tasks."""
        prompts = [self.components, self.keys, self.attention]
        ids = {id(p) for p in prompts}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": [p for p in prompts if p.requires_grad], "weight_decay": 0.0}]
