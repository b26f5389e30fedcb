"""Progress bars that say where the run is in the stream: ``Task 3/5 · epoch 2/4``.

Lightning's bars count epochs over the whole run (``Epoch 7/9``), which in a continual run mixes
up tasks and epochs. These bars are Lightning's own (rich when installed, else tqdm) with only the
training description changed, so every other behaviour and option stays Lightning's.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def task_description(trainer: L.Trainer) -> str:
    """``Task k/N · epoch e/E`` for a ContinualTrainer; Lightning's ``Epoch n`` for any other trainer."""
    progress = getattr(trainer, "progress", None)
    datamodule = getattr(trainer, "datamodule", None)
    stream = getattr(datamodule, "stream", None)
    if progress is None or stream is None:
        return f"Epoch {trainer.current_epoch}"
    text = f"Task {progress.task_id + 1}/{len(stream)}"
    per_task = getattr(trainer, "epochs_per_task", None)
    if getattr(trainer, "steps_per_task", None) is None and per_task and trainer.max_epochs:
        # max_epochs is cumulative: epochs_per_task times the tasks trained so far, this one included
        first = trainer.max_epochs - per_task
        return f"{text} · epoch {trainer.current_epoch - first + 1}/{per_task}"
    return f"{text} · epoch {trainer.current_epoch + 1}"


def _without_version(metrics: dict[str, Any]) -> dict[str, Any]:
    metrics.pop("v_num", None)  # the logger's run version: constant within a run, noise on every line
    return metrics


class TaskRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the task in its training description."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))

    def _get_train_description(self, current_epoch: int) -> str:
        text = task_description(self.trainer)
        if len(self.validation_description) > len(text):  # as Lightning does: no flicker against "Validation"
            text = f"{text:{len(self.validation_description)}}"
        return text


class TaskTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar with the task in its training description."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(task_description(trainer))


def default_task_progress_bar() -> RichProgressBar | TQDMProgressBar:
    """The bar Lightning would pick by default (rich if installed), with the task shown."""
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    return TaskRichProgressBar() if _RICH_AVAILABLE else TaskTQDMProgressBar()
