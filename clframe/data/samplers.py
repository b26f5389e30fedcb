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

    def __init__(self, sizes: Sequence[int], batch_size: int) -> None:
        if batch_size < 1 or not sizes or min(sizes) < 1:
            raise ValueError("PerTaskBatchSampler needs a positive batch size and non-empty tasks")
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.offsets = torch.tensor([0, *self.sizes]).cumsum(0)[:-1].tolist()

    def __len__(self) -> int:
        return -(-max(self.sizes) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # Seeded from the global RNG like torch's RandomSampler, so seed_everything fixes the order.
        gen = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        needed = len(self) * self.batch_size
        streams = []
        for size, offset in zip(self.sizes, self.offsets, strict=True):
            reps = -(-needed // size)
            order = torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)])[:needed]
            streams.append(order + offset)
        for b in range(len(self)):
            lo = b * self.batch_size
            yield torch.cat([s[lo:lo + self.batch_size] for s in streams]).tolist()
