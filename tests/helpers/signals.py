"""A callback that sends its own process a signal at a chosen step (SIGTERM: a scheduler's pre-emption)."""

from __future__ import annotations

import os

import lightning as L


class SignalAtStep(L.Callback):
    """Send this process ``sig`` (default SIGTERM, what a scheduler sends to pre-empt) at global step ``step``."""

    def __init__(self, step: int, sig: int = 15) -> None:
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
