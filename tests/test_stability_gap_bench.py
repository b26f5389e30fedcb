"""The stability-gap harness reads the epoch-end-only metrics off a run's per-iteration curves."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from clframe.metrics.stability import summarize_curves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stability_gap import epoch_end_metrics  # noqa: E402


def test_epoch_end_metrics_keep_step_zero_and_epoch_ends(tmp_path):
    # two tasks of 2 epochs x 3 steps: epoch ends at steps 3, 6 (task 0) and 9, 12 (task 1)
    steps = list(range(13))
    rng = np.random.default_rng(0)
    acc0 = rng.uniform(0.2, 1.0, len(steps))
    acc1 = [np.nan] * 7 + list(rng.uniform(0.2, 1.0, 6))
    path = tmp_path / "continual_eval.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "trained_task", "acc_task_0", "acc_task_1", "loss_task_0", "loss_task_1"])
        for s, a0, a1 in zip(steps, acc0, acc1, strict=True):
            w.writerow([s, 0 if s <= 6 else 1, f"{a0:.6f}", "" if a1 != a1 else f"{a1:.6f}", "", ""])
    kept = [0, 3, 6, 9, 12]
    acc = np.array([[round(acc0[s], 6), round(acc1[s], 6) if acc1[s] == acc1[s] else np.nan] for s in kept])
    expected = summarize_curves(kept, acc, [6, 12])
    got = epoch_end_metrics(path, epochs_per_task=2)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key
