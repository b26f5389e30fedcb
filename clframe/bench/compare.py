"""``clframe compare RUN_DIR...``: runs side by side (what differs in their configs, metrics, matrices)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from clframe.bench.runner import results_file
from clframe.bench.suite import SuiteError

# Keys that always differ between runs and say nothing about the experiment.
_NOISE = ("trainer.default_root_dir", "trainer.callbacks", "trainer.logger", "ckpt_path")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _load(run: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(results.json's folder, its results, the flattened config.yaml beside it)."""
    found = results_file(run) if run.is_dir() else (run if run.name == "results.json" else None)
    if found is None:
        raise SuiteError(f"{run}: no results.json there (give a run folder, e.g. runs/bench/<suite>/<label>/seed0, "
                         "or a lightning_logs/version_N folder of a finished run)")
    results = json.loads(found.read_text())
    config_file = found.parent / "config.yaml"
    config = _flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    return found.parent, results, config


def _short(value: Any, width: int = 28) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def compare(runs: list[Path], metrics: list[str] | None = None) -> str:
    """Text of the comparison: run names, differing config keys, metrics and the accuracy matrices."""
    if len(runs) < 2:
        raise SuiteError("compare needs two or more run folders")
    loaded = [_load(r) for r in runs]
    names = [f"[{i}]" for i in range(len(runs))]
    parts = ["\n".join(f"{n} {folder}" for n, (folder, _, _) in zip(names, loaded, strict=True))]
    keys = sorted({k for _, _, c in loaded for k in c if not k.startswith(_NOISE)})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for _, _, c in loaded}) > 1]
    if differ:
        parts.append("config differences:\n" + _table(["key", *names],
                     [[k, *(_short(c.get(k, "(absent)")) for _, _, c in loaded)] for k in differ]))
    else:
        parts.append("config differences: none" + (" (no config.yaml found)" if not keys else ""))
    shown = metrics or sorted({m for _, r, _ in loaded for m in r.get("metrics", {})})
    rows = []
    for m in shown:
        values = [r.get("metrics", {}).get(m) for _, r, _ in loaded]
        rows.append([m, *("–" if not isinstance(v, (int, float)) else f"{100 * v:.2f}" if abs(v) <= 1.5 else f"{v:.4g}"
                          for v in values)])
    parts.append("metrics (fractions shown as %):\n" + _table(["metric", *names], rows))
    for n, (_, r, _) in zip(names, loaded, strict=True):
        matrix = r.get("accuracy_matrix") or []
        body = [[str(i), *("-" if a is None else f"{100 * a:.1f}" for a in row)] for i, row in enumerate(matrix)]
        head = ["after", *(f"T{j}" for j in range(len(matrix[0]) if matrix else 0))]
        parts.append(f"{n} accuracy matrix R[i][j] (%):\n" + (_table(head, body) if matrix else "(none)"))
    return "\n\n".join(parts)
