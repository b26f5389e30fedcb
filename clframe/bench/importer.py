"""Runs that earlier scripts stored in one results file, read as the finished runs of a suite.

Before ``clframe bench`` wrote one folder per run, the reproduction scripts kept every (run, seed) as an object
in a JSON file. Reading those objects as records lets ``clframe report --from-json`` rebuild their tables with
the suite that now makes the same runs, so the published table and the suite's report are one computation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clframe.bench.report import Record
from clframe.bench.suite import Run, Suite, SuiteError


def import_records(suite: Suite, file: Path, key: str = "{label}") -> tuple[list[Record], list[tuple[Run, int, str]]]:
    """Finished runs from a results file that earlier scripts wrote instead of run folders: a JSON list (or
    ``{"runs": [...]}``) or JSON lines, one object per (run, seed). ``key``, a format over an object's fields
    (``"{benchmark}_{variant}"``), gives the suite label it belongs to; ``seed`` its seed. Metrics are read from
    ``metrics`` and from the object's own numeric fields; ``seconds`` and ``steps`` give ``run/seconds`` and
    ``run/steps``. Later objects of a (label, seed) replace earlier ones."""
    try:
        text = file.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise SuiteError(f"cannot read {file} as JSON or JSON lines: {err}") from None
    objects = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise SuiteError(f"{file}: expected a list of objects (or {{'runs': [...]}}), one per run and seed")
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for i, obj in enumerate(objects):
        try:
            label = key.format_map(obj)
        except (KeyError, AttributeError, IndexError, ValueError) as err:
            raise SuiteError(f"{file}: object {i} has no field for --key {key!r} ({type(err).__name__}: {err})") from None
        if isinstance(obj.get("seed"), int):
            by_key[(label, obj["seed"])] = obj
    records, missing = [], []
    for run, seed in suite.jobs():
        obj = by_key.get((run.label, seed))
        if obj is None:
            missing.append((run, seed, f"not in {file.name}"))
            continue
        numbers = {k: v for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        results = {"metrics": {**numbers, **(obj.get("metrics") or {})},
                   "accuracy_matrix": obj.get("accuracy_matrix") or obj.get("matrix") or []}
        records.append(Record(run, seed, file.parent, results, None,
                              {"run/seconds": obj.get("seconds"), "run/steps": obj.get("steps")}))
    return records, missing
