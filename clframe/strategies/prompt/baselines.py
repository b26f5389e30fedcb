"""Frozen-feature baselines for the prompt methods: the same frozen ViT, no prompts.

- :class:`LinearProbe`: the frozen backbone's [CLS] feature (final LayerNorm, no prompts) and a trained
  linear head. Training is the prompt methods' own: ``CE`` on logits with the old classes masked
  (``mask_past_classes``), fresh optimiser per task, argmax over all seen classes at test. It is what
  the prompt methods reduce to with empty prompts, so "prompts beat the linear probe" measures what the
  prompts add.
- :class:`NearestClassMean`: class means of the seen classes' frozen training features; a test image goes to
  the nearest mean (cosine similarity or Euclidean distance). No gradient steps: the one training epoch of
  each task (set ``trainer.epochs_per_task: 1``) only sums features per class (its ``training_step`` returns
  ``None``, which Lightning treats as "skip the optimiser step"), and the means are fixed at task end.

Both run **one** ViT forward pass per image at inference (no query pass).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from clframe.data.stream import Batch, Task
from clframe.errors import ConfigError
from clframe.strategies.prompt.base import PromptModule, PromptOutput
from clframe.strategies.prompt.vit import PromptViT


class LinearProbe(PromptModule):
    """Linear head on the frozen ViT's [CLS] feature (past-class logits masked in training).

    Args:
        lr, lr_schedule, optimizer, augment, ...: :class:`~clframe.strategies.prompt.base.PromptModule` arguments.
    """

    query_passes = 0

    def __init__(self, lr: float = 1e-3, lr_schedule: Literal["constant", "cosine"] = "cosine", **kwargs: Any) -> None:
        super().__init__(lr=lr, lr_schedule=lr_schedule, **kwargs)

    def build_prompts(self, vit: PromptViT) -> None:
        """No prompts."""

    def encode(self, x: Tensor, task_ids: Tensor | None = None, train: bool = False) -> PromptOutput:
        return PromptOutput(self.backbone.query(x), self.zero())  # frozen [CLS], no graph through the ViT


class NearestClassMean(PromptModule):
    """Nearest class mean on the frozen ViT's [CLS] feature; no training steps.

    Args:
        metric: ``cosine`` (means of L2-normalised features, cosine similarity) or ``euclidean`` (means of the
            raw features, negative squared distance).
        **kwargs: :class:`~clframe.strategies.prompt.base.PromptModule` arguments (the optimiser ones are unused).

    Logits are ``cos(f, mu_c)`` or ``-||f - mu_c||^2``; classes without a mean yet (future classes) are masked
    like in every strategy. The means are buffers (``class_sums``, ``class_counts``), so they are saved in
    checkpoints and summed over the ranks under DDP.
    """

    query_passes = 0

    def __init__(self, metric: Literal["cosine", "euclidean"] = "cosine", **kwargs: Any) -> None:
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        kwargs.setdefault("augment", "none")
        super().__init__(**kwargs)

    def build_prompts(self, vit: PromptViT) -> None:
        """No prompts; the class-mean statistics (the head is built by the base class and stays unused)."""
        shape = (int(self.hparams.num_classes), vit.num_features)
        self.register_buffer("class_sums", torch.zeros(shape))
        self.register_buffer("class_counts", torch.zeros(shape[0]))
        self.register_buffer("class_means", torch.zeros(shape))

    def build_network(self, num_classes: int, input_shape: tuple[int, ...]):
        self.hparams["num_classes"] = num_classes  # the buffers need the class count before _build records it
        backbone, head = super().build_network(num_classes, input_shape)
        head.requires_grad_(False)  # unused: no trainable parameters at all
        return backbone, head

    def parameter_report(self) -> dict[str, int]:
        report = super().parameter_report()
        report.update(prompt=0, head=0, trainable=0, class_means_stored=int(self.class_means.numel()))
        return report

    def _raw(self, x: Tensor) -> Tensor:
        feats = self.backbone.query(x)
        return F.normalize(feats, dim=1) if self.hparams.metric == "cosine" else feats

    def encode(self, x: Tensor, task_ids: Tensor | None = None, train: bool = False) -> PromptOutput:
        return PromptOutput(self._raw(x), self.zero())

    def class_logits(self, feats: Tensor) -> Tensor:
        means = self.class_means
        if self.hparams.metric == "cosine":
            return feats @ F.normalize(means, dim=1).T
        return -torch.cdist(feats, means).pow(2)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        feats = self.encode(self.preprocess(x), task_ids).features
        return self.mask_logits(self.class_logits(feats), task_ids)

    def _eval_step(self, batch: Batch) -> None:
        x, y, t = batch
        self.record_predictions(self(x, t).argmax(1), y, t)

    # ------------------------------------------------------------------ "training": one pass of feature sums
    def configure_optimizers(self) -> None:
        """Nothing to optimise (Lightning runs the epoch with its no-op optimiser)."""
        return None

    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        cls = self.current_classes()
        self.class_sums[cls] = 0.0  # a restarted task counts its data once
        self.class_counts[cls] = 0.0

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        x, y, _ = batch
        with torch.no_grad():
            feats = self._raw(self.preprocess(x))
            self.class_sums.index_add_(0, y, feats)
            self.class_counts.index_add_(0, y, torch.ones_like(y, dtype=self.class_counts.dtype))
        return None  # Lightning skips the optimiser step

    def on_task_end(self, task: Task) -> None:
        super().on_task_end(task)
        sums, counts = self.class_sums, self.class_counts
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums.clone(), reduce_op="sum")
            counts = trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        seen = counts > 0
        self.class_means.zero_()
        self.class_means[seen] = sums[seen] / counts[seen].unsqueeze(1)
