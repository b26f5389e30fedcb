"""ContinualDataModule: a TaskStream plus a task pointer, served through Lightning's data hooks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from clframe.data import device_resident as resident
from clframe.data.augment import TransformSpec, build_pipeline
from clframe.data.resize import check_resize, resize_source
from clframe.data.samplers import EpochBatchSampler, EpochResumable, PerTaskBatchSampler, TaskBatchSampler
from clframe.data.scenarios import (
    ScenarioError,
    check_unused_options,
    class_incremental,
    domain_incremental,
    resolve_task_kind,
)
from clframe.data.sources import load_source
from clframe.data.stream import Batch, TaskDataset, TaskStream, passthrough_collate


class ConcatTaskDataset(Dataset):
    """Several task datasets as one, keeping the batched ``__getitems__`` path (used by Joint)."""

    def __init__(self, datasets: Sequence[TaskDataset]) -> None:
        self.datasets = list(datasets)
        self.offsets = torch.tensor([0] + [len(d) for d in self.datasets]).cumsum(0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitems__(self, positions: Sequence[int]) -> Batch:
        pos = torch.as_tensor(positions, dtype=torch.long)
        which = torch.searchsorted(self.offsets, pos, right=True) - 1
        if len(pos) and bool((which == which[0]).all()):  # one task (evaluation)
            d = int(which[0])
            return self.datasets[d].__getitems__(pos - self.offsets[d])
        parts, order = [], []
        for d in which.unique().tolist():
            sel = (which == d).nonzero().flatten()
            parts.append(self.datasets[d].__getitems__(pos[sel] - self.offsets[d]))
            order.append(sel)
        inverse = torch.cat(order).argsort()
        return tuple(torch.cat([p[k] for p in parts])[inverse] for k in range(3))  # type: ignore[return-value]


class ResumableDataLoader(DataLoader):
    """The training loader: its position goes into Lightning checkpoints (``state_dict``), so a run
    killed mid-epoch resumes with exactly the batches it had not seen yet, in the same order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._resumed = 0

    def _order(self) -> EpochResumable:
        return self.batch_sampler if isinstance(self.batch_sampler, EpochResumable) else self.sampler

    def __iter__(self):
        resumed, self._resumed = self._resumed, 0  # batches of this epoch already consumed
        # ... unless the sampler dropped that position: the restored epoch was over and a new one begins
        self._yielded = resumed if self._order().start else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._order().epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        batches = int(state_dict["batches"])
        per_batch = 1 if isinstance(self.batch_sampler, EpochResumable) else self.batch_size  # batch samplers count batches
        self._order().resume_at(int(state_dict["epoch"]), batches * per_batch)
        self._resumed = batches


TrainScope = Literal["current", "seen", "all"]


