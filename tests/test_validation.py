"""Held-out validation: the validation accuracy matrix, final/val_* metrics, per-task monitored checkpoints."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.metrics.matrix import summarize_matrix
from tests.conftest import QUIET_TRAINER


def _fit(tmp_path, callbacks=(), budget=None, **data_kwargs):
    data = ContinualDataModule(n_tasks=3, class_order=list(range(6)), batch_size=16, **data_kwargs)
    trainer = ContinualTrainer(**(budget or {"steps_per_task": 4}), default_root_dir=tmp_path, callbacks=list(callbacks),
                               **{**QUIET_TRAINER, "enable_checkpointing": bool(callbacks)})
    trainer.fit(ER(buffer_size=50), datamodule=data)
    return trainer


def test_validation_matrix_and_summary(tmp_path):
    trainer = _fit(tmp_path, val_fraction=0.2)
    results = trainer.continual_results
    val = results["val_accuracy_matrix"]
    assert len(val) == 3 and all(len(r) == 3 for r in val)
    assert val != results["accuracy_matrix"]  # a different split, not a copy of the test matrix
    metrics = results["metrics"]
    expected = summarize_matrix(val)
    for key, value in expected.items():
        assert metrics[key.replace("final/", "final/val_")] == value
    out = json.loads((tmp_path / "lightning_logs" / "version_0" / "results.json").read_text())
    assert out["metrics"]["final/val_avg_acc"] == metrics["final/val_avg_acc"]
    assert (tmp_path / "lightning_logs" / "version_0" / "val_accuracy_matrix.csv").is_file()


def test_no_validation_split_no_validation_metrics(tmp_path):
    results = _fit(tmp_path).continual_results
    assert results["val_accuracy_matrix"] == []
    assert not any(k.startswith("final/val_") for k in results["metrics"])


def test_a_monitored_checkpoint_keeps_the_best_of_every_task(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/avg_acc", mode="max", save_top_k=1,
                           filename="task{task:.0f}-{val/avg_acc:.3f}", auto_insert_metric_name=False)
    _fit(tmp_path, callbacks=[ckpt], budget={"epochs_per_task": 1}, val_fraction=0.2)  # validation at epoch ends
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert [n.split("-")[0] for n in names] == ["task0", "task1", "task2"], names


def test_per_class_accuracy_sums_to_the_task_accuracy(tmp_path):
    import numpy as np

    trainer = _fit(tmp_path)
    out = tmp_path / "lightning_logs" / "version_0"
    row = trainer.continual_results["accuracy_matrix"][-1]
    confusion = np.loadtxt(out / "confusion_matrix_task2.csv", delimiter=",")
    support = confusion.sum(1)
    per_class = np.genfromtxt(out / "per_class_accuracy.csv", delimiter=",", skip_header=1)[-1, 1:]
    for task, classes in enumerate([[0, 1], [2, 3], [4, 5]]):
        weighted = sum(per_class[c] * support[c] for c in classes) / sum(support[c] for c in classes)
        assert weighted == pytest.approx(row[task], abs=1e-6)  # the CSV keeps 6 decimals
    assert (out / "confusion_matrix.png").is_file()
