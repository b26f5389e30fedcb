"""The report of a suite: every finished run's ``results.json`` aggregated into the paper-style table.

Cells are mean ± sample sd over seeds with n; the published value and the difference stand beside the
reference metric, marked where the difference exceeds the suite's tolerance. Runs that are missing or
failed are listed, so a partial suite reports what is there. Plots: average accuracy after each task
(a band over seeds) and, where runs logged ``continual_eval.csv``, the stability-gap curves of all
rows on one figure.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clframe.bench.runner import results_file
from clframe.bench.suite import Metric, Run, Suite, SuiteError

WARN = "⚠"
RUN_FACTS = ("run/seconds", "run/steps")  # tabulated like metrics; read from bench.json and metrics.csv


@dataclass
class Record:
    """One finished (run, seed): where it is and what its results.json says."""

    run: Run
    seed: int
    dir: Path
    results: dict[str, Any]
    run_dir: Path | None = None
    facts: dict[str, float | None] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        if name in RUN_FACTS:
            if name not in self.facts:
                self.facts[name] = _run_fact(self, name)
            value = self.facts[name]
        else:
            value = self.results.get("metrics", {}).get(name)
        return float(value) if isinstance(value, (int, float)) and value == value else None


def _run_fact(rec: Record, name: str) -> float | None:
    """``run/seconds``: the wall time ``clframe bench`` recorded; ``run/steps``: the last logged global step."""
    try:
        if name == "run/seconds":
            return json.loads(((rec.run_dir or rec.dir) / "bench.json").read_text()).get("seconds")
        with open(rec.dir / "metrics.csv", newline="") as f:
            steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]
        return max(steps) if steps else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


@dataclass
class Report:
    markdown: str
    csv: str
    files: list[Path] = field(default_factory=list)


def collect(suite: Suite) -> tuple[list[Record], list[tuple[Run, int, str]]]:
    """Finished runs, and the missing ones with why (failed with its error line, running, not run)."""
    records, missing = [], []
    for run, seed in suite.jobs():
        folder = suite.run_dir(run, seed)
        found = results_file(folder) if folder.is_dir() else None
        if found is not None:
            try:
                records.append(Record(run, seed, found.parent, json.loads(found.read_text()), folder))
                continue
            except (OSError, json.JSONDecodeError) as err:
                missing.append((run, seed, f"unreadable {found}: {err}"))
                continue
        missing.append((run, seed, _why_missing(folder)))
    return records, missing


def _why_missing(folder: Path) -> str:
    try:
        status = json.loads((folder / "bench.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "not run"
    if status.get("status") == "failed":
        last = (status.get("error") or "").strip().splitlines()
        return f"failed (exit {status.get('returncode')}): {last[-1] if last else ''}"
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return "running or interrupted; resumes from its checkpoint"
    return "running or interrupted before its first checkpoint"


def folder_suite(folder: Path, metrics: list[str] | None = None) -> Suite:
    """A suite made from a folder of runs: one row per run folder (``lightning_logs/version_N`` and a
    trailing ``seedK`` folded away, so seeds of one config share a row); the seed is read from results.json."""
    found = sorted(p for p in folder.glob("**/results.json") if "checkpoints" not in p.parts)
    if not found:
        raise SuiteError(f"no results.json under {folder}: nothing finished there yet")
    groups: dict[str, dict[int, Path]] = {}
    for path in found:
        rel = path.parent.relative_to(folder).as_posix()
        key = re.sub(r"(^|/)lightning_logs/version_\d+$", "", rel)
        seed_dir = re.search(r"(^|/)seed(\d+)$", key)
        key = re.sub(r"(^|/)seed\d+$", "", key) or folder.name
        seed = json.loads(path.read_text()).get("seed")
        seed = int(seed_dir.group(2)) if seed_dir else (int(seed) if isinstance(seed, int) else len(groups.get(key, {})))
        current = groups.setdefault(key, {})
        if seed not in current or path.stat().st_mtime > current[seed].stat().st_mtime:
            current[seed] = path
    runs = [Run(label=key, config="", row=key, seeds=tuple(sorted(seeds))) for key, seeds in groups.items()]
    suite = Suite(name=folder.name, path=None, out=folder, runs=runs,
                  metrics=[Metric(m, m) for m in (metrics or ["final/avg_acc"])])
    suite.locations = {(key, s): p.parent for key, seeds in groups.items() for s, p in seeds.items()}
    return suite


def aggregate(records: list[Record], metrics: list[Metric]) -> dict[tuple[str, str, str], Cell]:
    """(row, column, metric name) -> the cell's values over seeds, in the metric's display units."""
    cells: dict[tuple[str, str, str], Cell] = {}
    for rec in records:
        for m in metrics:
            value = rec.metric(m.name)
            cell = cells.setdefault((rec.run.row, rec.run.column, m.name), Cell([]))
            if value is not None:
                cell.values.append(value * m.scale)
    return cells


def _layout(suite: Suite) -> tuple[list[str], list[str]]:
    rows = list(dict.fromkeys(r.row for r in suite.runs))
    columns = list(dict.fromkeys(r.column for r in suite.runs))
    return rows, columns


def tables(suite: Suite, records: list[Record], missing: list[tuple[Run, int, str]], metrics: list[Metric],
           digits: int = 2) -> tuple[str, str]:
    """The Markdown table (plus reference, missing runs) and the CSV (one line per cell)."""
    cells = aggregate(records, metrics)
    rows, columns = _layout(suite)
    ref = suite.reference
    ref_metric = ref.metric if ref and any(m.name == ref.metric for m in metrics) else None
    ref_cols = {c for c in columns if ref and any((r, c) in ref.values for r in rows)} if ref_metric else set()

    def title(col: str, m: Metric) -> str:
        if not col:
            return m.title
        return col if len(metrics) == 1 else f"{col}: {m.title}"

    head = ["run"]
    for col in columns:
        for m in metrics:
            head.append(title(col, m))
            if col in ref_cols and m.name == ref_metric:
                head += [f"published{' (' + col + ')' if col else ''}", "difference"]
    head += [d.title for d in suite.differences if d.metric in {m.name for m in metrics}]
    notes_col = bool(ref and ref.notes)
    head += ["published / expected"] if notes_col else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "column", "metric", "n", "mean", "sd", "values", "reference", "reference_sd",
                     "difference", "outside_tolerance"])
    flagged = 0
    for row in rows:
        line = [row]
        for col in columns:
            for m in metrics:
                cell = cells.get((row, col, m.name), Cell([]))
                nd = digits if m.digits is None else m.digits
                line.append(f"{cell.mean:.{nd}f} ± {cell.sd:.{nd}f} ({cell.n})" if cell.n else "–")
                published = ref.values.get((row, col)) if ref and m.name == ref_metric else None
                diff = cell.mean - published[0] if published and cell.n else None
                outside = bool(diff is not None and ref.tolerance is not None and abs(diff) > ref.tolerance)
                flagged += outside
                if col in ref_cols and m.name == ref_metric:
                    shown = "–" if published is None else (f"{published[0]:.{nd}f}" if published[1] is None else
                                                           f"{published[0]:.{nd}f} ± {published[1]:.{nd}f}")
                    line += [shown, "–" if diff is None else f"{diff:+.{nd}f}{' ' + WARN if outside else ''}"]
                writer.writerow([row, col, m.name, cell.n, _num(cell.mean, cell.n), _num(cell.sd, cell.n),
                                 " ".join(f"{v:.10g}" for v in cell.values),
                                 "" if published is None else published[0],
                                 "" if published is None or published[1] is None else published[1],
                                 "" if diff is None else f"{diff:.10g}", int(outside)])
        for d in suite.differences:
            m = next((m for m in metrics if m.name == d.metric), None)
            if m is None:
                continue
            a, b = (cells.get((row, c, d.metric), Cell([])) for c in (d.a, d.b))
            value = a.mean - b.mean if a.n and b.n else None
            line.append("–" if value is None else f"{value:+.{digits if m.digits is None else m.digits}f}")
            writer.writerow([row, d.title, d.metric, min(a.n, b.n), "" if value is None else f"{value:.10g}",
                             "", "", "", "", "", 0])
        if notes_col:
            line.append(ref.notes.get(row, "–"))
        lines.append("| " + " | ".join(line) + " |")
    notes = [f"Cells: mean ± sample sd over seeds (n). Suite `{suite.name}`, {len(records)} finished run(s)."]
    if ref and ref_metric and ref.values:
        tol = f"; {WARN}: |difference| > {ref.tolerance:g} ({flagged} cell(s))" if ref.tolerance is not None else ""
        notes.append(f"Published: {ref.source} (metric `{ref_metric}`){tol}.")
    elif ref and ref.notes:
        notes.append(f"Published / expected: {ref.source}.")
    if missing:
        notes.append(f"Missing {len(missing)} run(s): " + _describe_missing(missing))
    return "\n".join([*( [f"## {suite.description}", ""] if suite.description else []), *lines, "", *notes]) + "\n", out.getvalue()


def _describe_missing(missing: list[tuple[Run, int, str]]) -> str:
    """``label seeds 0, 1 (why)``, one entry per label and reason."""
    groups: dict[tuple[str, str], list[int]] = {}
    for run, seed, why in missing:
        groups.setdefault((run.label, why), []).append(seed)
    return "; ".join(f"{label} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} ({why})"
                     for (label, why), seeds in groups.items())


def _num(value: float, n: int) -> str:
    return f"{value:.10g}" if n else ""


def write_report(suite: Suite, metrics: list[str] | None = None, out: Path | None = None, digits: int = 2,
                 plots: bool = True, from_json: Path | None = None, key: str = "{label}") -> Report:
    """Write ``report.md``, ``report.csv`` and the plots under ``out`` (default ``<suite out>/report``); the runs
    are the suite's run folders, or the objects of ``from_json`` (see :mod:`clframe.bench.importer`)."""
    chosen = ([next((m for m in suite.metrics if m.name == name), Metric(name, name, suite.metrics[0].scale))
               for name in metrics] if metrics else suite.metrics)
    if from_json is not None:
        from clframe.bench.importer import import_records

        records, missing = import_records(suite, from_json, key)
    else:
        records, missing = collect(suite)
    markdown, table_csv = tables(suite, records, missing, chosen, digits)
    out = out or suite.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.csv"]
    files[0].write_text(markdown)
    files[1].write_text(table_csv)
    if plots and records:
        from clframe.bench.plots import plot_avg_acc_per_task, plot_stability_curves

        rows, columns = _layout(suite)
        files.append(plot_avg_acc_per_task(records, rows, columns, out / "avg_acc_per_task.png"))
        curves = plot_stability_curves(records, rows, out / "stability_gap.png")
        if curves is not None:
            files.append(curves)
    return Report(markdown, table_csv, files)
