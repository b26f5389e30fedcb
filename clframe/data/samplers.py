"""Batch samplers that shape what a training batch holds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class PerTaskBatchSampler(Sampler[list[int]]):
    """Batches with ``batch_size`` samples from *each* task of a concatenated dataset.

    Incremental joint training in the stability-gap literature uses "batch 128 x number of tasks
    so far": every task contributes equally to every step whatever its size. An epoch lasts until
    the largest task has been seen once; smaller tasks are reshuffled and cycled.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1 or not sizes or min(sizes) < 1:
            raise ValueError("PerTaskBatchSampler needs a positive batch size and non-empty tasks")
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.offsets = torch.tensor([0, *self.sizes]).cumsum(0)[:-1].tolist()
        self.seed, self.epoch, self.start = seed, 0, 0
        self.sampler = self  # Lightning calls ``batch_sampler.sampler.set_epoch`` at every epoch start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a resume position belongs to its own epoch only
            self.start = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        self.epoch, self.start = epoch, (batches if batches < len(self) else 0)

    def __len__(self) -> int:
        return -(-max(self.sizes) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        start, self.start = self.start, 0
        needed = len(self) * self.batch_size
        streams = []
        for size, offset in zip(self.sizes, self.offsets, strict=True):
            reps = -(-needed // size)
            order = torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)])[:needed]
            streams.append(order + offset)
        for b in range(start, len(self)):
            lo = b * self.batch_size
            yield torch.cat([s[lo:lo + self.batch_size] for s in streams]).tolist()


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: a pure function of the run's data seed and the global epoch."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


class EpochShuffleSampler(Sampler[int]):
    """A random order per epoch that depends only on ``(seed, epoch)``, never on the global RNG.

    Lightning calls ``set_epoch`` at every epoch start; ``resume_at`` skips the samples already
    consumed when a run restarts mid-epoch, so a resumed run sees exactly the remaining order.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a resume position belongs to its own epoch only
            self.start = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        self.epoch, self.start = epoch, (position if position < self.size else 0)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
        start, self.start = self.start, 0
        return iter(order[start:].tolist())
