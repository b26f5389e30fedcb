"""Metrics over the accuracy matrix ``R[i][j]``: accuracy on task j after training task i.

Rows are time (one per finished task), columns are tasks; entries of tasks not evaluated are NaN.
All accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def _as_array(matrix: Matrix) -> np.ndarray:
    r = np.asarray(matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be 2-D with at least one row, got shape {r.shape}")
    return r


def average_accuracy(matrix: Matrix, after_task: int | None = None) -> float:
    """``A_k = (1/k) sum_{j<=k} R[k][j]`` (Chaudhry et al. 2018); the last row by default (ACC_T, GEM)."""
    r = _as_array(matrix)
    k = r.shape[0] - 1 if after_task is None else after_task
    return float(np.mean(r[k, : k + 1]))


def average_incremental_accuracy(matrix: Matrix) -> float:
    """``(1/T) sum_k A_k`` over the rows (Rebuffi et al. 2017, iCaRL)."""
    r = _as_array(matrix)
    return float(np.mean([average_accuracy(r, k) for k in range(r.shape[0])]))


def average_forgetting(matrix: Matrix) -> float:
    """``F_T = (1/(T-1)) sum_{j<T} max_{l<T} R[l][j] - R[T][j]`` (Chaudhry et al. 2018); 0 for one task."""
    r = _as_array(matrix)
    t = r.shape[0] - 1
    if t == 0:
        return 0.0
    return float(np.mean([np.max(r[j:t, j]) - r[t, j] for j in range(t)]))


def backward_transfer(matrix: Matrix) -> float:
    """``BWT = (1/(T-1)) sum_{j<T} R[T][j] - R[j][j]`` (Lopez-Paz & Ranzato 2017); negative = forgetting."""
    r = _as_array(matrix)
    t = r.shape[0] - 1
    if t == 0:
        return 0.0
    return float(np.mean([r[t, j] - r[j, j] for j in range(t)]))


def learning_accuracy(matrix: Matrix) -> float:
    """``LA = (1/T) sum_k R[k][k]`` (Riemer et al. 2019): accuracy on each task right after learning it."""
    r = _as_array(matrix)
    return float(np.mean([r[k, k] for k in range(r.shape[0])]))


def summarize_matrix(matrix: Matrix) -> dict[str, float]:
    """The end-of-stream metrics under their logged names."""
    return {
        "final/avg_acc": average_accuracy(matrix),
        "final/avg_incremental_acc": average_incremental_accuracy(matrix),
        "final/avg_forgetting": average_forgetting(matrix),
        "final/bwt": backward_transfer(matrix),
        "final/learning_acc": learning_accuracy(matrix),
    }
