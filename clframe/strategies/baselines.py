"""Baselines every continual-learning paper compares with: Finetune, Joint, EWC and LwF."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from clframe.data.stream import Batch, Task, passthrough_collate
from clframe.errors import ConfigError
from clframe.strategies.base import ContinualModule, frozen_copy
from clframe.strategies.distillation import soft_cross_entropy
from clframe.strategies.fisher import fisher_sq_grads


class Finetune(ContinualModule):
    """Plain sequential training (the lower bound; Mammoth's ``sgd``)."""


class Joint(ContinualModule):
    """Joint training on the data of every task seen so far (the usual upper bound).

    With ``final_only=True`` (the DER paper's JOINT) nothing is trained until the last task, which
    then trains on the whole stream at once; otherwise every task trains on all data seen so far
    ("incremental joint"), which also yields a meaningful accuracy matrix.
    """

    train_scope = "seen"

    def __init__(self, final_only: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def should_train(self, task: Task) -> bool:
        return not self.hparams.final_only or task.id == (self.num_tasks or 1) - 1


class EWC(ContinualModule):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017) and its online variant (Schwarz et al. 2018).

    After each task the diagonal Fisher ``F = E_x[ p(y|x) * (d log p(y|x) / d theta)^2 ]`` at the true
    label ``y`` is computed from squared per-sample gradients (Mammoth's ``ewc_on`` estimator), and training
    adds ``lambda * sum_i F_i (theta_i - theta*_i)^2``.

    Online (default): one penalty with ``F <- gamma * F + F_task`` and ``theta*`` the latest
    parameters. Offline: one penalty per finished task.

    Args:
        ewc_lambda: penalty weight (Mammoth's ``e_lambda``).
        gamma: decay of the accumulated Fisher in the online variant.
        online: online EWC (one accumulated penalty) or the original one-penalty-per-task form.
        fisher_samples: use at most this many training samples for the Fisher (all by default).
        fisher_batch_size: samples per Fisher batch.
        fisher_method: ``closed_form`` (default) sums squared per-sample gradients of linear and convolution
            layers from their inputs and output gradients, without materialising them; ``per_sample`` takes
            every parameter's per-sample gradients with ``torch.func`` (the same numbers, much slower).
    """

    def __init__(self, ewc_lambda: float = 90.0, gamma: float = 1.0, online: bool = True,
                 fisher_samples: int | None = None, fisher_batch_size: int = 128,
                 fisher_method: Literal["closed_form", "per_sample"] = "closed_form", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ewc_lambda < 0:
            raise ConfigError(f"ewc_lambda must be non-negative, got {ewc_lambda}")
        if not 0.0 <= gamma <= 1.0:  # a decay: outside [0, 1] old Fisher terms grow or change sign
            raise ConfigError(f"EWC gamma (decay of the accumulated Fisher) must be in [0, 1], got {gamma}")
        if fisher_method not in ("closed_form", "per_sample"):
            raise ConfigError(f"fisher_method must be 'closed_form' or 'per_sample', got {fisher_method!r}")
        self.register_buffer("ewc_fisher", torch.empty(0))
        self.register_buffer("ewc_anchor", torch.empty(0))

    def _flat_params(self) -> Tensor:
        return torch.cat([p.flatten() for p in self.parameters() if p.requires_grad])

    def penalty(self) -> Tensor:
        if self.ewc_fisher.numel() == 0:
            return torch.zeros((), device=self.device)
        diff = self._flat_params().unsqueeze(0) - self.ewc_anchor.view(-1, self.ewc_anchor.shape[-1])
        return (self.ewc_fisher.view_as(diff) * diff.pow(2)).sum()

    def training_loss(self, batch: Batch) -> Tensor:
        loss = super().training_loss(batch)
        if self.ewc_fisher.numel():
            loss = loss + self.hparams.ewc_lambda * self.penalty()
        return loss

    @torch.no_grad()
    def fisher_diagonal(self, task: Task) -> Tensor:
        """Per-parameter Fisher on ``task``'s training data, in eval mode (see :mod:`clframe.strategies.fisher`)."""
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        was_training = self.training
        self.eval()
        data = task.train
        if self.hparams.fisher_samples is not None and len(data) > self.hparams.fisher_samples:
            gen = torch.Generator().manual_seed(task.id)
            data = data.subset(torch.randperm(len(data), generator=gen)[: self.hparams.fisher_samples])
        loader = DataLoader(data, batch_size=self.hparams.fisher_batch_size, collate_fn=passthrough_collate)
        closed_form = self.hparams.fisher_method == "closed_form"
        sums = {n: torch.zeros_like(p) for n, p in self.named_parameters() if p.requires_grad}
        for x, y, t in loader:
            x, y, t = x.to(self.device), y.to(self.device), t.to(self.device)
            for n, v in fisher_sq_grads(self, names, x, y, t, closed_form=closed_form).items():
                sums[n] += v
        self.train(was_training)
        return torch.cat([sums[n].flatten() for n in names]) / len(data)

    def on_task_end(self, task: Task) -> None:
        fisher, anchor = self.fisher_diagonal(task), self._flat_params().detach().clone()
        if self.hparams.online or self.ewc_fisher.numel() == 0:
            if self.ewc_fisher.numel():
                fisher = self.hparams.gamma * self.ewc_fisher.view(-1) + fisher
            self.ewc_fisher = fisher.unsqueeze(0) if not self.hparams.online else fisher
            self.ewc_anchor = anchor.unsqueeze(0) if not self.hparams.online else anchor
        else:
            self.ewc_fisher = torch.cat([self.ewc_fisher, fisher.unsqueeze(0)])
            self.ewc_anchor = torch.cat([self.ewc_anchor, anchor.unsqueeze(0)])
        super().on_task_end(task)


class LwF(ContinualModule):
    """Learning without Forgetting (Li & Hoiem 2016) in class-, task- and domain-incremental streams.

    At each task start the current network is frozen as a teacher. Before the task trains, a warm-up
    fits only the new classes' head rows on frozen features (the paper's warm-up step; Mammoth's
    ``begin_task``). Training then adds ``alpha * L_old``, the cross-entropy between the teacher's and
    the student's temperature-``T`` softmax (the paper's Eq. 2):

    - task-incremental: one term per earlier task, over that task's classes (the paper's multi-head case);
    - class-incremental: ``distill_classes="seen"`` takes the student's softmax over every class seen so
      far, with teacher probability 0 for the new ones (van de Ven et al.'s three-scenario LwF), while
      ``"old"`` takes both softmaxes over the old classes only (Mammoth's ``lwf``);
    - domain-incremental: one term over the shared head.

    ``weighting="sum"`` gives ``CE + alpha * sum_g L_old_g`` (the paper, lambda_o = alpha);
    ``"balanced"`` gives ``CE / t + (1 - 1/t) * alpha * mean_g L_old_g`` at the ``t``-th task (van de Ven's
    weighting by the number of tasks seen). ``scale_by_t2`` multiplies ``L_old`` by ``T^2`` (Hinton et al.'s
    gradient scaling; van de Ven's implementation does, the paper and Mammoth do not). ``distill_average``:
    ``"batch"`` sums ``L_old`` over the classes and averages it over the batch (the paper; van de Ven's code since
    May 2019); ``"batch_and_classes"`` averages over the classes too (van de Ven's code before then).

    Args:
        alpha: weight of the distillation term (the paper's lambda_o).
        temperature: softmax temperature ``T`` (the paper's 2).
        distill_classes: class-incremental only: ``"seen"`` or ``"old"`` (see above).
        weighting: ``"sum"`` (the paper) or ``"balanced"`` (van de Ven).
        scale_by_t2: multiply the distillation term by ``T^2`` (van de Ven's implementation does).
        distill_average: ``"batch"`` (default) or ``"batch_and_classes"`` (see above).
        warmup_epochs: epochs of head-only warm-up at each task start after the first; ``None`` takes the
            trainer's ``epochs_per_task`` (Mammoth's choice), 0 turns it off. Domain-incremental streams
            have no new head rows, so nothing is warmed up there.
        warmup_lr: the warm-up's SGD learning rate (``None``: ``lr``).
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0,
                 distill_classes: Literal["seen", "old"] = "seen", weighting: Literal["sum", "balanced"] = "sum",
                 scale_by_t2: bool = False, warmup_epochs: int | None = None, warmup_lr: float | None = None,
                 distill_average: Literal["batch", "batch_and_classes"] = "batch", **kwargs: Any) -> None:
        if not math.isfinite(temperature) or temperature <= 0:  # softmax(z / 0) is NaN at the first distillation step
            raise ConfigError(f"LwF temperature must be a positive number (the paper uses 2), got {temperature}")
        if not math.isfinite(alpha) or alpha < 0:
            raise ConfigError(f"LwF alpha (distillation weight) must be non-negative, got {alpha}")
        super().__init__(**kwargs)
        if distill_classes not in ("seen", "old"):
            raise ConfigError(f"distill_classes must be 'seen' or 'old', got {distill_classes!r}")
        if weighting not in ("sum", "balanced"):
            raise ConfigError(f"weighting must be 'sum' or 'balanced', got {weighting!r}")
        if distill_average not in ("batch", "batch_and_classes"):
            raise ConfigError(f"distill_average must be 'batch' or 'batch_and_classes', got {distill_average!r}")
        if warmup_epochs is not None and warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be non-negative (0 turns the warm-up off), got {warmup_epochs}")
        self.teacher: nn.Module | None = None
        # The task whose warm-up has run: checkpointed, so a run resumed inside a task does not warm up twice.
        self.register_buffer("warmed_up_task", torch.tensor(-1))

    def _snapshot_teacher(self) -> None:
        self.teacher = frozen_copy(backbone=self.backbone, head=self.head)

    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        if task.id > 0:
            self._snapshot_teacher()

    def on_train_start(self) -> None:
        """The warm-up runs here, once the model sits on its training device."""
        super().on_train_start()
        task = int(self.current_task)
        if task > 0 and int(self.warmed_up_task) != task and self.scenario != "domain":
            epochs = self.hparams.warmup_epochs
            if epochs is None:
                epochs = getattr(self.trainer, "epochs_per_task", 1)
            if epochs > 0:
                datamodule = self.trainer.datamodule
                self.warm_up_head(datamodule.stream[task], epochs, datamodule.hparams.batch_size)
        self.warmed_up_task.fill_(task)

    def warm_up_head(self, task: Task, epochs: int, batch_size: int) -> None:
        """Train the new classes' head rows on frozen features (eval mode), with plain SGD."""
        new = (self.class_task == task.id).nonzero().squeeze(1)
        remap = torch.full_like(self.class_task, -1)
        remap[new] = torch.arange(len(new), device=new.device)
        gen = torch.Generator().manual_seed(1000 + task.id)
        loader = DataLoader(task.train, batch_size=batch_size, shuffle=True, generator=gen,
                            collate_fn=passthrough_collate)
        optimizer = torch.optim.SGD(self.head.parameters(), lr=self.hparams.warmup_lr or self.hparams.lr)
        was_training = self.training
        self.eval()
        for _ in range(epochs):
            for x, y, _t in loader:
                x, y = x.to(self.device), y.to(self.device)
                with torch.no_grad():
                    feats = self.features(x)
                optimizer.zero_grad()
                F.cross_entropy(self.head(feats)[:, new], remap[y]).backward()
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.train(was_training)

    def materialize_state(self, state_dict) -> None:
        """A checkpoint written after task 0 holds a teacher: create its slot before loading."""
        if self.teacher is None and any(k.startswith("teacher.") for k in state_dict):
            self._snapshot_teacher()
        super().materialize_state(state_dict)

    def distillation_groups(self, task: int) -> list[tuple[Tensor, Tensor]]:
        """(student columns, teacher columns) per distillation term; new classes come last among the
        student columns, where the teacher's padding with probability 0 puts them."""
        owner = self.class_task
        if self.scenario == "domain":
            cols = torch.arange(len(owner), device=owner.device)
            return [(cols, cols)]
        if self.scenario == "task":
            return [((owner == g).nonzero().squeeze(1),) * 2 for g in range(task)]
        old = ((owner >= 0) & (owner < task)).nonzero().squeeze(1)
        if self.hparams.distill_classes == "old":
            return [(old, old)]
        return [(torch.cat([old, (owner == task).nonzero().squeeze(1)]), old)]

    def distillation(self, x: Tensor, student_logits: Tensor, task: int) -> Tensor:
        """``L_old`` summed (``weighting="sum"``) or averaged (``"balanced"``) over the groups."""
        with torch.no_grad():
            teacher_logits = self.teacher["head"](self.teacher["backbone"](self.preprocess(x)))
        temp = self.hparams.temperature
        per_class = self.hparams.get("distill_average", "batch") == "batch_and_classes"
        terms = [soft_cross_entropy(student_logits[:, s], teacher_logits[:, t], temp, average_classes=per_class)
                 for s, t in self.distillation_groups(task)]
        total = torch.stack(terms).sum() if terms else student_logits.new_zeros(())
        if self.hparams.weighting == "balanced" and terms:
            total = total / len(terms)
        return total * temp**2 if self.hparams.scale_by_t2 else total

    def training_loss(self, batch: Batch) -> Tensor:
        x, y, t = batch
        raw = self.head(self.features(x))
        loss = F.cross_entropy(self.mask_logits(raw, t), y)
        if self.teacher is None or self.hparams.alpha <= 0:
            return loss
        task = int(self.current_task)
        distill = self.hparams.alpha * self.distillation(x, raw, task)
        if self.hparams.weighting == "balanced":
            new_share = 1.0 / (task + 1)
            return new_share * loss + (1.0 - new_share) * distill
        return loss + distill
