"""FWT is reported as not available (null plus a reason) where masking makes it undefined, never as 0."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from clframe import ContinualDataModule, ContinualTrainer, Finetune
from clframe.metrics.matrix import FWT_MASKED_REASON, summarize_matrix, unavailable_metrics
from clframe.metrics.summary import format_results
from tests.conftest import QUIET_TRAINER


def _run(tmp_path: Path, scenario: str, **model) -> ContinualTrainer:
    L.seed_everything(0, verbose=False)
    shift = {"tasks": "permutation"} if scenario == "domain" else {}
    data = ContinualDataModule(source="digits", scenario=scenario, n_tasks=2, batch_size=32, eval_all_tasks=True,
                               train_samples_per_class=20, test_samples_per_class=10, **shift)
    trainer = ContinualTrainer(epochs_per_task=1, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
    trainer.fit(Finetune(lr=0.05, **model), datamodule=data)
    return trainer


def test_class_incremental_fwt_is_null_with_a_reason(tmp_path, capsys) -> None:
    trainer = _run(tmp_path, "class")
    results = trainer.continual_results
    assert "final/fwt" not in results["metrics"]  # loggers never receive a number for it
    assert results["metrics_not_available"] == {"final/fwt": FWT_MASKED_REASON}
    written = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert written["metrics"]["final/fwt"] is None and "final/fwt" in written["metrics_not_available"]
    text = format_results(results)
    assert "forward transfer (FWT): n/a" in text and "0.00 %" not in text.split("forward transfer")[-1]


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_fwt_is_a_number_where_it_is_defined(tmp_path, scenario) -> None:
    results = _run(tmp_path, scenario).continual_results
    assert isinstance(results["metrics"]["final/fwt"], float) and not results["metrics_not_available"]


def test_class_incremental_without_masking_keeps_fwt() -> None:
    rows = [[0.9, 0.1], [0.5, 0.8]]
    assert "final/fwt" in summarize_matrix(rows, [0.1, 0.1], unseen_masked=False)
    assert "final/fwt" not in summarize_matrix(rows, [0.1, 0.1], unseen_masked=True)
    assert unavailable_metrics(None, True) == {}
