"""WSN: Winning SubNetworks (Kang et al., "Forget-free Continual Learning with Winning Subnetworks", ICML 2022).

Weights and one score tensor per layer are learned together; each task runs with the top-``c``
fraction of ``|S|`` per layer, stored as a bit-packed mask when the task ends. Weights selected by
any earlier task are frozen (they may be re-used, not changed); the others train freely. Each task
has its own linear head. With every task evaluated under its own mask and head, old tasks cannot
change: BWT is exactly 0 in task-incremental learning, with forward transfer through re-used weights.

clframe choices (see ``docs/methods/supermasks.md``): besides zeroing the gradient of frozen weights, every frozen entry
is restored from a snapshot after each optimizer step, so optimizer state or decoupled weight decay
cannot move it, and weight decay is never applied to masked weights (only to scores and heads).
The reference's plateau schedule (lr/2 after 6 epochs without improvement) cannot fire within the
5-epoch PMNIST protocol and is not implemented; use ``keep_best`` for its best-epoch restore.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.optim import OptimizerArg
from clframe.strategies.supermask.base import SupermaskModule
from clframe.strategies.supermask.layers import MaskedLayer, MaskSource


class TaskHeads(nn.Module):
    """One bias-free linear head per task; a task only ever trains its own."""

    def __init__(self, n_tasks: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        for _ in range(n_tasks):
            weight = torch.empty(out_features, in_features)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default, as in the reference
            self.weights.append(nn.Parameter(weight))

    def forward(self, x: Tensor, task: int) -> Tensor:
        return F.linear(x, self.weights[task])


class WSN(SupermaskModule):
    """Winning SubNetworks: jointly learned weights and shared scores, earlier tasks' weights frozen.

    Args:
        density: per-task capacity ``c``, the fraction of each layer a task selects (WSN's ``--sparsity``
            before the script inverts it).
        keep_best: restore the epoch with the best validation accuracy on the current task at the end
            of each task (needs ``val_fraction > 0`` on the data; the reference keeps the best
            validation loss).
    """

    def __init__(self, density: float = 0.5, keep_best: bool = False,
                 optimizer: OptimizerArg = "adam", lr: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(density=density, keep_best=keep_best, optimizer=optimizer, lr=lr, **kwargs)

    def layer_kwargs(self) -> dict[str, Any]:
        return {**super().layer_kwargs(), "weight_init": "kaiming"}

    def build_head(self, num_features: int, num_classes: int) -> nn.Module:
        return TaskHeads(self.hparams.n_tasks, num_features, num_classes)

    def run_head(self, features: Tensor, source: MaskSource) -> Tensor:
        return self.head(features, source.task)

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        layers = self.masked_layers()
        return [layer.weight for layer in layers] + super().trainable_parameters(task) + [self.head.weights[task]]

    def editable_weights(self) -> list[tuple[MaskedLayer, Tensor]]:
        """Every weight no earlier task selected (``¬U``); the current mask decides which get gradient."""
        return [(layer, ~self.union_mask(layer)) for layer in self.masked_layers()]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The masked weights without weight decay, everything else with the optimizer's."""
        weights = [layer.weight for layer in self.masked_layers()]
        ids = {id(w) for w in weights}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": weights, "weight_decay": 0.0}, {"params": rest}]
