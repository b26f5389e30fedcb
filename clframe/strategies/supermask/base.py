"""SupermaskModule: what SupSup, WSN and ExSSNeT share.

A masked backbone (and head) whose per-task binary masks are stored bit-packed when a task ends;
every finished task is then evaluated with its own stored mask, so the only way an old task can
change is through the weights under its mask. Strategies that train weights (WSN, ExSSNeT) name the
*editable* entries: their gradients are masked after ``backward`` and, because optimizer state or
decoupled weight decay can still move a zero-gradient entry, every other entry is restored from a
snapshot after each optimizer step (gradient zeroing alone is not enough: decoupled weight decay still moves them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clframe.data.stream import Task, TaskStream
from clframe.errors import ConfigError
from clframe.models.factory import check_kwargs
from clframe.strategies.base import ContinualModule
from clframe.strategies.supermask.layers import (
    MASKED_BACKBONES,
    MaskedLayer,
    MaskedLinear,
    MaskedSequential,
    MaskSource,
    binary_entropy,
    huffman_bits,
)


class SupermaskModule(ContinualModule):
    """Masked backbone + head, stored per-task masks, task-grouped forward, frozen-weight bookkeeping.

    Args:
        backbone: ``"mlp"`` (masked MLP; ``backbone_kwargs: {hidden_sizes: [300, 100]}``) or ``"conv"``
            (masked convs with per-task non-affine BatchNorm; ``channels``, ``hidden_sizes``).
        density: fraction of weights each task's mask keeps, per layer.
        n_tasks: number of tasks (mask slots); taken from the stream when unset.
        keep_best: at the end of each task, restore the parameters of the epoch with the best
            validation accuracy on that task (needs ``val_fraction > 0`` on the data module; the
            per-task BatchNorm statistics of the conv backbone stay those of the last epoch).
        Other arguments: see :class:`~clframe.strategies.base.ContinualModule`.
    """

    checkpointed_attributes = ("_best",)  # keep_best's snapshot: a resumed task restores the same epoch

    def __init__(self, backbone: str = "mlp", density: float = 0.5, n_tasks: int | None = None,
                 keep_best: bool = False, **kwargs: Any) -> None:
        super().__init__(backbone=backbone, **kwargs)
        self._editable: list[tuple[MaskedLayer, Tensor, Tensor]] = []  # (layer, editable, snapshot)
        self._best: tuple[float, list[Tensor]] | None = None  # (val accuracy, trainable tensors) of the best epoch

    # ------------------------------------------------------------------ construction
    def layer_kwargs(self) -> dict[str, Any]:
        """Arguments of every masked layer; strategies override the mask rule, init and score slots."""
        return {"density": self.hparams.density, "rule": "topk", "weight_init": "signed_constant", "score_slots": 1}

    def build_head(self, num_features: int, num_classes: int) -> nn.Module:
        """A masked head: each task's mask also selects its output weights."""
        return MaskedLinear(num_features, num_classes, n_tasks=self.hparams.n_tasks, **self.layer_kwargs())

    def build_network(self, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
        spec, n_tasks = self._backbone_spec, self.hparams.n_tasks
        if n_tasks is None:
            raise ValueError("a supermask strategy built before it sees the stream needs n_tasks (mask slots)")
        if not isinstance(spec, str) or spec not in MASKED_BACKBONES:
            raise ConfigError(f"supermask strategies build their own masked backbone: backbone must be one of "
                             f"{sorted(MASKED_BACKBONES)}, got {spec!r}")
        check_kwargs(f"masked backbone {spec!r}", MASKED_BACKBONES[spec], self.hparams.backbone_kwargs or {},
                     skip=("input_shape", "n_tasks"), closed=True)
        backbone = MASKED_BACKBONES[spec](input_shape, n_tasks=n_tasks, **(self.hparams.backbone_kwargs or {}),
                                          **self.layer_kwargs())
        return backbone, self.build_head(backbone.num_features, num_classes)

    def _build(self, num_classes: int, input_shape: tuple[int, ...], scenario: str) -> None:
        super()._build(num_classes, input_shape, scenario)
        self.register_buffer("learned", torch.zeros(self.hparams.n_tasks, dtype=torch.bool))

    def bind_stream(self, stream: TaskStream) -> None:
        """Resolve ``n_tasks`` from the stream (before the network is built) and keep it in the checkpoint."""
        if self.hparams.n_tasks is None:
            self.hparams.n_tasks = len(stream)
            self._hparams_initial["n_tasks"] = len(stream)
        elif self.hparams.n_tasks != len(stream):
            raise ValueError(f"the model has mask slots for {self.hparams.n_tasks} tasks but the stream has "
                             f"{len(stream)}; leave n_tasks unset to take it from the data")
        super().bind_stream(stream)

    # ------------------------------------------------------------------ masks
    def masked_layers(self) -> list[MaskedLayer]:
        assert isinstance(self.backbone, MaskedSequential)
        head = [self.head] if isinstance(self.head, MaskedLayer) else []
        return self.backbone.masked_layers() + head

    def learned_tasks(self) -> list[int]:
        """Tasks whose masks are stored, in order."""
        return self.learned.nonzero().flatten().tolist()

    def score_slot(self, task: int) -> int:
        """The score slot that learns ``task``'s mask (one shared slot unless a strategy keeps one per task)."""
        return 0

    def mask_source(self, task: int) -> MaskSource:
        """A finished task always runs with its stored mask; the task in training with its live scores."""
        if bool(self.learned[task]):
            return MaskSource("stored", task)
        return MaskSource("live", task, slot=self.score_slot(task))

    def union_mask(self, layer: MaskedLayer, tasks: Sequence[int] | None = None) -> Tensor:
        """``∪_τ M_τ`` over stored masks (all learned tasks by default): the weights earlier tasks use."""
        union = torch.zeros_like(layer.weight, dtype=torch.bool)
        for t in self.learned_tasks() if tasks is None else tasks:
            union |= layer.stored_mask(t)
        return union

    # ------------------------------------------------------------------ forward
    def run_head(self, features: Tensor, source: MaskSource) -> Tensor:
        return self.head(features, source)

    def network_forward(self, x: Tensor, source: MaskSource) -> Tensor:
        """Raw outputs (every head unit) of preprocessed inputs under one mask source."""
        return self.run_head(self.backbone(x, source), source)

    def task_outputs(self, x: Tensor, task_ids: Tensor) -> Tensor:
        """Raw outputs of uint8/float inputs, each sample with its own task's mask (grouped by task)."""
        x = self.preprocess(x)
        tasks = task_ids.unique()
        if len(tasks) <= 1:
            return self.network_forward(x, self.mask_source(int(tasks[0]) if len(tasks) else int(self.current_task)))
        out: Tensor | None = None
        for t in tasks.tolist():
            sel = task_ids == t
            part = self.network_forward(x[sel], self.mask_source(t))
            if out is None:
                out = part.new_empty(len(x), part.shape[1])
            out[sel] = part
        assert out is not None
        return out

    def infer_tasks(self, x: Tensor) -> Tensor:
        """Task ids for inputs whose task is unknown; only SupSup can infer them."""
        raise ValueError(f"{type(self).__name__} is task-incremental: it needs the task id of every sample")

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        if task_ids is None:
            task_ids = self.infer_tasks(x)
        return self.mask_logits(self.task_outputs(x, task_ids)[:, : len(self.class_task)], task_ids)

    # ------------------------------------------------------------------ task hooks
    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters task ``task`` trains (everything else gets ``requires_grad=False``)."""
        return [layer.scores[self.score_slot(task)] for layer in self.masked_layers()]

    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        self._best = None
        self.requires_grad_(False)
        for p in self.trainable_parameters(task.id):
            p.requires_grad_(True)

    def on_validation_epoch_end(self) -> None:
        """With ``keep_best``, snapshot everything the task trains when its validation accuracy improves."""
        super().on_validation_epoch_end()
        task = int(self.current_task)
        if not self.hparams.keep_best or self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        acc = self.eval_accuracy[task] if task < len(self.eval_accuracy) else float("nan")
        if acc == acc and (self._best is None or acc > self._best[0]):
            with torch.inference_mode(False):
                self._best = (acc, [p.detach().clone() for p in self.trainable_parameters(task)])

    def on_task_end(self, task: Task) -> None:
        """Restore the best epoch (``keep_best``), then store the task's masks; from now on it runs with them."""
        if self._best is not None:
            with torch.no_grad():
                for p, saved in zip(self.trainable_parameters(task.id), self._best[1], strict=True):
                    p.copy_(saved)
            self._best = None
        for layer in self.masked_layers():
            layer.store_mask(task.id, layer.live_mask(self.score_slot(task.id)))
        self.learned[task.id] = True

    # ------------------------------------------------------------------ frozen weights
    def editable_weights(self) -> list[tuple[MaskedLayer, Tensor]]:
        """``(layer, editable)`` for the masked weights the current step may change; none by default."""
        return []

    def refresh_editable(self) -> None:
        """Recompute the editable masks and snapshot the weights whose other entries must not move."""
        self._editable = [(layer, editable, layer.weight.detach().clone()) for layer, editable in self.editable_weights()]

    def on_train_start(self) -> None:
        self.refresh_editable()

    def on_after_backward(self) -> None:
        for layer, editable, _ in self._editable:
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(editable)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            for layer, editable, snapshot in self._editable:
                layer.weight.copy_(torch.where(editable, layer.weight, snapshot))

    # ------------------------------------------------------------------ storage
    def mask_storage(self) -> dict[str, float]:
        """Mask memory of the learned tasks, in bits per task, three ways.

        ``bits_per_task``: the bit-packed buffers (1 bit per maskable weight, what is stored);
        ``entropy_bits_per_task``: ``Σ_layers numel · H₂(density)``, the bound an entropy coder reaches;
        ``huffman_bits_per_task``: WSN's scheme, each weight's T task bits as one symbol, Huffman-coded,
        divided by T. ``capacity``: fraction of weights used by at least one task.
        """
        tasks = self.learned_tasks()
        layers = self.masked_layers()
        n_weights = sum(layer.weight.numel() for layer in layers)
        report = {"weights": float(n_weights), "tasks": float(len(tasks)),
                  "bits_per_task": float(sum(layer.packed_masks.shape[1] * 8 for layer in layers))}
        if not tasks:
            return report
        entropy, kept, used, symbols = 0.0, 0, 0, []
        for layer in layers:
            masks = torch.stack([layer.stored_mask(t).flatten() for t in tasks])  # (T, numel)
            for row in masks:
                density = float(row.float().mean())
                entropy += row.numel() * binary_entropy(density)
            kept += int(masks.sum())
            used += int(masks.any(0).sum())
            if len(tasks) <= 62:
                weights = 2 ** torch.arange(len(tasks), dtype=torch.int64).unsqueeze(1)
                symbols.append((masks.long() * weights).sum(0))
        report.update(entropy_bits_per_task=entropy / len(tasks), density=kept / (n_weights * len(tasks)),
                      capacity=used / n_weights)
        if symbols:
            counts = torch.cat(symbols).unique(return_counts=True)[1].tolist()
            report["huffman_bits_per_task"] = huffman_bits(counts) / len(tasks)
        return report

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log_dict({f"mask/{k}": v for k, v in self.mask_storage().items()}, sync_dist=False)
