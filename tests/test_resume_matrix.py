"""Kill/resume matrix: every strategy family, resumed from every kind of kill point, bit-exact on CPU.

One uninterrupted run per strategy writes a checkpoint at each kill point; a fresh run resumed from
each checkpoint must end with the same accuracy matrix, the same checkpoint (weights, strategy state,
optimizer, loop counters, loader position, callbacks) and the same value of every strategy attribute
at every step it runs (tests/helpers/resume.py). A checkpoint taken in-process is exactly what a run
killed after that save finds on disk, so resuming from it covers every crash before the next save.

The stream has tasks of unequal sizes (2, 4 and 4 classes of digits: 5, then 10 batches per epoch), so
a task boundary changes the number of batches per epoch, as in real streams.

Kill points (checkpoints written where ModelCheckpoint writes them):
  task_end     after the last batch of task 0 (a crash during its end hooks, its evaluation or the
               start of task 1 resumes from here)
  task_switch  after the first batch of task 1
  mid_epoch    after the third batch of task 1
  epoch_end    after the last batch of task 1's first epoch (before its validation and epoch-end hooks)
  epoch_hook   in ``on_train_epoch_end`` of that epoch (ModelCheckpoint's ``every_n_epochs``)
  last_epoch   after the third batch of task 1's last epoch (step-based runs: its second-to-last step),
               where phase-based strategies (ExSSNeT's weight epochs, OVOR's VOR epoch) are in their last phase
The run resumed from epoch_end is itself checkpointed and resumed again from its last_epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from clframe.callbacks import ContinualEvaluation
from clframe.callbacks.base import ContinualCallback
from clframe.strategies import ER, EWC, OVOR, WSN, DERpp, ExSSNeT, GeRe, ICaRL, LwF, SupSup
from clframe.strategies.interval import HyperInterval
from clframe.strategies.replay.view_batch import ViewBatchConfig
from tests.helpers.resume import Case, assert_resumed_exactly, run_case

KILL_POINTS = ("task_end", "task_switch", "mid_epoch", "epoch_end", "epoch_hook", "last_epoch")

MLP = {"backbone_kwargs": {"hidden_sizes": [32], "dropout": 0.2}}  # dropout draws from the global RNG
CLASS_IL = {"source": "digits", "n_tasks": 3, "first_task_classes": 2, "batch_size": 64}
TASK_IL = {**CLASS_IL, "scenario": "task", "normalize": False}
VIT = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2.0}

CASES: dict[str, Case] = {
    # replay
    "ER": Case(lambda: ER(buffer_size=40, lr=0.05, **MLP), CLASS_IL,  # with the stability-gap curves
               callbacks=lambda: [ContinualEvaluation(every_n_steps=3, samples_per_task=50, plots=False)]),
    # a step budget that ends each task in the middle of an epoch (12 steps; 5, then 10 batches per epoch)
    "ER-steps": Case(lambda: ER(buffer_size=40, lr=0.05, **MLP), CLASS_IL, {"steps_per_task": 12}),
    "DERpp": Case(lambda: DERpp(buffer_size=40, lr=0.05, **MLP), CLASS_IL),
    "iCaRL": Case(lambda: ICaRL(buffer_size=40, lr=0.05, **MLP), CLASS_IL),
    "GeRe": Case(lambda: GeRe(backbone="mlp", general={"source": "digits", "n": 32}, general_classes=10,
                              general_eval={"source": "digits", "split": "test", "n": 64},
                              replay_loss="ce+kl+tm", replays_per_batch=8, optimizer="adam", lr=1e-3, **MLP),
                 CLASS_IL),
    # view-batch: R views of each sample per batch, each sample back every R epochs (sampler position, noise, SSL)
    "ER-viewbatch": Case(lambda: ER(buffer_size=40, lr=0.05, view_batch=ViewBatchConfig(noise=0.2, ssl=True), **MLP),
                         {**CLASS_IL, "views_per_sample": 2}, {"epochs_per_task": 3}),
    "ER+InTAct": Case(lambda: ER(buffer_size=40, lr=0.05, intact={"lambda_var": 0.01, "lambda_int": 1.0,
                                                                     "lambda_feat": 1.0},
                                 backbone_kwargs={"hidden_sizes": [32, 32], "dropout": 0.2}), CLASS_IL),
    # regularisation
    "EWC": Case(lambda: EWC(ewc_lambda=50.0, lr=0.05, **MLP), CLASS_IL),
    "LwF": Case(lambda: LwF(lr=0.05, **MLP), CLASS_IL),
    # supermasks (keep_best: the best validation epoch of each task is restored at its end)
    "SupSup": Case(lambda: SupSup(backbone_kwargs={"hidden_sizes": [32]}, keep_best=True, optimizer="adam", lr=1e-2),
                   {**TASK_IL, "val_fraction": 0.1}, {"epochs_per_task": 3}),
    "WSN": Case(lambda: WSN(backbone_kwargs={"hidden_sizes": [32]}, density=0.3, keep_best=True, optimizer="adam",
                            lr=1e-2), {**TASK_IL, "val_fraction": 0.1}, {"epochs_per_task": 3}),
    "ExSSNeT": Case(lambda: ExSSNeT(backbone_kwargs={"hidden_sizes": [32]}, density=0.2, weight_epochs=2,
                                    sim_init="none", keep_best=True, optimizer="adam", lr=1e-2),
                    {**TASK_IL, "val_fraction": 0.1}, {"epochs_per_task": 3}),
    # interval (step-based: 12 steps per task, so task 1 spans more than one of its epochs; train_loss
    # selection keeps a copy of the best iterate, restored at the task's end)
    "HyperInterval": Case(lambda: HyperInterval(backbone_kwargs={"hidden_sizes": [16]}, hnet_hidden=[16],
                                                embedding_dim=4, epsilon=0.3, beta=0.05, lr=3e-3,
                                                model_selection="train_loss"), TASK_IL,
                          {"steps_per_task": 12}),
    # prompt (a tiny random ViT); OVOR's last epoch of each task trains the head with virtual outliers
    "OVOR": Case(lambda: OVOR(backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=VIT, g_layers=[0],
                              e_layers=[1], g_length=2, e_length=4, lr=0.01,
                              vor={"epochs": 1, "k": 3, "select": 5, "sample_from": 10, "num_per_class": 5}),
                 {**CLASS_IL, "train_samples_per_class": 40, "test_samples_per_class": 10, "batch_size": 16},
                 {"epochs_per_task": 3}),
}


class SaveAtKillPoints(ContinualCallback):
    """Writes ``<point>.ckpt`` at each kill point of the module docstring (placed as the run goes)."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)
        self.task, self.task_start, self.epoch_saved = 0, 0, False

    def _save(self, trainer: L.Trainer, point: str) -> None:
        trainer.save_checkpoint(self.dirpath / f"{point}.ckpt")

    def on_task_start(self, trainer, pl_module, task) -> None:
        self.task, self.task_start = task.id, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, last = trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self.task == 0:
            task_over = step >= trainer.max_steps if trainer.max_steps > 0 else (
                last and trainer.current_epoch + 1 >= trainer.max_epochs)
            if task_over:
                self._save(trainer, "task_end")
        elif self.task == 1:
            if step == self.task_start + 1:
                self._save(trainer, "task_switch")
            if step == self.task_start + 3:
                self._save(trainer, "mid_epoch")
            if last and not self.epoch_saved:
                self._save(trainer, "epoch_end")
            late = step == trainer.max_steps - 1 if trainer.max_steps > 0 else (
                trainer.current_epoch + 1 == trainer.max_epochs and batch_idx == 2)
            if late:
                self._save(trainer, "last_epoch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.task == 1 and not self.epoch_saved:
            self._save(trainer, "epoch_hook")
            self.epoch_saved = True


def _quiet(fn, *args: Any, **kwargs: Any):
    with contextlib.redirect_stdout(io.StringIO()):  # the results table printed at the end of every run
        return fn(*args, **kwargs)


def check_matrix_row(name: str, root: Path, points: tuple[str, ...] = KILL_POINTS) -> None:
    case = CASES[name]
    full = _quiet(run_case, case, root / "full", save=SaveAtKillPoints(root / "ckpt"))
    for point in points:
        ckpt = root / "ckpt" / f"{point}.ckpt"
        assert ckpt.is_file(), f"{name}: the run never reached kill point {point}"
        again = SaveAtKillPoints(root / "ckpt2") if point == "epoch_end" else None
        resumed = _quiet(run_case, case, root / point, ckpt_path=ckpt, save=again)
        assert_resumed_exactly(full, resumed, f"{name} resumed from {point}")
        if again is not None:  # killed again after the resume: resume the resumed run
            twice = _quiet(run_case, case, root / "twice", ckpt_path=root / "ckpt2" / "last_epoch.ckpt")
            assert_resumed_exactly(full, twice, f"{name} resumed from epoch_end, then from last_epoch")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_matrix_is_bit_exact(tmp_path, name):
    check_matrix_row(name, tmp_path)


def test_er_resumes_exactly_across_a_task_boundary(tmp_path):
    """The fast guard: killed after a task's last-batch checkpoint, the next (longer) task runs all its batches;
    killed after an epoch's last batch, and again later, the run still ends where the uninterrupted one does."""
    check_matrix_row("ER", tmp_path, points=("task_end", "epoch_end"))


def test_checkpointed_attributes_round_trip_through_a_checkpoint(tmp_path):
    """Plain-attribute state (keep_best's snapshot) is written into checkpoints, loads weights-only, and comes back."""
    import torch

    model = WSN(backbone_kwargs={"hidden_sizes": [8]}, keep_best=True, num_classes=4, input_shape=[1, 8, 8],
                scenario="task", n_tasks=2)
    model._best = (0.75, [torch.arange(3.0), torch.ones(2, 2)])
    checkpoint: dict[str, Any] = {}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.pt")
    fresh = WSN(backbone_kwargs={"hidden_sizes": [8]}, keep_best=True, num_classes=4, input_shape=[1, 8, 8],
                scenario="task", n_tasks=2)
    fresh.on_load_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True))
    assert fresh._best[0] == 0.75 and all(torch.equal(a, b) for a, b in zip(fresh._best[1], model._best[1], strict=True))
