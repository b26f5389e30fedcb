"""Experience replay (ER): train on the new batch plus a batch drawn from a replay buffer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from clframe.data.stream import Batch, Task, passthrough_collate, without_augmentation
from clframe.errors import ConfigError
from clframe.strategies.base import ContinualModule
from clframe.strategies.replay.buffer import BufferPolicy, ReplayBuffer
from clframe.strategies.replay.view_batch import ViewBatch, ViewBatchConfig

BufferUpdate = Literal["online", "task_end"]


@torch.no_grad()
def store_task(buffer: ReplayBuffer, task: Task, chunk: int = 1024) -> None:
    """Offer every training sample of a finished task to ``buffer``, in dataset order.

    What ends up stored follows the buffer's policy: with ``class_balanced`` every class seen so far
    keeps an equal share, each share a uniform random subset of all that class's samples offered so
    far. Inputs are stored without per-sample augmentation. The draw uses only the buffer's own
    generator, which checkpoints carry, so a resumed run stores the same samples. Every DDP rank
    reads the whole task, so the ranks' buffers stay identical without communication.
    """
    loader = DataLoader(without_augmentation(task.train), batch_size=chunk, shuffle=False,
                        collate_fn=passthrough_collate)
    for x, y, t in loader:
        buffer.add(x=x, y=y, t=t)


class ReplayModule(ContinualModule):
    """Base of replay strategies: owns the buffer and fills it after every training step (unless
    :meth:`stores_each_step` says otherwise, as ER's ``buffer_update="task_end"`` does).

    Under DDP the buffers of all ranks are identical: every step, each rank inserts the batches of
    all ranks (gathered and interleaved back into the order one process with the whole global
    batch would see), and the buffers' generators, seeded alike, draw alike. So ``buffer_size`` is
    the total memory whatever the number of processes, the run stays deterministic, and rank 0's
    checkpoint holds every rank's buffer. Each rank replays its own disjoint share of a common
    draw, so ``replay_batch_size`` is per process, like ``batch_size``: W processes replay what one
    process with ``W * replay_batch_size`` would.

    Args:
        buffer_size: number of stored samples.
        replay_batch_size: samples drawn from the buffer per step (default: the new batch's size).
        buffer_policy: ``reservoir`` (uniform over the stream) or ``class_balanced``.
        buffer_seed: seed of the buffer's own generator (saved in checkpoints).
        view_batch: switch on the view-batch model (views, SSL term, buffer view-batches; see
            :mod:`clframe.strategies.replay.view_batch`), with the data module's ``views_per_sample``.
    """

    def __init__(self, buffer_size: int = 500, replay_batch_size: int | None = None,
                 buffer_policy: BufferPolicy = "reservoir", buffer_seed: int = 0,
                 view_batch: ViewBatchConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if replay_batch_size is not None and replay_batch_size <= 0:
            raise ConfigError(f"replay_batch_size must be positive, got {replay_batch_size}")
        self.buffer = ReplayBuffer(buffer_size, buffer_policy, seed=buffer_seed)
        if isinstance(view_batch, Mapping):
            view_batch = ViewBatchConfig(**view_batch)
        self.view_batch = ViewBatch(view_batch) if view_batch is not None else None
        if view_batch is not None:  # plain values in the hyperparameters: checkpoints load without code
            self.hparams["view_batch"] = asdict(view_batch)

    def _shard(self) -> tuple[int, int]:
        """``(global rank, world size)``; ``(0, 1)`` outside a trainer."""
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        """Keep the replay buffers out of DDP's per-step buffer broadcast: they are identical on every
        rank by construction, and broadcasting the whole store every step would cost its size in traffic."""
        super().setup(stage)
        names = [f"{prefix}.{name}" if prefix else name for prefix, module in self.named_modules()
                 if isinstance(module, ReplayBuffer) for name, _ in module.named_buffers()]
        ignored = set(getattr(self, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, sorted(ignored))

    def stores_each_step(self) -> bool:
        """Whether every training batch is offered to the buffer (ER's ``task_end`` mode says no)."""
        return True

    def replay_batch(self, batch_size: int) -> dict[str, Tensor] | None:
        """A batch from the buffer (this rank's share under DDP), or ``None`` while it is empty."""
        if len(self.buffer) == 0:
            return None
        rank, world = self._shard()
        n, vb = self.hparams.replay_batch_size or batch_size, self.view_batch
        if vb is not None:  # view-batch: n / R distinct samples, each as R views in a row
            return vb.replay_views(self, self.buffer.sample(vb.replay_size(self, n), rank=rank, world_size=world))
        drawn = self.buffer.sample(n, rank=rank, world_size=world)
        if self._train_pipeline is not None:  # the buffer holds raw samples; each draw is augmented afresh
            drawn = {**drawn, "x": self.augment_inputs(drawn["x"])}
        return drawn

    def buffer_extras(self, batch: Batch) -> dict[str, Tensor]:
        """Extra per-sample fields to store (DER stores logits); none by default."""
        return {}

    def gather_ranks(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The samples of every rank as one batch (a no-op in a single process).

        The samplers give every rank batches of the same size, as ``all_gather`` needs, and strided
        shares, so interleaving the ranks' samples restores the single-process order of the global batch.
        """
        if self._shard()[1] == 1:
            return values
        gathered = self.all_gather({k: v.detach() for k, v in values.items()})  # (world, batch, ...)
        return {k: v.transpose(0, 1).flatten(0, 1) for k, v in gathered.items()}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        vb = self.view_batch
        if vb is not None:  # view-batch model: see clframe.strategies.replay.view_batch
            return self._view_batch_step(vb, batch, batch_idx)
        loss = super().training_step(batch, batch_idx)
        # Inserted here, not in on_train_batch_end: checkpoint callbacks save before the module's
        # batch-end hook, and a resumed run must find this batch in the buffer.
        if self.stores_each_step():
            x, y, t = batch
            self.buffer.add(**self.gather_ranks({"x": x, "y": y, "t": t, **self.buffer_extras(batch)}))
        return loss

    def _view_batch_step(self, vb: ViewBatch, batch: Batch, batch_idx: int) -> Tensor:
        """Train on the augmented views, add the view-batch SSL term, store only the anchors (un-augmented)."""
        views = vb.views_of(self, batch)
        with vb.capture(self.head) as outputs:
            loss = super().training_step(views, batch_idx)
        loss = vb.add_ssl_term(self, outputs, loss)
        x, y, t = batch
        values = vb.anchors(self, {"x": x, "y": y, "t": t, **self.buffer_extras(views)})
        self.buffer.add(**self.gather_ranks(values))
        return loss


class ER(ReplayModule):
    """Experience replay (Chaudhry et al. 2019; the DER paper's ER baseline).

    ``L = CE(f([x; x_b]), [y; y_b])`` over the concatenated new and replayed batch, as in Mammoth.
    With ``new_weight`` set, ``L = w * CE(new) + (1 - w) * CE(replay)`` (``Lw_new`` of the
    stability-gap paper); while the buffer is empty the replay term is absent, so ``L = w * CE(new)``.

    Args:
        new_weight: ``w`` above; ``None`` concatenates the two batches into one cross-entropy;
            ``"balanced"`` sets ``w = 1/t`` during the t-th task (van de Ven's weighting, so every task
            seen so far counts equally in the loss).
        buffer_update: when the buffer is filled. ``online`` (default) offers every training batch
            right after its step, so during a task the buffer also holds that task's samples.
            ``task_end`` offers the finished task's whole training set once the task ends (the
            stability-gap paper's code), so the replayed term covers earlier tasks only.
        **kwargs: :class:`ReplayModule` and :class:`ContinualModule` options.
    """

    def __init__(self, new_weight: float | Literal["balanced"] | None = None, buffer_update: BufferUpdate = "online",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(new_weight, str) and new_weight != "balanced":
            raise ConfigError(f"new_weight must be a number in [0, 1], 'balanced' or null, got {new_weight!r}")
        if isinstance(new_weight, (int, float)) and not 0.0 <= new_weight <= 1.0:
            raise ConfigError(f"new_weight must be in [0, 1], got {new_weight}")
        if buffer_update not in ("online", "task_end"):
            raise ConfigError(f"buffer_update must be 'online' or 'task_end', got {buffer_update!r}")
        if buffer_update == "task_end" and self.view_batch is not None:
            raise ConfigError("buffer_update='task_end' cannot be combined with view_batch, which stores the "
                              "anchors of each training batch; use buffer_update='online'")

    def stores_each_step(self) -> bool:
        return self.hparams.buffer_update == "online"

    def on_task_end(self, task: Task) -> None:
        if self.hparams.buffer_update == "task_end":
            store_task(self.buffer, task)
        super().on_task_end(task)

    def training_loss(self, batch: Batch) -> Tensor:
        x, y, t = batch
        replay = self.replay_batch(len(y))
        w = self.hparams.new_weight
        if w == "balanced":
            w = 1.0 / (int(self.current_task) + 1)
        if replay is None:
            loss = F.cross_entropy(self(x, t), y)
            return loss if w is None else w * loss
        logits = self(torch.cat([x, replay["x"]]), torch.cat([t, replay["t"]]))
        targets = torch.cat([y, replay["y"]])
        if w is None:
            return F.cross_entropy(logits, targets)
        n = len(y)
        return w * F.cross_entropy(logits[:n], y) + (1 - w) * F.cross_entropy(logits[n:], targets[n:])
