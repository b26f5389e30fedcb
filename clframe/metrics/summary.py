"""The end-of-run summary printed by ``clframe fit``: accuracy matrix and metrics as aligned tables."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# Readable names for the metrics every run has; anything else is shown by its logged key.
LABELS = {
    "final/avg_acc": "average accuracy (ACC)",
    "final/avg_incremental_acc": "average incremental accuracy",
    "final/avg_forgetting": "average forgetting",
    "final/forgetting_first": "forgetting (from first accuracy)",
    "final/forgetting_step": "forgetting (last step)",
    "final/bwt": "backward transfer (BWT)",
    "final/fwt": "forward transfer (FWT)",
    "final/learning_acc": "learning accuracy",
    "stability/min_acc": "min-ACC (stability gap)",
    "stability/wc_acc": "WC-ACC (stability gap)",
    "stability/avg_acc": "average accuracy (continual eval)",
    "stability/gap_depth": "stability-gap depth",
}


def label(key: str) -> str:
    """A readable name for a logged metric key (the key itself when there is none)."""
    if key in LABELS:
        return LABELS[key]
    if key.startswith("final/val_") and (base := LABELS.get("final/" + key[len("final/val_"):])):
        return f"{base}, validation"
    if key.startswith("final/til_") and (base := LABELS.get("final/" + key[len("final/til_"):])):
        return f"{base}, Task-IL scoring"

    if m := re.fullmatch(r"stability/w([fp])(\d+)(_all)?", key):
        kind = "forgetting" if m.group(1) == "f" else "plasticity"
        return f"windowed {kind}, {m.group(2)} steps" + (" (all tasks)" if m.group(3) else "")
    return key


def _value(key: str, value: float) -> str:
    if value != value:
        return "-"
    if "steps" in key:  # counts, not fractions
        return f"{value:.0f}"
    return f"{100 * value:.2f} %"


def matrix_table(rows: Sequence[Sequence[float]]) -> list[str]:
    """``R[i][j]`` in percent, one row per finished task, ``-`` for tasks not yet evaluated."""
    lines = ["Accuracy matrix R[i][j] (%): accuracy on task j after training task i",
             "after task | " + " ".join(f"T{j:<5}" for j in range(len(rows[0])))]
    for i, row in enumerate(rows):
        lines.append(f"{i:>10} | " + " ".join("  -   " if a != a else f"{100 * a:5.1f} " for a in row))
    return lines


def metrics_table(metrics: Mapping[str, float]) -> list[str]:
    """Known metrics first, in a fixed order and with readable names; then the rest by key.

    Per-task entries (``..._task3``) are left to the logs: a summary holds one number per metric.
    """
    keys = [k for k in LABELS if k in metrics]
    keys += sorted(k for k in metrics if k not in LABELS and "_task" not in k)
    if not keys:
        return []
    names = [label(k) for k in keys]
    width = max(len(n) for n in names)
    lines = [f"{'metric':<{width}}  {'value':>9}  logged as", "-" * (width + 13 + max(len(k) for k in keys))]
    lines += [f"{name:<{width}}  {_value(k, float(metrics[k])):>9}  {k}" for name, k in zip(names, keys, strict=True)]
    return lines


def format_results(results: Mapping[str, Any], strategy: str | None = None) -> str:
    """The whole summary for ``ContinualTrainer.continual_results`` (what ``clframe fit`` prints)."""
    stream = results.get("stream") or {}
    title = " ".join(p for p in (strategy, f"on {stream['name']}" if stream.get("name") else None) if p)
    details = [f"{stream['scenario']}-incremental" if stream.get("scenario") else None,
               f"{stream['tasks']} tasks" if stream.get("tasks") else None,
               f"seed {results['seed']}" if results.get("seed") is not None else None]
    lines = ["", f"== {title or 'Results'} ({', '.join(d for d in details if d)}) =="]
    rows = [r for r in results.get("accuracy_matrix") or [] if r]
    if rows:
        lines += matrix_table(rows) + [""]
    lines += metrics_table(results.get("metrics") or {})
    lines += unavailable_lines(results.get("metrics_not_available") or {})
    return "\n".join(lines)


def unavailable_lines(reasons: Mapping[str, str]) -> list[str]:
    """One line per metric the run cannot define: ``n/a`` and why (instead of a made-up number)."""
    return [f"{label(k)}: n/a ({k}), {why}" for k, why in reasons.items()]
