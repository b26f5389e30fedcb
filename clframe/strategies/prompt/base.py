"""PromptModule: the common ground of the prompt methods on a frozen ViT.

- The backbone is a frozen timm ViT (:class:`~clframe.strategies.prompt.vit.PromptViT`): by name with
  ``pretrained=True`` (timm's weights, needs network access or timm's cache), or with a local
  ``checkpoint_path``. Patch/position embeddings, [CLS], blocks and final LayerNorm never train; the
  optimiser holds the prompt parameters (prompts, keys, attention vectors) and the linear head only.
- Training loss: ``CE(masked logits, y) + method term``. In class-incremental training only the current
  task's classes keep finite logits (``mask_past_classes``; ContinualModule already hides future
  classes, this also hides the old ones). At test, the argmax runs over all classes seen so far
  (ContinualModule's ``forward``): masking test logits to the current task would turn CIL into TIL.
- Optional VOR (:mod:`clframe.strategies.prompt.ovor`) on top of any method: ``vor={...}``.

A method subclasses :class:`PromptModule` and implements ``build_prompts(vit)`` (create its parameters)
and ``encode(x, task_ids, train)`` (the prompted features, the method's extra loss and, when the method
predicts a task, that prediction).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from clframe.data.augment import crop_flip
from clframe.data.stream import Batch, Task, passthrough_collate
from clframe.data.view_batch import task_epoch_offset
from clframe.errors import ConfigError
from clframe.optim import OptimizerArg, TaskCosineLR
from clframe.strategies.base import ContinualModule
from clframe.strategies.prompt.ovor import VORConfig, synthesize_outliers, vor_loss
from clframe.strategies.prompt.vit import PromptViT

Phase = Literal["prompt", "head", "vor"]


class PromptOutput(NamedTuple):
    """What a prompt method's ``encode`` returns."""

    features: Tensor
    """The classifier input ``(batch, dim)``."""
    aux_loss: Tensor
    """The method's extra loss term (already weighted; 0 when it has none)."""
    task_pred: Tensor | None = None
    """The task each sample's prompt was selected for (DualPrompt), for the task-id accuracy."""


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class PromptModule(ContinualModule):
    """Base of the prompt strategies on a frozen timm ViT (see the module docstring).

    Args:
        backbone: a timm VisionTransformer name (``vit_base_patch16_224``; ``timm:`` prefix accepted) or a
            :class:`PromptViT`.
        pretrained: load timm's pretrained weights for ``backbone`` (ignored when ``checkpoint_path`` is given).
        checkpoint_path: local weights for the ViT (a timm state dict, ``.safetensors``, ``.npz``, or a clframe
            model's state dict); the backbone is built from ``backbone`` and ``backbone_kwargs`` first.
        backbone_kwargs: timm ``create_model`` arguments (``img_size``, ``patch_size``, ``depth``, ``embed_dim``,
            ``num_heads``, ...).
        backbone_mean, backbone_std: normalisation the ViT applies to its (resized) input; leave unset to feed
            the data module's output as it is (use ``data.normalize: false`` for pixels in [0, 1]).
        mask_past_classes: in class-incremental training, old classes' logits are -inf.
        lr_schedule: ``constant`` (L2P, DualPrompt) or ``cosine`` over each task (CODA-P, OVOR), rebuilt per task
            (short for ``lr_scheduler: clframe.optim.TaskCosineLR``; an explicit ``lr_scheduler`` wins).
        augment: ``crop_flip`` (pad 4, random crop, horizontal flip, on the device) or ``none``.
        vor: switch on Virtual Outlier Regularisation (:class:`~clframe.strategies.prompt.ovor.VORConfig`).
        optimizer, lr, ...: as in :class:`~clframe.strategies.base.ContinualModule`.
    """

    query_passes: int = 1
    """Prompt-free forward passes per image for the query (OnePrompt: 0)."""

    checkpointed_attributes = ("_phase", "_vor_outliers", "_vor_per_batch", "_vor_cursor")
    """VOR's phase and outliers are chosen at an epoch's start; a run resumed inside that epoch restores them."""

    def __init__(
        self,
        backbone: str | nn.Module = "vit_base_patch16_224",
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_mean: list[float] | None = None,
        backbone_std: list[float] | None = None,
        mask_past_classes: bool = True,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        augment: Literal["none", "crop_flip"] = "none",
        vor: VORConfig | None = None,
        optimizer: OptimizerArg = "adam",
        lr: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if augment not in ("none", "crop_flip"):
            raise ConfigError(f"augment must be 'none' or 'crop_flip', got {augment!r}")
        if isinstance(vor, Mapping):
            vor = VORConfig(**vor)
        self.vor_config: VORConfig | None = vor
        super().__init__(backbone=backbone, backbone_kwargs=backbone_kwargs, optimizer=optimizer, lr=lr, **kwargs)
        if lr_schedule == "cosine" and self._scheduler_factory is None:  # sugar for lr_scheduler: TaskCosineLR
            self.set_optimizer(lr_scheduler=TaskCosineLR)
        if vor is not None:  # plain values in the hyperparameters (checkpoints, YAML dumps)
            self.hparams["vor"] = asdict(vor)
        self._phase: Phase = "prompt"
        self._task: Task | None = None
        self._vor_outliers: Tensor | None = None
        self._vor_per_batch = 1
        self._vor_cursor = 0
        self._select_counts: Tensor | None = None
        self.task_id_accuracy: list[float] = []

    # ------------------------------------------------------------------ construction
    def build_prompts(self, vit: PromptViT) -> None:
        """Create the method's prompt parameters (keys, pools, ...) for ``vit``."""
        raise NotImplementedError

    def build_network(self, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
        if len(input_shape) != 3:
            raise ConfigError(f"the prompt methods need images (channels, height, width), got input shape {input_shape}")
        spec, h = self._backbone_spec, self.hparams
        if isinstance(spec, PromptViT):
            vit = spec
        elif isinstance(spec, str):
            vit = PromptViT(spec, in_chans=input_shape[0], pretrained=h.pretrained, checkpoint_path=h.checkpoint_path,
                            mean=h.backbone_mean, std=h.backbone_std, **(h.backbone_kwargs or {}))
        else:
            raise ConfigError("the prompt methods need a timm ViT name or a PromptViT as backbone, got "
                              f"{type(spec).__name__}")
        vit.requires_grad_(False)
        self.build_prompts(vit)
        return vit, nn.Linear(vit.num_features, num_classes)

    # ------------------------------------------------------------------ reporting
    @property
    def forward_passes_per_image(self) -> int:
        """Inference cost in ViT forward passes per image: the prompted pass plus the query pass(es)."""
        return 1 + self.query_passes

    def parameter_report(self) -> dict[str, int]:
        """Trainable parameters: the prompt parameters (prompts, keys, attention vectors), the head, the total;
        and the frozen backbone's size for comparison."""
        head = count_parameters(self.head) if self.head is not None else 0
        total = sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone."))
        frozen = count_parameters(self.backbone, trainable_only=False) if self.backbone is not None else 0
        return {"prompt": total - head, "head": head, "trainable": total, "backbone_frozen": frozen}

    # ------------------------------------------------------------------ forward
    def encode(self, x: Tensor, task_ids: Tensor | None = None, train: bool = False) -> PromptOutput:
        """The prompted features of preprocessed images; ``train`` selects the training-time behaviour."""
        raise NotImplementedError

    def zero(self) -> Tensor:
        return self.head.weight.new_zeros(())

    def features(self, x: Tensor) -> Tensor:
        return self.encode(self.preprocess(x), None, train=self.training).features

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        out = self.encode(self.preprocess(x), task_ids, train=self.training)
        return self.mask_logits(self.head(out.features), task_ids)

    def train_logit_mask(self, task_ids: Tensor | None) -> Tensor | None:
        """Training-time mask: the current task's classes only in class-incremental streams."""
        if self.scenario == "class" and self.hparams.mask_past_classes:
            return (self.class_task == self.current_task).unsqueeze(0)
        return self.logit_mask(task_ids)

    def mask_train_logits(self, logits: Tensor, task_ids: Tensor | None) -> Tensor:
        mask = self.train_logit_mask(task_ids)
        return logits if mask is None else logits.masked_fill(~mask, torch.finfo(logits.dtype).min)

    def current_classes(self) -> Tensor:
        """Boolean column mask of the current task's classes."""
        return self.class_task == self.current_task

    def _augment(self, x: Tensor) -> Tensor:
        return crop_flip(x) if self.hparams.augment == "crop_flip" and x.dim() == 4 else x

    # ------------------------------------------------------------------ training
    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        self._task = task
        self.backbone.requires_grad_(False)

    def training_loss(self, batch: Batch) -> Tensor:
        x, y, t = batch
        x = self.preprocess(self._augment(x))
        if self._phase == "prompt":
            out = self.encode(x, t, train=True)
            ce = F.cross_entropy(self.mask_train_logits(self.head(out.features), t), y)
            self.log("train/ce", ce, on_step=True, on_epoch=False)
            if out.aux_loss.requires_grad:
                self.log("train/prompt_loss", out.aux_loss, on_step=True, on_epoch=False)
            return ce + out.aux_loss
        with torch.no_grad():  # phases 0 and 2 (VOR): the head alone, on detached features
            feats = self.encode(x, t, train=True).features
        logits = self.head(feats)
        loss = F.cross_entropy(self.mask_train_logits(logits, t), y)
        if self._phase == "vor":
            loss = loss + self._vor_term(logits)
        return loss

    def _vor_term(self, id_logits: Tensor) -> Tensor:
        cfg, outliers = self.vor_config, self._vor_outliers
        n = len(outliers)
        idx = (torch.arange(self._vor_per_batch, device=outliers.device) + self._vor_cursor) % n
        self._vor_cursor = (self._vor_cursor + self._vor_per_batch) % n
        classes = self.current_classes()
        term, e_id, e_ood = vor_loss(id_logits, self.head(outliers[idx]), classes, cfg.tau_id, cfg.tau_ood, cfg.huber_delta)
        self.log_dict({"train/vor_loss": term, "train/vor_energy_id": e_id.mean(), "train/vor_energy_ood": e_ood.mean()},
                      on_step=True, on_epoch=False)
        return cfg.weight * term

    def on_train_epoch_start(self) -> None:
        """Pick the phase of this epoch of the task (VOR only): head warm-up, prompts, or VOR."""
        self._phase = "prompt"
        cfg = self.vor_config
        if cfg is None:
            return
        trainer = self.trainer
        per_task = getattr(trainer, "epochs_per_task", None)
        if per_task is None or getattr(trainer, "steps_per_task", None) is not None:
            raise ConfigError("VOR's phases are counted in epochs: use ContinualTrainer with epochs_per_task "
                              "(not steps_per_task)")
        if per_task <= cfg.epochs + cfg.warmup_epochs:
            raise ConfigError(f"trainer.epochs_per_task ({per_task}) must exceed vor.epochs ({cfg.epochs}) + "
                              f"vor.warmup_epochs ({cfg.warmup_epochs}): the prompts need at least one epoch")
        epoch = trainer.current_epoch - task_epoch_offset(trainer)
        if epoch < cfg.warmup_epochs and int(self.current_task) > 0:
            self._phase = "head"
        elif epoch >= per_task - cfg.epochs:
            self._phase = "vor"
            self._prepare_outliers(epoch)

    @torch.no_grad()
    def task_features(self, task: Task) -> Tensor:
        """Prompted features of all of ``task``'s training images (augmented like training batches)."""
        loader = DataLoader(task.train, batch_size=self.vor_config.feature_batch_size, collate_fn=passthrough_collate)
        feats = []
        for x, _, t in loader:
            x = self.preprocess(self._augment(x.to(self.device)))
            feats.append(self.encode(x, t.to(self.device), train=True).features)
        return torch.cat(feats)

    def _prepare_outliers(self, epoch: int) -> None:
        cfg, task = self.vor_config, self._task
        if task is None:
            raise RuntimeError("VOR needs the current task: on_task_start was not called")
        feats = self.task_features(task)
        seed = int(self.trainer.datamodule.seed if getattr(self.trainer, "datamodule", None) is not None else 0)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + task.id * 1009 + epoch)
        n_classes = int(self.current_classes().sum())
        outliers = synthesize_outliers(feats, n_classes, cfg, gen).to(feats.dtype)  # drawn in float32; the head's dtype
        self._vor_outliers = outliers[torch.randperm(len(outliers), generator=gen).to(outliers.device)]
        batches = self.trainer.num_training_batches
        batches = int(batches) if math.isfinite(batches) and batches > 0 else 1
        if len(outliers) < batches:
            warnings.warn(f"VOR: {len(outliers)} outliers for {batches} batches per epoch; each batch gets 1 outlier "
                          "(raise vor.num_per_class)", stacklevel=2)
        self._vor_per_batch = max(1, len(outliers) // batches)
        self._vor_cursor = 0

    def on_train_end(self) -> None:
        self._phase = "prompt"
        self._vor_outliers = None

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimiser: every trainable parameter (prompts, keys, head)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


    # ------------------------------------------------------------------ evaluation
    def _eval_start(self) -> None:
        super()._eval_start()
        self._select_counts = torch.zeros(2, self._task_accuracy.num_tasks, device=self.device)

    def _eval_step(self, batch: Batch) -> None:
        x, y, t = batch
        out = self.encode(self.preprocess(x), t, train=False)
        logits = self.mask_logits(self.head(out.features), t)
        self.record_predictions(logits.argmax(1), y, t)
        if out.task_pred is not None:
            hit = (out.task_pred == t).to(self._select_counts.dtype)
            self._select_counts.index_add_(1, t, torch.stack([hit, torch.ones_like(hit)]))

    def _eval_end(self) -> list[float]:
        acc = super()._eval_end()
        counts = self.trainer.strategy.reduce(self._select_counts, reduce_op="sum")
        if counts[1].sum() > 0:
            overall = float(counts[0].sum() / counts[1].sum())
            self.task_id_accuracy.append(overall)
            metrics = {"eval/task_id_acc": overall}
            metrics.update({f"eval/task_id_acc_task_{j}": float(c / n) for j, (c, n) in enumerate(zip(*counts.tolist(), strict=True))
                            if n > 0})
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step)
        return acc

    def train(self, mode: bool = True) -> PromptModule:
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # frozen: no dropout, no stochastic depth
        return self
