"""The view-batch replay sampler (Kang et al., "Do Your Best and Get Enough Rest for Continual Learning",
CVPR 2025): R views of a sample in one batch, and each sample back only every R epochs.

With ``R`` views per sample, an epoch keeps the baseline's number of steps (``ceil(N / B)``) but each
batch holds ``B / R`` distinct samples, each repeated ``R`` times in a row. The ``R`` epochs of an
*epoch group* share one permutation of the task's samples and each takes its own contiguous share of
it, so over a group every sample appears exactly once (as one run of ``R`` views): recall is ``R``
times more intense and the rest between two recalls ``R`` times longer, at the same compute.

Differences from the reference code, on purpose (see ``docs/methods/view_batch.md``):

* the permutation is seeded by ``(run seed, task, epoch group)``, not by the group alone, so run seeds
  and tasks differ;
* nothing is dropped (the reference cuts every epoch to a multiple of 256) and every epoch has the
  baseline's ``ceil(N / B)`` steps: the ``B / R``-sample batches are full except the last of each
  epoch, which shares out the remainder over the group's epochs; when that remainder is smaller than
  ``R`` (``0 < N mod B < R``), each epoch's share is instead spread evenly over its batches (a few
  batches then hold one sample less). Only tasks with fewer than ``R ceil(N / B)`` samples, where
  some epoch cannot fill its batches with one sample each, run fewer steps;
* views are rows ``[k R, (k + 1) R)`` of every batch (the first is the anchor), a layout the
  strategies are told about (``views_per_sample``), never inferred from neighbouring labels.

Under DDP the group's permutation is cut into units of ``world_size`` samples and the schedule is
built over units, rank ``r`` taking the ``r``-th sample of each unit: all views of a sample stay on
one rank, ranks are disjoint and have the same number of equally shaped batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from clframe.data.datamodule import ResumableDataLoader
from clframe.data.samplers import EpochResumable, check_shard, epoch_seed


def task_epoch_offset(trainer: Any) -> int:
    """The global epoch at which the current task's training started, so epoch groups restart with every task.

    ``ContinualTrainer`` sets ``max_epochs`` to the cumulative budget at the end of the current task, so the
    task started ``epochs_per_task`` epochs before it (also when resuming mid-task). Without such a budget
    (``steps_per_task``, a plain Trainer) groups follow the global epoch.
    """
    per_task = getattr(trainer, "epochs_per_task", None)
    max_epochs = getattr(getattr(trainer, "fit_loop", None), "max_epochs", None)
    if per_task is None or getattr(trainer, "steps_per_task", None) is not None or not max_epochs or max_epochs < 0:
        return 0
    return max(0, int(max_epochs) - int(per_task))


class ViewBatchSampler(EpochResumable, Sampler[list[int]]):
    """Batches of ``batch_size`` indices: ``batch_size / views`` distinct samples, each repeated ``views`` times.

    Args:
        size: number of samples of the task (``N``).
        batch_size: rows per batch (``B``, a multiple of ``views``).
        views: views per sample (``R``); ``R = 1`` is an ordinary shuffled sampler.
        seed: the run's data seed.
        task: the task id (part of the shuffle seed).
        epoch_offset: the global epoch at which the task started (Lightning passes global epochs to
            :meth:`set_epoch`; groups count from the task's first epoch).
        rank, world_size: this process's share under DDP.
    """

    def __init__(self, size: int, batch_size: int, views: int, seed: int = 0, task: int = 0, epoch_offset: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if views < 1 or batch_size < 1 or batch_size % views:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of views_per_sample ({views})")
        check_shard(rank, world_size)
        if size // world_size < 1:
            raise ValueError(f"a task of {size} samples cannot be shared by {world_size} processes")
        self.size, self.batch_size, self.views = int(size), int(batch_size), int(views)
        self.seed, self.task, self.epoch_offset = int(seed), int(task), int(epoch_offset)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.sampler = self  # Lightning calls ``batch_sampler.sampler.set_epoch`` at every epoch start

    # ------------------------------------------------------------------ epochs and resuming
    def resume_at(self, epoch: int, batches: int) -> None:
        self.epoch, self.start = epoch, batches

    @property
    def units(self) -> int:
        """Samples per rank and epoch group (the task cut to a multiple of ``world_size``)."""
        return self.size // self.world_size

    @property
    def per_batch(self) -> int:
        """Distinct samples per batch."""
        return self.batch_size // self.views

    def group_and_slot(self) -> tuple[int, int]:
        """``(epoch group, position of the current epoch in its group)``, counted from the task's first epoch."""
        e = max(0, self.epoch - self.epoch_offset)
        return e // self.views, e % self.views

    def group_seed(self, group: int) -> int:
        """A pure function of (run seed, task, epoch group)."""
        return epoch_seed(epoch_seed(self.seed, self.task), group)

    def epoch_counts(self) -> list[list[int]]:
        """For each epoch of a group, the number of distinct samples of each of its batches.

        The baseline has ``S = ceil(N / B)`` batches: ``S - 1`` full ones and a last one of ``r`` rows.
        Here every epoch has ``S - 1`` full batches of ``B / R`` samples, and the ``r`` left-over samples
        are shared out as evenly as possible over the last batches of the group's epochs.
        """
        n, s, r_views = self.units, self.per_batch, self.views
        steps = -(-n // self.batch_size)  # the baseline's steps: ceil(n / B)
        rest = n - (steps - 1) * self.batch_size  # = r: the full batches of the R epochs hold (S - 1) B samples
        if rest >= r_views:
            lasts = [rest // r_views + (1 if k < rest % r_views else 0) for k in range(r_views)]
            return [[s] * (steps - 1) + [last] for last in lasts]
        # fewer left-over samples than epochs: spread each epoch's share evenly over its ``steps`` batches
        shares = [n // r_views + (1 if k < n % r_views else 0) for k in range(r_views)]
        return [_even(share, min(steps, share)) for share in shares]

    def __len__(self) -> int:
        return len(self.epoch_counts()[self.group_and_slot()[1]])

    def epoch_samples(self) -> list[Tensor]:
        """This rank's distinct samples of each batch of the current epoch (before repeating them)."""
        group, slot = self.group_and_slot()
        gen = torch.Generator().manual_seed(self.group_seed(group))
        perm = torch.randperm(self.size, generator=gen)[: self.units * self.world_size]
        mine = perm.view(self.units, self.world_size)[:, self.rank]  # unit u -> its rank-th sample
        counts = self.epoch_counts()
        start = sum(sum(c) for c in counts[:slot])
        return list(mine[start: start + sum(counts[slot])].split(counts[slot]))

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        for samples in self.epoch_samples()[start:]:
            yield samples.repeat_interleave(self.views).tolist()


def _even(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class ViewBatchLoader(ResumableDataLoader):
    """The training loader of a view-batch run: resumable like the others, its position counted in batches."""

    def _order(self) -> ViewBatchSampler:  # type: ignore[override]
        return self.batch_sampler

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        batches = int(state_dict["batches"])
        self._order().resume_at(int(state_dict["epoch"]), batches)
        self._resumed = batches


def view_layout(rows: int, views: int) -> Tensor:
    """The view index of each row of a view-batch (0 = anchor): rows come in runs of ``views`` copies."""
    if rows % views:
        raise ValueError(f"a view-batch of {rows} rows is not made of whole groups of {views} views")
    return torch.arange(rows) % views
