"""A callback that kills its own process with SIGKILL at a chosen step: a real, unclean crash."""

from __future__ import annotations

import os
import signal

import lightning as L

from clframe.callbacks.base import ContinualCallback


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtTaskStart(ContinualCallback):
    """SIGKILL when ``task`` starts: after the previous task's end hooks and evaluation, whose last
    checkpoint was written at that task's last batch."""

    def __init__(self, task: int) -> None:
        self.task = task

    def on_task_start(self, trainer, pl_module, task) -> None:
        if task.id == self.task:
            os.kill(os.getpid(), signal.SIGKILL)
