"""Avalanche interop: run clframe strategies, data module and trainer on Avalanche benchmarks.

:func:`from_avalanche` turns an Avalanche benchmark (its train/test streams of experiences) into a
:class:`~clframe.data.stream.TaskStream`. Experience ``i`` becomes task ``i``; its data stay in the
Avalanche dataset and are read lazily through it (with Avalanche's own transform groups: ``train``
for training, ``eval`` for evaluation, as Avalanche's strategies do), and come out as the
``(x, y, task_id)`` batches every clframe strategy expects.

:func:`as_avalanche_model` goes the other way: a clframe strategy as a model that Avalanche's
strategies, plugins and metrics can evaluate, with the same scenario masking and in Avalanche's
label space.

Avalanche is an optional dependency (``pip install "clframe[avalanche]"``): this module imports it
only when one of its functions is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from clframe.data.stream import SCENARIOS, Batch, Task, TaskStream
from clframe.errors import ClframeError

INSTALL_HINT = 'pip install "clframe[avalanche]"'


class AvalancheInteropError(ClframeError):
    """Avalanche is missing, or a benchmark cannot be expressed as a clframe task stream."""


def require_avalanche() -> None:
    """Fail with the install command instead of a bare ImportError deep inside a call."""
    try:
        import avalanche  # noqa: F401
    except ImportError as err:
        raise AvalancheInteropError(
            f"Avalanche benchmarks need the optional dependency avalanche-lib, which is not installed ({err}). "
            f"Install it with: {INSTALL_HINT}"
        ) from err


def _to_tensor(x: Any) -> Tensor:
    """One sample as a tensor: PIL images become uint8 CHW (clframe scales uint8 on the device)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Image.Image):
        return TF.pil_to_tensor(x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise AvalancheInteropError(
        f"an Avalanche sample's input is a {type(x).__name__}, not a tensor, image or array; give the benchmark "
        "a transform that returns tensors (e.g. torchvision's ToTensor())"
    )


class AvalancheTaskDataset(Dataset):
    """One Avalanche experience's samples, read lazily, served as clframe ``(x, y, task_id)`` batches.

    It stands in for :class:`~clframe.data.stream.TaskDataset` (``__getitems__``, ``targets``,
    ``subset``) without copying the data: every sample is read through the Avalanche dataset's own
    ``__getitem__``, so its transforms (e.g. train-time augmentation) apply. ``label_map`` maps
    Avalanche labels to the stream's global class ids (only needed when a task-incremental benchmark
    reuses class ids across tasks); the task id is the experience's position in the stream.
    """

    def __init__(self, dataset: Any, task_id: int, label_map: Tensor | None = None,
                 indices: Tensor | None = None, group: str | None = None) -> None:
        switch = getattr(dataset, group, None) if group is not None else None
        self.dataset = switch() if callable(switch) else dataset  # Avalanche's train()/eval() transform groups
        self.group = group if callable(switch) else None
        self.task_id = int(task_id)
        self.label_map = label_map
        self.indices = torch.arange(len(dataset)) if indices is None else indices.long()

    def __len__(self) -> int:
        return len(self.indices)

    def _global(self, y: Tensor) -> Tensor:
        return y if self.label_map is None else self.label_map[y]

    def __getitems__(self, positions: Sequence[int] | Tensor) -> Batch:
        idx = self.indices[torch.as_tensor(positions, dtype=torch.long)]
        samples = [self.dataset[i] for i in idx.tolist()]
        x = torch.stack([_to_tensor(s[0]) for s in samples])
        y = self._global(torch.as_tensor([int(s[1]) for s in samples], dtype=torch.long))
        return x, y, torch.full_like(y, self.task_id)

    def __getitem__(self, position: int) -> Batch:
        x, y, t = self.__getitems__([position])
        return x[0], y[0], t[0]

    @property
    def targets(self) -> Tensor:
        """Global labels of this dataset's samples, in dataset order (from Avalanche's ``targets``)."""
        all_targets = torch.as_tensor(list(self.dataset.targets), dtype=torch.long)
        return self._global(all_targets[self.indices])

    def subset(self, positions: Tensor) -> AvalancheTaskDataset:
        """A dataset over some of this one's samples (same Avalanche dataset and transforms)."""
        sub = AvalancheTaskDataset(self.dataset, self.task_id, self.label_map, self.indices[positions])
        sub.group = self.group
        return sub

    @property
    def sample_transform(self) -> str | None:
        """Non-None while Avalanche's ``train`` transform group (augmentation) is active.

        Strategies that need the plain samples (iCaRL's herding) set it to ``None``, which switches
        the wrapped dataset to Avalanche's ``eval`` transforms, as Avalanche itself does for that.
        """
        return "train" if self.group == "train" else None

    @sample_transform.setter
    def sample_transform(self, value: None) -> None:
        if value is not None:
            raise AvalancheInteropError("an Avalanche task's sample transform can only be turned off (set to None)")
        if self.group == "train":
            self.dataset, self.group = self.dataset.eval(), "eval"


# ----------------------------------------------------------------------------- reading experiences
def _experiences(benchmark: Any, name: str) -> list[Any]:
    stream = getattr(benchmark, f"{name}_stream", None)
    if stream is None:
        streams = getattr(benchmark, "streams", {})
        stream = streams.get(name) if isinstance(streams, dict) else None
    if stream is None:
        raise AvalancheInteropError(
            f"the benchmark has no {name!r} stream (no attribute {name}_stream); name one of its streams"
        )
    return list(stream)


def _classes(exp: Any) -> list[int]:
    """The experience's classes in Avalanche's order (``classes_in_this_experience`` if present)."""
    listed = getattr(exp, "classes_in_this_experience", None)
    if isinstance(listed, (list, tuple)):
        return [int(c) for c in listed]
    if listed is not None:  # a set (the new benchmark API): no order to keep
        return sorted(int(c) for c in listed)
    return sorted(int(c) for c in exp.dataset.targets.uniques)


def _task_labels(exp: Any) -> list[int]:
    """The experience's task labels: the experience's own, else the dataset's, else 0."""
    labels = getattr(exp, "task_labels", None)
    if labels is None:
        attr = getattr(exp.dataset, "targets_task_labels", None)
        labels = attr.uniques if attr is not None else [0]
    return sorted(int(t) for t in labels)


def _infer_scenario(task_labels: list[list[int]], classes: list[list[int]]) -> str:
    distinct = {tuple(t) for t in task_labels}
    if len(task_labels) > 1 and len(distinct) == len(task_labels):
        return "task"
    if len(distinct) > 1:
        raise AvalancheInteropError(
            f"some experiences share task labels ({[t[0] for t in task_labels]}): clframe's task id is the "
            "experience, so a task-incremental stream needs one distinct task label per experience. Pass "
            "scenario='class' or scenario='domain' to ignore the task labels."
        )
    seen: set[int] = set()
    for cls in classes:
        if seen & set(cls):
            return "domain"
        seen |= set(cls)
    return "class"


def from_avalanche(
    benchmark: Any,
    scenario: Literal["class", "task", "domain"] | None = None,
    name: str | None = None,
    train_stream: str = "train",
    test_stream: str = "test",
    val_stream: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
) -> TaskStream:
    """An Avalanche benchmark as a clframe :class:`TaskStream`, one task per training experience.

    Args:
        benchmark: an Avalanche benchmark (``SplitMNIST(...)``, ``nc_benchmark(...)``,
            ``class_incremental_benchmark(...)``, ...), or anything with ``<name>_stream`` lists of
            experiences that have a ``dataset``.
        scenario: ``class``, ``task`` or ``domain``; inferred when not given: ``task`` when every
            experience has its own task label, else ``domain`` when classes repeat across
            experiences, else ``class``.
        name: the stream's name (logged, part of the stream signature); default from the type.
        train_stream, test_stream, val_stream: which streams give the tasks' train, test and
            validation data (``val_stream="valid"`` after ``benchmark_with_validation_stream``).
            A test stream with one experience (``ni_benchmark``) is every task's test set, so each
            task reports the accuracy on the whole test set, as Avalanche does.
        mean, std: per-channel normalisation clframe applies on the device. Default: none (mean 0,
            std 1), because Avalanche's transforms already normalise; uint8 inputs are scaled to [0, 1].
        seed: the stream's seed (clframe's data order within a task).

    Class ids stay Avalanche's, except in task-incremental benchmarks that reuse class ids in every
    task (``class_ids_from_zero_in_each_exp``): there task ``t``'s classes get global ids after the
    previous tasks' (in Avalanche's class order), as clframe's task-incremental head needs one row per
    task and class; ``description["avalanche_classes"]`` keeps the original ids of every task.
    """
    require_avalanche()
    train_exps = _experiences(benchmark, train_stream)
    test_exps = _experiences(benchmark, test_stream)
    val_exps = _experiences(benchmark, val_stream) if val_stream is not None else None
    if not train_exps:
        raise AvalancheInteropError(f"the benchmark's {train_stream!r} stream has no experiences")
    n = len(train_exps)
    shared_test = len(test_exps) == 1 and n > 1
    if len(test_exps) != n and not shared_test:
        raise AvalancheInteropError(
            f"the {train_stream!r} stream has {n} experiences but the {test_stream!r} stream has {len(test_exps)}; "
            "clframe needs one test experience per training experience (or a single one shared by all tasks)"
        )
    if val_exps is not None and len(val_exps) != n:
        raise AvalancheInteropError(f"the {val_stream!r} stream has {len(val_exps)} experiences, not {n}")

    classes = [_classes(e) for e in train_exps]
    task_labels = [_task_labels(e) for e in train_exps]
    if scenario is None:
        scenario = _infer_scenario(task_labels, classes)
    if scenario not in SCENARIOS:
        raise AvalancheInteropError(f"unknown scenario {scenario!r}; allowed: {', '.join(SCENARIOS)}")
    if scenario == "task":
        if any(len(t) != 1 for t in task_labels) or len({t[0] for t in task_labels}) != n:
            raise AvalancheInteropError(
                f"scenario='task' needs one distinct task label per experience, got {task_labels}"
            )
        if shared_test:
            raise AvalancheInteropError("a task-incremental stream needs one test experience per task, got one in all")
        for i, e in enumerate(test_exps):
            if _task_labels(e) != task_labels[i]:
                raise AvalancheInteropError(
                    f"test experience {i} has task labels {_task_labels(e)} but training experience {i} has "
                    f"{task_labels[i]}; the streams must pair up"
                )

    # Task-incremental benchmarks may reuse class ids in every task: give each task its own global ids.
    all_ids = [c for cls in classes for c in cls]
    remap = scenario == "task" and len(set(all_ids)) != len(all_ids)
    label_maps: list[Tensor | None] = []
    task_classes: list[tuple[int, ...]] = []
    max_label = max([*all_ids, *(c for e in test_exps for c in _classes(e))], default=-1)
    offset = 0
    for cls in classes:
        if remap:
            label_map = torch.full((max_label + 1,), -1, dtype=torch.long)
            label_map[torch.tensor(cls, dtype=torch.long)] = torch.arange(offset, offset + len(cls))
            label_maps.append(label_map)
            task_classes.append(tuple(range(offset, offset + len(cls))))
            offset += len(cls)
        else:
            label_maps.append(None)
            task_classes.append(tuple(cls))
    num_classes = offset if remap else max(max_label + 1, int(getattr(benchmark, "n_classes", 0) or 0))

    if scenario != "domain" and not shared_test:
        for i, e in enumerate(test_exps):
            extra = sorted(set(_classes(e)) - set(classes[i]))
            if extra:
                raise AvalancheInteropError(
                    f"test experience {i} has classes {extra} that training experience {i} does not have; in a "
                    f"{scenario}-incremental stream each task is tested on its own classes (use scenario='domain')"
                )

    tasks = []
    for i, exp in enumerate(train_exps):
        test_exp = test_exps[0] if shared_test else test_exps[i]
        tasks.append(Task(
            id=i, classes=task_classes[i],
            train=AvalancheTaskDataset(exp.dataset, i, label_maps[i], group="train"),
            test=AvalancheTaskDataset(test_exp.dataset, i, label_maps[i], group="eval"),
            val=None if val_exps is None else AvalancheTaskDataset(val_exps[i].dataset, i, label_maps[i], group="eval"),
            domain=f"experience_{i}" if scenario == "domain" else None,
        ))

    x0 = tasks[0].train[0][0]
    input_shape = tuple(x0.shape)
    channels = input_shape[0] if len(input_shape) == 3 else 1
    mean = tuple(float(m) for m in mean) if mean is not None else (0.0,) * channels
    std = tuple(float(s) for s in std) if std is not None else (1.0,) * channels
    if remap:
        class_names = [f"task{t}/{c}" for t, cls in enumerate(classes) for c in cls]
    else:
        class_names = [str(c) for c in range(num_classes)]
    return TaskStream(
        name=name or f"avalanche_{type(benchmark).__name__}", scenario=scenario, tasks=tasks,
        num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, class_names=class_names, seed=seed,
        description={"source": "avalanche", "avalanche_classes": classes, "task_labels": [t[0] for t in task_labels],
                     "class_order": list(getattr(benchmark, "classes_order", None) or all_ids),
                     "remapped_labels": remap, "shared_test": shared_test,
                     "test_sizes": [len(t.test) for t in tasks]},
    )


# ----------------------------------------------------------------------------- clframe model for Avalanche
def as_avalanche_model(module: nn.Module, stream: TaskStream) -> nn.Module:
    """A clframe strategy as a model for Avalanche's strategies and metrics (e.g. ``Naive(...).eval``).

    It is an Avalanche ``MultiTaskModule``, so Avalanche passes the task labels; they are mapped to
    clframe task ids, and the output is the clframe module's scenario-masked logits (unseen classes
    hidden in class-incremental streams, other tasks' classes in task-incremental ones) in
    Avalanche's label space, so Avalanche's metrics score exactly the predictions clframe scores.
    In class- and domain-incremental streams the module gets no task id (Avalanche's task label is
    0 for every experience there, and clframe's masking does not use it).
    """
    require_avalanche()
    from avalanche.models import MultiTaskModule

    task_of_label = {label: i for i, label in enumerate(stream.description.get("task_labels", range(len(stream))))}
    remapped = bool(stream.description.get("remapped_labels"))
    originals = stream.description.get("avalanche_classes", [])

    class ClframeAsAvalanche(MultiTaskModule):
        """A ``MultiTaskModule`` because Avalanche hands task labels only to those."""

        def __init__(self) -> None:
            super().__init__()
            self.module = module
            # per task: for every Avalanche label, the global clframe class id (-1: not this task's)
            width = 1 + max((c for cls in originals for c in cls), default=-1)
            index = torch.full((len(stream), max(width, 1)), -1, dtype=torch.long)
            for t, task in enumerate(stream.tasks):
                if remapped:
                    index[t, torch.tensor(originals[t])] = torch.tensor(task.classes)
            self.register_buffer("label_index", index, persistent=False)

        def adaptation(self, experience: Any = None) -> None:
            """The wrapped clframe module is fixed; Avalanche must not resize anything."""

        def forward(self, x: Tensor, task_labels: Tensor | int | None = None) -> Tensor:
            if stream.scenario != "task":  # class/domain logits do not depend on the task id
                return self.module(x, None)
            if task_labels is None:
                raise AvalancheInteropError("a task-incremental clframe model needs Avalanche's task labels")
            labels = torch.as_tensor(task_labels).reshape(-1).expand(x.shape[0]).tolist()
            tids = torch.tensor([task_of_label.get(int(t), -1) for t in labels], device=x.device)
            if (tids < 0).any():
                raise AvalancheInteropError(f"task labels {sorted(set(labels))} are not all in this stream")
            logits = self.module(x, tids)
            if not remapped:
                return logits
            idx = self.label_index[tids]  # (n, avalanche classes)
            out = logits.gather(1, idx.clamp(min=0))
            return out.masked_fill(idx < 0, torch.finfo(out.dtype).min)

    return ClframeAsAvalanche()
