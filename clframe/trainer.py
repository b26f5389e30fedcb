"""ContinualTrainer: a Lightning Trainer whose ``fit`` walks a whole task stream.

For every task it calls the task hooks, runs Lightning's own ``fit`` for the task's epochs (so
loggers, checkpoints, precision, callbacks and strategies work unchanged; the global step never
resets; optimizers are rebuilt by ``configure_optimizers``), then tests every seen task and
records a row of the accuracy matrix.

Under DDP (``strategy="ddp"``) Lightning starts the other ranks by re-running the command (or
script) on the first ``fit``; every rank then runs this whole stream loop, in lockstep, and the
later per-task fits reuse the same processes. The data module shards every loader itself.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from clframe.callbacks.base import ContinualCallback
from clframe.callbacks.progress import default_task_progress_bar
from clframe.callbacks.run_folder import RunFolder, run_log_dir
from clframe.checkpoints import (
    check_same_run,
    checkpoint_kwargs,
    load_checkpoint,
    newest_of_this_run,
    run_identity,
)
from clframe.console import QuietRepeats, install_filters
from clframe.data.datamodule import ContinualDataModule
from clframe.data.stream import Task
from clframe.errors import CheckpointError, ConfigError
from clframe.hooks import PassThrough, skipping_noop_hooks
from clframe.loggers import log_stream_to_wandb
from clframe.loops import ExactResumeFitLoop
from clframe.metrics.matrix import summarize_matrix, unavailable_metrics
from clframe.metrics.summary import format_results
from clframe.metrics.task_accuracy import per_class_accuracy
from clframe.reporting import announce_log_folder, log_folder
from clframe.strategies.base import ContinualModule


def _rng_states() -> dict[str, Any]:
    """Global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


_PROCESS_GROUP_EXIT_HOOK = False


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _release_process_group_at_exit() -> None:
    """Destroy a non-NCCL process group in an ``atexit`` hook (once per process).

    Lightning registers this for NCCL only; a gloo group is otherwise left to interpreter shutdown,
    where its worker threads can be torn down while still joinable, which aborts the process with
    "terminate called without an active exception" (SIGABRT) after the last task."""
    global _PROCESS_GROUP_EXIT_HOOK
    if _PROCESS_GROUP_EXIT_HOOK or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "nccl":
        atexit.register(_destroy_process_group)
    _PROCESS_GROUP_EXIT_HOOK = True


def _global_seed() -> int | None:
    """The run's ``seed_everything`` value (recorded with every result)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


# Streams without validation data serve an empty list of val loaders; that is intended.
warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")


class _TaskBudgetFilter(logging.Filter):
    """Drops Lightning's "`Trainer.fit` stopped: `max_epochs=8` reached": in a stream every task ends on
    its cumulative budget, so the line repeats each task with a number that reads like a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("`Trainer.fit` stopped: `max_epochs=", "`Trainer.fit` stopped: `max_steps="))


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_TaskBudgetFilter())
install_filters()  # Lightning's tips and repeated warnings (clframe/console.py)


MATRICES = ("accuracy_matrix", "val_accuracy_matrix", "task_il_accuracy_matrix")
"""The accuracy matrices a run may write: test, held-out validation, test scored per task (class-IL runs)."""


class StreamProgress(L.Callback):
    """Where the stream is (task pointer, accuracy rows, whether the task's end hooks ran).

    Kept as a callback so Lightning saves it in every checkpoint; ``fit(ckpt_path=...)`` reads it
    to resume at the right task. Its ``on_train_end`` runs the task-end hooks inside Lightning's
    fit, while the model is still on its device and distributed processes are alive.
    """

    state_key = "clframe_stream_progress"

    def __init__(self) -> None:
        self.task_id = 0
        self.rows: list[list[float]] = []
        self.val_rows: list[list[float]] = []  # the same matrix on held-out validation data
        self.til_rows: list[list[float]] = []  # class-IL runs with report_task_il: test scored per task
        self.task_ended = False
        self.initial: list[float] | None = None
        self.task: Task | None = None
        self.confusions: dict[int, torch.Tensor] = {}  # after task i: the test confusion matrix (not checkpointed)

    def state_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "rows": self.rows, "val_rows": self.val_rows, "til_rows": self.til_rows,
                "task_ended": self.task_ended,
                "initial": self.initial, "rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task_id = state_dict["task_id"]
        self.rows = [list(r) for r in state_dict["rows"]]
        self.val_rows = [list(r) for r in state_dict.get("val_rows", [])]
        self.til_rows = [list(r) for r in state_dict.get("til_rows", [])]
        self.task_ended = state_dict["task_ended"]
        self.initial = state_dict.get("initial")
        if "rng" in state_dict:  # dropout, augmentation: the resumed run draws what the original would have
            _set_rng_states(state_dict["rng"])

    def end_task(self, trainer: L.Trainer, module: ContinualModule) -> None:
        if self.task_ended or self.task is None:
            return
        module.on_task_end(self.task)
        for cb in trainer.callbacks:
            if isinstance(cb, ContinualCallback):
                cb.on_task_end(trainer, module, self.task)
        self.task_ended = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end_task(trainer, pl_module)


