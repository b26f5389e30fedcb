"""Replay buffer: vectorised reservoir and class-balanced storage of compact tensors.

The buffer is an ``nn.Module`` whose storage is registered buffers, so it follows the model to
its device, lands in ``state_dict``/checkpoints (its random generator too) and loads into a
fresh module. Inserting and drawing a batch cost a few tensor operations of the batch's size,
whatever the capacity: no per-sample Python loop, no scan of the storage (the class-balanced
policy keeps per-class slot lists, see :mod:`clframe.strategies.replay.slots`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from clframe.errors import ConfigError
from clframe.strategies.replay.slots import ClassSlots, draw_distinct, first_occurrence_into, last_occurrence

BufferPolicy = Literal["reservoir", "class_balanced"]


def _rows_as_words(t: Tensor) -> Tensor:
    """``t`` (contiguous) as one row per sample of the widest integer words that tile a row, for index writes:
    they copy element by element, so a uint8 image row moves in 8-byte words instead of single bytes."""
    rows = t.reshape(len(t), -1)
    row_bytes, offset_bytes = rows.shape[1] * rows.element_size(), rows.storage_offset() * rows.element_size()
    for word in (torch.int64, torch.int32, torch.int16):
        if rows.element_size() < word.itemsize and row_bytes % word.itemsize == 0 and offset_bytes % word.itemsize == 0:
            return rows.view(word)
    return rows


class ReplayBuffer(nn.Module):
    """A fixed-size memory of past samples.

    Policies:
      * ``reservoir`` (Vitter's algorithm R): after n insertions every sample seen so far is in
        the buffer with probability ``capacity / n``.
      * ``class_balanced``: every seen class gets an equal share of the slots (the share shrinks
        as classes arrive; evictions are random), and each class's share is a reservoir sample of
        that class's stream.

    Fields: ``x`` (inputs, stored in their incoming dtype, e.g. uint8), ``y`` (labels), ``t``
    (task ids) and any extra per-sample tensors given to :meth:`add` (e.g. DER's logits).

    Under DDP the owning strategy offers every rank's batch to every rank's buffer (see
    ``ReplayModule``), so all ranks hold identical buffers of ``capacity`` samples in all.
    """

    def __init__(self, capacity: int, policy: BufferPolicy = "reservoir", seed: int = 0) -> None:
        super().__init__()
        if int(capacity) <= 0:
            raise ConfigError(f"buffer capacity must be a positive number of samples, got {capacity}")
        if policy not in ("reservoir", "class_balanced"):
            raise ConfigError(f"unknown buffer policy {policy!r}; allowed: reservoir, class_balanced")
        self.capacity = int(capacity)
        self.policy = policy
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("num_seen", torch.tensor(0, dtype=torch.long))
        # a host copy of num_seen, so that inserting and sampling never wait for a GPU to read it back
        self._seen_on_host = 0
        self.register_buffer("class_seen", torch.zeros(0, dtype=torch.long))
        self.fields: list[str] = []
        for name in ("x", "y", "t"):
            self._register_field(name)
        # class-balanced slot bookkeeping: host tensors, saved in the extra state
        self._slots = ClassSlots(self.capacity) if policy == "class_balanced" else None

    # ------------------------------------------------------------------ storage
    def _register_field(self, name: str) -> None:
        if name not in self.fields:
            self.fields.append(name)
            self.register_buffer(f"data_{name}", torch.empty(0))

    def _storage(self, name: str) -> Tensor:
        return getattr(self, f"data_{name}")

    def _allocate(self, values: dict[str, Tensor]) -> None:
        for name, v in values.items():
            self._register_field(name)
            if self._storage(name).numel() == 0:
                fill = -1 if name == "y" else 0
                store = torch.full((self.capacity, *v.shape[1:]), fill, dtype=v.dtype, device=v.device)
                self.register_buffer(f"data_{name}", store)

    def __len__(self) -> int:
        if self._slots is not None:
            return len(self._slots)
        if self._storage("y").numel() == 0:
            return 0
        return min(self._seen_on_host, self.capacity)

    def valid_slots(self) -> Tensor:
        """Indices of occupied slots, in increasing order."""
        if self._slots is None:
            return torch.arange(len(self), device=self.num_seen.device)
        return self._slots.occupied().to(self.num_seen.device)

    def reindex(self) -> None:
        """Rebuild the class-balanced bookkeeping from the stored labels (O(capacity)).

        For code that frees or fills slots by writing ``data_y`` directly (``-1``: free), as iCaRL's
        exemplar memory does once per task; :meth:`add` keeps the bookkeeping current by itself.
        """
        if self._slots is not None:
            self._slots = ClassSlots.from_labels(self.data_y, self.class_seen, self.capacity)

    # ------------------------------------------------------------------ insertion
    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, t: Tensor, **extra: Tensor) -> None:
        """Offer a batch to the buffer (detached; stored in the inputs' dtype)."""
        values = {"x": x.detach(), "y": y.detach().long(), "t": t.detach().long(), **{k: v.detach() for k, v in extra.items()}}
        self._allocate(values)
        if self.policy == "reservoir":
            self._add_reservoir(values)
        else:
            self._add_class_balanced(values)
        self.count_seen(len(y))

    def count_seen(self, n: int) -> None:
        """Add ``n`` to the samples offered so far (in place: no ``nn.Module.__setattr__`` per step)."""
        self.num_seen.add_(n)
        self._seen_on_host += int(n)

    def _write(self, slots: Tensor, rows: Tensor, values: dict[str, Tensor]) -> None:
        keep = last_occurrence(slots)
        self._write_distinct(slots[keep], rows[keep], values)

    def _write_distinct(self, slots: Tensor, rows: Tensor, values: dict[str, Tensor]) -> None:
        """Store row ``rows[i]`` of ``values`` in slot ``slots[i]`` (the slots distinct). Rows of several
        words go by ``index_put_``, single words by ``index_copy_``: each the faster of the two there."""
        dev = self.data_y.device
        slots, rows_dev = slots.to(dev), rows.to(values["y"].device)
        for name, v in values.items():
            store = self._storage(name)
            if store.dim() > 1 and store.element_size() < 8 and store.is_contiguous():  # reshape: a view
                words = _rows_as_words(store)
                new = _rows_as_words(v.contiguous()) if v.dtype == store.dtype and v.device == dev else None
                if new is not None and new.dtype == words.dtype:  # pick the rows' words directly
                    new = new.index_select(0, rows_dev)
                else:
                    new = _rows_as_words(v.index_select(0, rows_dev).to(device=dev, dtype=store.dtype).contiguous())
                words.index_put_((slots,), new)
            elif store.dim() == 1:
                store.index_copy_(0, slots, v.index_select(0, rows_dev).to(device=dev, dtype=store.dtype))
            else:
                store.index_put_((slots,), v.index_select(0, rows_dev).to(device=dev, dtype=store.dtype))

    def _ones(self, n: int) -> Tensor:
        """``n`` int64 ones on the host (a view of a kept tensor: do not write to it)."""
        ones = self.__dict__.get("_ones_kept")
        if ones is None or len(ones) < n:
            ones = self.__dict__["_ones_kept"] = torch.ones(max(n, 1024), dtype=torch.long)
        return ones[:n]

    def _scratch_of(self, size: int) -> Tensor:
        """A host int64 work tensor of at least ``size`` entries (contents meaningless; not saved)."""
        scratch = self.__dict__.get("_scratch")
        if scratch is None or len(scratch) < size:
            scratch = self.__dict__["_scratch"] = torch.empty(size, dtype=torch.long)
        return scratch

    def _reservoir_slots(self, start: int, count: int, room: int) -> tuple[Tensor, Tensor]:
        """Slots (< room) chosen by algorithm R for stream positions start..start+count-1."""
        # the same draw as floor(u * (pos + 1)) with pos = start..start+count-1, in fewer tensor operations
        draw = torch.rand(count, generator=self.generator, dtype=torch.float64)
        draw = draw.mul_(torch.arange(start + 1, start + count + 1, dtype=torch.float64)).floor_().long()
        if start < room:  # filling up: positions below `room` take their own slot
            pos = torch.arange(start, start + count)
            draw = torch.where(pos < room, pos, draw)
        rows = (draw < room).nonzero().flatten()
        return draw[rows], rows

    def _add_reservoir(self, values: dict[str, Tensor]) -> None:
        slots, rows = self._reservoir_slots(self._seen_on_host, len(values["y"]), self.capacity)
        if len(slots):
            self._write(slots, rows, values)

    def _add_class_balanced(self, values: dict[str, Tensor]) -> None:
        """Each row takes a free slot while its class is below the quota, else is a reservoir candidate
        (algorithm R over the class's own stream) for one of the class's ``quota`` slots. A few
        tensor operations on the batch and on per-label vectors; no scan of the storage."""
        book = self._slots
        # rows grouped by label, stream order within a label; the labels are the one transfer needed
        y = values["y"]
        ys, order = torch.sort(y if y.device.type == "cpu" else y.cpu(), stable=True)
        class_seen = self.class_seen
        n_labels = max(len(class_seen), len(book.count), int(ys[-1]) + 1)
        if len(class_seen) < n_labels:
            grown = torch.zeros(n_labels, dtype=torch.long, device=class_seen.device)
            grown[: len(class_seen)] = class_seen
            self.class_seen = class_seen = grown
        book.grow(n_labels)
        seen = class_seen if class_seen.device.type == "cpu" else class_seen.cpu()  # read only
        seen_ys = seen.index_select(0, ys)
        if not bool(seen_ys.all()):  # new classes: a smaller quota for everyone
            arrived = seen > 0
            arrived[ys] = True
            self._rebalance(arrived.nonzero().flatten())
        quota, n = book.quota, len(ys)
        rank = torch.arange(n).sub_(torch.searchsorted(ys, ys))  # a row's rank among its class's rows here
        pos = seen_ys.add_(rank)  # its position in its class's stream
        # algorithm R over the class's stream: position p takes entry floor(u * (p + 1)) of the class's list
        entry = torch.rand(n, generator=self.generator, dtype=torch.float64).mul_(pos + 1).long()
        entry = torch.where(pos < quota, pos, entry)
        if book.n_free:  # with no free slot every class is at its quota: none can be filling
            held = book.count.index_select(0, ys)
            fill = rank < quota - held
            filling = int(fill.sum())
            if filling:  # rows of classes below the quota append the lowest free slots to their class's list
                entry = torch.where(fill, held + rank, entry)
                book.table[book.start[ys[fill]] + entry[fill]] = book.pop_free(filling)
                book.count.index_add_(0, ys[fill], self._ones(filling))
                book.counts_changed()
        hit = (entry < quota).nonzero().flatten()
        if len(hit):
            # places in the slot table, in (label, stream) order: of rows sharing a place the last one's
            # write is kept (a later row of a class overwrites an earlier one's slot, never the reverse)
            place = book.start.index_select(0, ys).add_(entry).index_select(0, hit)
            keep = first_occurrence_into(place, self._scratch_of(len(book.table)), last=True)
            rows = order.index_select(0, hit)
            if not bool(keep.all()):
                place, rows = place[keep], rows[keep]
            self._write_distinct(book.table.index_select(0, place), rows, values)
        if class_seen.device.type == "cpu":
            class_seen.index_add_(0, ys, self._ones(n))
        else:
            class_seen.add_(torch.bincount(ys, minlength=n_labels).to(class_seen.device))

    def _rebalance(self, classes: Tensor) -> None:
        """Shrink every class above the new quota to it by random evictions, and lay the class
        segments out again for ``classes`` (the sorted labels seen). O(capacity), once per new class."""
        book = self._slots
        quota = self.capacity // len(classes)
        evicted = []
        for c in (book.count > quota).nonzero().flatten().tolist():
            own = book.slots_of(c)
            order = torch.randperm(len(own), generator=self.generator)
            keep = torch.ones(len(own), dtype=torch.bool)
            keep[order[: len(own) - quota]] = False
            evicted.append(own[~keep])
            own[:quota] = own[keep].clone()  # survivors keep their order, at the segment's head
            book.count[c] = quota
            book.counts_changed()
        if evicted:
            gone = torch.cat(evicted)
            self.data_y[gone.to(self.data_y.device)] = -1
            book.release(gone)
        book.layout(classes)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        """``n`` stored samples drawn without replacement (all of them if fewer are stored).

        Under DDP, where every rank holds the same buffer and generator, each rank passes its
        ``rank``: all ranks draw the same permutation (so the generators stay in step) and take
        disjoint shares of it, so the ranks replay different samples.
        """
        if n < 1:
            raise ConfigError(f"the number of samples to draw must be positive, got {n}")
        size = len(self)
        if size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        # the first n * world_size places of a random order of the stored samples: rank r takes
        # places r, r + world_size, ...; with fewer stored samples than ranks every rank replays them all
        spread = size >= world_size
        pick = draw_distinct(size, n * world_size if spread else n, self.generator, self._scratch_of(size))
        if spread:
            pick = pick[rank::world_size]
        pick = pick[:n]
        # reservoir slots 0..len-1 are the occupied ones; class-balanced positions go through the slot lists
        slots = pick if self._slots is None else self._slots.slot_at(pick)
        idx = slots.to(self.num_seen.device)
        return self.take_slots(idx)

    def take_slots(self, slots: Tensor) -> dict[str, Tensor]:
        """Every field of the samples in ``slots`` (``index_select``: whole rows copied at once, which for
        uint8 images is tens of times faster than advanced indexing on the CPU)."""
        return {name: self._storage(name).index_select(0, slots) for name in self.fields}

    def all(self) -> dict[str, Tensor]:
        return self.take_slots(self.valid_slots())

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        state = {"generator": self.generator.get_state(), "fields": list(self.fields), "policy": self.policy,
                 "capacity": self.capacity}
        if self._slots is not None:
            state["slots"] = self._slots.state()
        return state

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity or state["policy"] != self.policy:
            raise ConfigError(
                f"checkpoint buffer (capacity {state['capacity']}, policy {state['policy']}) does not match this "
                f"strategy's buffer (capacity {self.capacity}, policy {self.policy}); resume with the same config."
            )

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_compatible(state)
        self.generator.set_state(state["generator"])
        for name in state["fields"]:
            self._register_field(name)
        if self._slots is not None:  # the storage is loaded by now (buffers load before the extra state)
            if "slots" in state:
                self._slots = ClassSlots.from_state(state["slots"], self.capacity)
            else:  # a checkpoint from before the bookkeeping was saved
                self.reindex()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self._check_compatible(extra)  # before any storage is replaced
            for name in extra["fields"]:
                self._register_field(name)
        for key, value in state_dict.items():
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                attr = key[len(prefix):]
                if attr in self._buffers and self._buffers[attr].shape != value.shape:
                    self._buffers[attr] = torch.empty_like(value, device=self._buffers[attr].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._seen_on_host = int(self.num_seen)  # one read at load time
