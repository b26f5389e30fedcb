"""A callback that raises a file-system error at a chosen step (a full disk, a read-only folder)."""

from __future__ import annotations

import errno
import os

import lightning as L


class FailWriteAtStep(L.Callback):
    """Raise ``OSError(errno.<code>)`` at ``on_train_batch_start`` of global step ``step``, as a checkpoint
    or log write would on a full disk (ENOSPC) or a read-only folder (EROFS)."""

    def __init__(self, step: int, code: str = "ENOSPC") -> None:
        self.step, self.code = step, getattr(errno, code)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            path = os.path.join(trainer.default_root_dir, "metrics.csv")
            raise OSError(self.code, os.strerror(self.code), path)
