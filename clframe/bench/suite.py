"""Suites: a YAML file naming the runs of a results table (config, overrides, label) and the seeds.

A suite is data, not code: ``clframe bench`` runs it, ``clframe report`` turns its finished runs into
the table. Only ``yaml.safe_load`` reads it, so a suite can never run code. Layout::

    name: split_mnist_der
    out: runs/bench/split_mnist_der      # each run writes to <out>/<label>/seed<k>/
    seeds: [0, 1, 2]
    overrides: [--trainer.enable_model_summary=false]   # added to every run
    metrics: [final/avg_acc]             # logged names in results.json; {name, title, scale, digits} also works
    runs:
      - {label: finetune, config: configs/split_mnist/finetune.yaml, row: Finetune}
      - grid: {method: [er, der], buffer: [200, 500]}      # expands to 4 runs
        label: "{method}_{buffer}"
        config: configs/split_mnist/{method}.yaml
        overrides: ["--model.buffer_size={buffer}"]
    reference:                           # published figures beside the table (optional)
      source: Buzzega et al. 2020, Table 2
      tolerance: 2.0                     # |difference| above this is marked
      values: {Finetune: 19.60}          # row -> value, or row -> {column: value}; value: m, [m, sd] or "m ± sd"
      notes: {Finetune: "an expectation"}  # row -> text, a last column (figures that are not one number)
    differences:                         # derived columns: per row, mean of column a minus mean of column b
      - {title: "DER - ER", a: DER, b: ER}   # metric: the first one unless given

Rows and columns of the table come from each run's ``row`` (default: its label) and ``column``
(default: none, so the metrics are the columns). Besides logged metrics, ``run/seconds`` (the run's wall
time, from ``bench.json``) and ``run/steps`` (its last global step, from ``metrics.csv``) can be tabulated.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clframe.errors import ClframeError

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
_SUITE_KEYS = {"name", "description", "out", "seeds", "overrides", "metrics", "runs", "reference", "scale",
               "differences"}
_RUN_KEYS = {"label", "config", "overrides", "row", "column", "seeds", "grid"}


class SuiteError(ClframeError):
    """A suite file is malformed (unknown key, duplicate label, bad grid, ...)."""


@dataclass(frozen=True)
class Metric:
    """A logged metric (``final/avg_acc``) and how the table shows it (fractions as %, by default)."""

    name: str
    title: str
    scale: float = 100.0
    digits: int | None = None  # decimals shown; None: the report's --digits


@dataclass(frozen=True)
class Run:
    """One row-and-column cell of the table: a config with overrides, run once per seed."""

    label: str
    config: str
    overrides: tuple[str, ...] = ()
    row: str = ""
    column: str = ""
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Reference:
    """Published mean (and sd) per (row, column), with where it was published."""

    source: str
    values: dict[tuple[str, str], tuple[float, float | None]]
    metric: str
    tolerance: float | None = None
    notes: dict[str, str] = field(default_factory=dict)  # row -> text shown in a last column


@dataclass(frozen=True)
class Difference:
    """A derived column: per row, the mean of column ``a`` minus the mean of column ``b`` for ``metric``."""

    title: str
    a: str
    b: str
    metric: str


@dataclass
class Suite:
    name: str
    path: Path | None
    out: Path
    runs: list[Run]
    metrics: list[Metric]
    overrides: tuple[str, ...] = ()
    reference: Reference | None = None
    differences: list[Difference] = field(default_factory=list)
    description: str = ""
    base: Path = field(default_factory=Path.cwd)
    locations: dict[tuple[str, int], Path] = field(default_factory=dict)  # folder-made suites: where each run is

    def jobs(self) -> list[tuple[Run, int]]:
        """Every (run, seed), in suite order."""
        return [(run, seed) for run in self.runs for seed in run.seeds]

    def run_dir(self, run: Run, seed: int) -> Path:
        return self.locations.get((run.label, seed)) or self.out / run.label / f"seed{seed}"

    def config_path(self, run: Run) -> Path:
        """A config path is read relative to the working directory, else the suite file's folder and its parents
        (so ``clframe bench benchmarks/suites/x.yaml`` works from anywhere in the repository)."""
        path = Path(run.config)
        if path.is_absolute() or path.exists():
            return path
        for folder in [self.base, *self.base.parents]:
            if (folder / path).exists():
                return folder / path
        return path


class _Choice(dict):
    """A grid value given as a mapping: ``{method}`` formats its ``name``, ``{method.title}`` any key."""

    def __format__(self, spec: str) -> str:
        return format(str(self.get("name", "")), spec)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _fill(template: Any, values: dict[str, Any], where: str) -> Any:
    if not isinstance(template, str):
        return template
    try:
        return template.format_map(values)
    except (KeyError, AttributeError, IndexError, ValueError) as err:
        raise SuiteError(f"{where}: cannot fill {template!r} from the grid ({type(err).__name__}: {err}); "
                         f"grid names: {', '.join(values)}") from None


def _expand(entry: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """A run entry, or one entry per point of its ``grid`` (lists of values, crossed in order)."""
    grid = entry.get("grid")
    if grid is None:
        return [entry]
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise SuiteError(f"runs[{index}].grid must map names to non-empty lists of values, got {grid!r}")
    names = list(grid)
    out = []
    for point in itertools.product(*(grid[n] for n in names)):
        values = {n: _Choice(v) if isinstance(v, dict) else v for n, v in zip(names, point, strict=True)}
        where = f"runs[{index}] at {', '.join(f'{n}={v}' for n, v in values.items())}"
        out.append({k: ([_fill(o, values, where) for o in v] if k == "overrides" else _fill(v, values, where))
                    for k, v in entry.items() if k != "grid"})
    return out


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise SuiteError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    return tuple(value)


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    value = [] if value is None else value
    if not isinstance(value, list) or not all(isinstance(o, str) and o.startswith("--") for o in value):
        raise SuiteError(f"{where}: overrides must be a list of '--key=value' strings, got {value!r}")
    return tuple(value)


def _metric(value: Any, scale: float) -> Metric:
    if isinstance(value, str):
        return Metric(value, value, scale)
    if isinstance(value, dict) and isinstance(value.get("name"), str) and set(value) <= {"name", "title", "scale", "digits"}:
        digits = value.get("digits")
        if digits is not None and (not isinstance(digits, int) or isinstance(digits, bool) or digits < 0):
            raise SuiteError(f"metrics: digits of {value['name']!r} must be a whole number >= 0, got {digits!r}")
        return Metric(value["name"], str(value.get("title", value["name"])), float(value.get("scale", scale)), digits)
    raise SuiteError(f"metrics: each entry is a logged name or {{name, title, scale, digits}}, got {value!r}")


def _differences(raw: Any, metrics: list[Metric]) -> list[Difference]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SuiteError("differences: a list of {title, a, b, metric} (columns a and b; metric: the first by default)")
    out = []
    for i, item in enumerate(raw):
        if (not isinstance(item, dict) or set(item) - {"title", "a", "b", "metric"}
                or not all(isinstance(item.get(k), str) for k in ("a", "b"))):
            raise SuiteError(f"differences[{i}]: needs columns 'a' and 'b' (and optional 'title', 'metric'), got {item!r}")
        metric = str(item.get("metric", metrics[0].name))
        if metric not in {m.name for m in metrics}:
            raise SuiteError(f"differences[{i}]: metric {metric!r} is not among the suite's metrics")
        out.append(Difference(str(item.get("title", f"{item['a']} - {item['b']}")), item["a"], item["b"], metric))
    return out


def parse_value(value: Any, where: str) -> tuple[float, float | None]:
    """A published figure: ``19.6``, ``[19.6, 0.4]`` or ``"19.6 ± 0.4"`` -> (mean, sd or None)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(-?[\d.]+)\s*(?:(?:±|\+-|\+/-)\s*([\d.]+))?\s*", value)):
        return float(m.group(1)), float(m.group(2)) if m.group(2) else None
    raise SuiteError(f"{where}: a published value is a number, [mean, sd] or 'mean ± sd', got {value!r}")


