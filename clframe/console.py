"""Console noise that a continual run repeats at every task, silenced where it says nothing useful.

A stream runs Lightning's ``fit`` once per task, so messages meant for one run appear N times:

- Lightning's advertising tips ("💡 Tip: ... litlogger / litmodels"): dropped;
- the ``_pytree`` ``LeafSpec`` deprecation warning raised inside Lightning itself (nothing a user can
  change): dropped;
- "Checkpoint directory ... exists and is not empty": kept when the folder held files before this run
  started (that may mean overwriting another run's checkpoints), dropped once this run itself has
  written there (:class:`QuietRepeats`);
- "The number of training batches (N) is smaller than the logging interval": shown once per message.

Everything else Lightning says is left alone.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import lightning as L

_TIP = "💡 Tip:"
_CHECKPOINT_DIR = "Checkpoint directory {} exists and is not empty."


class _TipFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIP)


def install_filters() -> None:
    """Filters for the messages above (idempotent; called when clframe's trainer is imported)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TipFilter) for f in logger.filters):
            logger.addFilter(_TipFilter())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("once", message=r".*is smaller than the logging interval.*")
    # clframe's evaluation batch sampler serves every sample exactly once by construction (tested), which is
    # what Lightning asks the user to check for a custom batch sampler in prediction
    warnings.filterwarnings("ignore", message=r".*custom batch sampler `TaskBatchSampler` for prediction.*")


class QuietRepeats(L.Callback):
    """Drops "Checkpoint directory ... exists and is not empty" for folders this run has already used.

    The checkpoint callbacks warn in their ``setup`` (every task's ``fit``); this callback's ``setup`` runs
    before theirs (Lightning puts checkpoint callbacks last) and adds an ignore filter for the folders
    seen at an earlier task, which ``on_fit_start`` removes again."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._filters: list[Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.used and self._filters is None:
            self._filters = warnings.filters[:]
            for folder in self.used:
                warnings.filterwarnings("ignore", message=re.escape(_CHECKPOINT_DIR.format(folder)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        self.used |= {str(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()  # fit failed between setup and on_fit_start

    def _restore(self) -> None:
        if self._filters is not None:
            warnings.filters[:] = self._filters
            self._filters = None
            mutated = getattr(warnings, "_filters_mutated", None)  # drop cached decisions, as filterwarnings does
            if mutated is not None:
                mutated()
