"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017).

Three parts, as in the paper and in Mammoth's ``icarl``:

* **Exemplar memory.** A fixed total of ``buffer_size`` samples split evenly over the classes seen
  so far. At the end of each task the old classes' sets are cut to the new per-class share (by
  herding rank, so each set stays the best prefix) and the new classes get their share by
  *herding*: greedily pick the sample that brings the running exemplar mean closest to the
  class mean of the (L2-normalised) features.
* **Training.** Sigmoid binary cross-entropy over the outputs of every class seen so far: one-hot
  targets for the current task's classes, the previous network's sigmoid outputs for the older
  ones (distillation). The exemplars are merged into the task's training data: each appears once
  per epoch, in a random batch, as when Mammoth concatenates them to the training set (or, with
  ``replay_batch_size``, a fixed number is drawn every step instead).
* **Classification.** Nearest mean of exemplars (NME): class means of the L2-normalised exemplar
  features, computed with the network of the end of the task; a sample goes to the class whose
  (normalised) mean is closest to its normalised feature.
* **View-batch model** (``view_batch=...`` with the data module's ``views_per_sample=R``; the base
  of the view-batch paper's reference code): the task data come as R views per sample, each sample
  back every R epochs; the merged exemplars follow the same schedule (each exemplar in one batch of
  every R-epoch group, as R views), and the optional SSL term pulls each view's softmax over the
  seen classes towards its anchor's (:mod:`clframe.strategies.replay.view_batch`).

NME needs means computed with the *current* network. They exist from the end of a task until the
next training step, which covers the end-of-task evaluation (the accuracy matrix). While a task is
being trained, e.g. under per-iteration continual evaluation, ``forward`` falls back to the masked
head logits, the classifier iCaRL trains; ``nme_ready`` says which one answers.

Everything lives in ``state_dict`` (exemplars with their herding ranks, class means, the teacher
network), so a checkpoint resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from clframe.data.stream import Batch, Task, TaskStream, passthrough_collate, without_augmentation
from clframe.data.view_batch import task_epoch_offset
from clframe.errors import ConfigError
from clframe.strategies.base import ContinualModule, frozen_copy
from clframe.strategies.replay.buffer import ReplayBuffer
from clframe.strategies.replay.view_batch import ViewBatch, ViewBatchConfig


def herding(features: Tensor, m: int) -> Tensor:
    """Indices of ``m`` rows chosen greedily so that their running mean tracks the mean of all rows.

    Step ``k`` picks ``argmin_i || mu - (phi_i + sum_{j<k} phi_{p_j}) / k ||`` among rows not yet
    picked (iCaRL's Algorithm 4); the first pick is the row closest to the mean.
    """
    n = len(features)
    m = min(int(m), n)
    mu = features.mean(0)
    running = torch.zeros_like(mu)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    chosen = torch.empty(m, dtype=torch.long, device=features.device)
    for k in range(m):
        cost = (mu - (running + features) / (k + 1)).norm(dim=1).masked_fill(taken, float("inf"))
        i = cost.argmin()
        chosen[k] = i
        taken[i] = True
        running += features[i]
    return chosen


class ExemplarMemory(ReplayBuffer):
    """Per-class exemplar sets in herding order, on the replay buffer's storage and checkpointing.

    A slot is occupied when its label is ``>= 0``; the ``rank`` field is the sample's position in
    its class's herding order, so shrinking a class to ``m`` exemplars keeps ranks ``< m``.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, policy="class_balanced", seed=seed)
        self._register_field("rank")

    def shrink(self, per_class: int) -> None:
        """Keep the first ``per_class`` exemplars (by herding rank) of every class."""
        if len(self):
            self.data_y[(self.data_y >= 0) & (self.data_rank >= per_class)] = -1
            self.reindex()

    @torch.no_grad()
    def insert(self, x: Tensor, y: Tensor, t: Tensor, rank: Tensor) -> None:
        """Store a class's exemplars in free slots."""
        dev = self.num_seen.device  # the model's device, where replayed exemplars are needed
        values = {"x": x.to(dev), "y": y.to(dev).long(), "t": t.to(dev).long(), "rank": rank.to(dev).long()}
        self._allocate(values)
        free = (self.data_y < 0).nonzero().flatten()
        if len(free) < len(y):
            raise RuntimeError(f"exemplar memory full: {len(y)} to insert, {len(free)} free slots")
        self._write(free[: len(y)].cpu(), torch.arange(len(y)), values)
        self.count_seen(len(y))
        self.reindex()

    def take(self, slots: Tensor) -> dict[str, Tensor]:
        """The inputs, labels and task ids stored in ``slots``."""
        return {name: self._storage(name).index_select(0, slots) for name in ("x", "y", "t")}

    def counts(self, num_classes: int) -> Tensor:
        """Number of exemplars of each class."""
        if self.data_y.numel() == 0:
            return torch.zeros(num_classes, dtype=torch.long, device=self.num_seen.device)
        y = self.data_y[self.data_y >= 0]
        return torch.bincount(y, minlength=num_classes)


class ICaRL(ContinualModule):
    """iCaRL (class- and task-incremental).

    Args:
        buffer_size: total number of exemplars (split evenly over the seen classes).
        replay_batch_size: ``None`` (default): every exemplar joins the training data once per
            epoch, in a random batch (Mammoth / the paper). An integer: draw that many exemplars
            at every step instead.
        normalize_features: L2-normalise features for herding and NME (the paper); ``False``
            uses raw features (Mammoth's variant).
        buffer_seed: seed of the exemplar schedule and of the memory's generator.
        feature_batch_size: batch size of the feature passes at the end of a task.
        view_batch: switch on the view-batch model (see the module docstring), with the data module's
            ``views_per_sample``.
        All other arguments: :class:`ContinualModule`.
    """

    def __init__(self, buffer_size: int = 2000, replay_batch_size: int | None = None,
                 normalize_features: bool = True, buffer_seed: int = 0, feature_batch_size: int = 1000,
                 view_batch: ViewBatchConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view_batch = ViewBatch(view_batch) if view_batch is not None else None
        if replay_batch_size is not None and replay_batch_size <= 0:
            raise ConfigError(f"replay_batch_size must be positive, got {replay_batch_size}")
        if feature_batch_size <= 0:
            raise ConfigError(f"feature_batch_size must be positive, got {feature_batch_size}")
        self.memory = ExemplarMemory(buffer_size, seed=buffer_seed)
        self.teacher: nn.Module | None = None
        self.register_buffer("class_means", torch.empty(0))
        self.register_buffer("has_mean", torch.empty(0, dtype=torch.bool))
        self.register_buffer("nme_ready", torch.tensor(False))
        self._nme_ready = False  # host copy of ``nme_ready``: no device sync per forward
        self._batch_idx = 0
        self._task_index: int | None = None  # host copy of ``current_task`` for the exemplar schedule
        self._schedule: tuple[tuple[int, int, int], Tensor, Tensor] | None = None

    def bind_stream(self, stream: TaskStream) -> None:
        if stream.scenario == "domain":
            raise ConfigError("iCaRL needs class- or task-incremental streams (new classes per task); "
                              "the stream is domain-incremental. Use ER, DER or EWC for domain shifts.")
        if self.memory.capacity < stream.num_classes:
            raise ConfigError(f"iCaRL's buffer_size ({self.memory.capacity}) must hold at least one exemplar per "
                              f"class ({stream.num_classes} classes); raise --model.buffer_size.")
        super().bind_stream(stream)

    # ------------------------------------------------------------------ teacher
    def _snapshot_teacher(self) -> None:
        self.teacher = frozen_copy(backbone=self.backbone, head=self.head)

    # ------------------------------------------------------------------ forward
    def _normalized(self, feats: Tensor) -> Tensor:
        return F.normalize(feats, dim=1) if self.hparams.normalize_features else feats

    def nme_scores(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """Minus the squared distance of each sample's feature to each class mean (classes without a mean
        and classes the scenario hides get the lowest value)."""
        f = self._normalized(self.features(x))
        means = self.class_means.to(f.dtype)
        scores = -(f.pow(2).sum(1, keepdim=True) - 2 * f @ means.T + means.pow(2).sum(1))
        allowed = self.has_mean.unsqueeze(0)
        mask = self.logit_mask(task_ids)
        if mask is not None:
            allowed = allowed & mask
        return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """NME scores when the class means match the network, else the masked head logits."""
        if self._nme_ready:
            return self.nme_scores(x, task_ids)
        return super().forward(x, task_ids)

    # ------------------------------------------------------------------ training
    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        self._task_index = task.id

    def _exemplar_views(self) -> int:
        """R when the exemplars are view-batched (each drawn exemplar as R views), else 1."""
        vb = self.view_batch
        return vb.views(self) if vb is not None and vb.config.buffer_views else 1

    def _exemplars_for_batch(self) -> dict[str, Tensor] | None:
        """The exemplars that join this step's batch (as R augmented views each under the view-batch model)."""
        r = self._exemplar_views()
        if self.hparams.replay_batch_size is not None:
            if not len(self.memory):
                return None
            drawn = self.memory.sample(max(1, self.hparams.replay_batch_size // r))
            return self.view_batch.replay_views(self, drawn) if self.view_batch is not None else drawn
        # Merged into the epoch: each exemplar in one random batch, drawn from a seed of (seed, task,
        # epoch) alone, so resuming mid-epoch needs no extra state. Kept on the host: no device sync.
        # Under the view-batch model the schedule spans an R-epoch group (each exemplar once per group,
        # as R views), like the task data's sampler.
        task = self._task_index if self._task_index is not None else int(self.current_task)
        epoch = int(self.current_epoch)
        if r > 1:
            epoch -= task_epoch_offset(self.trainer)
            group, position = epoch // r, epoch % r
        else:
            group, position = epoch, 0
        batches = max(1, int(self.trainer.num_training_batches))
        key = (task, group, batches, r)
        if self._schedule is None or self._schedule[0] != key:
            seed = (self.hparams.buffer_seed * 1_000_003 + key[0]) * 1_000_003 + key[1]
            slots = self.memory.valid_slots().cpu()
            when = torch.randint(batches * r, (len(slots),), generator=torch.Generator().manual_seed(seed))
            self._schedule = (key, slots, when)
        _, slots, when = self._schedule
        idx = slots[when == position * batches + self._batch_idx]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if world > 1:  # identical memories and schedules on every rank: each rank takes its own share
            idx = idx[rank::world]
        if len(idx) == 0:
            return None
        drawn = self.memory.take(idx.to(self.memory.data_y.device))
        return self.view_batch.replay_views(self, drawn) if self.view_batch is not None else drawn

    def training_loss(self, batch: Batch) -> Tensor:
        x, y, t = batch
        replay = self._exemplars_for_batch()
        if replay is not None:
            if self.view_batch is None:  # the memory holds raw exemplars; augment each draw afresh
                replay = {**replay, "x": self.augment_inputs(replay["x"])}
            x, y, t = torch.cat([x, replay["x"]]), torch.cat([y, replay["y"]]), torch.cat([t, replay["t"]])
        logits = self.head(self.features(x))
        seen = (self.class_task >= 0) & (self.class_task <= self.current_task)
        targets = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        if self.teacher is not None:
            old = (self.class_task >= 0) & (self.class_task < self.current_task)
            with torch.no_grad():
                teacher = torch.sigmoid(self.teacher["head"](self.teacher["backbone"](self.preprocess(x))))
            targets = torch.where(old.unsqueeze(0), teacher.to(logits.dtype), targets)
        # mean over the samples and the seen classes' outputs (weights, not indexing: no device sync)
        per_output = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (per_output * seen).sum() / (len(y) * seen.sum())

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self._nme_ready:  # the weights are about to change: the class means go stale
            self._nme_ready = False
            self.nme_ready.fill_(False)
        self._batch_idx = batch_idx
        vb = self.view_batch
        if vb is None:
            return super().training_step(batch, batch_idx)
        with vb.capture(self.head) as outputs:  # the task views and the exemplar views, whole R-row groups
            loss = super().training_step(vb.views_of(self, batch), batch_idx)
        return vb.add_ssl_term(self, outputs, loss)

    # ------------------------------------------------------------------ task end
    @torch.no_grad()
    def _features_of(self, x: Tensor) -> Tensor:
        bs = self.hparams.feature_batch_size
        return torch.cat([self._normalized(self.features(x[i:i + bs].to(self.device))) for i in range(0, len(x), bs)])

    @torch.no_grad()
    def update_memory(self, task: Task) -> None:
        """Shrink the old classes' sets to the new share, then herd the share of each new class."""
        n_seen = int(((self.class_task >= 0) & (self.class_task <= task.id)).sum())
        per_class = self.memory.capacity // max(1, n_seen)
        self.memory.shrink(per_class)
        data = without_augmentation(task.train)
        loader = DataLoader(data, batch_size=self.hparams.feature_batch_size, shuffle=False,
                            collate_fn=passthrough_collate)
        feats, labels = [], []
        for x, y, _ in loader:
            feats.append(self._features_of(x))
            labels.append(y.to(self.device))
        all_feats, all_labels = torch.cat(feats), torch.cat(labels)
        for c in task.classes:
            rows = (all_labels == c).nonzero().flatten()
            if len(rows) == 0:
                continue
            order = rows[herding(all_feats[rows], per_class)]
            x, y, t = data.__getitems__(order.cpu().tolist())
            self.memory.insert(x, y, t, torch.arange(len(order)))

    @torch.no_grad()
    def compute_class_means(self) -> None:
        """Normalised mean of the normalised exemplar features of every class in memory."""
        stored = self.memory.all()
        feats = self._features_of(stored["x"])
        n_classes = len(self.class_task)
        y = stored["y"].to(self.device)
        sums = torch.zeros(n_classes, feats.shape[1], device=self.device, dtype=feats.dtype).index_add_(0, y, feats)
        counts = torch.bincount(y, minlength=n_classes)
        means = sums / counts.clamp(min=1).unsqueeze(1).to(feats.dtype)
        self.class_means = self._normalized(means)
        self.has_mean = counts > 0
        self.nme_ready = torch.tensor(True, device=self.device)
        self._nme_ready = True

    def on_task_end(self, task: Task) -> None:
        was_training = self.training
        self.eval()
        try:
            self.update_memory(task)
            self.compute_class_means()
            self._snapshot_teacher()  # the previous network of the next task's distillation
        finally:
            self.train(was_training)
        super().on_task_end(task)

    # ------------------------------------------------------------------ checkpoints
    def materialize_state(self, state_dict: Mapping[str, Any]) -> None:
        """A checkpoint written after task 0 holds a teacher: create its slot before loading."""
        if self.teacher is None and any(k.startswith("teacher.") for k in state_dict):
            self._snapshot_teacher()
        super().materialize_state(state_dict)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._nme_ready = bool(self.nme_ready)
        self._schedule = None
        return result