def check_optimisation_options(kwargs: dict[str, Any]) -> None:
    """Trainer options Lightning passes on unchecked: a negative clip value flips the gradient's sign
    (torch scales it by max_norm / norm), 0 accumulated batches or a 0 validation interval divide by
    zero, and 0 training batches give a run that silently learns nothing."""
    clip, accumulate = kwargs.get("gradient_clip_val"), kwargs.get("accumulate_grad_batches", 1)
    if clip is not None and not clip >= 0:
        raise ConfigError(f"gradient_clip_val must be non-negative (or null for no clipping), got {clip}")
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(f"accumulate_grad_batches must be a positive number of batches, got {accumulate}")
    if kwargs.get("limit_train_batches") == 0:  # Lightning then skips training and the run reports chance level
        raise ConfigError("limit_train_batches=0 trains nothing; give a positive number (or fraction) of batches")
    if kwargs.get("val_check_interval") is not None and not kwargs["val_check_interval"] > 0:
        raise ConfigError(f"val_check_interval must be positive, got {kwargs['val_check_interval']}")


def restart_monitored_checkpoints(trainer: L.Trainer) -> None:
    """Give every ``ModelCheckpoint`` that monitors a metric a fresh best-k list at a task start.

    A monitored value (``val/avg_acc`` over the seen tasks, a loss) changes meaning with each task, so the
    best of task 1 must not stop task 2 from saving its own best: each task keeps its own top-k files (name
    them with ``{task}``, e.g. ``filename="task{task}-{val/avg_acc:.3f}"``); earlier tasks' files stay.
    """
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "monitor", None) is None or not hasattr(cb, "best_k_models"):
            continue
        cb.best_k_models = {}
        cb.kth_best_model_path, cb.best_model_path = "", ""
        cb.best_model_score = cb.kth_value = None
        cb.current_score = None


