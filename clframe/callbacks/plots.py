"""Plots of continual-learning results, written as PNG files.

The heatmaps (accuracy matrix, confusion matrix) are drawn with Pillow (`clframe.callbacks.heatmap`):
every run writes a confusion matrix, and matplotlib would cost it the better part of a second. Only the
accuracy-curve plot uses matplotlib (headless), imported when that plot is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clframe.callbacks.heatmap import write_heatmap


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write the figure and free it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_accuracy_curves(steps: Sequence[float], acc: np.ndarray, task_ends: Sequence[float], path: str | Path,
                         title: str = "Accuracy on each task during training") -> Path:
    """Per-task accuracy against the global iteration, with task switches marked (the stability gap)."""
    plt = _pyplot()
    steps, acc = np.asarray(steps, float), np.asarray(acc, float)
    n_tasks = acc.shape[1]
    fig, ax = plt.subplots(figsize=(11, 5), dpi=120)
    colors = plt.get_cmap("tab10" if n_tasks <= 10 else "tab20")
    for end in task_ends[:-1]:
        ax.axvline(end, color="0.6", linestyle="--", linewidth=1)
    for j in range(n_tasks):
        seen = ~np.isnan(acc[:, j])
        if not seen.any():
            continue
        ax.plot(steps[seen], 100 * acc[seen, j], color=colors(j % colors.N), linewidth=1.2, label=f"task {j}")
        after = seen & (steps > task_ends[j]) if j < len(task_ends) else np.zeros_like(seen)
        if after.any():  # the worst point after the task was learned: its min-ACC
            m = np.nonzero(after)[0][np.argmin(acc[after, j])]
            ax.plot(steps[m], 100 * acc[m, j], marker="v", color=colors(j % colors.N), markersize=7)
    ymax = 100
    for k, end in enumerate(task_ends):
        start = task_ends[k - 1] if k else steps.min()
        ax.text((start + end) / 2, ymax + 1, f"T{k}", ha="center", va="bottom", fontsize=9, color="0.3")
    ax.set_xlim(steps.min(), steps.max())
    ax.set_ylim(0, ymax + 6)
    ax.set_xlabel("training iteration (global step)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title + "  (dashed: task switches; ▼: min-ACC)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", ncol=min(n_tasks, 10), fontsize=8, framealpha=0.9)
    return _save(plt, fig, path)


def plot_accuracy_matrix(matrix: Sequence[Sequence[float]], path: str | Path,
                         title: str = "Accuracy matrix R[i][j] (%)") -> Path:
    """Heatmap of the accuracy matrix with the value in each cell (blank where not evaluated)."""
    r = 100 * np.asarray(matrix, float)
    n_rows, n_cols = r.shape
    texts = None
    if n_cols <= 25:
        texts = [["" if np.isnan(x) else f"{x:.0f}" for x in row] for row in r]
    return write_heatmap(r, path, title=title, xlabel="evaluated task j", ylabel="after training task i",
                         cell_text=texts, colormap="viridis", vmin=0, vmax=100)


def plot_confusion_matrix(confusion: np.ndarray, path: str | Path, title: str = "Test confusion matrix") -> Path:
    """Row-normalised confusion matrix (true class in rows, predicted in columns), counts where few classes."""
    counts = np.asarray(confusion, float)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)
    texts = None
    if len(counts) <= 20:
        texts = [[f"{c:.0f}" if c else "" for c in row] for row in counts]
    return write_heatmap(100 * share, path, title=title, xlabel="predicted class", ylabel="true class",
                         cell_text=texts, colormap="blues", vmin=0, vmax=100,
                         colorbar_label="% of the true class")
