"""ContinualModule: the strategy base class, a LightningModule with scenario-aware logits.

A strategy is a subclass that overrides a few named hooks: ``on_task_start``, ``on_task_end``,
``training_loss`` (and, when needed, ``configure_optimizers``). The training loop is Lightning's.
Everything a strategy remembers across tasks is a registered buffer or submodule, so it lands in
``state_dict`` and in checkpoints.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe import optim
from clframe.data.stream import Batch, Task, TaskStream
from clframe.errors import ConfigError, NonFiniteLossError
from clframe.metrics.task_accuracy import TaskAccuracy
from clframe.models.factory import create_backbone
from clframe.models.speed import MemoryFormat, check_memory_format, prepare_backbone, to_float
from clframe.optim import OPTIMIZERS, Interval, LRSchedulerCallable, OptimizerArg  # noqa: F401 (OPTIMIZERS: re-exported)
from clframe.strategies.intact import InTAct, InTActConfig


class FrozenSnapshot(nn.ModuleDict):
    """Modules that stay in eval mode when their owner switches to training (fixed dropout and BN statistics)."""

    def train(self, mode: bool = True) -> FrozenSnapshot:
        return super().train(False)


def frozen_copy(**parts: nn.Module) -> FrozenSnapshot:
    """Deep copies of ``parts`` with gradients off, in eval mode for good: the teacher / reference snapshot
    that distillation-style terms compare against (LwF, iCaRL, GeRe's KL reference)."""
    return FrozenSnapshot({name: copy.deepcopy(module) for name, module in parts.items()}).requires_grad_(False).eval()


class ContinualModule(L.LightningModule):
    """Backbone + linear head over every class of the stream, masked to fit the scenario.

    The head has one row per class of the whole stream. In class-incremental streams the rows of
    classes not seen yet are masked (equivalent to a growing head, but shapes stay fixed for
    checkpoints and DDP); in task-incremental streams each sample only sees its task's classes
    (equivalent to one head per task); in domain-incremental streams the head is shared.

    Args:
        backbone: a registered backbone name (``mlp``, ``resnet18``, ``reduced_resnet18``,
            ``timm:<name>``) or an ``nn.Module`` with a ``num_features`` attribute.
        backbone_kwargs: keyword arguments for a backbone built by name.
        num_classes, input_shape, scenario: taken from the stream when not given.
        optimizer, lr, momentum, weight_decay: the optimizer rebuilt at every task start: a shortcut
            (``sgd``, ``adam``, ``adamw``, ``rmsprop`` with ``lr``, ``momentum``, ``weight_decay``) or any
            optimizer class with its arguments (see :mod:`clframe.optim`; ``--optimizer`` replaces it).
        lr_scheduler: a learning-rate scheduler class with its arguments, rebuilt (restarted) at every
            task start; ``--lr_scheduler`` replaces it.
        lr_scheduler_interval: step the scheduler every ``epoch`` or every optimizer ``step`` (schedulers
            that say which, like :class:`~clframe.optim.WarmupCosineLR`, keep their own).
        reset_optimizer: a fresh optimizer state and schedule per task (``True``) or carry the state and the
            schedule's position over from the previous task (``False``).
        mask_unseen_classes: in class-incremental streams, hide classes of future tasks.
        check_finite_loss: stop with a clear error when the loss becomes NaN or infinite. On the CPU every
            step is checked at once; on an accelerator the check costs no host sync per step: the first bad
            step is recorded on the device and read every ``finite_check_every`` steps, before every
            checkpoint is written and at the end of each task's training (see :meth:`watch_loss`).
        intact: carry the InTAct regulariser (activation boxes per task; see
            :mod:`clframe.strategies.intact`), with any strategy.
        report_task_il: in a class-incremental stream, also score every test pass with the logits masked
            to each sample's task (the DER paper's Task-IL numbers come from the class-IL run scored this
            way): a second matrix ``task_il_accuracy_matrix`` and ``final/til_*`` metrics.
        memory_format: ``channels_last`` keeps convolution weights and inputs in NHWC layout (faster convolutions
            on GPUs, notably under ``--trainer.precision=bf16-mixed``); ``contiguous`` is PyTorch's default.
        compile_backbone: ``torch.compile`` the backbone's forward in place (checkpoints unchanged; see
            :mod:`clframe.models.speed`).
    """

    train_scope: Literal["current", "seen", "all"] = "current"
    """Which tasks' training data the data module serves (Joint training uses ``"seen"``)."""

    finite_check_every: int = 50
    """On an accelerator, the most training steps between two reads of the non-finite-loss record
    (``check_finite_loss``): the error may come up to this many steps after the bad step, and names the bad step."""

    checkpointed_attributes: tuple[str, ...] = ()
    """Plain attributes (not buffers or parameters) that are training state, such as the best epoch's weights of
    ``keep_best``: saved in every checkpoint and restored on resume. Their values must be tensors, numbers,
    ``None``, or lists, tuples and dicts of them, which checkpoints load without running code."""

    def __init__(
        self,
        backbone: str | nn.Module = "mlp",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        scenario: Literal["class", "task", "domain"] | None = None,
        optimizer: OptimizerArg = "sgd",
        lr: float = 0.03,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        mask_unseen_classes: bool = True,
        check_finite_loss: bool = True,
        intact: InTActConfig | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Interval = "epoch",
        reset_optimizer: bool = True,
        report_task_il: bool = False,
        memory_format: MemoryFormat = "contiguous",
        compile_backbone: bool = False,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        check_memory_format(memory_format)
        self._memory_format = memory_format
        self._optimizer_carry = optim.OptimizerCarry()
        self._optimizer_factory = optim.optimizer_factory(optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._scheduler_factory = optim.scheduler_factory(lr_scheduler)
        # callables (a Python-API partial or lambda) are not hyperparameters: checkpoints hold plain data only
        ignore = [name for name, value in (("backbone", backbone), ("optimizer", optimizer), ("lr_scheduler", lr_scheduler))
                  if not (value is None or isinstance(value, (str, Mapping)))]
        self.save_hyperparameters(ignore=ignore or None)
        for name, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            if name in ignore:
                self.hparams[name] = self._hparams_initial[name] = optim.describe(value)
        # Not an attribute assignment: a module given here must not be registered twice.
        object.__setattr__(self, "_backbone_spec", backbone)
        self.backbone: nn.Module | None = None
        self.head: nn.Linear | None = None
        self.intact: InTAct | None = None
        self.num_tasks: int | None = None
        self.register_buffer("current_task", torch.tensor(0))
        self._task_accuracy: TaskAccuracy | None = None
        self._confusion: Any = None
        self.eval_confusion: Tensor | None = None  # (classes x classes) of the last test pass
        self._task_il_accuracy: TaskAccuracy | None = None
        self.eval_accuracy_task_il: list[float] | None = None  # with report_task_il, the last test pass
        # Input pipelines from the data module (see ``setup``); plain attributes, not submodules.
        object.__setattr__(self, "_train_pipeline", None)
        object.__setattr__(self, "_eval_pipeline", None)
        object.__setattr__(self, "_normalize_inputs", True)  # False when input_mean/std are 0/1 (the identity)
        object.__setattr__(self, "_first_nonfinite", None)  # (global step, loss) of the first bad step, on device
        self.eval_accuracy: list[float] = []
        if num_classes is not None and input_shape is not None and scenario is not None:
            self._build(num_classes, tuple(input_shape), scenario)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":  # Lightning sets it twice per hook call: a plain string, never a tensor
            object.__setattr__(self, name, value)  # or submodule, so nn.Module's checks (~3 us) are skipped
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ construction
    def build_network(self, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
        """The backbone and the head; strategies with their own layer types (supermasks) override this."""
        spec = self._backbone_spec
        backbone = create_backbone(spec, input_shape, **(self.hparams.backbone_kwargs or {})) if isinstance(spec, str) else spec
        if not hasattr(backbone, "num_features"):
            raise ConfigError("the backbone must expose `num_features` (the width of its output features)")
        return backbone, nn.Linear(backbone.num_features, num_classes)

    def _build(self, num_classes: int, input_shape: tuple[int, ...], scenario: str) -> None:
        self.backbone, self.head = self.build_network(num_classes, input_shape)
        prepare_backbone(self.backbone, self._memory_format, bool(self.hparams.get("compile_backbone", False)))
        self.scenario = scenario
        if self.hparams.get("intact") is not None:
            config = self.hparams.intact
            self.intact = InTAct(InTActConfig(**config) if isinstance(config, Mapping) else config)
            self.intact.attach(self)
        channels = input_shape[0] if len(input_shape) == 3 else 1
        self.register_buffer("input_mean", torch.zeros(channels, 1, 1))
        self.register_buffer("input_std", torch.ones(channels, 1, 1))
        self.register_buffer("class_task", torch.full((num_classes,), -1, dtype=torch.long))
        resolved = {"num_classes": num_classes, "input_shape": list(input_shape), "scenario": scenario}
        self.hparams.update(resolved)
        self._hparams_initial.update(resolved)  # logged and checkpointed as resolved from the stream

    def bind_stream(self, stream: TaskStream) -> None:
        """Take the stream's shapes, class-to-task map and normalisation (called by the trainer)."""
        h = self.hparams
        if self.backbone is None:
            self._build(stream.num_classes, tuple(stream.input_shape), stream.scenario)
        elif (h.num_classes, tuple(h.input_shape), h.scenario) != (stream.num_classes, tuple(stream.input_shape), stream.scenario):
            raise ConfigError(
                f"the model was built for {h.num_classes} classes, input {tuple(h.input_shape)}, scenario "
                f"{h.scenario!r} but the stream has {stream.num_classes} classes, input {tuple(stream.input_shape)}, "
                f"scenario {stream.scenario!r}. When resuming (--ckpt_path), this means the checkpoint was written "
                "for a different task stream: resume with the config that produced it, or start without "
                "--ckpt_path. Otherwise leave num_classes/input_shape/scenario unset to take them from the data."
            )
        self.num_tasks = len(stream)
        self.class_task.copy_(torch.tensor(stream.class_to_task()))
        if len(stream.mean) == self.input_mean.numel():
            self.input_mean.copy_(torch.tensor(stream.mean).view_as(self.input_mean))
            self.input_std.copy_(torch.tensor(stream.std).view_as(self.input_std))
        self._refresh_normalization()

    def _refresh_normalization(self) -> None:
        """Skip the per-batch ``(x - mean) / std`` when it is the identity (``normalize: false``: mean 0,
        std 1); exact either way. Read once here and after loading a state dict, never per batch."""
        if getattr(self, "input_mean", None) is None:  # not built yet
            return
        identity = bool((self.input_mean == 0).all() and (self.input_std == 1).all())
        object.__setattr__(self, "_normalize_inputs", not identity)

    def setup(self, stage: str) -> None:
        """Take the data module's input pipelines (augmentation for training, the eval transform)."""
        super().setup(stage)
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if hasattr(datamodule, "input_pipelines"):
            self.set_input_pipelines(*datamodule.input_pipelines())

    def set_input_pipelines(self, train: Any = None, eval: Any = None) -> None:
        """Batch callables on uint8 images: ``train`` augments every training input (new and replayed samples,
        each replayed copy drawn afresh), ``eval`` transforms inputs in eval mode. Neither changes what replay
        buffers store: the raw sample, as in Mammoth."""
        object.__setattr__(self, "_train_pipeline", train)
        object.__setattr__(self, "_eval_pipeline", eval)

    def augment_inputs(self, x: Tensor) -> Tensor:
        """The training pipeline applied to a batch of raw inputs (unchanged in eval mode or without one)."""
        if self._train_pipeline is None or not self.training or x.is_floating_point() or x.dim() != 4:
            return x
        return self._train_pipeline(x)

    # ------------------------------------------------------------------ forward
    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 images to normalised floats, on the device (cheap, and keeps loaders compact)."""
        if self._eval_pipeline is not None and not self.training and not x.is_floating_point() and x.dim() == 4:
            x = self._eval_pipeline(x)
        if not x.is_floating_point():  # a fresh tensor: normalise it in place
            x = to_float(x, self._memory_format, self.dtype).div_(255.0)
            return x.sub_(self.input_mean).div_(self.input_std) if x.dim() == 4 and self._normalize_inputs else x
        if x.dim() == 4 and self._normalize_inputs:
            x = (x - self.input_mean) / self.input_std
        return x

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(self.preprocess(x))

    def logit_mask(self, task_ids: Tensor | None, task: int | None = None) -> Tensor | None:
        """Boolean mask of the logits each sample may use, broadcastable to (batch, classes)."""
        if self.scenario == "domain":
            return None
        if self.scenario == "task":
            if task_ids is None:
                raise ConfigError("task-incremental logits need the task id of every sample")
            return self.class_task.unsqueeze(0) == task_ids.unsqueeze(1)
        if not self.hparams.mask_unseen_classes:
            return None
        upto = self.current_task if task is None else task
        return ((self.class_task >= 0) & (self.class_task <= upto)).unsqueeze(0)

    def mask_logits(self, logits: Tensor, task_ids: Tensor | None) -> Tensor:
        mask = self.logit_mask(task_ids)
        return logits if mask is None else logits.masked_fill(~mask, torch.finfo(logits.dtype).min)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        return self.mask_logits(self.head(self.features(x)), task_ids)

    # ------------------------------------------------------------------ task hooks
    def on_task_start(self, task: Task) -> None:
        """Called before training on ``task`` (and again when a run resumes inside it)."""
        self.current_task.fill_(task.id)
        if self.intact is not None:
            self.intact.on_task_start(self, task)

    def on_task_end(self, task: Task) -> None:
        """Called once after training on ``task``, with the model on its training device.

        Subclasses call ``super().on_task_end(task)``: attached regularisers (InTAct) record here.
        """
        if self.intact is not None:
            self.intact.on_task_end(self, task)

    def should_train(self, task: Task) -> bool:
        """Whether ``task`` gets training epochs (Joint with ``final_only`` waits for the last task)."""
        return True

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Batch) -> Tensor:
        """The loss of one batch; strategies override this (and may call ``super()``)."""
        x, y, t = batch
        return F.cross_entropy(self(x, t), y)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.intact is not None:
            self.intact.begin_step()  # observe this step's training forwards only
        if self._train_pipeline is not None:  # augmented here; a replay strategy's caller keeps the raw batch
            x, y, t = batch
            batch = (self.augment_inputs(x), y, t)
        loss = self.training_loss(batch)
        if self.intact is not None:
            loss = loss + self.intact.penalty(self)
        if self.hparams.check_finite_loss:
            self.watch_loss(loss)
        if self.step_metrics_wanted():
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def watch_loss(self, loss: Tensor) -> None:
        """``check_finite_loss`` without a host sync per step.

        On the CPU a bad loss stops training at once. On an accelerator, reading the loss's finiteness would
        wait for the device every step, so the step and value of the first non-finite loss are recorded on the
        device instead and read every ``finite_check_every`` steps, before any checkpoint is written
        (``on_save_checkpoint``: no checkpoint ever holds the bad step's weights) and at the end of each task's
        training (``on_fit_end``). The error names the bad step either way.
        """
        loss = loss.detach()
        if not self._defer_loss_check(loss):
            value = loss.item()  # on the CPU a plain read (a tenth of the cost of torch.isfinite and bool)
            if not math.isfinite(value):
                self._raise_nonfinite(self.global_step, value)
            return
        record = self._first_nonfinite
        if record is None or record.device != loss.device:
            record = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)
            object.__setattr__(self, "_first_nonfinite", record)
        new = ~torch.isfinite(loss) & (record[0] < 0)  # device-side: no sync
        record[0] = torch.where(new, float(self.global_step), record[0])
        record[1] = torch.where(new, loss.double(), record[1])
        if (self.global_step + 1) % self.finite_check_every == 0:
            self.check_nonfinite_record()

    @staticmethod
    def _defer_loss_check(loss: Tensor) -> bool:
        """Whether reading the loss on the host would wait for a device (everywhere but the CPU)."""
        return loss.device.type != "cpu"

    def check_nonfinite_record(self) -> None:
        """Raise if :meth:`watch_loss` recorded a non-finite loss (one host sync; a no-op when none was kept)."""
        record = self._first_nonfinite
        if record is not None and bool(record[0] >= 0):
            step, value = record.tolist()
            self._raise_nonfinite(int(step), value, noticed=self.global_step)

    def _raise_nonfinite(self, step: int, value: float, noticed: int | None = None) -> None:
        later = "" if noticed is None or noticed == step else \
            f" (noticed at step {noticed}: on an accelerator the check runs every {self.finite_check_every} steps)"
        raise NonFiniteLossError(
            f"the training loss became {value} at global step {step}{later} (task "
            f"{int(self.current_task)}). Lower the learning rate (now {self.hparams.lr}), clip gradients "
            "(--trainer.gradient_clip_val=1.0), or check the data for NaN/inf values. Checkpoints and logs "
            "written so far are intact; resume from one with --ckpt_path."
        )

    def step_metrics_wanted(self) -> bool:
        """Whether a value logged with ``on_step=True`` in this training step reaches anyone.

        Lightning hands step metrics to the loggers only every ``log_every_n_steps`` steps and drops the
        others, yet each ``self.log`` call costs Python work every step (about 0.5-1 ms on a CPU, several
        per cent of a small model's step). So step metrics are logged on the steps the loggers write, and on
        every step while a progress bar shows them or a callback monitors a metric (checkpointing or early
        stopping on ``train/loss``). The loggers receive exactly the same values either way.
        """
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run or trainer.progress_bar_callback is not None:
            return True
        if any(getattr(cb, "monitor", None) is not None for cb in trainer.callbacks):
            return True
        if not trainer.loggers:
            return False
        try:
            return bool(trainer._logger_connector.should_update_logs)
        except AttributeError:  # a Lightning without this (private) property: log every step, as before
            return True

    def set_optimizer(self, optimizer: Any = None, lr_scheduler: Any = None) -> None:
        """Replace the optimizer and/or the scheduler every later task start builds (``--optimizer`` and
        ``--lr_scheduler`` land here); ``None`` keeps the current one. A name (``adam``) uses the
        strategy's ``lr``, ``momentum`` and ``weight_decay``."""
        h = self.hparams
        if optimizer is not None:
            self._optimizer_factory = optim.optimizer_factory(optimizer, lr=h.lr, momentum=h.get("momentum", 0.0),
                                                              weight_decay=h.get("weight_decay", 0.0))
        if lr_scheduler is not None:
            self._scheduler_factory = optim.scheduler_factory(lr_scheduler)
        for name, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            if isinstance(value, (str, Mapping)) and name in h:  # what ran, in checkpoints and logged hparams
                h[name] = self._hparams_initial[name] = value

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the task's optimizer (strategies with per-group settings override this).
        Settings a group leaves out come from the optimizer (``lr``, ``weight_decay``)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        """A fresh optimizer over :meth:`optimizer_groups` and a restarted schedule, at every task start."""
        trainer = self._trainer
        config = optim.build(self.optimizer_groups(), self._optimizer_factory, self._scheduler_factory, trainer,
                             self.hparams.get("lr_scheduler_interval", "epoch"))
        if not self.hparams.get("reset_optimizer", True):
            opt, sched = (config["optimizer"], config["lr_scheduler"]["scheduler"]) if isinstance(config, dict) else (config, None)
            self._optimizer_carry.restore(opt, sched)
        return config

    def on_fit_end(self) -> None:
        """Keep the task's optimizer state for the next task when ``reset_optimizer`` is off (after the last
        look at the non-finite-loss record)."""
        self.check_nonfinite_record()
        trainer = self._trainer
        if self.hparams.get("reset_optimizer", True) or trainer is None or not trainer.optimizers:
            return
        scheds = trainer.lr_scheduler_configs
        self._optimizer_carry.capture(trainer.optimizers[0], scheds[0].scheduler if scheds else None)

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self) -> None:
        """Fresh torchmetrics counters (kept out of the module tree: no checkpoint keys, no DDP buffers)."""
        accuracy = TaskAccuracy(self.num_tasks or len(self.class_task)).to(self.device)
        object.__setattr__(self, "_task_accuracy", accuracy)
        confusion = None
        if self._trainer is not None and self.trainer.testing:  # per-class results at task ends, not every val epoch
            from torchmetrics.classification import MulticlassConfusionMatrix

            confusion = MulticlassConfusionMatrix(len(self.class_task), validate_args=False).to(self.device)
        object.__setattr__(self, "_confusion", confusion)
        til = None
        if self.hparams.get("report_task_il") and self.scenario == "class" and confusion is not None:
            til = TaskAccuracy(accuracy.num_tasks).to(self.device)
        object.__setattr__(self, "_task_il_accuracy", til)

    def record_predictions(self, preds: Tensor, y: Tensor, t: Tensor, correct: Tensor | None = None) -> None:
        """Count one evaluation batch: predicted classes, labels, task ids (``correct`` overrides
        ``preds == y``, e.g. when a wrong inferred task makes a right class count as wrong)."""
        self._task_accuracy.update(preds == y if correct is None else correct, t)
        if self._confusion is not None:
            self._confusion.update(preds, y)

    def _eval_step(self, batch: Batch) -> None:
        x, y, t = batch
        logits = self(x, t)
        self.record_predictions(logits.argmax(1), y, t)
        if self._task_il_accuracy is not None:  # the same outputs, restricted to the sample's own task
            own = self.class_task.unsqueeze(0) == t.unsqueeze(1)
            self._task_il_accuracy.update(logits.masked_fill(~own, torch.finfo(logits.dtype).min).argmax(1) == y, t)

    def _eval_end(self) -> list[float]:
        """Accuracy per task from the (correct, seen) counts, summed over the ranks (torchmetrics' sync):
        under DDP each rank evaluates its own shard, so counts are added, never per-rank accuracies averaged."""
        self.eval_accuracy = self._task_accuracy.compute().reshape(-1).tolist()  # torchmetrics squeezes 1 task
        if self._confusion is not None:
            self.eval_confusion = self._confusion.compute().cpu()
        if self._task_il_accuracy is not None:
            self.eval_accuracy_task_il = self._task_il_accuracy.compute().reshape(-1).tolist()
        return self.eval_accuracy

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end()
        self._log_standalone_evaluation("test")

    def _log_standalone_evaluation(self, prefix: str) -> None:
        """Log ``<prefix>/acc_task_j`` and ``<prefix>/avg_acc_seen`` (the mean over the tasks seen so far) when the
        user runs ``trainer.test`` / ``trainer.validate`` (or ``clframe test`` / ``validate``), so Lightning returns
        them and sends them to the loggers. The stream's own task-end evaluation is reported by ContinualTrainer
        (``eval/...``), and validation inside ``fit`` logs ``val/avg_acc``: neither logs here."""
        trainer = self._trainer
        if trainer is None or getattr(trainer, "evaluating_stream", False) or trainer.state.fn == "fit":
            return
        accuracy = self.eval_accuracy
        for j, a in enumerate(accuracy):
            if a == a:  # NaN: a task without samples in this split
                self.log(f"{prefix}/acc_task_{j}", a, sync_dist=False)  # counts are summed over ranks already
        seen = [a for a in accuracy[: int(self.current_task) + 1] if a == a]
        if seen:
            self.log(f"{prefix}/avg_acc_seen", sum(seen) / len(seen), sync_dist=False)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Predicted class of every sample, with its task id and target (``clframe predict``)."""
        x, y, t = batch
        return {"task_id": t, "target": y, "prediction": self(x, t).argmax(1)}

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        acc = self._eval_end()
        self._log_standalone_evaluation("val")
        seen = [a for a in acc if a == a]
        if seen:
            self.log("val/avg_acc", sum(seen) / len(seen), prog_bar=True, sync_dist=False)
            self.log("task", float(self.current_task), sync_dist=False)  # for checkpoint file names: {task}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_nonfinite_record()  # never write the weights of a step after a non-finite loss
        if self.checkpointed_attributes:
            checkpoint["clframe_strategy_attributes"] = {k: getattr(self, k) for k in self.checkpointed_attributes}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, value in checkpoint.get("clframe_strategy_attributes", {}).items():
            if name in self.checkpointed_attributes:
                setattr(self, name, value)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Resize lazily shaped state (replay storage, per-task statistics) before loading."""
        self.materialize_state(state_dict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._refresh_normalization()
        return result

    def materialize_state(self, state_dict: Mapping[str, Any]) -> None:
        """Give empty placeholder buffers the saved shape, so a fresh module can load any checkpoint."""
        own = dict(self.named_buffers())
        for name, value in state_dict.items():
            buf = own.get(name)
            if buf is not None and buf.numel() == 0 and value.numel() > 0:
                module_name, _, attr = name.rpartition(".")
                module = self.get_submodule(module_name) if module_name else self
                module.register_buffer(attr, torch.empty_like(value, device=buf.device), persistent=True)
