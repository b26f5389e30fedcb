"""One log folder per run, for every logger, kept when a run resumes.

- Lightning's ``trainer.log_dir`` is a versioned folder for the CSV and TensorBoard loggers, but the bare
  ``save_dir`` for any other first logger (wandb): every run would write ``results.json``, ``config.yaml``
  and plots into the same folder. :func:`run_log_dir` gives such loggers ``save_dir/<name>/<version>``
  (wandb: ``save_dir/<project>/<run id>``, where Lightning also puts their checkpoints).
- :class:`RunFolder` stores each logger's version in the checkpoint; a run resumed from it
  (``--ckpt_path``) logs into the same folder (CSV, TensorBoard) or continues the same wandb run,
  instead of starting a second one.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_log_dir(trainer: L.Trainer, default: str | None) -> str | None:
    """``default`` (Lightning's ``log_dir``) for versioned loggers; ``save_dir/name/version`` for the others.

    A collective under DDP (rank 0's version is broadcast), so every rank must call it."""
    if not trainer.loggers or isinstance(trainer.loggers[0], (CSVLogger, TensorBoardLogger)):
        return default
    logger = trainer.loggers[0]
    version = None
    if trainer.is_global_zero:
        if getattr(logger, "version", None) is None and hasattr(logger, "experiment"):
            logger.experiment  # noqa: B018 - starting the run gives it its id (wandb)
        version = getattr(logger, "version", None)
    version = trainer.strategy.broadcast(version)
    save_dir = getattr(logger, "save_dir", None)
    if version is None or save_dir is None:
        return default
    return os.path.join(save_dir, str(logger.name or ""), str(version))


class RunFolder(L.Callback):
    """Remembers the loggers' versions in checkpoints, so that a resumed run continues in the same folder."""

    state_key = "clframe_run_folder"

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        loggers = self._trainer.loggers if self._trainer is not None else []
        return {"versions": [_plain(getattr(logger, "version", None)) for logger in loggers]}

    @staticmethod
    def resume(trainer: L.Trainer, state: dict[str, Any] | None) -> None:
        """Point the loggers at the versions a checkpoint recorded (before they have written anything)."""
        versions = (state or {}).get("versions") or []
        for logger, version in zip(trainer.loggers, versions, strict=False):
            if version is None:
                continue
            if isinstance(logger, (CSVLogger, TensorBoardLogger)) and getattr(logger, "_experiment", None) is None:
                logger._version = version  # Lightning's own attribute for a fixed version=
                # CSV rows are appended to the folder's metrics.csv, nothing is deleted: the warning would mislead
                warnings.filterwarnings("ignore", message=re.escape(f"Experiment logs directory {logger.log_dir} exists"))
            elif type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is None:
                logger._id = version
                logger._wandb_init.update(id=version, resume="allow")


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, str)) else str(value)
