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


class SignalInValidation(L.Callback):
    """Send this process ``sig`` at the start of validation batch ``batch`` of the ``run``-th validation
    (counted from 1, sanity checks not counted): Lightning stops at the end of that batch, mid-validation."""

    def __init__(self, run: int, batch: int = 0, sig: int = 15) -> None:
        self.run, self.batch, self.sig, self.runs = run, batch, sig, 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.runs += 0 if trainer.sanity_checking else 1

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.runs == self.run and not trainer.sanity_checking and (dataloader_idx, batch_idx) == (0, self.batch):
            os.kill(os.getpid(), self.sig)
