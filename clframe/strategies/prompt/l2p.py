"""L2P, Learning to Prompt (Wang et al., CVPR 2022).

A shared pool of ``M`` prompts with learnable keys. The query ``q(x)`` (frozen [CLS], no prompts) picks
the ``N`` keys of highest cosine similarity; their prompts are prepended to the input tokens (prompt
tuning, once, after the embedding: the sequence grows by ``N · L_p``). The classifier reads the **mean
of the outputs at the prompt positions**, not [CLS]. Loss: ``CE_masked + c · mean_b Σ_{i∈K_x} (1 − cos(q, k_i))``,
the released code's ``CE − c · mean_b Σ cos`` up to a constant; keys get gradient only from this term.

Defaults: the released CIFAR-100 config (M = 10, L_p = 10, N = 4, c = 1, keys and prompts U(0, 0.01),
Adam lr 0.03 constant); the paper text's values (N = 5, L_p = 5, λ = 0.5) differ. Selection is per
sample; ``batchwise_prompt=True`` is the reference code's batch voting (it leaks task identity when an
evaluation batch comes from one task). Inference: 2 ViT passes per image.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from clframe.strategies.prompt.base import PromptModule, PromptOutput
from clframe.strategies.prompt.pool import PromptPool
from clframe.strategies.prompt.vit import PromptViT


class L2P(PromptModule):
    """L2P: prompt pool with key-query top-N matching, prompt tuning at the input.

    Args:
        pool_size: ``M`` prompts in the pool.
        prompt_length: ``L_p`` tokens per prompt.
        top_k: ``N`` prompts per sample.
        pull_weight: ``c``, the scale of the surrogate (key pull) loss, averaged over the batch.
        init_scale: prompts and keys start ``U(0, init_scale)`` (Flax's 0.01; PyTorch ports 1.0).
        batchwise_prompt: the reference code's batch voting, for parity (off by default).
        **kwargs: :class:`~clframe.strategies.prompt.base.PromptModule` arguments.
    """

    pool: PromptPool  # built with the network (build_prompts)

    def __init__(self, pool_size: int = 10, prompt_length: int = 10, top_k: int = 4, pull_weight: float = 1.0,
                 init_scale: float = 0.01, batchwise_prompt: bool = False, lr: float = 0.03, **kwargs: Any) -> None:
        super().__init__(lr=lr, **kwargs)

    def build_prompts(self, vit: PromptViT) -> None:
        h = self.hparams
        self.pool = PromptPool(h.pool_size, h.prompt_length, vit.num_features, h.top_k, h.init_scale)

    def encode(self, x: Tensor, task_ids: Tensor | None = None, train: bool = False) -> PromptOutput:
        h, vit = self.hparams, self.backbone
        q = vit.query(x)
        idx, sim = self.pool.select(q, batchwise=h.batchwise_prompt)
        tokens = vit.forward_tokens(x, prompts=self.pool.tokens(idx))
        start = vit.num_prefix_tokens
        feats = tokens[:, start:start + idx.shape[1] * h.prompt_length].mean(1)
        pull = (1 - sim.gather(1, idx)).sum(1).mean() * h.pull_weight if train else self.zero()
        return PromptOutput(feats, pull)
