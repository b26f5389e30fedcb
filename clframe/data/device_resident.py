"""Device-resident data: a task's uint8 tensors kept on the accelerator, batches gathered there by index.

The small-image benchmarks (MNIST family, CIFAR-10, Tiny-ImageNet at 64 px) fit in GPU memory many times
over. In this mode (``ContinualDataModule(device_resident=...)``) each served data set is copied to the
device once, as uint8 images plus labels and task ids; an epoch's order is the normal path's
(:class:`~clframe.data.samplers.EpochBatchSampler`, a pure function of seed and epoch), moved to the device
once per epoch, and every batch is a slice of it followed by one gather on the device. There is no worker process, no pinned copy and no host-to-device transfer per step; Lightning's
``transfer_batch_to_device`` finds the tensors already on the device (``Tensor.to`` returns them as they
are). Batches hold the same samples in the same order as the normal path's, so a run gives the same
results either way (up to the device's arithmetic), and the loaders resume mid-epoch through the same
protocol (``ResumableDataLoader``).

``device_resident="auto"`` turns the mode on where it pays: on a CUDA device, when the data set takes at
most :data:`FREE_MEMORY_SHARE` of the device's free memory. On a CPU it is off: the normal path already
gathers a batch with one indexing operation from the same tensors, so there is nothing to save (measured
in ``benchmarks/RESULTS.md``). ``True`` forces it on any device (tests use it on the CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from clframe.data.samplers import check_shard
from clframe.data.scenarios import ScenarioError
from clframe.data.stream import Batch

DeviceResident = bool | Literal["auto"]
"""What ``data.device_resident`` accepts: ``auto`` (on for a CUDA device when the data fit), ``true``, ``false``."""

FREE_MEMORY_SHARE = 0.5
"""``auto`` keeps a data set on the device only if it takes at most this share of the free device memory."""

_CHUNK = 4096  # samples read per gather while copying a data set to the device


def has_sample_transform(dataset: Dataset) -> bool:
    """Whether ``dataset`` (or a part of a concatenation) draws a random per-sample transform when read: such
    data cannot be copied to the device once without freezing the draw."""
    parts = getattr(dataset, "datasets", [dataset])
    return any(getattr(d, "sample_transform", None) is not None for d in parts)


def dataset_bytes(dataset: Dataset) -> int:
    """Bytes the device copy of ``dataset`` takes (inputs, int64 labels and task ids), from its first sample."""
    if len(dataset) == 0:
        return 0
    x, y, t = dataset.__getitems__([0])
    per_sample = x[0].numel() * x.element_size() + y.element_size() + t.element_size()
    return len(dataset) * per_sample


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` fit within :data:`FREE_MEMORY_SHARE` of ``device``'s free memory (CUDA only)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= FREE_MEMORY_SHARE * free


def normalize(setting: DeviceResident | str) -> DeviceResident:
    """``True``, ``False`` or ``"auto"`` from a setting (strings in any case accepted); anything else is refused."""
    if isinstance(setting, bool):
        return setting
    word = str(setting).strip().lower()
    if word in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[word]
    raise ScenarioError(f"device_resident must be auto, true or false, got {setting!r}")


def resolve(setting: DeviceResident, device: torch.device, dataset: Dataset) -> bool:
    """Whether ``dataset`` is served from ``device`` under ``setting`` (see the module doc)."""
    setting = normalize(setting)
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return False
    if has_sample_transform(dataset):
        if setting == "auto":
            return False
        raise ScenarioError("device_resident=true cannot serve a data set with a per-sample transform drawn while "
                            "reading it (it would be frozen at the first copy); use device_resident=auto or false")
    return setting is True or fits_on(device, dataset_bytes(dataset))


def quiet_worker_advice() -> None:
    """Drop Lightning's "does not have many workers ... increase num_workers" warning: device-resident loaders
    gather on the device in the main process on purpose, and worker processes could not touch the data there."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck.*")


class DeviceTaskData(Dataset):
    """The samples of a data set (a task's, or several tasks' for Joint) as tensors on ``device``.

    Read once through the data set's own batched ``__getitems__`` (so its fixed per-task input transform,
    a permutation or a rotation, is applied exactly as on the normal path); ``__getitems__`` then gathers
    a batch on the device from positions given as a device tensor (or any sequence of ints).
    """

    def __init__(self, dataset: Dataset, device: torch.device | str) -> None:
        self.device = torch.device(device)
        n = len(dataset)
        parts = [dataset.__getitems__(list(range(lo, min(n, lo + _CHUNK)))) for lo in range(0, n, _CHUNK)]
        self.x, self.y, self.t = (torch.cat([p[k] for p in parts]).to(self.device) for k in range(3))

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, positions: Sequence[int] | Tensor) -> Batch:
        idx = torch.as_tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        return self.x[idx], self.y[idx], self.t[idx]

    def __getitem__(self, position: int) -> Batch:
        x, y, t = self.__getitems__([position])
        return x[0], y[0], t[0]

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.x, self.y, self.t))


class DeviceSliceSampler(Sampler[Tensor]):
    """Evaluation batches: consecutive positions (this rank's every ``world_size``-th under DDP, as
    :class:`~clframe.data.samplers.ShardSampler` gives them), as device tensors."""

    def __init__(self, size: int, batch_size: int, device: torch.device | str, rank: int = 0,
                 world_size: int = 1) -> None:
        check_shard(rank, world_size)
        self.positions = torch.arange(rank, size, world_size, device=device)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.positions.split(self.batch_size))
