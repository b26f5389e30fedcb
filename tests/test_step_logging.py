"""Step metrics are logged only where someone reads them (``ContinualModule.step_metrics_wanted``), and the
loggers receive exactly what they received when every step called ``self.log``."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.strategies.base import ContinualModule


def _run(root: Path, every_step: bool, monkeypatch: pytest.MonkeyPatch, **trainer_kwargs) -> tuple[list[dict], list[int]]:
    """Train ER on Split-Digits; return the CSV's train/loss rows and the steps at which self.log ran."""
    logged_at: list[int] = []
    original_log = ContinualModule.log

    def spy(self, name, *args, **kwargs):
        if name == "train/loss":
            logged_at.append(self.global_step)
        return original_log(self, name, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ContinualModule, "log", spy)
        if every_step:
            m.setattr(ContinualModule, "step_metrics_wanted", lambda self: True)
        L.seed_everything(0, verbose=False)
        kwargs = dict(steps_per_task=7, logger=CSVLogger(root, name="logs"), log_every_n_steps=3,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      default_root_dir=root)
        trainer = ContinualTrainer(**{**kwargs, **trainer_kwargs})
        trainer.fit(ER(buffer_size=50), datamodule=ContinualDataModule(source="digits", n_tasks=2, seed=0))
    with open(next(Path(root).rglob("metrics.csv"))) as f:
        rows = [{"step": r["step"], "loss": r["train/loss"]} for r in csv.DictReader(f) if r.get("train/loss")]
    return rows, logged_at


def test_loggers_get_the_same_values_with_fewer_log_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sparse, sparse_calls = _run(tmp_path / "sparse", False, monkeypatch)
    dense, dense_calls = _run(tmp_path / "dense", True, monkeypatch)
    assert dense_calls == list(range(14))
    assert sparse == dense and len(sparse) == 4  # steps 2, 5, 8, 11 (every 3rd of 14)
    assert sparse_calls == [int(r["step"]) for r in sparse]


def test_monitoring_callback_keeps_every_step_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss", every_n_train_steps=1)
    _, calls = _run(tmp_path, False, monkeypatch, callbacks=[checkpoint], enable_checkpointing=True)
    assert calls == list(range(14))
