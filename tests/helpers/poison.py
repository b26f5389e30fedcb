"""A callback that puts a NaN into the model's weights at a chosen step (to test NaN-loss handling)."""

from __future__ import annotations

import lightning as L
import torch


class PoisonAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.head.parameters()).fill_(float("nan"))