class ContinualDataModule(L.LightningDataModule):
    """Builds a task stream from a named source and serves the task the trainer points at.

    ``train_dataloader`` serves the current task (or every seen task when a strategy such as Joint
    sets ``train_scope="seen"``; ``joint_batches="per_task"`` then puts ``batch_size`` samples of
    each seen task in every batch); ``val/test_dataloader`` serve the seen tasks as one loader of
    single-task batches, in task order (every batch carries its task id). Batches are ``(uint8 x, label, task id)``;
    strategies scale and normalise on the device (`normalize=False`: scale to [0, 1] only).
    ``tasks`` says how tasks differ: ``split`` (each task a subset of the classes; the default for class-
    and task-incremental streams), ``permutation``, ``rotation`` (``angles``), ``datasets``
    (``domain_sources``) or ``corruption`` (``corruptions`` at ``severity`` 1-5; see
    :mod:`clframe.data.corruptions`). ``scenario`` says what is shared at test time; every pair works
    (see :mod:`clframe.data.scenarios`), e.g. ``scenario="domain", tasks="split"`` relabels each task's
    classes to 0..k-1 over one shared k-way head. ``domain`` is the older name of ``tasks``.
    ``image_size`` pads (``resize="pad"``, zeros around the image) or resizes (``"bilinear"``) every
    image to a square size once, at load time (MNIST to 32x32 as in several MNIST protocols).
    ``data_cache``: where decoded images are kept between runs (unset: ``CLFRAME_CACHE`` or the default
    folder; ``false``: decode every time; a folder; see :mod:`clframe.data.cache`).
    ``train_transforms`` / ``eval_transforms``: a preset (``cifar_crop_flip``, ``tiny_imagenet_crop_flip``)
    or a list of ``torchvision.transforms.v2`` classes (see :mod:`clframe.data.augment`), applied by the
    strategy on its device, per sample: to training inputs only (train) or to evaluation inputs (eval).
    ``device_resident``: keep the served tasks' tensors on the trainer's device and gather batches there
    (``auto``: on a CUDA device when they fit; see :mod:`clframe.data.device_resident`).

    Under DDP every loader serves this process's shard (see :mod:`clframe.data.samplers`): training
    shards are disjoint and equally long, so ``batch_size`` is per process; evaluation shards cover
    every test sample exactly once across the ranks.
    """

    def __init__(
        self,
        source: str = "digits",
        scenario: Literal["class", "task", "domain"] = "class",
        n_tasks: int | None = 5,
        classes_per_task: int | None = None,
        first_task_classes: int | None = None,
        class_order: list[int] | None = None,
        shuffle_classes: bool = False,
        tasks: Literal["split", "permutation", "rotation", "datasets", "corruption"] | None = None,
        domain: Literal["split", "permutation", "rotation", "datasets", "corruption"] | None = None,
        domain_sources: list[str] | None = None,
        angles: list[float] | None = None,
        corruptions: list[str] | None = None,
        severity: int = 3,
        data_root: str | None = None,
        download: bool = False,
        data_cache: bool | str | None = None,
        source_options: dict[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        train_samples_per_class: int | None = None,
        test_samples_per_class: int | None = None,
        eval_all_tasks: bool = False,
        joint_batches: Literal["uniform", "per_task"] = "uniform",
        normalize: bool = True,
        seed: int | None = None,
        views_per_sample: int = 1,
        image_size: int | None = None,
        resize: Literal["pad", "bilinear"] = "pad",
        train_transforms: TransformSpec = None,
        eval_transforms: TransformSpec = None,
        device_resident: resident.DeviceResident = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._pipelines = (build_pipeline(train_transforms, "data.train_transforms"),  # fail early on a typo
                           build_pipeline(eval_transforms, "data.eval_transforms"))
        if batch_size < 1 or eval_batch_size < 1:
            raise ScenarioError(f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        if num_workers < 0:
            raise ScenarioError(f"num_workers must be 0 (load in the main process) or a positive number of loader "
                                f"processes, got {num_workers}")
        if views_per_sample < 1 or batch_size % views_per_sample:
            raise ScenarioError(f"views_per_sample ({views_per_sample}) must be positive and divide batch_size "
                                f"({batch_size}): every batch holds batch_size / views_per_sample samples x their views")
        check_resize(image_size, resize)
        resident.normalize(device_resident)  # fail early on a typo
        self.current_task = 0
        self.train_scope: TrainScope = "current"
        self._stream: TaskStream | None = None
        self._on_device: dict[tuple, resident.DeviceTaskData] = {}  # device copies served in device-resident mode

    def input_pipelines(self) -> tuple[Any, Any]:
        """``(train, eval)`` batch-level input pipelines (``None`` where unset) that the strategy applies on its
        device: the train one to every training forward (new and replayed samples), the eval one to evaluation
        inputs. Batches leave the loaders raw (uint8), so replay buffers store un-augmented samples."""
        return self._pipelines

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_stream(cls, stream: TaskStream, **kwargs: Any) -> ContinualDataModule:
        """Serve an already built stream (Python API); its scenario is the stream's."""
        given = kwargs.pop("scenario", stream.scenario)
        if given != stream.scenario:
            raise ScenarioError(f"scenario={given!r} was given for a {stream.scenario}-incremental stream; the data "
                                "module serves the stream as built, so leave scenario out (or build the stream again)")
        if kwargs.get("image_size") is not None:
            raise ScenarioError("image_size resizes images while the data module builds its stream; a given stream "
                                "is served as built. Resize its source first (clframe.data.resize.resize_source).")
        dm = cls(scenario=stream.scenario, **kwargs)
        dm._stream = stream
        return dm

    def _load(self, name: str, download: bool):
        source = load_source(name, root=self.hparams.data_root, download=download,
                             cache=self.hparams.get("data_cache"), **(self.hparams.source_options or {}))
        size = self.hparams.get("image_size")
        return source if download or size is None else resize_source(source, size, self.hparams.get("resize", "pad"))

    def prepare_data(self) -> None:
        """Downloads (once, on rank 0) when asked to; the stream itself is built in ``setup``."""
        if self.hparams.download and self._stream is None:
            for name in self.hparams.domain_sources or [self.hparams.source]:
                self._load(name, download=True)

    @property
    def seed(self) -> int:
        """The stream's seed: ``seed`` if given, else the run's global seed (``seed_everything``)."""
        if self._stream is not None:
            return self._stream.seed
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def build_stream(self) -> TaskStream:
        h = self.hparams
        kind = resolve_task_kind(h.scenario, h.get("tasks"), h.domain)
        check_unused_options(kind, classes_per_task=h.classes_per_task, first_task_classes=h.first_task_classes,
                             class_order=h.class_order, shuffle_classes=h.shuffle_classes, angles=h.angles,
                             corruptions=h.corruptions, domain_sources=h.domain_sources)
        limits = dict(seed=self.seed, val_fraction=h.val_fraction, train_samples_per_class=h.train_samples_per_class,
                      test_samples_per_class=h.test_samples_per_class, scenario=h.scenario)
        if kind != "split":
            names = h.domain_sources if kind == "datasets" else [h.source]
            if not names:
                raise ScenarioError("tasks='datasets' needs domain_sources: a list of data set names, one per task")
            sources = [self._load(n, download=False) for n in names]
            return domain_incremental(sources, kind=kind, n_tasks=h.n_tasks, angles=h.angles,
                                      corruptions=h.corruptions, severity=h.severity, **limits)
        return class_incremental(self._load(h.source, download=False), n_tasks=h.n_tasks,
                                 classes_per_task=h.classes_per_task, first_task_classes=h.first_task_classes,
                                 class_order=h.class_order, shuffle_classes=h.shuffle_classes, **limits)

    def setup(self, stage: str | None = None) -> None:
        if self._stream is None:
            self._stream = self.build_stream()
            if not self.hparams.normalize:  # inputs only scaled to [0, 1] (the DER paper's MNIST protocol)
                channels = len(self._stream.mean)
                self._stream.mean, self._stream.std = (0.0,) * channels, (1.0,) * channels

    @property
    def stream(self) -> TaskStream:
        if self._stream is None:
            self.setup()
        assert self._stream is not None
        return self._stream

    def set_task(self, task_id: int) -> None:
        if not 0 <= task_id < len(self.stream):
            raise IndexError(f"task {task_id} is out of range for a stream of {len(self.stream)} tasks")
        self.current_task = task_id

    # ------------------------------------------------------------------ loaders
    def shard(self) -> tuple[int, int]:
        """``(global rank, world size)`` of this process under the attached trainer; ``(0, 1)`` without one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _tasks_eval_loader(self, datasets: Sequence[Dataset]) -> DataLoader:
        """One loader over several tasks' evaluation data: per-task batches, task after task
        (:class:`TaskBatchSampler`), so one evaluation loop serves every task; batches carry their task ids.
        In device-resident mode the tasks' device copies are served the same way."""
        workers = self.hparams.num_workers
        rank, world = self.shard()
        sampler = TaskBatchSampler([len(d) for d in datasets], self.hparams.eval_batch_size, rank, world,
                                   as_lists=workers > 0)
        on_device = [self.device_copy(d, ("eval", id(d))) for d in datasets]
        if datasets and all(copy is not None for copy in on_device):
            return DataLoader(ConcatTaskDataset(on_device), batch_sampler=sampler, collate_fn=passthrough_collate,
                              generator=self._private_generator())
        return DataLoader(
            ConcatTaskDataset(datasets), num_workers=workers, collate_fn=passthrough_collate, batch_sampler=sampler,
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available() and workers > 0,
            generator=self._private_generator(),
        )

    def device_copy(self, dataset: Dataset, key: tuple) -> resident.DeviceTaskData | None:
        """``dataset`` as tensors on the trainer's device in device-resident mode (copied once, then kept;
        one training set at a time), else ``None`` (see :mod:`clframe.data.device_resident`)."""
        setting = resident.normalize(self.hparams.get("device_resident", "auto"))
        strategy = getattr(self.trainer, "strategy", None)
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        kept = self._on_device.get(key)
        if setting is False:
            return None
        if kept is not None and kept.device == device:
            return kept
        if not resident.resolve(setting, device, dataset):
            return None
        if key[0] == "train":  # the previous training set's copy is freed first
            self._on_device = {k: v for k, v in self._on_device.items() if k[0] != "train"}
        if not self._on_device:
            rank_zero_info(f"clframe: data kept on {device} (device_resident={setting})")
            resident.quiet_worker_advice()
        self._on_device[key] = resident.DeviceTaskData(dataset, device)
        return self._on_device[key]

    def _private_generator(self) -> torch.Generator:
        """Every DataLoader iterator draws a worker seed; from this generator, not the global RNG, so
        creating loaders (new epochs, evaluations, a resumed run) never shifts training randomness."""
        return torch.Generator().manual_seed(self.seed)

    def train_dataset(self) -> Dataset:
        tasks = self.stream.tasks
        if self.train_scope == "current":
            return tasks[self.current_task].train
        upto = len(tasks) if self.train_scope == "all" else self.current_task + 1
        return ConcatTaskDataset([t.train for t in tasks[:upto]])

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``(seed, epoch)`` alone and resumable mid-epoch (see :class:`ResumableDataLoader`)."""
        dataset, workers = self.train_dataset(), self.hparams.num_workers
        rank, world = self.shard()
        common = dict(num_workers=workers, collate_fn=passthrough_collate, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available() and workers > 0, generator=self._private_generator())
        per_task = isinstance(dataset, ConcatTaskDataset) and self.hparams.joint_batches == "per_task"
        sizes = [len(d) for d in dataset.datasets] if per_task else []
        on_device = self.device_copy(dataset, ("train", *map(id, getattr(dataset, "datasets", [dataset]))))
        if on_device is not None:  # gathered on the device: no workers, no pinned copies
            dataset, common = on_device, dict(collate_fn=passthrough_collate, generator=common["generator"])
        if self.hparams.get("views_per_sample", 1) > 1:  # the view-batch model (clframe.data.view_batch)
            return self._view_batch_loader(dataset, rank, world, common, per_task)
        if per_task:
            sampler = PerTaskBatchSampler(sizes, self.hparams.batch_size, self.seed, rank=rank, world_size=world)
            return ResumableDataLoader(dataset, batch_sampler=sampler, **common)
        device = on_device.device if on_device is not None else "cpu"
        sampler = EpochBatchSampler(len(dataset), self.hparams.batch_size, self.seed, rank=rank, world_size=world,
                                    device=device, as_lists=on_device is None and workers > 0)
        return ResumableDataLoader(dataset, batch_sampler=sampler, **common)

    def _view_batch_loader(self, dataset: Dataset, rank: int, world: int, common: dict[str, Any],
                           per_task: bool = False) -> DataLoader:
        """R views of each sample in one batch, each sample back every R epochs, at the baseline's steps."""
        from clframe.data.view_batch import ViewBatchLoader, ViewBatchSampler, task_epoch_offset

        if per_task:
            raise ScenarioError("views_per_sample > 1 cannot be combined with joint_batches='per_task'")
        sampler = ViewBatchSampler(len(dataset), self.hparams.batch_size, self.hparams.views_per_sample, self.seed,
                                   task=self.current_task, epoch_offset=task_epoch_offset(self.trainer), rank=rank,
                                   world_size=world)
        return ViewBatchLoader(dataset, batch_sampler=sampler, **common)

    def _eval_tasks(self):
        tasks = self.stream.tasks
        return tasks if self.hparams.eval_all_tasks else tasks[: self.current_task + 1]

    def has_validation_data(self) -> bool:
        """Whether the tasks hold validation splits (``val_fraction > 0``, or a stream built with them)."""
        return any(t.val is not None and len(t.val) > 0 for t in self.stream.tasks)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The seen tasks' validation data as one loader (see :meth:`test_dataloader`); ``[]`` without any."""
        held_out = [t.val for t in self._eval_tasks() if t.val is not None]
        return self._tasks_eval_loader(held_out) if held_out else []

    def test_dataloader(self) -> DataLoader:
        """The seen tasks' test data as one loader of single-task batches, in task order (one evaluation
        loop for any number of tasks; the batches are those of one loader per task, one after the other)."""
        return self._tasks_eval_loader([t.test for t in self._eval_tasks()])

    def predict_dataloader(self) -> DataLoader:
        """The seen tasks' test data (``clframe predict``); batches carry their task ids."""
        return self.test_dataloader()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"current_task": self.current_task, "signature": self.stream.signature()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("signature")
        if saved is not None and saved != self.stream.signature():
            raise ScenarioError(
                "this checkpoint was written for a different task stream (data set, class order, split or seed "
                "differ). Resume with the config that produced it, or start a new run without --ckpt_path."
            )
        self.current_task = int(state_dict["current_task"])

