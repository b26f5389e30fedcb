"""Optimizers and learning-rate schedules, rebuilt at every task start from the same callables.

A strategy holds two factories: an *optimizer callable* (parameters or parameter groups to an
optimizer, Lightning's ``OptimizerCallable``) and an optional *scheduler callable* (optimizer to
scheduler, ``LRSchedulerCallable``). ``ContinualModule.configure_optimizers`` calls both at every
task start, so every task gets a fresh optimizer and its schedule restarts. They come from:

- the strategy's ``optimizer`` argument: a string shortcut (``sgd``, ``adam``, ``adamw``, ``rmsprop``,
  built with the strategy's ``lr``, ``momentum``, ``weight_decay``) or any ``torch.optim`` class with its
  arguments (``optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}``);
- the strategy's ``lr_scheduler`` argument, any scheduler class with its arguments (also
  :class:`WarmupCosineLR` below);
- LightningCLI's own ``--optimizer`` / ``--lr_scheduler`` flags (YAML ``optimizer:`` / ``lr_scheduler:``),
  which replace the strategy's choice (``clframe.cli`` hands them to the strategy).

Schedulers step once per epoch (Lightning's default) unless they say otherwise: a scheduler with an
``interval`` attribute (``WarmupCosineLR``: ``"step"``) or the strategy's ``lr_scheduler_interval``.
With ``reset_optimizer=False`` the optimizer state (momenta, Adam moments) and the scheduler's
position carry over from one task to the next, as some protocols do; parameters new to a task start
with empty state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from clframe.errors import ConfigError

OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                                          "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}

OptimizerArg = Literal["sgd", "adam", "adamw", "rmsprop"] | OptimizerCallable
"""What a strategy's ``optimizer`` accepts: a shortcut name or any optimizer callable / class spec."""

Interval = Literal["epoch", "step"]


def optimizer_factory(spec: Any, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> OptimizerCallable:
    """The optimizer callable behind ``spec``: a shortcut name (with the strategy's ``lr``, ``momentum``,
    ``weight_decay``), a callable (used as given), or a ``{class_path, init_args}`` mapping."""
    if isinstance(spec, str):
        key = spec.lower()
        if key not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {spec!r}; use one of {', '.join(OPTIMIZERS)} or a torch.optim class "
                              "with its arguments (optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}})")
        kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        if key == "sgd":
            kwargs["momentum"] = momentum
        return functools.partial(OPTIMIZERS[key], **kwargs)
    if isinstance(spec, Mapping):
        return class_spec_factory(spec, Optimizer)
    if callable(spec):
        return spec
    raise ConfigError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or an optimizer class with its arguments, "
                      f"got {spec!r}")


def scheduler_factory(spec: Any) -> LRSchedulerCallable | None:
    """The scheduler callable behind ``spec`` (``None``, a callable or a ``{class_path, init_args}`` mapping)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return class_spec_factory(spec, None)
    if callable(spec):
        return spec
    raise ConfigError(f"lr_scheduler must be a scheduler class with its arguments, got {spec!r}")


def class_spec_factory(spec: Mapping[str, Any], base: type | None) -> Callable[[Any], Any]:
    """A callable ``first_arg -> class_path(first_arg, **init_args)`` from a config mapping.

    Only classes are accepted (``torch.optim.Adam``, ``torch.optim.lr_scheduler.StepLR``, or a short name
    of either module); the import is of a module the user named in their own config."""
    from jsonargparse.typing import (
        import_object,  # jsonargparse's resolver: what the CLI accepts, nothing more
    )

    path = spec.get("class_path")
    if not isinstance(path, str):
        raise ConfigError(f"expected {{class_path: ..., init_args: {{...}}}}, got {dict(spec)!r}")
    if "." not in path:
        module = "torch.optim" if base is Optimizer else "torch.optim.lr_scheduler"
        path = f"{module}.{path}" if hasattr(__import__(module, fromlist=["_"]), path) else f"clframe.optim.{path}"
    try:
        cls = import_object(path)
    except Exception as err:
        raise ConfigError(f"cannot import {path!r} ({err}); give a class such as torch.optim.Adam") from err
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        raise ConfigError(f"{path!r} is not a {base.__name__ if base else 'scheduler'} class")
    return functools.partial(cls, **dict(spec.get("init_args") or {}))


def describe(factory: Any) -> Any:
    """Plain data for the hyperparameters (checkpoints, loggers): a name or mapping as given, a partial of a
    class as ``{class_path, init_args}``, anything else as its ``repr``. Never the callable itself, so a
    checkpoint holds no code."""
    if factory is None or isinstance(factory, (str, Mapping)):
        return factory
    if isinstance(factory, functools.partial):
        cls = next((a for a in (factory.func, *factory.args) if isinstance(a, type)), None)
        if cls is not None:
            short = f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"
            path = short if _resolves(short, cls) else f"{cls.__module__}.{cls.__qualname__}"
            args = {k: list(v) if isinstance(v, tuple) else v for k, v in factory.keywords.items()
                    if v is None or isinstance(v, (bool, int, float, str, tuple, list))}
            return {"class_path": path, "init_args": args}
    return repr(factory)


def _resolves(path: str, cls: type) -> bool:
    module, _, name = path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=["_"]), name, None) is cls
    except ImportError:
        return False


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from ``warmup_start_factor * lr`` to ``lr`` over ``warmup_steps`` steps, then a
    cosine decay to ``min_lr_factor * lr`` at ``total_steps``; stepped every optimizer step.

    ``total_steps=None`` means the task's length (``steps_per_task``, else ``epochs_per_task`` times the
    task's batches); clframe fills it in at every task start, so the schedule spans each task.
    """

    interval: Interval = "step"

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 warmup_start_factor: float = 0.0, min_lr_factor: float = 0.0, last_epoch: int = -1) -> None:
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1):
            raise ConfigError(f"WarmupCosineLR needs warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, "
                              f"{total_steps}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.warmup_start_factor, self.min_lr_factor = warmup_start_factor, min_lr_factor
        super().__init__(optimizer, self.factor, last_epoch=last_epoch)

    def bind_task(self, trainer: Any) -> None:
        """Span the task when no ``total_steps`` was given (called by clframe at every task start)."""
        if self.total_steps is None:
            self.total_steps = task_length(trainer, "step")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = {**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)}
        super().load_state_dict(state_dict)


