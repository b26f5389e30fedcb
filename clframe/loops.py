"""A fit loop that resumes a checkpoint written after a task's (or an epoch's) last batch exactly.

ModelCheckpoint's ``every_n_train_steps`` saves in ``on_train_batch_end``. When that batch was the last
of an epoch, the run still had work to do after the save: count the batch as completed, validate, call
the ``on_train_epoch_end`` hooks and close the epoch. Lightning's own restore skips that work (it
bumps the epoch counters directly), and when the epoch was the task's last the restored fit trains
nothing, so its loops keep their "restarting" state and restored in-epoch position into the *next*
task's fit: that task's first epoch then starts at the old batch index and runs only the batches
after it. A stream of tasks with different numbers of batches per epoch lost most of an epoch.

:class:`ExactResumeFitLoop` finishes such a restored batch the way the uninterrupted run did, through
Lightning's own loop methods, and clears every restore flag when a fit ends, so each task's fit starts
from the state an uninterrupted run has at that point.
"""

from __future__ import annotations

from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.utilities import _is_max_limit_reached


class ExactResumeFitLoop(_FitLoop):
    """Lightning's fit loop, plus exact resume after the last batch of an epoch or task (see the module doc)."""

    @classmethod
    def replacing(cls, loop: _FitLoop) -> ExactResumeFitLoop:
        """This loop in place of ``loop`` (same trainer, limits and epoch loop)."""
        new = cls(loop.trainer, min_epochs=loop.min_epochs, max_epochs=loop.max_epochs)
        new.epoch_loop = loop.epoch_loop
        return new

    def _restored_after_closing_batch(self) -> bool:
        """The checkpoint was written in ``on_train_batch_end`` of a batch that ended its epoch or the task."""
        if not self._loaded_from_state_dict:
            return False
        batches = self.epoch_loop.batch_progress
        t = batches.total
        if not (t.started == t.ready and t.processed == t.started and t.completed == t.processed - 1):
            return False  # not saved between a batch's processing and its completion
        epoch_over = batches.is_last_batch or batches.current.ready >= self.max_batches
        return epoch_over or _is_max_limit_reached(self.epoch_loop.global_step, self.max_steps)

    @property
    def skip(self) -> bool:
        return super().skip and not self._restored_after_closing_batch()

    def reset(self) -> None:
        self._was_reset = True
        if self._restored_after_closing_batch():
            self._finish_restored_batch()
        super().reset()

    def _finish_restored_batch(self) -> None:
        """Run what followed the save in the uninterrupted run: the end of the batch, then of its epoch."""
        epoch_loop = self.epoch_loop
        epoch_loop.batch_progress.increment_completed()
        _Loop.restarting.fset(self, False)  # every child too: from here on this is an ordinary run
        epoch_loop.on_advance_end(self._data_fetcher)  # validation if due, step schedulers, logger step
        self.on_advance_end()  # epoch counters, on_train_epoch_end hooks, epoch schedulers
        self.clear_restore_state()

    def clear_restore_state(self) -> None:
        """Forget that this loop was restored: the next fit (the next task) starts as a fresh one does."""
        for loop in (self, self.epoch_loop, self.epoch_loop.val_loop):
            loop.on_iteration_done()

    def run(self) -> None:
        restored, self._was_reset = self._loaded_from_state_dict, False
        super().run()
        if restored and not self._was_reset:  # restored at the very end of the task (an epoch-end checkpoint): nothing ran
            progress = self.epoch_progress
            if progress.total.completed == progress.total.processed - 1:
                progress.increment_completed()  # saved in on_train_epoch_end, just before the epoch closed
        self.clear_restore_state()
