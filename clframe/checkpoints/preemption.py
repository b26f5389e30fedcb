"""SIGTERM (a scheduler's pre-emption, ``timeout``, ``kill``): save a resumable checkpoint, exit 143.

Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit``) at the end of the running
training batch, so the state is consistent there. Its exit status would be 0, which a job array or a
sweep agent reads as a finished run; this callback sets it to 143 (128 + SIGTERM, what the shell
reports for a process ended by SIGTERM) and first writes ``last.ckpt`` through every
``ModelCheckpoint`` (``save_last`` or not), so ``--ckpt_path last`` continues from that very batch.
"""

from __future__ import annotations

import os
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_STATUS = 143


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM during training, save ``last.ckpt`` in every checkpoint folder and exit with status 143."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = EXIT_STATUS
        saved: list[str] = []
        if trainer.state.fn == TrainerFn.FITTING:
            for cb in trainer.checkpoint_callbacks:
                if not isinstance(cb, ModelCheckpoint) or cb.dirpath is None:
                    continue
                if cb.save_last:
                    cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                    saved.append(str(cb.last_model_path))
                else:  # checkpointing is on without save_last: still leave what --ckpt_path last finds
                    path = os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
                    trainer.save_checkpoint(path)
                    saved.append(path)
        if trainer.is_global_zero:
            where = (f"saved {', '.join(saved)} at step {trainer.global_step}; continue with --ckpt_path last"
                     if saved else "no checkpoint was saved (checkpointing is off)")
            print(f"clframe: stopped by SIGTERM; {where}. Exit status {EXIT_STATUS}.", file=sys.stderr, flush=True)
