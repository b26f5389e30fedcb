"""End-of-stream reporting to Weights & Biases.

Lightning's ``WandbLogger`` already receives every ``log_metrics`` call (so ``final/*`` and
``stability/*`` reach the run's history) and the model's and data module's ``hparams`` (its
config). What a continual run also needs, and what a sweep controller reads, is added here once
the stream has ended (``ContinualTrainer._finish`` calls :func:`log_stream_to_wandb`):

- the end-of-stream metrics in the run **summary** (the value a sweep's ``metric.name`` is read
  from; set explicitly, so it does not depend on which history row came last),
- the accuracy matrix ``R[i][j]`` as a ``wandb.Table`` under ``accuracy_matrix``,
- the whole CLI configuration under the same dotted names the command line and sweep files use
  (``model.lr``, ``trainer.epochs_per_task``, ``seed_everything``, ``model.class_path``), which
  Lightning's hparams logging leaves out (trainer settings, seed, strategy class).

Plots are sent by :class:`~clframe.callbacks.ContinualEvaluation` itself (``log_image``).
Only rank 0 talks to wandb; other ranks' ``WandbLogger.experiment`` is a dummy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    import lightning as L

ACCURACY_TABLE_KEY = "accuracy_matrix"


def wandb_loggers(trainer: L.Trainer) -> list[Any]:
    """The trainer's ``WandbLogger`` instances (none when wandb is not in use)."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning always ships it, wandb may be missing
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _plain(value: Any) -> Any:
    """JSON-friendly values for wandb's config (paths and other objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace inside a list (e.g. callbacks)
        return _plain(value.as_dict())
    return str(value)


def flatten_cli_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A jsonargparse Namespace as ``{dotted name: value}``, with ``class_path``/``init_args``
    collapsed (``model.init_args.lr`` becomes ``model.lr``), so the names are exactly the ones
    that ``--model.lr=...`` and the sweep files use. Dict-typed options stay whole values."""
    out: dict[str, Any] = {}
    for key, value in vars(config).items():
        if key in ("__path__", "__default_config__"):
            continue
        name = f"{prefix}{key}"
        if hasattr(value, "as_dict"):  # a nested namespace: a group, or a subclass spec
            init_args = value.get("init_args") if "class_path" in value else None
            if init_args is not None:
                out[f"{name}.class_path"] = _plain(value.get("class_path"))
                out.update(flatten_cli_config(init_args, f"{name}."))
                continue
            out.update(flatten_cli_config(value, f"{name}."))
        else:
            out[name] = _plain(value)
    return out


def cli_config(trainer: L.Trainer) -> dict[str, Any]:
    """The run's flattened CLI configuration, when it was started by LightningCLI (its
    ``SaveConfigCallback`` holds the parsed config); empty for Python-API runs."""
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            flat = flatten_cli_config(cb.config)
            # the config files and the logger's own settings are not hyperparameters
            return {k: v for k, v in flat.items() if k != "config" and not k.startswith("trainer.logger")}
    return {}


def accuracy_table(rows: list[list[float]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the accuracy matrix for a ``wandb.Table`` (NaN, the unseen tasks, as empty cells)."""
    n = len(rows[0]) if rows else 0
    columns = ["after_task", *(f"task_{j}" for j in range(n))]
    data = [[i, *(None if isinstance(a, float) and math.isnan(a) else a for a in row)] for i, row in enumerate(rows)]
    return columns, data


@rank_zero_only
def log_stream_to_wandb(trainer: L.Trainer, results: dict[str, Any] | None = None) -> None:
    """Send the end-of-stream results of ``trainer`` (``continual_results`` by default) to every
    attached ``WandbLogger``: metrics into the summary, the accuracy matrix as a table, the CLI
    config into the run config. A no-op without a ``WandbLogger``."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    results = trainer.continual_results if results is None else results  # type: ignore[attr-defined]
    metrics = {k: v for k, v in (results.get("metrics") or {}).items() if v is not None}
    rows = results.get("accuracy_matrix") or []
    config = cli_config(trainer)
    for logger in loggers:
        run = logger.experiment
        if config:
            fresh = {k: v for k, v in config.items() if k not in run.config or run.config[k] != v}
            if fresh:  # keys a sweep set are locked and already hold the same values
                run.config.update(fresh, allow_val_change=True)
        if rows:
            columns, data = accuracy_table(rows)
            logger.log_table(key=ACCURACY_TABLE_KEY, columns=columns, data=data, step=trainer.global_step)
        if metrics:
            run.summary.update(metrics)

