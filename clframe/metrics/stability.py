"""Continual-evaluation metrics over per-iteration accuracy curves (the stability gap).

De Lange, Van de Ven & Tuytelaars, "Continual evaluation for lifelong learning: identifying the
stability gap", ICLR 2023. Inputs: ``steps`` (n,) global steps of the evaluations, ``acc`` (n, T)
accuracy of every task at every evaluation (NaN where a task was not evaluated), ``task_ends``
(T,) the global step at which each task's training ended (evaluations after it belong to later
tasks). Windows are measured in iterations, not in evaluations (a clframe
choice), so results do not depend on the evaluation period.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _after(steps: np.ndarray, end: float) -> np.ndarray:
    return steps > end


def min_acc(steps: Sequence[float], acc_i: Sequence[float], task_end: float) -> float:
    """``min-ACC_i = min_{n_i < n <= n_now} A(E_i, f_n)``: worst accuracy on task i after its training ended.

    NaN if task i has no evaluation after it ended (the current task).
    """
    s, a = np.asarray(steps, float), np.asarray(acc_i, float)
    sel = _after(s, task_end) & ~np.isnan(a)
    return float(np.min(a[sel])) if sel.any() else float("nan")


def average_min_acc(steps, acc, task_ends, upto: int | None = None) -> float:
    """``(1/(k-1)) sum_{i<k} min-ACC_i`` over the tasks before the last one (k = number of tasks)."""
    acc = np.asarray(acc, float)
    k = acc.shape[1] if upto is None else upto
    vals = [min_acc(steps, acc[:, i], task_ends[i]) for i in range(k - 1)]
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def wc_acc(steps, acc, task_ends) -> float:
    """Worst-case accuracy at the last evaluation, with k = number of tasks:

    ``WC-ACC = (1/k) A(E_k, f_n) + (1 - 1/k) avg-min-ACC``. With one task it is the accuracy.
    """
    acc = np.asarray(acc, float)
    k = acc.shape[1]
    current = acc[-1, k - 1]
    if k == 1:
        return float(current)
    return float(current / k + (1 - 1 / k) * average_min_acc(steps, acc, task_ends))


def _windowed_extreme(steps: np.ndarray, a: np.ndarray, window: float, sign: float) -> float:
    """max over pairs m < m' with step(m') - step(m) < window of sign * (A_m - A_m')."""
    keep = ~np.isnan(a)
    s, a = steps[keep], a[keep]
    best = 0.0
    for m in range(len(a)):
        hi = np.searchsorted(s, s[m] + window, side="left")
        if hi > m + 1:
            best = max(best, float(np.max(sign * (a[m] - a[m + 1 : hi]))))
    return best


def windowed_forgetting(steps, acc_i, window: int) -> float:
    """``WF^w_i``: the largest drop ``A_m - A_m'`` (m before m') within any window of ``w`` iterations."""
    return _windowed_extreme(np.asarray(steps, float), np.asarray(acc_i, float), window, 1.0)


def windowed_plasticity(steps, acc_i, window: int) -> float:
    """``WP^w_i``: the largest rise ``A_m' - A_m`` (m before m') within any window of ``w`` iterations."""
    return _windowed_extreme(np.asarray(steps, float), np.asarray(acc_i, float), window, -1.0)


def gap_at_boundaries(steps, acc, task_ends, recovery_fraction: float = 0.9) -> list[dict[str, float]]:
    """Depth and recovery time of the stability gap at every task switch.

    For the switch into task k and each earlier task i: ``depth = A_i(at the switch) - min A_i
    during task k``; ``recovery = iterations from the switch until A_i first regains
    recovery_fraction of the way from that minimum back to A_i at the end of task k`` (0 when there
    is no drop, NaN when it never recovers within the task). Averaged over the earlier tasks.
    """
    s, acc = np.asarray(steps, float), np.asarray(acc, float)
    out = []
    for k in range(1, acc.shape[1]):
        start, end = task_ends[k - 1], task_ends[k]
        during = (s > start) & (s <= end)
        at_switch = np.nonzero(s <= start)[0]
        if not during.any() or len(at_switch) == 0:
            continue
        depths, recoveries = [], []
        for i in range(k):
            before = acc[at_switch[-1], i]
            curve, cs = acc[during, i], s[during]
            trough = int(np.nanargmin(curve))
            depths.append(before - curve[trough])
            target = curve[trough] + recovery_fraction * (curve[-1] - curve[trough])
            if curve[trough] >= before:
                recoveries.append(0.0)
                continue
            back = np.nonzero(curve[trough:] >= target)[0]
            recoveries.append(cs[trough + back[0]] - start if len(back) else float("nan"))
        out.append({"task": k, "depth": float(np.mean(depths)), "recovery_steps": float(np.nanmean(recoveries))
                    if not np.all(np.isnan(recoveries)) else float("nan")})
    return out


def summarize_curves(steps, acc, task_ends, windows: Sequence[int] = (10, 100)) -> dict[str, float]:
    """The continual-evaluation metrics under their logged names.

    WF/WP are averaged over the old tasks (all but the last), and also over every task
    (``_all``, the reference code's form, which includes the current task).
    """
    s, acc = np.asarray(steps, float), np.asarray(acc, float)
    k = acc.shape[1]
    out: dict[str, float] = {
        "stability/min_acc": average_min_acc(s, acc, task_ends),
        "stability/wc_acc": wc_acc(s, acc, task_ends),
        "stability/avg_acc": float(np.nanmean(acc[-1, :k])),
    }
    for w in windows:
        wf = [windowed_forgetting(s, acc[:, i], w) for i in range(k)]
        wp = [windowed_plasticity(s, acc[:, i], w) for i in range(k)]
        out[f"stability/wf{w}"] = float(np.mean(wf[:-1])) if k > 1 else 0.0
        out[f"stability/wp{w}"] = float(np.mean(wp[:-1])) if k > 1 else 0.0
        out[f"stability/wf{w}_all"] = float(np.mean(wf))
        out[f"stability/wp{w}_all"] = float(np.mean(wp))
    gaps = gap_at_boundaries(s, acc, task_ends)
    for g in gaps:
        out[f"stability/gap_depth_task{g['task']}"] = g["depth"]
        out[f"stability/gap_recovery_steps_task{g['task']}"] = g["recovery_steps"]
    if gaps:
        out["stability/gap_depth"] = float(np.mean([g["depth"] for g in gaps]))
    return out
