"""A fit loop that resumes a checkpoint written after a task's (or an epoch's) last batch exactly.

ModelCheckpoint's ``every_n_train_steps`` saves in ``on_train_batch_end``. When that batch was the last
of an epoch, the run still had work to do after the save: count the batch as completed, validate, call
the ``on_train_epoch_end`` hooks and close the epoch. Lightning's own restore skips that work (it
bumps the epoch counters directly), and when the epoch was the task's last the restored fit trains
nothing, so its loops keep their "restarting" state and restored in-epoch position into the *next*
task's fit: that task's first epoch then starts at the old batch index and runs only the batches
after it. A stream of tasks with different numbers of batches per epoch lost most of an epoch.

:class:`ExactResumeFitLoop` finishes such a restored batch the way the uninterrupted run did, through
Lightning's own loop methods (and likewise a checkpoint written in ``on_train_epoch_end``), and clears
every restore flag when a fit ends, so each task's fit starts from the state an uninterrupted run has there.

It also narrows Lightning's "modules in eval mode at the start of training" warning to the modules that are
in eval mode by accident: a strategy keeps some in eval mode on purpose (LwF's and iCaRL's frozen teacher, a
frozen ViT, frozen batch-norm statistics), and warning about those at every task would only teach users to
ignore the warning.
"""

from __future__ import annotations

import torch
from lightning.pytorch.loops import _FitLoop
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.utilities import _is_max_limit_reached
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import _ModuleMode
from lightning.pytorch.utilities.warnings import PossibleUserWarning


class ExactResumeFitLoop(_FitLoop):
    """Lightning's fit loop, plus exact resume after the last batch of an epoch or task (see the module doc)."""

    _finish: str | None = None  # the restored work left to do when this fit starts: "batch", "epoch" or None

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

    def _restored_in_epoch_end(self) -> bool:
        """The checkpoint was written in ``on_train_epoch_end`` (every batch done, the epoch not yet closed)."""
        p = self.epoch_progress.total
        return self._loaded_from_state_dict and p.ready == p.started == p.processed and p.completed == p.processed - 1

    @property
    def skip(self) -> bool:
        return super().skip and not (self._restored_after_closing_batch() or self._restored_in_epoch_end())

    def reset(self) -> None:
        self._finish = ("batch" if self._restored_after_closing_batch() else
                        "epoch" if self._restored_in_epoch_end() else None)
        if self._finish is None:
            super().reset()
            self._uncount_restarted_validation_batch()
        else:  # Lightning's restart bookkeeping would skip the work: it is done in on_run_start instead
            torch.set_grad_enabled(True)

    def _uncount_restarted_validation_batch(self) -> None:
        """Restored inside a validation (a batch started, not processed: what a SIGTERM there saves, see
        checkpoints/preemption.py), Lightning runs that validation again but keeps the started batch in its
        running totals; drop it, so the totals match the uninterrupted run's."""
        val = self.epoch_loop.val_loop
        if val.restarted_mid_evaluation:
            total = val.batch_progress.total
            total.ready = total.started = total.processed

    def on_run_start(self) -> None:
        super().on_run_start()  # on_train_start hooks first, as in the uninterrupted run
        if self._finish == "batch":
            self._finish_restored_batch()
        elif self._finish == "epoch":
            self._finish_restored_epoch()
        self._finish = None

    def _finish_restored_batch(self) -> None:
        """Run what followed the save in the uninterrupted run: the end of the batch, then of its epoch."""
        epoch_loop = self.epoch_loop
        epoch_loop.batch_progress.increment_completed()
        _Loop.restarting.fset(self, False)  # every child too: from here on this is an ordinary run
        epoch_loop.on_advance_end(self._data_fetcher)  # validation if due, step schedulers, logger step
        self.on_advance_end()  # epoch counters, on_train_epoch_end hooks, epoch schedulers
        self.clear_restore_state()

    def _finish_restored_epoch(self) -> None:
        """Close an epoch restored from an ``on_train_epoch_end`` save.

        (Lightning's restore treats such a checkpoint of a step-based run as an unfinished epoch and runs an
        empty extra one, which shifts every later epoch's shuffling.) What the uninterrupted run did after
        the save besides this is logging and stepping ``ReduceLROnPlateau`` schedulers, which cannot be
        redone: the metric they monitor is not in the checkpoint."""
        _Loop.restarting.fset(self, False)
        for counts in (self.epoch_progress.total, self.epoch_progress.current):
            counts.completed = counts.processed
        self.clear_restore_state()

    def clear_restore_state(self) -> None:
        """Forget that this loop was restored: the next fit (the next task) starts as a fresh one does."""
        for loop in (self, self.epoch_loop, self.epoch_loop.val_loop):
            loop.on_iteration_done()

    def run(self) -> None:
        super().run()
        self.clear_restore_state()  # a restored fit that had nothing left to run leaves no flags behind

    def _warn_if_modules_in_eval_mode(self) -> None:
        """Lightning's warning about modules in eval mode when training starts, for the modules that the
        strategy's own ``train()`` would switch to training mode (the others it keeps in eval mode on purpose)."""
        model = self.trainer.lightning_module
        in_eval = {name for name, module in model.named_modules() if not module.training}
        if not in_eval:
            return
        modes = _ModuleMode()
        modes.capture(model)
        try:
            model.train()
            on_purpose = {name for name, module in model.named_modules() if not module.training}
        finally:
            modes.restore(model)
        unexpected = sorted(in_eval - on_purpose)
        if unexpected:
            rank_zero_warn(
                f"Found {len(unexpected)} module(s) in eval mode at the start of training ({', '.join(unexpected[:5])}"
                f"{', ...' if len(unexpected) > 5 else ''}). This may lead to unexpected behavior during training. If "
                "this is intentional, you can ignore this warning.",
                category=PossibleUserWarning,
            )
