"""DualPrompt (Wang et al., ECCV 2022).

A **G-prompt** shared by all tasks at shallow blocks and one **E-prompt** per task (with a key) at the
next blocks, both by prefix tuning (keys and values prepended inside attention; concatenated where both
apply). Training uses the true task's E-prompt; test picks ``t̂ = argmax_t cos(q, k_t)`` over every slot
of the E-pool (the official code; ``key_match="seen"`` restricts it to the tasks trained so far). The
classifier reads the final [CLS]. Loss: ``CE_masked + λ · mean_b (1 − cos(q, k_t))``.

As in the official code (``shared_prompt_pool``), each task's E-prompt starts as a copy of the previous
task's trained E-prompt (keys are not copied), and prompts and keys start ``U(0, 0.01)`` (Flax's
``uniform()``); the official configs also clip gradients at norm 1 (``--trainer.gradient_clip_val=1.0``).

Prompt lengths count keys + values (the CODA/OVOR convention: length 10 = 5 keys + 5 values), so the
official CIFAR-100 config (G length 5, E length 5 per keys/values) is ``g_length=10, e_length=10``; the
CODA-P port is ``6, 20`` and the OVOR port ``10, 40``. Defaults: the official CIFAR-100 config (G at
blocks [0, 1], E at [2, 3, 4], λ = 1, Adam lr 0.03 constant, E-prompt carry-over, init U(0, 0.01),
matching over the whole pool). The prompt-selection (task-id) accuracy
is logged at every evaluation (``eval/task_id_acc``), the main error source in class-incremental
learning. Inference: 2 ViT passes per image.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from clframe.errors import ConfigError
from clframe.strategies.prompt.base import PromptModule, PromptOutput
from clframe.strategies.prompt.pool import batch_vote, cosine_matrix, uniform_parameter
from clframe.strategies.prompt.vit import Prefix, PromptViT, cat_prefixes, split_prefix


def layer_prefixes(layers: list[int], prompts: Tensor) -> dict[int, Prefix]:
    """``prompts[..., j, :, :]`` (one prompt per layer, ``(batch or 1, n_layers, length, dim)``) as per-block prefixes."""
    return {layer: split_prefix(prompts[:, j]) for j, layer in enumerate(layers)}


def merge_prefixes(*maps: dict[int, Prefix]) -> dict[int, Prefix]:
    """Per-block prefixes of several prompt sets, concatenated (keys with keys, values with values) where they meet."""
    merged: dict[int, Prefix] = {}
    for m in maps:
        for layer, p in m.items():
            merged[layer] = cat_prefixes(merged.get(layer), p)
    return merged


class DualPrompt(PromptModule):
    """DualPrompt: G-prompt (shared) and E-prompts (one per task, with keys), prefix tuning.

    Args:
        g_layers, e_layers: blocks (0-based) of the G- and E-prompts.
        g_length, e_length: prompt lengths, keys + values (even).
        e_pool_size: number of E-prompts; by default the number of tasks of the stream.
        pull_weight: ``λ`` of the key pull term, averaged over the batch.
        init_scale: prompts and keys start ``U(0, init_scale)``: the official 0.01 (the PyTorch ports use 1.0).
        copy_previous_e_prompt: at each task start after the first, copy E-prompt ``t-1`` into slot ``t`` (the
            official ``shared_prompt_pool``); ``False`` starts every E-prompt from its initial values.
        key_match: at test, match the query against ``all`` slots of the E-pool (official) or only the
            ``seen`` tasks' keys (the final accuracy is the same; earlier rows of the matrix can differ).
        batchwise_prompt: at test, every sample of a batch uses the batch's majority E-prompt (the official
            CIFAR-100 config's voting, for parity; it leaks task identity, off by default).
        **kwargs: :class:`~clframe.strategies.prompt.base.PromptModule` arguments.
    """

    g_prompts: nn.Parameter
    e_prompts: nn.Parameter
    e_keys: nn.Parameter

    def __init__(self, g_layers: list[int] | None = None, e_layers: list[int] | None = None, g_length: int = 10,
                 e_length: int = 10, e_pool_size: int | None = None, pull_weight: float = 1.0, init_scale: float = 0.01,
                 copy_previous_e_prompt: bool = True, key_match: Literal["all", "seen"] = "all",
                 batchwise_prompt: bool = False, lr: float = 0.03, **kwargs: Any) -> None:
        g_layers = [0, 1] if g_layers is None else g_layers
        e_layers = [2, 3, 4] if e_layers is None else e_layers
        if (g_layers and g_length % 2) or e_length % 2 or e_length < 2 or (g_layers and g_length < 2):
            raise ConfigError(f"prefix lengths count keys + values and must be even and positive, got g_length={g_length}, "
                              f"e_length={e_length}")
        if not e_layers:
            raise ConfigError("DualPrompt needs at least one E-prompt layer (e_layers)")
        if key_match not in ("all", "seen"):
            raise ConfigError(f"key_match must be 'all' or 'seen', got {key_match!r}")
        self._stream_tasks: int | None = None
        super().__init__(lr=lr, **kwargs)
        self.hparams.update(g_layers=list(g_layers), e_layers=list(e_layers))

    def bind_stream(self, stream) -> None:
        self._stream_tasks = len(stream)
        super().bind_stream(stream)
        if self.e_prompts.shape[0] < len(stream):
            raise ConfigError(f"e_pool_size ({self.e_prompts.shape[0]}) is smaller than the number of tasks "
                              f"({len(stream)}): DualPrompt needs one E-prompt per task")

    def build_prompts(self, vit: PromptViT) -> None:
        h = self.hparams
        pool = h.e_pool_size or self._stream_tasks
        if pool is None:
            raise ConfigError("DualPrompt needs e_pool_size when it is built before it sees the stream")
        self.hparams["e_pool_size"] = pool  # resolved from the stream: checkpoints rebuild the same shapes
        self._hparams_initial["e_pool_size"] = pool
        dim, scale = vit.num_features, h.init_scale
        self.g_prompts = uniform_parameter(1, len(h.g_layers), h.g_length, dim, scale=scale)
        self.e_prompts = uniform_parameter(pool, len(h.e_layers), h.e_length, dim, scale=scale)
        self.e_keys = uniform_parameter(pool, dim, scale=scale)

    def on_task_start(self, task) -> None:
        """The official carry-over: the new task's E-prompt starts where the previous task's ended."""
        super().on_task_start(task)
        if self.hparams.copy_previous_e_prompt and task.id > 0:
            with torch.no_grad():
                self.e_prompts[task.id].copy_(self.e_prompts[task.id - 1])

    def select_task(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """``t̂ = argmax_t cos(q, k_t)`` over the pool (or the tasks trained so far), and the similarities."""
        sim = cosine_matrix(q, self.e_keys)
        slots = len(self.e_keys) if self.hparams.key_match == "all" else int(self.current_task) + 1
        pred = sim[:, :slots].detach().argmax(1)
        if self.hparams.batchwise_prompt:
            pred = batch_vote(pred.unsqueeze(1), slots, 1)[:, 0]
        return pred, sim

    def encode(self, x: Tensor, task_ids: Tensor | None = None, train: bool = False) -> PromptOutput:
        h, vit = self.hparams, self.backbone
        q = vit.query(x)
        pred, sim = self.select_task(q)
        if train:  # the true task's E-prompt
            task = task_ids if task_ids is not None else self.current_task.expand(len(x))
            pull = h.pull_weight * (1 - sim.gather(1, task.unsqueeze(1))).mean()
        else:
            task, pull = pred, self.zero()
        prefixes = merge_prefixes(layer_prefixes(h.g_layers, self.g_prompts) if h.g_layers else {},
                                  layer_prefixes(h.e_layers, self.e_prompts[task]))
        feats = vit.forward_tokens(x, prefixes=prefixes)[:, 0]
        return PromptOutput(feats, pull, pred)

    @torch.no_grad()
    def task_selection(self, x: Tensor) -> Tensor:
        """The E-prompt (task) each image would use at test."""
        return self.select_task(self.backbone.query(self.preprocess(x)))[0]
