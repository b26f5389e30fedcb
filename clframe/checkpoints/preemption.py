"""SIGTERM (a scheduler's pre-emption, ``timeout``, ``kill``): save a resumable checkpoint, exit 143.

Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit``) at the end of the running
training batch, so the state is consistent there. Its exit status would be 0, which a job array or a
sweep agent reads as a finished run; this callback sets it to 143 (128 + SIGTERM, what the shell
reports for a process ended by SIGTERM) and first writes ``last.ckpt`` through every
``ModelCheckpoint`` (``save_last`` or not), so ``--ckpt_path last`` continues from that very batch.

A SIGTERM can also land while a validation runs; Lightning then stops after the running validation batch.
A checkpoint of that moment would tell Lightning's restore that the validation had finished (its counters
look like those of a save after validation), so the resumed run would skip it: the epoch's ``val/*``
metrics, a monitored checkpoint's candidate and a ``keep_best`` strategy's snapshot would be lost. So the
checkpoint records the fit's validation as started but not through its first batch, which Lightning's
restore reads as a stop inside it and runs again in full before training on (at an epoch's end or
mid-epoch alike); and the evaluation after a task is rewound to the task's end, before its accuracy rows,
so the resumed run evaluates the task again and appends each row once.
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
    """On SIGTERM during training (or a task's evaluation), save ``last.ckpt`` in every checkpoint folder and
    exit with status 143."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = EXIT_STATUS
        saved: list[str] = []
        if trainer.state.fn == TrainerFn.FITTING or _in_task_evaluation(trainer):
            if trainer.state.fn == TrainerFn.FITTING and trainer.validating and not trainer.sanity_checking:
                _rewind_validation(trainer)
            elif trainer.state.fn != TrainerFn.FITTING:
                _rewind_task_evaluation(trainer)
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


def _in_task_evaluation(trainer: L.Trainer) -> bool:
    """A ``ContinualTrainer`` is evaluating the seen tasks after a task's training and end hooks."""
    progress = getattr(trainer, "progress", None)
    return bool(getattr(trainer, "evaluating_stream", False) and getattr(progress, "task_ended", False))


def _rewind_validation(trainer: L.Trainer) -> None:
    """Count the running validation as started but not yet through its first batch: Lightning's restore reads
    that as a stop inside the validation, and runs the whole validation again before it trains on."""
    val = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    for name in ("ready", "started", "processed", "completed"):
        setattr(val.total, name, getattr(val.total, name) - getattr(val.current, name))
    val.current.reset()
    for counts in (val.total, val.current):
        counts.ready += 1
        counts.started += 1
    val.is_last_batch = False


def _rewind_task_evaluation(trainer: L.Trainer) -> None:
    """Drop the accuracy rows the interrupted evaluation already appended for its task."""
    progress = trainer.progress  # type: ignore[attr-defined]  # checked by _in_task_evaluation
    for rows in (progress.rows, progress.val_rows, progress.til_rows):
        del rows[progress.task_id:]
