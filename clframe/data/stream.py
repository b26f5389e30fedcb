"""Tasks and task streams: the data side of a continual-learning experiment.

A stream is an ordered list of tasks. Each task holds compact uint8 inputs (shared with the
source, never copied), global labels and its task id. Batches are ``(x, y, task_id)`` triples.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from clframe.data.sources import guard_std

InputTransform = Callable[[Tensor], Tensor]
"""A deterministic, batch-level map applied to uint8 inputs (a task's permutation or rotation)."""

Batch = tuple[Tensor, Tensor, Tensor]


class TaskDataset(Dataset):
    """The samples of one task: a view over shared source tensors.

    ``__getitems__`` gathers a whole batch with one indexing operation, so a DataLoader with
    :func:`passthrough_collate` costs one tensor gather per batch instead of a Python loop.
    ``sample_transform`` (e.g. random crops) is applied per sample and only if given.
    """

    def __init__(
        self,
        inputs: Tensor,
        labels: Tensor,
        task_id: int,
        indices: Tensor | None = None,
        input_transform: InputTransform | None = None,
        sample_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if len(inputs) != len(labels):
            raise ValueError(f"inputs ({len(inputs)}) and labels ({len(labels)}) differ in length")
        self.inputs = inputs
        self.labels = labels
        self.task_id = int(task_id)
        self.indices = torch.arange(len(labels)) if indices is None else indices.long()
        self.input_transform = input_transform
        self.sample_transform = sample_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: Sequence[int] | Tensor) -> Batch:
        # index_select, not x[idx]: the same rows, an order of magnitude faster for a batch of images
        idx = self.indices.index_select(0, torch.as_tensor(positions, dtype=torch.long))
        x = self.inputs.index_select(0, idx)
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.sample_transform is not None:
            x = torch.stack([self.sample_transform(xi) for xi in x])
        y = self.labels.index_select(0, idx)
        return x, y, torch.full_like(y, self.task_id)

    def __getitem__(self, position: int) -> Batch:
        x, y, t = self.__getitems__([range(len(self))[position]])  # a negative position counts from the end
        return x[0], y[0], t[0]

    @property
    def targets(self) -> Tensor:
        """Labels of this task's samples, in dataset order."""
        return self.labels[self.indices]

    def subset(self, positions: Tensor) -> TaskDataset:
        """A dataset over some of this one's samples (same transforms)."""
        return TaskDataset(
            self.inputs, self.labels, self.task_id, self.indices[positions], self.input_transform,
            self.sample_transform,
        )


def without_augmentation(dataset: Dataset) -> Dataset:
    """The same samples without their per-sample augmentation (a shallow copy with ``sample_transform``
    unset): what task-end passes that summarise the training data (iCaRL's herding, InTAct's boxes) read."""
    if getattr(dataset, "sample_transform", None) is None:
        return dataset
    plain = copy.copy(dataset)
    plain.sample_transform = None
    return plain


def passthrough_collate(batch: Batch) -> Batch:
    """Collate for :class:`TaskDataset`: ``__getitems__`` already returns a collated batch."""
    return batch


@dataclass
class Task:
    """One step of the stream: which classes it brings and its train/val/test data."""

    id: int
    classes: tuple[int, ...]
    train: TaskDataset
    test: TaskDataset
    val: TaskDataset | None = None
    domain: str | None = None

    def __repr__(self) -> str:
        return (
            f"Task(id={self.id}, classes={list(self.classes)}, domain={self.domain!r}, "
            f"train={len(self.train)}, test={len(self.test)}, val={len(self.val) if self.val else 0})"
        )


SCENARIOS = ("class", "task", "domain")


@dataclass
class TaskStream:
    """An ordered list of tasks plus what every strategy needs to know about the stream.

    ``scenario`` is ``"class"`` (one head over all classes seen so far), ``"task"`` (task id known
    at test time) or ``"domain"`` (same label space, new input distribution).
    """

    name: str
    scenario: str
    tasks: list[Task]
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    seed: int = 0
    description: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        self.std = guard_std(self.std, f"stream {self.name!r}")

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    def __iter__(self):
        return iter(self.tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def class_to_task(self) -> list[int]:
        """For each global class id, the task that first brings it (-1 if none)."""
        owner = [-1] * self.num_classes
        for task in self.tasks:
            for c in task.classes:
                if owner[c] == -1:
                    owner[c] = task.id
        return owner

    def signature(self) -> str:
        """A short hash of what defines the stream, to refuse checkpoints from another stream."""
        payload = json.dumps(
            {"name": self.name, "scenario": self.scenario, "classes": [list(t.classes) for t in self.tasks],
             "sizes": [len(t.train) for t in self.tasks], "seed": self.seed, **self.description},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
