"""Samplers: the per-epoch training order, batches that shape what a training batch holds, and the
shards of each data set that the ranks of a distributed (DDP) run see.

Under DDP every rank builds the same order from ``(seed, epoch)`` and keeps its own disjoint share,
so the order stays a pure function of the seed, the epoch, the rank and the world size (Lightning's
injected ``DistributedSampler`` would reshuffle with its own seed and cannot wrap a batch sampler).
Shares are strided (rank ``r`` takes positions ``r, r + W, ...``), so interleaving the ranks'
batches sample by sample gives back the batch of one process with ``W`` times the batch size.
With ``world_size=1`` every sampler yields exactly what it yields without DDP.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler


class EpochResumable:
    """The epoch and mid-epoch resume protocol every training sampler shares (see ``ResumableDataLoader``).

    Subclasses start with ``epoch = start = 0`` and define ``__len__``; their ``__iter__`` skips ``start``
    items once and resets it.
    """

    epoch: int
    start: int

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a resume position belongs to its own epoch only
            self.start = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        self.epoch, self.start = epoch, (position if position < len(self) else 0)


def check_shard(rank: int, world_size: int) -> None:
    """Refuse a rank outside ``[0, world_size)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")


class PerTaskBatchSampler(EpochResumable, Sampler[list[int]]):
    """Batches with ``batch_size`` samples from *each* task of a concatenated dataset.

    Incremental joint training in the stability-gap literature uses "batch 128 x number of tasks
    so far": every task contributes equally to every step whatever its size. An epoch lasts until
    the largest task has been seen once; smaller tasks are reshuffled and cycled.

    Under DDP the ranks split every global batch of ``batch_size * world_size`` samples per task,
    taking every ``world_size``-th of them from ``rank`` on: each rank gets ``batch_size`` per task,
    disjoint from the other ranks', and all ranks get the same number of batches.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1 or not sizes or min(sizes) < 1:
            raise ValueError("PerTaskBatchSampler needs a positive batch size and non-empty tasks")
        check_shard(rank, world_size)
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.offsets = torch.tensor([0, *self.sizes]).cumsum(0)[:-1].tolist()
        self.seed, self.epoch, self.start = seed, 0, 0
        self.sampler = self  # Lightning calls ``batch_sampler.sampler.set_epoch`` at every epoch start

    def __len__(self) -> int:
        return -(-max(self.sizes) // (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        start, self.start = self.start, 0
        needed = len(self) * self.batch_size * self.world_size
        streams = []
        for size, offset in zip(self.sizes, self.offsets, strict=True):
            reps = -(-needed // size)
            order = torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)])[:needed]
            streams.append(order + offset)
        step = self.batch_size * self.world_size
        for b in range(start, len(self)):
            lo = b * step + self.rank  # this rank's share of global batch b
            yield torch.cat([s[lo:(b + 1) * step:self.world_size] for s in streams]).tolist()


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: a pure function of the run's data seed and the global epoch."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


class EpochShuffleSampler(EpochResumable, Sampler[int]):
    """A random order per epoch that depends only on ``(seed, epoch)``, never on the global RNG.

    Lightning calls ``set_epoch`` at every epoch start; ``resume_at`` skips the samples already
    consumed when a run restarts mid-epoch, so a resumed run sees exactly the remaining order.

    Under DDP all ranks draw the same permutation, cut it to a multiple of ``world_size`` and take
    every ``world_size``-th position from ``rank`` on: the shards are disjoint and equally long (so
    every rank runs the same number of steps, which DDP needs); at most ``world_size - 1`` samples
    per epoch, a different random few every epoch, are left out.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        check_shard(rank, world_size)
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.size // self.world_size

    def epoch_order(self) -> Tensor:
        """This rank's whole order for the current epoch (a pure function of seed, epoch, rank and world size)."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        return order[self.rank: len(self) * self.world_size: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        start, self.start = self.start, 0
        return iter(order[start:].tolist())


class EpochBatchSampler(EpochResumable, Sampler[Tensor | list[int]]):
    """The training batches of one epoch as slices of :class:`EpochShuffleSampler`'s order.

    The same samples in the same batches as a DataLoader with that sampler and ``batch_size`` (the last
    batch shorter), without building a list of ints per batch: each batch is an int64 tensor of positions
    on ``device`` (the data set then gathers with one ``index_select``), or a list with ``as_lists`` (for
    loaders with worker processes). Positions (``resume_at``, ``start``) count batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", as_lists: bool = False) -> None:
        check_shard(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.order = EpochShuffleSampler(size, seed, rank=rank, world_size=world_size)
        self.batch_size, self.device, self.as_lists = int(batch_size), torch.device(device), as_lists
        self.epoch, self.start = 0, 0
        self.sampler = self  # Lightning calls ``batch_sampler.sampler.set_epoch`` at every epoch start

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def epoch_order(self) -> Tensor:
        """This rank's whole order for the current epoch (:meth:`EpochShuffleSampler.epoch_order`)."""
        self.order.epoch = self.epoch
        return self.order.epoch_order()

    def __iter__(self) -> Iterator[Tensor | list[int]]:
        order = self.epoch_order().to(self.device)
        start, self.start = self.start, 0
        rest = order[start * self.batch_size:]
        for batch in rest.split(self.batch_size) if len(rest) else ():  # split() gives [] one part
            yield batch.tolist() if self.as_lists else batch


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank`` on, in order and without padding (evaluation under DDP).

    Across the ranks each sample is evaluated exactly once; PyTorch's ``DistributedSampler`` pads the
    shards with repeated samples, which would count those twice. Shards may differ in length by one,
    which is harmless for evaluation: its per-batch steps have no collectives (counts are reduced
    once at the end).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        check_shard(rank, world_size)
        self.size, self.rank, self.world_size = size, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))


class TaskBatchSampler(Sampler[list[int]]):
    """The evaluation batches of several tasks as one loader: task after task, never two tasks in a batch.

    Positions index the tasks' data sets concatenated (:class:`~clframe.data.datamodule.ConcatTaskDataset`);
    each task's share is :class:`ShardSampler`'s (every ``world_size``-th sample from ``rank`` on) cut into
    ``batch_size`` batches, so the batches are exactly those of one loader per task, one after the other.
    One loader means one evaluation loop whatever the number of tasks; single-task batches keep every
    strategy that picks something per batch (a mask, a prompt, an inferred task) seeing one task per batch.
    Batches are int64 tensors of positions (one gather each, no list to convert), or lists with
    ``as_lists`` (for loaders with worker processes, where a list is cheaper to send than a tensor).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1,
                 as_lists: bool = False) -> None:
        check_shard(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths, self.batch_size = [int(n) for n in lengths], int(batch_size)
        self.rank, self.world_size, self.as_lists = rank, world_size, as_lists

    def task_indices(self) -> list[list[int]]:
        """This rank's positions within each task's own data set, in order."""
        return [list(ShardSampler(n, self.rank, self.world_size)) for n in self.lengths]

    def __len__(self) -> int:
        return sum(-(-len(ShardSampler(n, self.rank, self.world_size)) // self.batch_size) for n in self.lengths)

    def __iter__(self) -> Iterator[Tensor | list[int]]:
        offset = 0
        for n in self.lengths:
            share = torch.arange(self.rank, max(n, self.rank), self.world_size) + offset  # ShardSampler's positions
            for batch in share.split(self.batch_size) if len(share) else ():  # split() gives [] one part
                yield batch.tolist() if self.as_lists else batch
            offset += n
