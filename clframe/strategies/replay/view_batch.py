"""The view-batch model on the strategy side (Kang et al., CVPR 2025): views, their augmentation, the
view-batch self-supervised (KL) term, and view-batches of the replay buffer.

Any replay strategy switches it on with ``view_batch=ViewBatchConfig(...)`` (YAML:
``model.init_args.view_batch: {ssl: true, noise: 0.2}``) together with the data module's
``views_per_sample=R`` (the sampler in :mod:`clframe.data.view_batch`). :class:`ReplayModule` calls
the small :class:`ViewBatch` helper at four points and nothing else changes, so ER, DER and DER++
(and subclasses) get it without a class per combination:

1. ``views_of(batch)``: the sampler's batch (R consecutive copies of each sample, uint8) becomes the
   views: every row gets its own random *weak* augmentation, the non-anchor rows (view index 1..R-1)
   optionally progressive noise and/or a *strong* augmentation. Augmentation runs here, batched on the
   module's device, because the data sets serve whole uint8 batches (``TaskDataset.__getitems__``)
   and normalisation happens on the device (``preprocess``); a per-sample dataset transform would
   not know which copy is the anchor. Views leave as floats in [0, 1], which ``preprocess`` normalises.
2. ``replay_batch``: ``m / R`` distinct buffer samples, each repeated R times and augmented the same way,
   so the replayed rows of a step are view groups too (our extension to ER/DER-style buffers).
3. ``capture(head)`` + ``ssl_term``: every head output of the step is recorded; since all inputs of a
   view-batch step are whole groups of R views in a row, row ``k R`` is the anchor of rows
   ``k R + 1 .. k R + R - 1``. The layout is the sampler's, passed explicitly (``views``), never
   inferred from labels.
4. ``anchors``: only the anchor row of each group enters the buffer (the R copies are one sample), with
   the extras (DER's logits) of the anchor view.

The SSL term (``docs/methods/view_batch.md``): with ``p = softmax`` over the seen classes,
``L_vb = mean over views of KL(stopgrad(p_anchor) || p_view)``; ``kl_reduction="mean"`` also divides by
the number of seen classes (PyTorch's element-wise mean, the reference code), ``"batchmean"`` does not.
It is added as ``alpha * L_vb`` from task epoch ``warmup_epochs`` on (the reference: 6).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.data.augment import crop_flip
from clframe.data.stream import Batch
from clframe.data.view_batch import task_epoch_offset
from clframe.errors import ConfigError

if TYPE_CHECKING:
    from clframe.strategies.base import ContinualModule

StrongAug = Literal["none", "affine", "autoaugment", "randaugment"]
WeakAug = Literal["none", "crop_flip"]


@dataclass
class ViewBatchConfig:
    """Switches of the view-batch model on the strategy side (independent flags).

    Attributes:
        views: views per sample R; ``None`` takes the data module's ``views_per_sample`` (they must agree).
        ssl: add the view-batch self-supervised KL term.
        alpha: its weight.
        warmup_epochs: the term starts at this epoch of every task (0-indexed; the reference uses 6).
        kl_reduction: ``mean`` (divide by the seen classes too, as the reference) or ``batchmean``.
        noise: progressive uniform noise on non-anchor views, ``x + U[0, 1) * noise * k / (R - 1)`` on
            the [0, 1] scale (the reference's ``prog-aug 1`` uses 0.2); 0 turns it off.
        strong_aug: strong augmentation of non-anchor views: ``affine`` (batched random rotation,
            translation and scale, for digits), ``autoaugment`` (CIFAR-10 policy) or ``randaugment``.
        weak_aug: augmentation of *every* row, anchors included (``crop_flip``: pad 4, random crop,
            horizontal flip, the CIFAR protocol); also applied with R = 1 so baselines match.
        buffer_views: make buffer batches view-batches too (``m / R`` samples x R views).
    """

    views: int | None = None
    ssl: bool = False
    alpha: float = 1.0
    warmup_epochs: int = 0
    kl_reduction: Literal["mean", "batchmean"] = "mean"
    noise: float = 0.0
    strong_aug: StrongAug = "none"
    weak_aug: WeakAug = "none"
    buffer_views: bool = True


# Presets for the rows of the official README ablation table (docs/methods/view_batch.md): the data
# module's views_per_sample and the strategy's view_batch options. The reference's "VB replay" row
# (prog-aug 1) also switches on the SSL term and noise; ``vb_replay_only`` is the clean ablation.
PRESETS: dict[str, tuple[int, dict]] = {
    "baseline": (1, {}),
    "strong_aug": (1, {"strong_aug": "autoaugment"}),
    "vb_replay_reference": (4, {"noise": 0.2, "ssl": True, "warmup_epochs": 6}),
    "vb_replay_only": (4, {"noise": 0.2}),
    "vb_replay_strong_aug": (4, {"strong_aug": "autoaugment"}),
    "full": (4, {"strong_aug": "autoaugment", "ssl": True, "warmup_epochs": 6}),
}


# ---------------------------------------------------------------------- batched augmentations
def random_affine(x: Tensor, degrees: float = 15.0, translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1)) -> Tensor:
    """Per-row random rotation, translation and scale of a float image batch (one ``grid_sample``)."""
    b = len(x)
    angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(degrees)
    s = torch.empty(b, device=x.device).uniform_(*scale)
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * translate * 2  # grid units span [-1, 1]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _policy_aug(kind: str) -> nn.Module:
    from torchvision.transforms import v2

    if kind == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return v2.RandAugment(num_ops=2, magnitude=7)


class ViewBatch:
    """The strategy-side view-batch helper held by :class:`ReplayModule` (no parameters, no state)."""

    def __init__(self, config: ViewBatchConfig) -> None:
        if config.views is not None and config.views < 1:
            raise ConfigError(f"view_batch.views must be at least 1, got {config.views}")
        if config.alpha < 0 or config.noise < 0 or config.warmup_epochs < 0:
            raise ConfigError("view_batch.alpha, noise and warmup_epochs must be non-negative")
        if config.kl_reduction not in ("mean", "batchmean"):
            raise ConfigError(f"view_batch.kl_reduction must be 'mean' or 'batchmean', got {config.kl_reduction!r}")
        self.config = config
        self._policy = _policy_aug(config.strong_aug) if config.strong_aug in ("autoaugment", "randaugment") else None
        self.last_ssl: Tensor | None = None

    # ------------------------------------------------------------------ layout
    def views(self, module: ContinualModule) -> int:
        """R, from the config or the data module's sampler; the two must agree."""
        trainer = module._trainer
        data = getattr(trainer, "datamodule", None) if trainer is not None else None
        sampler_views = getattr(getattr(data, "hparams", None), "views_per_sample", None)
        r = self.config.views or sampler_views or 1
        if sampler_views is not None and int(sampler_views) != r:
            raise ConfigError(
                f"model view_batch.views={r} but data views_per_sample={sampler_views}: the strategy would read the "
                "batch with the wrong view layout. Leave view_batch.views unset to take R from the data module."
            )
        return int(r)

    # ------------------------------------------------------------------ augmentation
    def augment(self, x: Tensor, views: int) -> Tensor:
        """The views of a batch of R-copy groups: weak augmentation everywhere, noise / strong on non-anchors."""
        cfg = self.config
        image = x.dim() == 4
        if image and cfg.weak_aug == "crop_flip":
            x = crop_flip(x)
        view_id = (torch.arange(len(x), device=x.device) % views) if views > 1 else None
        if image and view_id is not None and self._policy is not None and x.dtype == torch.uint8:
            rows = (view_id > 0).nonzero().flatten()
            if len(rows):
                x = x.clone()
                x[rows] = torch.stack([self._policy(x[i]) for i in rows.tolist()])
        x = x.float().div(255.0) if not x.is_floating_point() else x.float()
        if image and view_id is not None and cfg.strong_aug == "affine":
            rows = (view_id > 0).nonzero().flatten()
            x = x.index_copy(0, rows, random_affine(x[rows]))
        if view_id is not None and cfg.noise > 0:
            beta = cfg.noise * view_id.to(x.dtype) / (views - 1)
            x = x + torch.rand_like(x) * beta.view(-1, *([1] * (x.dim() - 1)))
        return x

    def views_of(self, module: ContinualModule, batch: Batch) -> Batch:
        """The training batch the strategy sees: the sampler's copies turned into augmented views."""
        x, y, t = batch
        return self.augment(x, self.views(module)), y, t

    def replay_size(self, module: ContinualModule, rows: int) -> int:
        """Distinct buffer samples for a replay batch of ``rows`` rows."""
        r = self.views(module) if self.config.buffer_views else 1
        return max(1, rows // r)

    def replay_views(self, module: ContinualModule, replay: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each drawn buffer sample repeated R times in a row, then augmented like the training batch."""
        r = self.views(module) if self.config.buffer_views else 1
        out = {k: v.repeat_interleave(r, dim=0) for k, v in replay.items()} if r > 1 else dict(replay)
        out["x"] = self.augment(out["x"], r)
        return out

    def anchors(self, module: ContinualModule, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Only the anchor row of each group (the R copies are one sample) goes into the buffer."""
        r = self.views(module)
        return {k: v[::r] for k, v in values.items()} if r > 1 else values

    # ------------------------------------------------------------------ SSL term
    @contextmanager
    def capture(self, head: nn.Module) -> Iterator[list[Tensor]]:
        """Record every output of ``head`` while the block runs (the strategy's own forward passes)."""
        outputs: list[Tensor] = []
        handle = head.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        try:
            yield outputs
        finally:
            handle.remove()

    def ssl_active(self, module: ContinualModule) -> bool:
        cfg = self.config
        if not cfg.ssl or cfg.alpha == 0 or self.views(module) < 2:
            return False
        trainer = module._trainer
        epoch = trainer.current_epoch - task_epoch_offset(trainer) if trainer is not None else 0
        return epoch >= cfg.warmup_epochs

    def ssl_term(self, module: ContinualModule, outputs: list[Tensor]) -> Tensor | None:
        """``alpha * L_vb`` over the recorded head outputs, or ``None`` when inactive."""
        if not outputs or not self.ssl_active(module):
            return None
        r = self.views(module)
        seen = seen_classes(module)
        kl = [view_kl(o[:, seen] if seen is not None else o, r, self.config.kl_reduction, total=True)
              for o in outputs if len(o) >= r and len(o) % r == 0]
        if not kl:
            return None
        n_views = sum(len(o) // r * (r - 1) for o in outputs if len(o) >= r and len(o) % r == 0)
        loss = torch.stack(kl).sum() / n_views
        self.last_ssl = loss.detach()
        return self.config.alpha * loss

    def add_ssl_term(self, module: ContinualModule, outputs: list[Tensor], loss: Tensor) -> Tensor:
        """``loss`` plus :meth:`ssl_term` when active (logged as ``train/view_ssl`` where step metrics are wanted)."""
        ssl = self.ssl_term(module, outputs)
        if ssl is None:
            return loss
        if module.step_metrics_wanted():
            module.log("train/view_ssl", self.last_ssl, on_step=True, on_epoch=False)
        return loss + ssl


def seen_classes(module: ContinualModule) -> Tensor | None:
    """Columns of the classes seen so far (class- and task-incremental streams); ``None``: all (domain)."""
    if getattr(module, "scenario", None) == "domain":
        return None
    class_task = module.class_task
    seen = ((class_task >= 0) & (class_task <= module.current_task)).nonzero().flatten()
    return seen if len(seen) > 1 else None  # not bound to a stream yet: every class


def view_kl(logits: Tensor, views: int, reduction: Literal["mean", "batchmean"] = "mean", total: bool = False) -> Tensor:
    """``KL(stopgrad(p_anchor) || p_view)`` averaged over the non-anchor views of R-row groups.

    ``reduction="mean"`` also averages over classes (PyTorch's element-wise ``kl_div`` mean, as the
    reference); ``"batchmean"`` sums over classes. ``total=True`` returns the sum over views instead
    of the mean (to pool several head outputs).
    """
    if views < 2:
        return logits.new_zeros(())
    groups = logits.float().view(-1, views, logits.shape[-1])
    log_p = F.log_softmax(groups, dim=-1)
    anchor = log_p[:, :1].detach()
    kl = (anchor.exp() * (anchor - log_p[:, 1:])).sum(-1)  # (groups, views - 1)
    if reduction == "mean":
        kl = kl / logits.shape[-1]
    return kl.sum() if total else kl.mean()
