"""Replay buffer: vectorised reservoir and class-balanced storage of compact tensors.

The buffer is an ``nn.Module`` whose storage is registered buffers, so it follows the model to
its device, lands in ``state_dict``/checkpoints (its random generator too) and loads into a
fresh module. Inserting a batch costs a few tensor operations; there is no per-sample Python
loop (the class-balanced policy loops over the classes present in a batch, not its samples).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from clframe.errors import ConfigError

BufferPolicy = Literal["reservoir", "class_balanced"]


def _last_occurrence(slots: Tensor) -> Tensor:
    """Positions whose slot is not written again later in the batch (sequential semantics)."""
    if len(slots) <= 1:
        return torch.ones_like(slots, dtype=torch.bool)
    order = torch.sort(slots, stable=True).indices
    s = slots[order]
    last_sorted = torch.ones_like(s, dtype=torch.bool)
    last_sorted[:-1] = s[1:] != s[:-1]
    keep = torch.zeros_like(slots, dtype=torch.bool)
    keep[order] = last_sorted
    return keep


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
        self.register_buffer("class_seen", torch.zeros(0, dtype=torch.long))
        self.fields: list[str] = []
        for name in ("x", "y", "t"):
            self._register_field(name)

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
        if self._storage("y").numel() == 0:
            return 0
        if self.policy == "reservoir":
            return int(min(int(self.num_seen), self.capacity))
        return int((self.data_y >= 0).sum())

    def valid_slots(self) -> Tensor:
        """Indices of occupied slots."""
        if self.policy == "reservoir":
            return torch.arange(len(self), device=self.num_seen.device)
        return (self.data_y >= 0).nonzero().flatten()

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
        self.num_seen.add_(len(y))  # in place: no nn.Module.__setattr__ on every step

    def _write(self, slots: Tensor, rows: Tensor, values: dict[str, Tensor]) -> None:
        keep = _last_occurrence(slots)
        slots, rows = slots[keep], rows[keep]
        dev = self.data_y.device
        slots, rows_dev = slots.to(dev), rows.to(values["y"].device)
        for name, v in values.items():
            self._storage(name)[slots] = v[rows_dev].to(dev)

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
        slots, rows = self._reservoir_slots(int(self.num_seen), len(values["y"]), self.capacity)
        if len(slots):
            self._write(slots, rows, values)

    def _add_class_balanced(self, values: dict[str, Tensor]) -> None:
        y = values["y"]
        y_cpu = y.cpu()
        n_needed = int(y_cpu.max()) + 1
        if len(self.class_seen) < n_needed:
            grown = torch.zeros(n_needed, dtype=torch.long, device=self.class_seen.device)
            grown[: len(self.class_seen)] = self.class_seen
            self.class_seen = grown
        new_classes = [c for c in y_cpu.unique().tolist() if int(self.class_seen[c]) == 0]
        if new_classes:
            self._rebalance(int((self.class_seen > 0).sum()) + len(new_classes))
        quota = self.capacity // max(1, int((self.class_seen > 0).sum()) + len(new_classes))
        stored = self.data_y.cpu()
        for c in y_cpu.unique().tolist():
            rows = (y_cpu == c).nonzero().flatten()
            own = (stored == c).nonzero().flatten()
            n_fill = max(0, min(len(rows), quota - len(own)))
            slots_list, rows_list = [], []
            if n_fill:
                free = (stored < 0).nonzero().flatten()[:n_fill]
                slots_list.append(free)
                rows_list.append(rows[:n_fill])
                stored[free] = c
                own = torch.cat([own, free]).sort().values
            rest = rows[n_fill:]
            if len(rest):
                start = int(self.class_seen[c]) + n_fill
                picks, accepted = self._reservoir_slots(start, len(rest), quota)
                # positions below `quota` that are already filled index the class's own slots
                slots_list.append(own[picks])
                rows_list.append(rest[accepted])
            if slots_list:
                self._write(torch.cat(slots_list), torch.cat(rows_list), values)
            self.class_seen[c] += len(rows)

    def _rebalance(self, n_classes: int) -> None:
        """Evict random samples of classes above the new per-class quota."""
        quota = self.capacity // n_classes
        stored = self.data_y.cpu()
        for c in stored[stored >= 0].unique().tolist():
            own = (stored == c).nonzero().flatten()
            excess = len(own) - quota
            if excess > 0:
                evict = own[torch.randperm(len(own), generator=self.generator)[:excess]]
                self.data_y[evict.to(self.data_y.device)] = -1

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        """``n`` stored samples drawn without replacement (all of them if fewer are stored).

        Under DDP, where every rank holds the same buffer and generator, each rank passes its
        ``rank``: all ranks draw the same permutation (so the generators stay in step) and take
        disjoint shares of it, so the ranks replay different samples.
        """
        if n < 1:
            raise ConfigError(f"the number of samples to draw must be positive, got {n}")
        # reservoir slots 0..len-1 are the occupied ones, so the draw indexes the storage directly
        slots = self.valid_slots() if self.policy != "reservoir" else None
        size = len(self) if slots is None else len(slots)
        if size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        pick = torch.randperm(size, generator=self.generator)
        if size >= world_size:  # otherwise (fewer stored samples than ranks) every rank replays them all
            pick = pick[rank::world_size]
        idx = pick[:n].to(self.num_seen.device)
        if slots is not None:
            idx = slots[idx]
        return {name: self._storage(name)[idx] for name in self.fields}

    def all(self) -> dict[str, Tensor]:
        idx = self.valid_slots()
        return {name: self._storage(name)[idx] for name in self.fields}

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "fields": list(self.fields), "policy": self.policy,
                "capacity": self.capacity}

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
