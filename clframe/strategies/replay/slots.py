"""Index arithmetic of the replay buffer that must cost O(batch), not O(capacity), per step.

* :func:`draw_distinct`: distinct integers drawn uniformly without replacement from a range, in
  O(count) expected time (not a full ``randperm`` of the range).
* :class:`ClassSlots`: which storage slots each class occupies in a class-balanced buffer, and
  which slots are free, kept up to date by the insert instead of being found by scanning the
  stored labels.

Everything here lives on the host: the buffer's generator is a CPU generator, and the indices
that result travel to the storage's device once per call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SMALL = 1024  # ranges this small are cheaper to permute than to draw from with rejection


def first_occurrence(values: Tensor) -> Tensor:
    """Mask of the positions whose value does not occur earlier in ``values``."""
    if len(values) <= 1:
        return torch.ones_like(values, dtype=torch.bool)
    s, order = torch.sort(values, stable=True)
    first_sorted = torch.ones_like(s, dtype=torch.bool)
    first_sorted[1:] = s[1:] != s[:-1]
    keep = torch.zeros_like(values, dtype=torch.bool)
    keep[order] = first_sorted
    return keep


def last_occurrence(values: Tensor) -> Tensor:
    """Mask of the positions whose value does not occur later in ``values`` (the write that wins)."""
    return first_occurrence(values.flip(0)).flip(0)


def first_occurrence_into(values: Tensor, scratch: Tensor, last: bool = False) -> Tensor:
    """:func:`first_occurrence` of ``values`` (all below ``len(scratch)``) without a sort: each value's
    smallest position is scattered into ``scratch`` (whose old contents do not matter), three tensor
    operations instead of about eight. ``last``: the mask of last occurrences instead."""
    pos = torch.arange(len(values))
    scratch.scatter_reduce_(0, values, pos, "amax" if last else "amin", include_self=False)
    return scratch.index_select(0, values) == pos


def draw_distinct(size: int, count: int, generator: torch.Generator, scratch: Tensor | None = None) -> Tensor:
    """``count`` distinct integers of ``0..size-1``, uniformly without replacement and in random order.

    Dense draws (``count > size / 2``) and small ranges (up to ``SMALL`` values) take a permutation of
    the range, which then costs O(count), or a few microseconds.
    Sparse draws take uniform integers with replacement and keep each value's first occurrence:
    the order of first appearances in an i.i.d. uniform stream is a uniform ordered sample without
    replacement, and at most half the range taken, about ``count * 1.4`` draws suffice.
    ``scratch``: an optional int64 tensor of at least ``size`` entries to work in (same draws, fewer operations).
    """
    count = min(count, size)
    if 2 * count > size or size <= SMALL:
        return torch.randperm(size, generator=generator)[:count]
    picked = torch.empty(0, dtype=torch.long)
    while len(picked) < count:
        need = count - len(picked)
        fresh = torch.randint(size, (need + need // 2 + 8,), generator=generator)
        pool = torch.cat([picked, fresh]) if len(picked) else fresh
        keep = first_occurrence(pool) if scratch is None or len(scratch) < size else first_occurrence_into(pool, scratch)
        picked = pool.index_select(0, keep.nonzero().flatten())  # cheaper than a mask on the CPU
    return picked[:count]


class ClassSlots:
    """Slot bookkeeping of a class-balanced buffer.

    ``table[start[c] : start[c] + count[c]]`` are the slots holding class ``c``; each class seen
    has a segment of at least the current per-class quota, so a class below its quota appends in
    place. ``free[:n_free]`` are the free slots in decreasing order, so :meth:`pop_free` hands out
    the lowest first. The segments are laid out again only when the quota changes (a new class),
    which may cost O(capacity); every other operation costs O(batch + number of classes).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = torch.zeros(0, dtype=torch.long)
        self.start = torch.zeros(0, dtype=torch.long)
        self.table = torch.zeros(capacity, dtype=torch.long)
        self.free = torch.arange(capacity - 1, -1, -1)
        self.n_free = capacity
        self.quota = capacity  # slots per class: capacity // number of classes laid out
        self._positions: tuple[Tensor, Tensor] | None = None  # slot_at's cumulative counts; see counts_changed

    def counts_changed(self) -> None:
        """To be called after ``count`` or ``start`` change (slot_at caches what it derives from them)."""
        self._positions = None

    def __len__(self) -> int:
        """Occupied slots."""
        return self.capacity - self.n_free

    # ------------------------------------------------------------------ building
    @classmethod
    def from_labels(cls, labels: Tensor, class_seen: Tensor, capacity: int) -> ClassSlots:
        """Bookkeeping of a storage whose label tensor is ``labels`` (``-1``: free), in O(capacity).

        Used for checkpoints written before the bookkeeping was saved, and after code that edits the
        stored labels directly (iCaRL's exemplar memory). Within a class, slots are in increasing order.
        """
        out = cls(capacity)
        labels = labels.cpu()
        if labels.numel() == 0:  # storage not allocated yet: everything free
            out.grow(len(class_seen))
            out.layout(class_seen.cpu().gt(0).nonzero().flatten())
            return out
        occupied = (labels >= 0).nonzero().flatten()
        lab = labels[occupied]
        n_labels = max(len(class_seen), int(lab.max()) + 1 if len(lab) else 0)
        out.count = torch.bincount(lab, minlength=n_labels)
        order = torch.argsort(lab, stable=True)
        out.table = occupied[order]  # grouped by class, exact-size segments; layout() spreads them out
        out.start = torch.cumsum(out.count, 0) - out.count
        in_layout = out.count > 0
        in_layout[: len(class_seen)] |= class_seen.cpu() > 0
        out.layout(in_layout.nonzero().flatten())
        free = (labels < 0).nonzero().flatten().flip(0)
        out.n_free = len(free)
        out.free = torch.cat([free, torch.zeros(capacity - len(free), dtype=torch.long)])
        return out

    def grow(self, n_labels: int) -> None:
        """Make room for labels ``0..n_labels-1``."""
        extra = n_labels - len(self.count)
        if extra > 0:
            self.count = torch.cat([self.count, torch.zeros(extra, dtype=torch.long)])
            self.start = torch.cat([self.start, torch.zeros(extra, dtype=torch.long)])
            self.counts_changed()

    def layout(self, classes: Tensor) -> None:
        """Set the quota for ``classes`` (sorted labels) and give each a segment of ``max(quota, count)`` entries."""
        quota = self.quota = self.capacity // max(1, len(classes))
        counts = self.count[classes]
        seg = counts.clamp(min=quota)
        new_start = torch.zeros_like(self.start)
        new_start[classes] = torch.cumsum(seg, 0) - seg
        table = torch.zeros(max(self.capacity, int(seg.sum())), dtype=torch.long)
        members = torch.repeat_interleave(classes, counts)
        offset = torch.arange(len(members)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        table[new_start[members] + offset] = self.table[self.start[members] + offset]
        self.table, self.start = table, new_start
        self.counts_changed()

    # ------------------------------------------------------------------ queries and updates
    def slots_of(self, c: int) -> Tensor:
        s = int(self.start[c])
        return self.table[s: s + int(self.count[c])]

    def occupied(self) -> Tensor:
        """All occupied slots, in increasing order (O(occupied))."""
        classes = self.count.nonzero().flatten()
        counts = self.count[classes]
        members = torch.repeat_interleave(classes, counts)
        offset = torch.arange(len(members)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return self.table[self.start[members] + offset].sort().values

    def slot_at(self, index: Tensor) -> Tensor:
        """The slots at positions ``index`` of the concatenation of all classes' slot lists (label order)."""
        if self._positions is None:  # class c's lists hold positions ends[c] - count[c] .. ends[c] - 1
            ends = torch.cumsum(self.count, 0)
            self._positions = ends, self.start - (ends - self.count)
        ends, base = self._positions
        c = torch.searchsorted(ends, index.contiguous(), right=True)
        return self.table.index_select(0, base.index_select(0, c).add_(index))

    def pop_free(self, k: int) -> Tensor:
        """The ``k`` lowest free slots, in increasing order."""
        if k > self.n_free:
            raise RuntimeError(f"replay buffer bookkeeping: {k} slots wanted, {self.n_free} free")
        out = self.free[self.n_free - k: self.n_free].flip(0)
        self.n_free -= k
        return out

    def release(self, slots: Tensor) -> None:
        """Return ``slots`` to the free stack, keeping it in decreasing order (O(capacity); rebalancing only)."""
        free = torch.cat([self.free[: self.n_free], slots]).sort(descending=True).values
        self.n_free = len(free)
        self.free = torch.cat([free, torch.zeros(self.capacity - len(free), dtype=torch.long)])

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"count": self.count.clone(), "start": self.start.clone(), "table": self.table.clone(),
                "free": self.free.clone(), "n_free": self.n_free, "quota": self.quota}

    @classmethod
    def from_state(cls, state: dict[str, Any], capacity: int) -> ClassSlots:
        out = cls(capacity)
        out.count, out.start = state["count"].clone(), state["start"].clone()
        out.table, out.free, out.n_free = state["table"].clone(), state["free"].clone(), int(state["n_free"])
        out.quota = int(state["quota"])
        return out
