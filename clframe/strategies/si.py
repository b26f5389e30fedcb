"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017): importance from the path of each parameter.

During a task every parameter accumulates how much its own updates lowered the loss, the path
integral ``w += -g * delta`` (``g`` the gradient that the optimizer step used, ``delta`` the change the
step made). At the end of the task the importance grows by ``Omega += w / (Delta^2 + xi)``, with
``Delta`` the parameter's total change over the task and ``xi`` a damping term that keeps the ratio
bounded when a parameter barely moved. Later tasks add the surrogate loss
``c * sum Omega * (theta - theta*)^2``, ``theta*`` the parameters at the end of the previous task.

Two details differ between the official implementations, and both are options:

- which gradient enters ``w``: the paper's code (``ganguli-lab/pathint``) uses the gradient of the
  loss without the surrogate term (``importance_grad="task"``, the default); van de Ven & Tolias'
  three-scenario code uses the gradient of the whole loss, surrogate included (``"total"``);
- the paper's code clips the accumulated ``Omega`` at zero (``nonnegative_omega=True``, the default),
  van de Ven & Tolias' code does not.

The task gradient is recovered from the total one by subtracting the surrogate's own gradient,
``2 c Omega (theta - theta*)``, so no second backward pass is needed; other terms in the loss (an
attached InTAct regulariser) count as task loss.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from clframe.data.stream import Batch, Task
from clframe.errors import ConfigError
from clframe.strategies.base import ContinualModule


class SI(ContinualModule):
    """Synaptic Intelligence: a quadratic penalty weighted by each parameter's path-integral importance.

    Args:
        si_c: strength ``c`` of the surrogate loss.
        xi: damping ``xi`` in ``w / (Delta^2 + xi)`` (0.1 in the MNIST experiments of both codes).
        importance_grad: ``"task"`` (gradient without the surrogate term, the paper's code) or
            ``"total"`` (gradient of the whole loss, van de Ven & Tolias' code).
        nonnegative_omega: clip the accumulated importance at zero after each task (the paper's code).
    """

    def __init__(self, si_c: float = 1.0, xi: float = 0.1, importance_grad: Literal["task", "total"] = "task",
                 nonnegative_omega: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if si_c < 0:
            raise ConfigError(f"si_c must be non-negative, got {si_c}")
        if xi <= 0:
            raise ConfigError(f"xi must be positive (it keeps w / (Delta^2 + xi) finite), got {xi}")
        if importance_grad not in ("task", "total"):
            raise ConfigError(f"importance_grad must be 'task' or 'total', got {importance_grad!r}")
        # Flat over the trainable parameters, in parameters() order; all three go into checkpoints.
        self.register_buffer("si_omega", torch.empty(0))   # accumulated importance Omega
        self.register_buffer("si_anchor", torch.empty(0))  # theta at the start of the current task (= theta*)
        self.register_buffer("si_path", torch.empty(0))    # running path integral w of the current task
        self._si_grad: Tensor | None = None

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters() if p.requires_grad])

    def _flat_grads(self) -> Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                          for p in self.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ the surrogate loss
    def surrogate(self) -> Tensor:
        """``sum Omega (theta - theta*)^2`` (zero before the first task has ended)."""
        if self.si_omega.numel() == 0:
            return torch.zeros((), device=self.device)
        params = torch.cat([p.flatten() for p in self.parameters() if p.requires_grad])
        return (self.si_omega * (params - self.si_anchor).pow(2)).sum()

    def training_loss(self, batch: Batch) -> Tensor:
        loss = super().training_loss(batch)
        if self.si_omega.numel() and self.hparams.si_c > 0:
            loss = loss + self.hparams.si_c * self.surrogate()
        return loss

    # ------------------------------------------------------------------ the path integral
    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        if self.si_anchor.numel() == 0:  # the first task starts from the initial parameters
            self.si_anchor = self._flat_params().clone()
        self.si_path = torch.zeros_like(self.si_anchor)  # a resumed run loads its saved path over this

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the gradient this step will use (before any clipping), as the importance's ``g``."""
        grad = self._flat_grads()
        if self.hparams.importance_grad == "task" and self.si_omega.numel() and self.hparams.si_c > 0:
            grad = grad - 2 * self.hparams.si_c * self.si_omega * (self._flat_params() - self.si_anchor)
        self._si_grad = grad

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step, then ``w += -g * delta``; inside the training step, so checkpoints see the new ``w``."""
        before = self._flat_params().clone()
        self._si_grad = None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._si_grad is not None:
            self.si_path.add_(-self._si_grad * (self._flat_params() - before))
            self._si_grad = None

    def on_task_end(self, task: Task) -> None:
        """``Omega += w / (Delta^2 + xi)``, then the current parameters become ``theta*``."""
        current = self._flat_params()
        gain = self.si_path / ((current - self.si_anchor).pow(2) + self.hparams.xi)
        omega = gain if self.si_omega.numel() == 0 else self.si_omega + gain
        self.si_omega = omega.clamp(min=0) if self.hparams.nonnegative_omega else omega
        self.si_anchor = current.clone()
        self.si_path = torch.zeros_like(current)
        super().on_task_end(task)
