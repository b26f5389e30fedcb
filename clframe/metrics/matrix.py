"""Metrics over the accuracy matrix ``R[i][j]``: accuracy on task j after training task i.

Rows are time (one per finished task), columns are tasks; entries of tasks not evaluated are NaN.
All accuracies are fractions in [0, 1]. Definitions follow ``docs/methods/replay.md``.
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
    """``F_T = (1/(T-1)) sum_{j<T} max_{l<T} R[l][j] - R[T][j]`` (Chaudhry et al. 2018); 0 for one task.

    The max runs over the rows from j (when task j was learned) to T-1; used by L2P, DualPrompt, OVOR.
    """
    r = _as_array(matrix)
    t = r.shape[0] - 1
    if t == 0:
        return 0.0
    return float(np.mean([np.max(r[j:t, j]) - r[t, j] for j in range(t)]))


def forgetting_first(matrix: Matrix) -> float:
    """``(1/(T-1)) sum_{j<T} R[j][j] - R[T][j]``: forgetting against the just-learned accuracy.

    Avalanche's ``StreamForgetting`` and the stability-gap paper's FORG; equals ``-BWT``.
    """
    return -backward_transfer(matrix)


def forgetting_step(matrix: Matrix) -> float:
    """``(1/(T-1)) sum_{t=2..T} (1/(t-1)) sum_{i<t} R[t-1][i] - R[t][i]``: mean per-step drop (CODA-Prompt code)."""
    r = _as_array(matrix)
    t = r.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([np.mean(r[k - 1, :k] - r[k, :k]) for k in range(1, t)]))


def backward_transfer(matrix: Matrix) -> float:
    """``BWT = (1/(T-1)) sum_{j<T} R[T][j] - R[j][j]`` (Lopez-Paz & Ranzato 2017); negative = forgetting."""
    r = _as_array(matrix)
    t = r.shape[0] - 1
    if t == 0:
        return 0.0
    return float(np.mean([r[t, j] - r[j, j] for j in range(t)]))


def forward_transfer(matrix: Matrix, initial: Sequence[float]) -> float:
    """``FWT = (1/(T-1)) sum_{j=2..T} R[j-1][j] - b_j`` (Lopez-Paz & Ranzato 2017).

    ``initial[j]`` (b_j) is the accuracy on task j of the model before any training. Needs the
    accuracy on tasks not yet learned (``eval_all_tasks``); meaningful in task-/domain-incremental
    streams (in class-incremental ones unseen classes are masked, so R[j-1][j] = 0).
    """
    r = _as_array(matrix)
    t = r.shape[0]
    if t == 1:
        return 0.0
    b = np.asarray(initial, dtype=float)
    return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


def learning_accuracy(matrix: Matrix) -> float:
    """``LA = (1/T) sum_k R[k][k]`` (Riemer et al. 2019): accuracy on each task right after learning it."""
    r = _as_array(matrix)
    return float(np.mean([r[k, k] for k in range(r.shape[0])]))


FWT_MASKED_REASON = ("undefined in a class-incremental stream with unseen classes masked: a task's classes "
                     "cannot be predicted before it starts, so R[j-1][j] and b_j are 0 by construction")


def unavailable_metrics(initial: Sequence[float] | None, unseen_masked: bool) -> dict[str, str]:
    """Metrics that this run cannot define, with the reason (reported as such, never as a number)."""
    return {"final/fwt": FWT_MASKED_REASON} if initial is not None and unseen_masked else {}


def summarize_matrix(matrix: Matrix, initial: Sequence[float] | None = None,
                     unseen_masked: bool = False) -> dict[str, float]:
    """The end-of-stream metrics under their logged names (FWT only when ``initial`` and the
    above-diagonal entries it needs are known, and not when ``unseen_masked``: see
    :func:`unavailable_metrics`)."""
    out = {
        "final/avg_acc": average_accuracy(matrix),
        "final/avg_incremental_acc": average_incremental_accuracy(matrix),
        "final/avg_forgetting": average_forgetting(matrix),
        "final/forgetting_first": forgetting_first(matrix),
        "final/forgetting_step": forgetting_step(matrix),
        "final/bwt": backward_transfer(matrix),
        "final/learning_acc": learning_accuracy(matrix),
    }
    if initial is not None and not unseen_masked:
        fwt = forward_transfer(matrix, initial)
        if fwt == fwt:
            out["final/fwt"] = fwt
    return out