def _reference(raw: Any, metrics: list[Metric]) -> Reference | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("values", {}), dict):
        raise SuiteError("reference: needs 'values' (row -> value or row -> {column: value}) and a 'source'")
    extra = set(raw) - {"source", "values", "metric", "tolerance", "notes"}
    if extra:
        raise SuiteError(f"reference: unknown key(s) {sorted(extra)}; allowed: source, values, metric, tolerance, notes")
    notes = raw.get("notes") or {}
    if not isinstance(notes, dict):
        raise SuiteError(f"reference.notes must map rows to text, got {notes!r}")
    values: dict[tuple[str, str], tuple[float, float | None]] = {}
    for row, cell in raw.get("values", {}).items():
        if isinstance(cell, dict):
            for col, v in cell.items():
                values[(str(row), str(col))] = parse_value(v, f"reference.values[{row!r}][{col!r}]")
        else:
            values[(str(row), "")] = parse_value(cell, f"reference.values[{row!r}]")
    tol = raw.get("tolerance")
    if tol is not None and not isinstance(tol, (int, float)):
        raise SuiteError(f"reference.tolerance must be a number (in the table's units), got {tol!r}")
    return Reference(str(raw.get("source", "")), values, str(raw.get("metric", metrics[0].name)),
                     None if tol is None else float(tol), {str(k): str(v) for k, v in notes.items()})


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; every problem is one :class:`SuiteError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist; give the path of a suite YAML (see benchmarks/suites/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"{path} is not valid YAML: {err}") from None
    return suite_from_dict(raw, path)


def suite_from_dict(raw: Any, path: Path | None = None) -> Suite:
    where = str(path or "suite")
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: a suite is a mapping with 'runs' (and name, seeds, out, ...)")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(_SUITE_KEYS))}")
    if not isinstance(raw.get("runs"), list) or not raw["runs"]:
        raise SuiteError(f"{where}: 'runs' must be a non-empty list of runs (label, config, overrides, ...)")
    name = str(raw.get("name") or (path.stem if path else "suite"))
    seeds = _seeds(raw.get("seeds", [0]), "seeds")
    scale = float(raw.get("scale", 100.0))
    metrics = [_metric(m, scale) for m in (raw.get("metrics") or ["final/avg_acc"])]
    runs: list[Run] = []
    for i, entry in enumerate(raw["runs"]):
        if not isinstance(entry, dict) or set(entry) - _RUN_KEYS:
            bad = sorted(set(entry) - _RUN_KEYS) if isinstance(entry, dict) else entry
            raise SuiteError(f"runs[{i}]: unknown key(s) {bad}; a run has {', '.join(sorted(_RUN_KEYS))}")
        for item in _expand(entry, i):
            label, config = item.get("label"), item.get("config")
            if not isinstance(label, str) or not _LABEL.match(label):
                raise SuiteError(f"runs[{i}]: label {label!r} must be a folder name (letters, digits, _ . = + -)")
            if not isinstance(config, str):
                raise SuiteError(f"runs[{i}] ({label}): 'config' (a config file path) is required")
            runs.append(Run(label, config, _overrides(item.get("overrides"), f"runs[{i}] ({label})"),
                            str(item.get("row", label)), str(item.get("column", "") or ""),
                            _seeds(item["seeds"], f"runs[{i}] ({label})") if "seeds" in item else seeds))
    labels = [r.label for r in runs]
    if dupes := sorted({x for x in labels if labels.count(x) > 1}):
        raise SuiteError(f"{where}: labels must be unique (each names a folder); repeated: {', '.join(dupes)}")
    differences = _differences(raw.get("differences"), metrics)
    columns = {r.column for r in runs}
    for d in differences:
        if unknown := [c for c in (d.a, d.b) if c not in columns]:
            raise SuiteError(f"differences ({d.title}): no run has column {', '.join(map(repr, unknown))}; "
                             f"columns: {', '.join(sorted(map(repr, columns)))}")
    base = path.resolve().parent if path else Path.cwd()
    return Suite(name=name, path=path, out=Path(raw.get("out") or f"runs/bench/{name}"), runs=runs, metrics=metrics,
                 overrides=_overrides(raw.get("overrides"), "overrides"), reference=_reference(raw.get("reference"), metrics),
                 differences=differences, description=str(raw.get("description", "")), base=base)
