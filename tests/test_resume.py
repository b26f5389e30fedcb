"""Resuming a stream from a checkpoint written mid-task."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.errors import CheckpointError
from tests.conftest import QUIET_TRAINER
from tests.helpers.resume import assert_same_matrix_and_weights, fit_saving_every_step


def _setup(tmp_path, name):
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=3, batch_size=32, class_order=list(range(9)))
    model = ER(buffer_size=100, lr=0.05)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = ContinualTrainer(epochs_per_task=2, logger=False, callbacks=[ckpt], default_root_dir=tmp_path,
                               **{**QUIET_TRAINER, "enable_checkpointing": True})
    return data, model, trainer


def test_resume_mid_task_continues_the_stream(tmp_path):
    data, model, trainer = _setup(tmp_path, "full")
    trainer.fit(model, datamodule=data)
    full_rows, full_steps = trainer.accuracy_matrix, trainer.global_step

    mid_task_1 = tmp_path / "full" / "epoch=2.ckpt"  # first of task 1's two epochs
    data2, model2, trainer2 = _setup(tmp_path, "resumed")
    trainer2.fit(model2, datamodule=data2, ckpt_path=mid_task_1)

    assert len(trainer2.accuracy_matrix) == 3
    assert trainer2.accuracy_matrix[0] == pytest.approx(full_rows[0], nan_ok=True)  # carried in the checkpoint
    assert trainer2.global_step == full_steps
    assert int(model2.buffer.num_seen) == int(model.buffer.num_seen)
    assert int(model2.current_task) == 2


def test_resume_refuses_a_checkpoint_of_another_stream(tmp_path):
    data, model, trainer = _setup(tmp_path, "full")
    trainer.fit(model, datamodule=data)
    L.seed_everything(0)
    other = ContinualDataModule(source="digits", n_tasks=3, batch_size=32, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1])
    _, model2, trainer2 = _setup(tmp_path, "other")
    with pytest.raises(ValueError, match="different task stream|configured differently"):
        trainer2.fit(model2, datamodule=other, ckpt_path=tmp_path / "full" / "epoch=2.ckpt")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    data, model, trainer = _setup(tmp_path, "x")
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.fit(model, datamodule=data, ckpt_path=tmp_path / "nope.ckpt")


DIGITS_3 = {"source": "digits", "n_tasks": 3, "batch_size": 64, "class_order": list(range(6))}


def _model() -> ER:
    return ER(buffer_size=40, backbone_kwargs={"dropout": 0.2})


def test_resume_is_bit_exact_from_any_step(tmp_path):
    """Mid-epoch, last batch of an epoch, last batch of a task: the resumed run is identical."""
    full = fit_saving_every_step(tmp_path / "full", _model, DIGITS_3)
    steps_per_epoch = full[0].global_step // 6
    for step in (steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 2, 2 * steps_per_epoch, 3 * steps_per_epoch + 1):
        resumed = fit_saving_every_step(tmp_path / f"from{step}", _model, DIGITS_3,
                                        tmp_path / "full" / f"step={step}.ckpt")
        assert_same_matrix_and_weights(full, resumed, step)
