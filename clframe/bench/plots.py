"""Plots that compare methods over seeds: average accuracy after each task, and stability-gap curves."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clframe.callbacks.plots import _pyplot

if TYPE_CHECKING:
    from clframe.bench.report import Record


def avg_acc_after_each_task(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """Row i of R -> mean accuracy over tasks 0..i (the seen tasks after training task i)."""
    out = []
    for i, row in enumerate(matrix):
        seen = [a for a in row[: i + 1] if a is not None and not (isinstance(a, float) and math.isnan(a))]
        out.append(sum(seen) / len(seen) if seen else math.nan)
    return out


def _band(ax, x: np.ndarray, curves: list[np.ndarray], label: str, color) -> None:
    stack = np.vstack(curves)
    mean = np.nanmean(stack, axis=0)
    ax.plot(x, mean, color=color, linewidth=1.6, marker="o" if len(x) <= 20 else None, markersize=3,
            label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        sd = np.nanstd(stack, axis=0, ddof=1)
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)


def _label_axes(ax, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower left")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_avg_acc_per_task(records: list[Record], rows: list[str], columns: list[str], path: Path) -> Path:
    """One panel per column; per row, average accuracy over seen tasks after each task, mean ± sd over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(6.5 * len(columns), 4.2), dpi=110, squeeze=False)
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    for ax, col in zip(axes[0], columns, strict=True):
        for k, row in enumerate(rows):
            curves = [100 * np.asarray(avg_acc_after_each_task(r.results.get("accuracy_matrix", [])), float)
                      for r in records if r.run.row == row and r.run.column == col]
            curves = [c for c in curves if c.size]
            if not curves:
                continue
            length = min(c.size for c in curves)
            _band(ax, np.arange(1, length + 1), [c[:length] for c in curves], row, colors(k % colors.N))
        ax.xaxis.get_major_locator().set_params(integer=True)
        _label_axes(ax, "after task", "average accuracy on seen tasks (%)", col or "average accuracy after each task", 7)
    return _save(plt, fig, path)


def read_curve(path: Path, task: int = 0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Steps, accuracy on ``task`` and the steps where the trained task changes, from continual_eval.csv."""
    steps, acc, switches, last = [], [], [], None
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            steps.append(float(rec["step"]))
            value = rec.get(f"acc_task_{task}", "")
            acc.append(float(value) if value else math.nan)
            if last is not None and rec["trained_task"] != last:
                switches.append(float(rec["step"]))
            last = rec["trained_task"]
    return np.asarray(steps), np.asarray(acc), switches


def plot_stability_curves(records: list[Record], rows: list[str], path: Path, task: int = 0) -> Path | None:
    """Accuracy on the first task during the whole stream, one curve per row (mean ± sd over seeds, on the
    first seed's evaluation steps); None when no run wrote continual_eval.csv."""
    by_row: dict[str, list[tuple[np.ndarray, np.ndarray, list[float]]]] = {}
    for rec in records:
        csv_file = rec.dir / "continual_eval.csv"
        if csv_file.is_file():
            by_row.setdefault(rec.run.row if not rec.run.column else f"{rec.run.row} · {rec.run.column}",
                              []).append(read_curve(csv_file, task))
    if not by_row:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=110)
    colors = plt.get_cmap("tab10" if len(by_row) <= 10 else "tab20")
    order = [r for r in rows if r in by_row] + [r for r in by_row if r not in rows]
    for k, row in enumerate(order):
        curves = by_row[row]
        x = curves[0][0]
        ys = [100 * np.interp(x, s, np.nan_to_num(a, nan=np.nan)) for s, a, _ in curves]
        _band(ax, x, ys, row, colors(k % colors.N))
        if k == 0:
            for s in curves[0][2]:
                ax.axvline(s, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 102)
    _label_axes(ax, "training iteration (global step); dashed: task switches", f"accuracy on task {task} (%)",
                f"Stability gap: accuracy on task {task} during the stream (mean ± sd over seeds)", 8)
    return _save(plt, fig, path)