class ContinualTrainer(L.Trainer):
    """Runs a whole continual-learning stream in one ``fit`` call.

    Args:
        epochs_per_task: training epochs of every task (Lightning's ``max_epochs`` is managed
            from this, so do not set ``max_epochs``).
        steps_per_task: train each task for this many iterations instead of whole epochs.
        eval_after_task: test every seen task after each task (the accuracy matrix). When the
            data module has ``eval_all_tasks``, the untrained model is tested too, which gives
            forward transfer (FWT).
        use_distributed_sampler: accepted for compatibility and ignored: under DDP the data module
            always shards its loaders itself (Lightning's injected sampler would reshuffle with
            its own seed, breaking exact resume, and cannot wrap the per-task batch sampler), so
            Lightning's injection stays off.
        trust_checkpoints: load checkpoints that hold arbitrary Python objects (their unpickling can
            run code). Off by default: such a file is refused (see ``clframe.checkpoints``).
        allow_changed: config keys (``model.lr``, ``data.batch_size``, ``trainer.epochs_per_task``, or a
            prefix such as ``model``) whose value may differ from the checkpoint's on resume; any
            other difference is refused.
        All other arguments are Lightning's ``Trainer`` arguments. The default logger is a
        ``CSVLogger`` under ``default_root_dir``. Distributed runs need a strategy that keeps its
        processes across calls (``ddp``), not a spawning one (``ddp_spawn``, ``ddp_notebook``).
    """

    def __init__(self, *args: Any, epochs_per_task: int = 1, steps_per_task: int | None = None,
                 eval_after_task: bool = True, use_distributed_sampler: bool = False, trust_checkpoints: bool = False,
                 allow_changed: list[str] | None = None, **kwargs: Any) -> None:
        if kwargs.get("max_epochs") not in (None, -1):
            raise ConfigError(
                "ContinualTrainer manages max_epochs itself; set epochs_per_task instead "
                f"(got max_epochs={kwargs['max_epochs']})."
            )
        if epochs_per_task < 1:
            raise ConfigError(f"epochs_per_task must be at least 1, got {epochs_per_task}")
        if steps_per_task is not None and steps_per_task < 1:
            raise ConfigError(f"steps_per_task must be at least 1, got {steps_per_task}")
        if steps_per_task is not None and kwargs.get("max_steps") not in (None, -1):
            raise ConfigError("set steps_per_task or max_steps, not both (ContinualTrainer manages max_steps)")
        check_optimisation_options(kwargs)
        kwargs.pop("max_epochs", None)
        barebones = bool(kwargs.get("barebones"))  # Lightning's minimal mode: no logger, no progress bar
        if kwargs.get("logger") in (None, True) and not barebones:
            kwargs["logger"] = CSVLogger(kwargs.get("default_root_dir") or os.getcwd(), name="lightning_logs")
        if kwargs.get("profiler") is None and not barebones:
            kwargs["profiler"] = PassThrough()  # Lightning's default, without a context object per hook call
        self.progress = StreamProgress()
        callbacks = kwargs.get("callbacks") or []
        callbacks = [*(callbacks if isinstance(callbacks, list) else [callbacks]), self.progress, RunFolder(), QuietRepeats()]
        if kwargs.get("enable_progress_bar") is not False and not barebones and \
                not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(default_task_progress_bar())  # Lightning's bar, showing "Task k/N · epoch e/E"
        kwargs["callbacks"] = callbacks
        kwargs.update(checkpoint_kwargs(kwargs, trust_checkpoints))  # atomic sealed saves, safe loads, SIGTERM
        self.trust_checkpoints, self.allow_changed = trust_checkpoints, list(allow_changed or [])
        super().__init__(*args, max_epochs=epochs_per_task, use_distributed_sampler=False, **kwargs)
        self.fit_loop = ExactResumeFitLoop.replacing(self.fit_loop)  # exact resume at epoch and task ends
        if isinstance(self.strategy.launcher, _MultiProcessingLauncher):
            raise ConfigError(
                "spawning strategies (ddp_spawn, ddp_fork, ddp_notebook) start new processes for every fit/test call, "
                "so each task would train in fresh processes that forget the stream (task pointer, callbacks, global "
                "step). Use "
                "strategy='ddp' (--trainer.strategy=ddp): it starts the ranks once and each runs the whole stream; "
                "from Python, put the training code under `if __name__ == \"__main__\":`."
            )
        self.epochs_per_task = epochs_per_task
        self.steps_per_task = steps_per_task
        self.eval_after_task = eval_after_task
        self.evaluating_stream = False  # inside evaluate_seen_tasks
        self.continual_results: dict[str, Any] = {}

    # ------------------------------------------------------------------ the stream loop
    def fit(self, model: L.LightningModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: L.LightningDataModule | None = None, ckpt_path: str | Path | None = None,
            **kwargs: Any) -> None:
        """Train on every task of the stream in turn, testing all seen tasks after each one.

        ``ckpt_path`` resumes a killed run at the task, epoch and batch it had reached.
        """
        if not isinstance(model, ContinualModule):
            raise TypeError(f"ContinualTrainer.fit needs a clframe strategy (ContinualModule), got {type(model).__name__}")
        if not isinstance(datamodule, ContinualDataModule) or train_dataloaders is not None:
            raise TypeError("ContinualTrainer.fit takes its data as datamodule=ContinualDataModule(...), not dataloaders")
        stream = datamodule.stream
        model.bind_stream(stream)
        self._identity = run_identity(self, model, datamodule)
        if ckpt_path is not None:
            ckpt_path = self.resolve_checkpoint(ckpt_path)
        start = self._resume_point(ckpt_path) if ckpt_path is not None else 0
        announce_log_folder(log_folder(self), "start")  # after _resume_point: a resumed run's own folder
        with skipping_noop_hooks(self, model, datamodule), self._once_per_stream(model, datamodule):
            if ckpt_path is None:
                self.progress.rows, self.progress.val_rows, self.progress.til_rows = [], [], []
                self.progress.initial = None
                if self.eval_after_task and datamodule.hparams.eval_all_tasks:
                    datamodule.set_task(0)
                    self.progress.initial = self.evaluate_seen_tasks(model, datamodule, log=False)
            for task in stream.tasks[start:]:
                self._run_task(model, datamodule, task, ckpt_path, **kwargs)
                ckpt_path, kwargs = None, {}
                if self.interrupted:
                    return
            self._finish(model, datamodule)

    @contextlib.contextmanager
    def _once_per_stream(self, model: ContinualModule, datamodule: ContinualDataModule) -> Iterator[None]:
        """The model summary and the hyperparameters go out with the stream's first fit or test, not again
        with each of the two Lightning runs per task (the same table printed, the same ``hparams.yaml``
        rewritten: tens of milliseconds a task). ``_first_run_done`` switches them off; they are back on after."""
        self._undo_once: list[Any] | None = []
        callbacks = list(self.callbacks)
        try:
            yield
        finally:
            undo, self._undo_once = self._undo_once, None
            for step in reversed(undo or []):
                step()
            self.callbacks[:] = callbacks + [cb for cb in self.callbacks if cb not in callbacks]

    def _first_run_done(self, model: ContinualModule, datamodule: ContinualDataModule) -> None:
        undo = getattr(self, "_undo_once", None)
        if undo is None or undo:
            return  # outside ``fit``, or done already
        self.callbacks[:] = [cb for cb in self.callbacks if not isinstance(cb, ModelSummary)]
        undo.append(lambda: None)  # done, even with nothing else to undo
        for owner in (model, datamodule):
            if getattr(owner, "_log_hyperparams", False):
                object.__setattr__(owner, "_log_hyperparams", False)
                undo.append(lambda owner=owner: object.__setattr__(owner, "_log_hyperparams", True))

    def _set_task_budget(self, model: ContinualModule, stream_tasks: list[Task], upto: int) -> None:
        """Cumulative epoch (or step) limit at the end of task ``upto``: derived, so resuming needs no state."""
        trained = sum(model.should_train(t) for t in stream_tasks[: upto + 1])
        if self.steps_per_task is None:
            self.fit_loop.max_epochs = self.epochs_per_task * trained
        else:
            self.fit_loop.max_epochs = -1
            self.fit_loop.epoch_loop.max_steps = self.steps_per_task * trained

    def _run_task(self, model: ContinualModule, datamodule: ContinualDataModule, task: Task,
                  ckpt_path: str | Path | None, **fit_kwargs: Any) -> None:
        resuming = ckpt_path is not None
        datamodule.set_task(task.id)
        datamodule.train_scope = model.train_scope
        self.progress.task, self.progress.task_id = task, task.id
        if not resuming:
            self.progress.task_ended = False
            restart_monitored_checkpoints(self)
        model.on_task_start(task)
        for cb in self.callbacks:
            if isinstance(cb, ContinualCallback):
                cb.on_task_start(self, model, task)
        if model.should_train(task):
            self._set_task_budget(model, datamodule.stream.tasks, task.id)
            self.fit_loop._combined_loader = None  # serve the new task's data, not the cached loader
            rank_zero_info(f"clframe: task {task.id + 1}/{len(datamodule.stream)}, classes {list(task.classes)}")
            super().fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **fit_kwargs)
            self._first_run_done(model, datamodule)
            _release_process_group_at_exit()
            if self.interrupted:
                return
        self.progress.end_task(self, model)
        row = self.evaluate_seen_tasks(model, datamodule) if self.eval_after_task else []
        self.progress.rows.append(row)
        if self.eval_after_task:
            self._log_class_results(model, task.id)
            if model.eval_accuracy_task_il is not None:
                til = model.eval_accuracy_task_il
                self.progress.til_rows.append(til + [math.nan] * (len(datamodule.stream) - len(til)))
        if self.eval_after_task and datamodule.has_validation_data():
            self.progress.val_rows.append(self.evaluate_seen_tasks(model, datamodule, split="val"))
        for cb in self.callbacks:
            if isinstance(cb, ContinualCallback):
                cb.on_task_evaluated(self, model, task, row)

    def evaluate_seen_tasks(self, model: ContinualModule, datamodule: ContinualDataModule, log: bool = True,
                            split: str = "test") -> list[float]:
        """Accuracy on every seen task's ``split`` (``test`` or ``val``; all tasks if the data module says so);
        NaN for the rest."""
        bar = self.progress_bar_callback
        if bar is not None:
            bar.disable()  # one line per task is enough; the per-loader test bars are noise
        self.evaluating_stream = True  # a SIGTERM now still saves last.ckpt (checkpoints/preemption.py)
        try:
            if split == "val":
                self.validate(model, datamodule=datamodule, verbose=False)
            else:
                self.test(model, datamodule=datamodule, verbose=False)
        finally:
            self.evaluating_stream = False
            if bar is not None:
                bar.enable()
        self._first_run_done(model, datamodule)
        row = list(model.eval_accuracy) + [math.nan] * (len(datamodule.stream) - len(model.eval_accuracy))
        if not log:
            return row
        step = self.global_step
        prefix = "eval/" if split == "test" else "eval/val_"
        metrics = {f"{prefix}acc_task_{j}": a for j, a in enumerate(row) if a == a}
        seen = [a for a in row[: datamodule.current_task + 1] if a == a]
        metrics[f"{prefix}avg_acc_seen"] = sum(seen) / max(1, len(seen))
        metrics["task"] = datamodule.current_task
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        return row

    def _log_class_results(self, model: ContinualModule, after_task: int) -> None:
        """Per-class accuracy (``eval/class_acc_<c>``) from the task-end test pass, and its confusion matrix
        kept for ``results.json``-side files (``confusion_matrix_task<i>.csv``, ``confusion_matrix.png``)."""
        confusion = model.eval_confusion
        if confusion is None:
            return
        self.progress.confusions[after_task] = confusion
        acc = per_class_accuracy(confusion)
        metrics = {f"eval/class_acc_{c}": float(a) for c, a in enumerate(acc.tolist()) if a == a}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def resolve_checkpoint(self, ckpt_path: str | Path) -> Path:
        """A checkpoint path, or ``"last"``: the newest ``last*.ckpt`` written by this run (same settings) in the
        checkpoint callbacks' folders (or anywhere under ``default_root_dir``)."""
        if str(ckpt_path) != "last":
            return Path(ckpt_path)
        folders = [Path(cb.dirpath) for cb in self.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        candidates = [p for f in folders for p in f.glob("last*.ckpt")] or \
            list(Path(self.default_root_dir).rglob("last*.ckpt"))
        if not candidates:
            raise CheckpointError(
                f"ckpt_path='last' but no last.ckpt was found in {[str(f) for f in folders] or self.default_root_dir}; "
                "enable ModelCheckpoint(save_last=True) (with a fixed dirpath) in the run you want to resume, "
                "or pass the checkpoint's path."
            )
        return newest_of_this_run(candidates, getattr(self, "_identity", {}), self.allow_changed, self.trust_checkpoints)

    def _resume_point(self, ckpt_path: str | Path) -> int:
        path = Path(ckpt_path)
        ckpt = load_checkpoint(path, trust=self.trust_checkpoints)
        state = ckpt.get("callbacks", {}).get(StreamProgress.state_key)
        if state is None:
            raise ConfigError(f"{path} holds no clframe stream progress; it was not written by a ContinualTrainer run")
        check_same_run(path, ckpt, self._identity, self.allow_changed)
        self.progress.load_state_dict(state)
        RunFolder.resume(self, ckpt.get("callbacks", {}).get(RunFolder.state_key))  # log on in the same folder
        return self.progress.task_id

    # ------------------------------------------------------------------ results
    @property
    def accuracy_matrix(self) -> list[list[float]]:
        return self.progress.rows

    @property
    def log_dir(self) -> str | None:
        """Lightning's log folder, and one per run for loggers without versioned folders (wandb)."""
        return run_log_dir(self, super().log_dir)

    def _finish(self, model: ContinualModule, datamodule: ContinualDataModule) -> None:
        rows = [r for r in self.progress.rows if r]
        unseen_masked = datamodule.stream.scenario == "class" and bool(model.hparams.get("mask_unseen_classes", True))
        metrics = summarize_matrix(rows, self.progress.initial, unseen_masked) if rows else {}
        val_rows = [r for r in self.progress.val_rows if r]
        if val_rows:  # select hyperparameters on these, never on the test matrix
            metrics.update({k.replace("final/", "final/val_", 1): v for k, v in summarize_matrix(val_rows).items()})
        til_rows = [r for r in self.progress.til_rows if r]
        if til_rows:
            metrics.update({k.replace("final/", "final/til_", 1): v for k, v in summarize_matrix(til_rows).items()})
        self.continual_results = {"accuracy_matrix": rows, "val_accuracy_matrix": val_rows,
                                  "task_il_accuracy_matrix": til_rows,
                                  "initial_accuracy": self.progress.initial,
                                  "metrics": metrics, "seed": _global_seed(), "data_seed": datamodule.stream.seed,
                                  "metrics_not_available": unavailable_metrics(self.progress.initial, unseen_masked)
                                  if rows else {},
                                  "stream": {"name": datamodule.stream.name, "scenario": datamodule.stream.scenario,
                                             "tasks": len(datamodule.stream), "signature": datamodule.stream.signature()}}
        for cb in self.callbacks:
            if isinstance(cb, ContinualCallback):
                cb.on_stream_end(self, model)
        metrics = self.continual_results["metrics"]
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
            logger.save()
        log_stream_to_wandb(self)  # summary, accuracy-matrix table, CLI config; a no-op without a WandbLogger
        self._write_results(Path(self.log_dir or self.default_root_dir))  # log_dir is a collective: every rank asks
        self._print_results()
        announce_log_folder(log_folder(self), "end")

    @rank_zero_only
    def _write_results(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name in MATRICES:
            rows = self.continual_results.get(name) or []
            if rows:
                with open(out / f"{name}.csv", "w") as f:
                    f.write("after_task," + ",".join(f"task_{j}" for j in range(len(rows[0]))) + "\n")
                    for i, row in enumerate(rows):
                        f.write(f"{i}," + ",".join("" if a != a else f"{a:.6f}" for a in row) + "\n")
        self._write_class_results(out)
        tmp = out / "results.json.tmp"
        clean = {**self.continual_results,
                 **{name: [[None if a != a else a for a in r] for r in self.continual_results.get(name) or []]
                    for name in MATRICES}}
        missing = self.continual_results.get("metrics_not_available") or {}
        clean["metrics"] = {**self.continual_results["metrics"], **dict.fromkeys(missing)}  # null, reason beside
        tmp.write_text(json.dumps(clean, indent=2))
        os.replace(tmp, out / "results.json")

    def _write_class_results(self, out: Path) -> None:
        """``per_class_accuracy.csv`` (a row per finished task), one confusion-matrix CSV per task end and a
        plot of the last one."""
        confusions = self.progress.confusions
        if not confusions:
            return
        n = next(iter(confusions.values())).shape[0]
        with open(out / "per_class_accuracy.csv", "w") as f:
            f.write("after_task," + ",".join(f"class_{c}" for c in range(n)) + "\n")
            for i, conf in sorted(confusions.items()):
                acc = per_class_accuracy(conf).tolist()
                f.write(f"{i}," + ",".join("" if a != a else f"{a:.6f}" for a in acc) + "\n")
        for i, conf in confusions.items():
            np.savetxt(out / f"confusion_matrix_task{i}.csv", conf.long().numpy(), fmt="%d", delimiter=",",
                       header="rows: true class, columns: predicted class")
        from clframe.callbacks.plots import plot_confusion_matrix

        last = max(confusions)
        plot_confusion_matrix(confusions[last].numpy(), out / "confusion_matrix.png",
                              title=f"Test confusion matrix after task {last}")

    @rank_zero_only
    def _print_results(self) -> None:
        strategy = type(self.lightning_module).__name__ if self.lightning_module is not None else None
        print(format_results(self.continual_results, strategy), flush=True)
