"""What ``clframe test`` / ``validate`` / ``predict`` print, log and write, and where a run's files go.

``clframe fit`` reports through ``ContinualTrainer`` (the accuracy matrix, ``results.json``). The other
subcommands evaluate one checkpoint: the tasks it had seen (``current_task`` in the checkpoint) are
evaluated, and the result is one row of the accuracy matrix. It is printed, sent to every logger by the
strategy (``test/acc_task_j``, ``test/avg_acc_seen``; ``val/...`` for ``validate``) and written as
``<stage>_results.json`` in the log folder. ``predict`` returns, and writes as ``predictions.csv``,
one line per test sample of the seen tasks: task id, target and predicted class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from clframe.metrics.summary import matrix_table


def log_folder(trainer: L.Trainer) -> Path | None:
    """The run's log folder (where ``results.json`` and ``config.yaml`` land); ``None`` without loggers."""
    if not trainer.loggers:
        return None
    folder = trainer.log_dir
    return Path(folder) if folder else None


@rank_zero_only
def announce_log_folder(folder: Path | None, when: str) -> None:
    """``clframe: logging to <folder>``: printed at the start and at the end of a run (``folder`` is
    :func:`log_folder`, asked on every rank: under DDP it is a collective)."""
    if folder is not None:
        verb = "logging to" if when == "start" else "logs and results in"
        print(f"clframe: {verb} {folder.resolve()}", flush=True)


def evaluation_row(trainer: L.Trainer, model: Any, stage: str) -> dict[str, Any]:
    """The accuracy row of the seen tasks after ``trainer.test`` / ``trainer.validate``, with its metrics."""
    datamodule = trainer.datamodule
    n_tasks = len(datamodule.stream) if datamodule is not None else len(model.eval_accuracy)
    upto = int(getattr(datamodule, "current_task", n_tasks - 1))
    row = list(model.eval_accuracy)[:n_tasks]
    row += [math.nan] * (n_tasks - len(row))
    prefix = "test" if stage == "test" else "val"
    metrics = {f"{prefix}/acc_task_{j}": a for j, a in enumerate(row) if a == a}
    seen = [a for a in row[: upto + 1] if a == a]
    if seen:
        metrics[f"{prefix}/avg_acc_seen"] = sum(seen) / len(seen)
    return {"stage": stage, "after_task": upto, "row": row, "metrics": metrics}


def report_evaluation(trainer: L.Trainer, model: Any, stage: str) -> dict[str, Any]:
    """Print and write the row that ``clframe test`` / ``clframe validate`` computed (the strategy logged its
    metrics through Lightning: ``ContinualModule._log_standalone_evaluation``)."""
    result = evaluation_row(trainer, model, stage)
    _write_and_print(log_folder(trainer), result)
    return result


@rank_zero_only
def _write_and_print(folder: Path | None, result: dict[str, Any]) -> None:
    stage, row = result["stage"], result["row"]
    name = "Validation" if stage == "validate" else "Test"
    lines = ["", f"== {name} accuracy of the checkpoint (trained up to task {result['after_task']}) =="]
    if any(a == a for a in row):
        table = matrix_table([row])
        lines += [table[1], f"{result['after_task']:>10} |" + table[2].split("|", 1)[1]]
        avg = next((v for k, v in result["metrics"].items() if k.endswith("avg_acc_seen")), None)
        if avg is not None:
            key = next(k for k in result["metrics"] if k.endswith("avg_acc_seen"))
            lines.append(f"average over the seen tasks: {100 * avg:.2f} %  ({key})")
    else:
        lines.append("no data to evaluate" + (" (validation needs --data.val_fraction > 0)" if stage == "validate" else ""))
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        clean = {**result, "row": [None if a != a else a for a in row]}
        (folder / f"{stage}_results.json").write_text(json.dumps(clean, indent=2))
        lines.append(f"clframe: written to {folder.resolve()}")
    print("\n".join(lines), flush=True)


def collect_predictions(batches: list[Any] | None) -> dict[str, torch.Tensor]:
    """``trainer.predict``'s per-batch dicts (one list per data loader) as one dict of tensors."""
    flat: list[dict[str, torch.Tensor]] = []
    for item in batches or []:
        flat.extend(item if isinstance(item, list) else [item])
    if not flat:
        return {"task_id": torch.empty(0, dtype=torch.long), "target": torch.empty(0, dtype=torch.long),
                "prediction": torch.empty(0, dtype=torch.long)}
    return {key: torch.cat([b[key].cpu() for b in flat]) for key in flat[0]}


@rank_zero_only
def write_predictions(folder: Path | None, predictions: dict[str, torch.Tensor]) -> None:
    """``predictions.csv`` (task_id, target, prediction) in the log folder, and a one-line summary."""
    n = len(predictions["prediction"])
    correct = (predictions["prediction"] == predictions["target"]).float()
    tasks = sorted(set(predictions["task_id"].tolist()))
    per_task = ", ".join(f"T{t} {100 * correct[predictions['task_id'] == t].mean():.1f} %" for t in tasks)
    lines = [f"clframe: {n} predictions on tasks {tasks}" + (f" (accuracy {per_task})" if n else "")]
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "predictions.csv", "w") as f:
            f.write("task_id,target,prediction\n")
            for t, y, p in zip(*(predictions[k].tolist() for k in ("task_id", "target", "prediction")), strict=True):
                f.write(f"{t},{y},{p}\n")
        lines.append(f"clframe: written to {(folder / 'predictions.csv').resolve()}")
    print("\n".join(lines), flush=True)