class TaskCosineLR(torch.optim.lr_scheduler.CosineAnnealingLR):
    """Cosine decay over each task, no warm-up: stepped per step when the trainer counts a task in steps
    (``steps_per_task``), else per epoch. The prompt strategies' ``lr_schedule: cosine``."""

    interval: Interval = "epoch"

    def __init__(self, optimizer: Optimizer, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        super().__init__(optimizer, T_max=1, eta_min=eta_min, last_epoch=last_epoch)

    def bind_task(self, trainer: Any) -> None:
        self.interval = "step" if getattr(trainer, "steps_per_task", None) is not None else "epoch"
        self.T_max = task_length(trainer, self.interval)


def task_length(trainer: Any, interval: Interval) -> int:
    """Steps (or epochs) one task trains for: ``steps_per_task`` or ``epochs_per_task`` times its batches."""
    steps = getattr(trainer, "steps_per_task", None) if trainer is not None else None
    epochs = getattr(trainer, "epochs_per_task", None) if trainer is not None else None
    if interval == "epoch":
        if steps is not None:
            batches = _batches_per_epoch(trainer)
            return max(1, math.ceil(steps / batches)) if batches else 1
        return epochs or 1
    if steps is not None:
        return steps
    batches = _batches_per_epoch(trainer)
    return max(1, (epochs or 1) * (batches or 1))


def _batches_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps in one epoch of the current task (None before the loaders exist)."""
    try:
        trainer.fit_loop.setup_data()  # what Lightning's own estimated_stepping_batches does
        batches = trainer.num_training_batches
    except Exception:  # no fit running (a direct call from a test or notebook)
        return None
    if not math.isfinite(batches) or batches <= 0:
        return None
    return max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))


def build(groups: list[dict[str, Any]], optimizer: OptimizerCallable, scheduler: LRSchedulerCallable | None,
          trainer: Any = None, interval: Interval | None = None) -> Any:
    """The optimizer over ``groups`` and, with a scheduler, Lightning's ``configure_optimizers`` dict."""
    groups = [g for g in groups if g["params"]]
    opt = optimizer(groups)
    if scheduler is None:
        return opt
    sched = scheduler(opt)
    if hasattr(sched, "bind_task"):
        sched.bind_task(trainer)
    every = getattr(sched, "interval", None) or interval or "epoch"
    config: dict[str, Any] = {"scheduler": sched, "interval": every}
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = getattr(sched, "monitor", "train/loss")
        config["strict"] = False  # train/loss is logged on the loggers' steps only: skip, with a warning, when absent
    return {"optimizer": opt, "lr_scheduler": config}


class OptimizerCarry:
    """Optimizer state and scheduler position kept from one task to the next (``reset_optimizer=False``).

    State is matched by parameter, so a parameter that trains in both tasks keeps its momenta and one
    that is new to the task starts empty; group learning rates and the scheduler continue."""

    def __init__(self) -> None:
        self.state: dict[torch.nn.Parameter, Any] | None = None
        self.group_lrs: list[dict[str, Any]] = []
        self.scheduler: dict[str, Any] | None = None

    def capture(self, optimizer: Optimizer, scheduler: Any = None) -> None:
        self.state = {p: s for p, s in optimizer.state.items()}
        keys = ("lr", "initial_lr")
        self.group_lrs = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
        self.scheduler = scheduler.state_dict() if scheduler is not None else None

    def restore(self, optimizer: Optimizer, scheduler: Any = None) -> None:
        if self.state is None:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in self.state:
                    optimizer.state[p] = self.state[p]
        if len(self.group_lrs) == len(optimizer.param_groups):
            for group, saved in zip(optimizer.param_groups, self.group_lrs, strict=True):
                group.update(saved)
        if scheduler is not None and self.scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
