"""Callbacks that also hear about task boundaries."""

from __future__ import annotations

import lightning as L

from clframe.data.stream import Task


class ContinualCallback(L.Callback):
    """A Lightning callback with two more hooks, called by :class:`~clframe.trainer.ContinualTrainer`."""

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task: Task) -> None:
        """Before training on ``task``."""

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: Task) -> None:
        """After training on ``task``, before its evaluation."""

    def on_task_evaluated(self, trainer: L.Trainer, pl_module: L.LightningModule, task: Task,
                          accuracies: list[float]) -> None:
        """After the evaluation that follows ``task``: one accuracy per task (NaN if not evaluated)."""

    def on_stream_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the last task's evaluation, before the final metrics are logged and written.

        A callback may add metrics to ``trainer.continual_results["metrics"]`` here.
        """
