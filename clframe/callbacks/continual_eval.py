"""ContinualEvaluation: per-iteration evaluation of every seen task (the stability gap).

De Lange et al., ICLR 2023. Every ``every_n_steps`` training steps the model is evaluated on a
fixed subset of each seen task's test data. The subsets are chosen once (seeded), kept on the
model's device as ready tensors, and evaluated in one pass with no DataLoader; per-task counts
are reduced on the device and stay there until the task ends, so the hot path has no host sync
at all (one transfer per task). Train/eval flags of every submodule are restored exactly, and
the forward runs under the training precision. Evaluation consumes no random numbers and does
not touch the gradients or BatchNorm statistics, so training is unchanged by it.

Under DDP each rank evaluates every ``world_size``-th sample of the subsets (the weights are the
same on every rank), and the counts are summed over the ranks once per task, when they go to the
host: the curves equal a single process's evaluation of the same weights, at a fraction of the cost.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.nn import functional as F

from clframe.callbacks.base import ContinualCallback
from clframe.callbacks.plots import plot_accuracy_curves, plot_accuracy_matrix
from clframe.data.stream import Task, TaskStream
from clframe.errors import ConfigError
from clframe.metrics.stability import summarize_curves


class ContinualEvaluation(ContinualCallback):
    """Evaluate every seen task every ``every_n_steps`` iterations and report stability metrics.

    Args:
        every_n_steps: evaluation period in training iterations (the paper uses 1).
        samples_per_task: size of each task's fixed evaluation subset (the paper uses 1,000).
        include_future_tasks: also evaluate tasks not trained yet.
        eval_batch_size: chunk size of the evaluation forward passes (about 1,000 keeps a CPU's
            caches warm; larger chunks suit a GPU).
        seed: seed of the subset choice (independent of the run's global RNG).
        windows: iteration windows of WF/WP (the paper reports 10 and 100).
        log_curves: send the per-iteration accuracies to the loggers (at each task end).
        plots: write ``stability_gap.png`` and ``accuracy_matrix.png`` (and send them to wandb).
        save_dir: where to write curves and plots (default: the trainer's log folder).
    """

    def __init__(self, every_n_steps: int = 1, samples_per_task: int = 1000, include_future_tasks: bool = False,
                 eval_batch_size: int = 1024, seed: int = 0, windows: list[int] | None = None,
                 log_curves: bool = True, plots: bool = True, save_dir: str | None = None) -> None:
        if every_n_steps < 1 or samples_per_task < 1 or eval_batch_size < 1:
            raise ConfigError("every_n_steps, samples_per_task and eval_batch_size must be positive")
        self.every_n_steps = every_n_steps
        self.samples_per_task = samples_per_task
        self.include_future_tasks = include_future_tasks
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.windows = list(windows or [10, 100])
        self.log_curves = log_curves
        self.plots = plots
        self.save_dir = save_dir
        self._data: tuple[Tensor, Tensor, Tensor] | None = None
        self._offsets: list[int] = []
        self._strategy: Strategy | None = None  # sums the counts over the ranks under DDP (set at train start)
        self._pending: list[Tensor] = []
        self._pending_meta: list[tuple[int, int]] = []
        self.steps: list[int] = []
        self.trained_task: list[int] = []
        self.accuracy: list[list[float]] = []
        self.loss: list[list[float]] = []
        self.task_ends: list[int] = []
        self.metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ subsets
    def _build_subsets(self, stream: TaskStream, rank: int = 0, world_size: int = 1) -> None:
        """The fixed subsets (the same for any world size); this rank keeps every ``world_size``-th sample."""
        gen = torch.Generator().manual_seed(self.seed)
        xs, ys, ts, offsets = [], [], [], [0]
        for task in stream.tasks:
            n = len(task.test)
            pick = torch.randperm(n, generator=gen)[: self.samples_per_task].sort().values
            x, y, t = task.test.__getitems__(pick.tolist())
            xs.append(x), ys.append(y), ts.append(t)
            offsets.append(offsets[-1] + len(y))
        self._data = tuple(torch.cat(d)[rank::world_size] for d in (xs, ys, ts))
        self._offsets = [len(range(rank, o, world_size)) for o in offsets]  # own samples before each task's start

    def _device_data(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        assert self._data is not None
        if self._data[0].device != device:
            self._data = tuple(d.to(device) for d in self._data)  # once per task fit, not per step
        return self._data

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> Tensor:
        """One pass over the subsets of the tasks in scope; returns (3, T) [correct, count, loss sum] on device."""
        x_all, y_all, t_all = self._device_data(module.device)
        n_tasks = len(self._offsets) - 1
        current = int(trainer.datamodule.current_task)
        end = self._offsets[-1] if self.include_future_tasks else self._offsets[current + 1]
        flags = [(m, m.training) for m in module.modules()]
        module.eval()
        stats = torch.zeros(3, n_tasks, device=module.device)
        try:
            with trainer.precision_plugin.forward_context():
                for lo in range(0, end, self.eval_batch_size):
                    x, y, t = x_all[lo:lo + self.eval_batch_size], y_all[lo:lo + self.eval_batch_size], \
                        t_all[lo:lo + self.eval_batch_size]
                    if lo + len(y) > end:
                        x, y, t = x[: end - lo], y[: end - lo], t[: end - lo]
                    logits = module(x, t).float()
                    correct = (logits.argmax(1) == y).float()
                    loss = F.cross_entropy(logits, y, reduction="none")
                    # index_add_ has a fixed output size; CUDA bincount reads min/max back to the host.
                    stats.index_add_(1, t, torch.stack([correct, torch.ones_like(correct), loss]))
        finally:
            for m, flag in flags:
                m.training = flag
        return stats

    def _record(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step, task = trainer.global_step, int(trainer.datamodule.current_task)
        last = self._pending_meta[-1] if self._pending_meta else (
            (self.steps[-1], self.trained_task[-1]) if self.steps else None)  # flushed by a checkpoint
        if last is not None and tuple(last) == (step, task):
            return  # recorded already (a resumed run's on_train_start, an epoch end after a checkpoint)
        self._pending.append(self.evaluate(trainer, module))
        self._pending_meta.append((step, task))

    def _flush(self) -> None:
        """Move the pending evaluations to the host: one transfer (and under DDP one reduction) for the whole task.

        Every rank calls it at the same points (task end, stream end, checkpoint saving) with the
        same number of pending evaluations, as the reduction needs.
        """
        if not self._pending:
            return
        stats = torch.stack(self._pending)
        if self._strategy is not None:
            stats = self._strategy.reduce(stats, reduce_op="sum")
        stats = stats.cpu().double()
        counts = stats[:, 1]
        acc = torch.where(counts > 0, stats[:, 0] / counts.clamp(min=1), torch.nan)
        loss = torch.where(counts > 0, stats[:, 2] / counts.clamp(min=1), torch.nan)
        for (step, task), a, lo in zip(self._pending_meta, acc.tolist(), loss.tolist(), strict=True):
            self.steps.append(step)
            self.trained_task.append(task)
            self.accuracy.append(a)
            self.loss.append(lo)
        self._pending, self._pending_meta = [], []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The curves so far, so a resumed run reports the whole stream (pending evaluations flushed)."""
        self._flush()
        return {"steps": self.steps, "trained_task": self.trained_task, "accuracy": self.accuracy,
                "loss": self.loss, "task_ends": self.task_ends}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("steps", "trained_task", "accuracy", "loss", "task_ends"):
            setattr(self, key, list(state_dict[key]))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._data is None:
            self._build_subsets(trainer.datamodule.stream, trainer.global_rank, trainer.world_size)
        self._strategy = trainer.strategy if trainer.world_size > 1 else None
        if not trainer.fit_loop._loaded_from_state_dict:  # not when a run resumes inside the task
            self._record(trainer, pl_module)  # before the task's first update

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)  # the last iteration of every epoch, whatever the period

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: Task) -> None:
        self._flush()
        self.task_ends.append(trainer.global_step)
        if self.log_curves:
            self._log_curves(trainer, task)

    def _log_curves(self, trainer: L.Trainer, task: Task) -> None:
        first = next((i for i, t in enumerate(self.trained_task) if t == task.id), len(self.steps))
        for step, row in zip(self.steps[first:], self.accuracy[first:], strict=True):
            metrics = {f"continual_eval/acc_task_{j}": a for j, a in enumerate(row) if a == a}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_stream_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()
        if not self.steps:
            return
        acc = np.asarray(self.accuracy, float)[:, : len(self.task_ends)]
        self.metrics = summarize_curves(self.steps, acc, self.task_ends, windows=self.windows)
        trainer.continual_results.setdefault("metrics", {}).update(self.metrics)
        self._write(trainer, self.output_dir(trainer))  # output_dir may be a collective: every rank asks

    # ------------------------------------------------------------------ outputs
    def output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.save_dir or trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        n_tasks = len(self.accuracy[0])
        with open(out / "continual_eval.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "trained_task", *[f"acc_task_{j}" for j in range(n_tasks)],
                        *[f"loss_task_{j}" for j in range(n_tasks)]])
            for s, k, a, lo in zip(self.steps, self.trained_task, self.accuracy, self.loss, strict=True):
                w.writerow([s, k, *["" if v != v else f"{v:.6f}" for v in a], *["" if v != v else f"{v:.6f}" for v in lo]])
        if not self.plots:
            return
        images = [plot_accuracy_curves(self.steps, np.asarray(self.accuracy, float), self.task_ends,
                                       out / "stability_gap.png")]
        rows = trainer.continual_results.get("accuracy_matrix")
        if rows:
            images.append(plot_accuracy_matrix(rows, out / "accuracy_matrix.png"))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb (and others that take images)
                logger.log_image(key="continual_eval/plots", images=[str(p) for p in images],
                                 caption=[p.stem for p in images])
