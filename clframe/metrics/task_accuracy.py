"""Evaluation counts as torchmetrics metrics: accuracy per task and the confusion matrix per class.

Both keep *counts* (correct and seen samples per task; (true, predicted) pairs per class), and
torchmetrics sums counts over the processes under DDP before anything is divided, so every test
sample counts exactly once whatever the sharding; per-rank accuracies are never averaged.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class TaskAccuracy(Metric):
    """``acc_j = correct_j / seen_j`` for every task ``j`` (NaN for a task without samples).

    ``update(correct, task_ids)`` takes one boolean (or 0/1) per sample and the sample's task id.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = int(num_tasks)
        self.add_state("correct", torch.zeros(self.num_tasks), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(self.num_tasks), dist_reduce_fx="sum")

    def update(self, correct: Tensor, task_ids: Tensor) -> None:  # no host sync: index_add on the device
        self.correct.index_add_(0, task_ids, correct.to(self.correct.dtype))
        self.seen.index_add_(0, task_ids, torch.ones_like(task_ids, dtype=self.seen.dtype))

    def compute(self) -> Tensor:
        self.last_seen = self.seen.clone()  # the summed counts (states are synced here, local again after)
        return torch.where(self.seen > 0, self.correct / self.seen.clamp(min=1), torch.nan)


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Recall of every class from a confusion matrix (rows: true class, columns: predicted); NaN where a
    class has no samples. Weighted by the rows' sizes, it sums back to the accuracy over those classes."""
    support = confusion.sum(1)
    return torch.where(support > 0, confusion.diagonal() / support.clamp(min=1), torch.nan)
