"""Baselines every continual-learning paper compares with: Finetune, Joint, EWC and LwF."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader

from clframe.data.stream import Batch, Task, passthrough_collate
from clframe.errors import ConfigError
from clframe.strategies.base import ContinualModule, frozen_copy


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
    label ``y`` is computed from per-sample gradients (Mammoth's ``ewc_on`` estimator), and training
    adds ``lambda * sum_i F_i (theta_i - theta*_i)^2``.

    Online (default): one penalty with ``F <- gamma * F + F_task`` and ``theta*`` the latest
    parameters. Offline: one penalty per finished task.

    Args:
        ewc_lambda: penalty weight (Mammoth's ``e_lambda``).
        gamma: decay of the accumulated Fisher in the online variant.
        online: online EWC (one accumulated penalty) or the original one-penalty-per-task form.
        fisher_samples: use at most this many training samples for the Fisher (all by default).
        fisher_batch_size: per-sample gradients are computed this many at a time.
    """

    def __init__(self, ewc_lambda: float = 90.0, gamma: float = 1.0, online: bool = True,
                 fisher_samples: int | None = None, fisher_batch_size: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ewc_lambda < 0:
            raise ConfigError(f"ewc_lambda must be non-negative, got {ewc_lambda}")
        if not 0.0 <= gamma <= 1.0:  # a decay: outside [0, 1] old Fisher terms grow or change sign
            raise ConfigError(f"EWC gamma (decay of the accumulated Fisher) must be in [0, 1], got {gamma}")
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
        """Per-parameter Fisher on ``task``'s training data, from per-sample gradients (torch.func)."""
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        buffers = dict(self.named_buffers())
        was_training = self.training
        self.eval()

        def log_lik(p: dict[str, Tensor], x: Tensor, y: Tensor, t: Tensor) -> Tensor:
            logits = functional_call(self, (p, buffers), (x.unsqueeze(0), t.unsqueeze(0)))
            return F.log_softmax(logits, dim=1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

        per_sample = vmap(grad(log_lik), in_dims=(None, 0, 0, 0))
        data = task.train
        if self.hparams.fisher_samples is not None and len(data) > self.hparams.fisher_samples:
            gen = torch.Generator().manual_seed(task.id)
            data = data.subset(torch.randperm(len(data), generator=gen)[: self.hparams.fisher_samples])
        loader = DataLoader(data, batch_size=self.hparams.fisher_batch_size, collate_fn=passthrough_collate)
        fisher = torch.zeros(sum(params[n].numel() for n in names), device=self.device)
        for x, y, t in loader:
            x, y, t = x.to(self.device), y.to(self.device), t.to(self.device)
            with torch.enable_grad():
                grads = per_sample(params, x, y, t)
            lik = vmap(log_lik, in_dims=(None, 0, 0, 0))(params, x, y, t).exp()
            flat = torch.cat([grads[n].flatten(1) for n in names], dim=1)
            fisher += (lik.unsqueeze(1) * flat.pow(2)).sum(0)
        self.train(was_training)
        return fisher / len(data)

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
    """Learning without Forgetting (Li & Hoiem 2016), class- and task-incremental.

    At each task start the current network is frozen as a teacher; training adds
    ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over the logits of the
    classes learned before the task (per earlier task in task-incremental streams).

    Args:
        alpha: weight of the distillation term.
        temperature: softmax temperature ``T``.
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0, **kwargs: Any) -> None:
        if not math.isfinite(temperature) or temperature <= 0:  # softmax(z / 0) is NaN at the first distillation step
            raise ConfigError(f"LwF temperature must be a positive number (the paper uses 2), got {temperature}")
        if not math.isfinite(alpha) or alpha < 0:
            raise ConfigError(f"LwF alpha (distillation weight) must be non-negative, got {alpha}")
        super().__init__(**kwargs)
        self.teacher: nn.Module | None = None

    def _snapshot_teacher(self) -> None:
        self.teacher = frozen_copy(backbone=self.backbone, head=self.head)

    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        if task.id > 0:
            self._snapshot_teacher()

    def materialize_state(self, state_dict) -> None:
        """A checkpoint written after task 0 holds a teacher: create its slot before loading."""
        if self.teacher is None and any(k.startswith("teacher.") for k in state_dict):
            self._snapshot_teacher()
        super().materialize_state(state_dict)

    def train(self, mode: bool = True) -> LwF:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def distillation(self, x: Tensor, student_logits: Tensor, task: int) -> Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher["head"](self.teacher["backbone"](self.preprocess(x)))
        old_owner = self.class_task
        groups = range(task) if self.scenario == "task" else [None]
        temp, total = self.hparams.temperature, student_logits.new_zeros(())
        for g in groups:
            cols = (old_owner == g) if g is not None else (old_owner >= 0) & (old_owner < task)
            if self.scenario == "domain":
                cols = torch.ones_like(cols)
            s = F.log_softmax(student_logits[:, cols] / temp, dim=1)
            p = F.softmax(teacher_logits[:, cols] / temp, dim=1)
            total = total + F.kl_div(s, p, reduction="batchmean") * temp**2
        return total

    def training_loss(self, batch: Batch) -> Tensor:
        x, y, t = batch
        raw = self.head(self.features(x))
        loss = F.cross_entropy(self.mask_logits(raw, t), y)
        if self.teacher is not None and self.hparams.alpha > 0:
            loss = loss + self.hparams.alpha * self.distillation(x, raw, int(self.current_task))
        return loss
