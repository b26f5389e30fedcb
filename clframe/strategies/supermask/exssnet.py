"""ExSSNeT: Exclusive Supermask SubNetwork Training (Yadav & Bansal, arXiv 2210.10209, ACL Findings 2023).

Each task first learns a supermask over the current weights (mask phase, scores only, as SupSup);
then it trains the weights inside its mask that **no earlier mask uses** (weight phase). Earlier
tasks' weights never change, so forgetting is zero, while new tasks gain capacity beyond a fixed
random network. With ``exclusive=False`` the weight phase edits the whole mask (SSNeT), which
overwrites weights shared with earlier tasks and forgets.

KKT (k-NN knowledge transfer): before task t's mask phase, each earlier mask i embeds a subset of
task t's training data (penultimate features); a k-NN classifier fit on 66 % of it and scored on the
rest gives an accuracy ``a_i``. ``knn_best`` copies the scores of ``argmax a_i`` into task t's slot
when that accuracy beats chance (``1/#classes of task t``), ``knn_always`` copies it regardless,
``knn_all`` averages the scores of every task above chance; otherwise the scores stay random.

clframe choices (see ``docs/methods/supermasks.md``): the KKT subset is a seeded random subset (not the first batches in
loader order); k is capped at a tenth of the fitting samples (200 is more than tiny tasks have);
weight decay never applies to weights, and besides gradient masking every non-editable weight is
restored after each optimizer step; the best epoch (``keep_best``) is chosen on a real validation
split, over both phases as in the reference. The reference's plateau + cosine schedules are not
implemented (constant learning rates).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from clframe.data.stream import Task
from clframe.optim import OptimizerArg
from clframe.strategies.supermask.base import SupermaskModule
from clframe.strategies.supermask.layers import MaskedLayer, MaskSource


def knn_predict(fit_x: Tensor, fit_y: Tensor, query: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Majority vote of the ``k`` nearest (L2) fitting samples for every query row."""
    preds = []
    for start in range(0, len(query), chunk):
        dist = torch.cdist(query[start: start + chunk], fit_x)
        votes = fit_y[dist.topk(k, largest=False).indices]
        preds.append(votes.mode(1).values)
    return torch.cat(preds)


class ExSSNeT(SupermaskModule):
    """Supermask per task, then exclusive weight training, with k-NN knowledge transfer between tasks.

    The last ``weight_epochs`` of each task's epochs (``trainer.epochs_per_task``) are the weight phase;
    the epochs before them are the mask phase.

    Args:
        density: fraction of weights each task's mask keeps (ExSSNeT's ``--sparsity``, default 0.1).
        weight_epochs: epochs of weight training at the end of each task (0: SupSup with KKT).
        weight_lr: learning rate of the weight phase (``--train-weight-lr``); ``lr`` is the mask phase's.
        exclusive: train only weights no earlier mask uses (ExSSNeT); ``False`` trains the whole mask (SSNeT).
        sim_init: knowledge transfer: ``"none"``, ``"knn_best"``, ``"knn_always"`` or ``"knn_all"``.
        knn_k: neighbours of the k-NN vote (capped at a tenth of the fitting samples).
        knn_fraction: fraction of the new task's training samples embedded for KKT.
    """

    def __init__(self, density: float = 0.1, weight_epochs: int = 0, weight_lr: float = 1e-3, exclusive: bool = True,
                 sim_init: Literal["none", "knn_best", "knn_always", "knn_all"] = "knn_best", knn_k: int = 200,
                 knn_fraction: float = 0.2, optimizer: OptimizerArg = "adam",
                 lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(density=density, optimizer=optimizer, lr=lr, **kwargs)
        if weight_epochs < 0 or not 0.0 < knn_fraction <= 1.0 or knn_k < 1:
            raise ValueError(f"need weight_epochs >= 0, 0 < knn_fraction <= 1 and knn_k >= 1; got {weight_epochs}, "
                             f"{knn_fraction}, {knn_k}")
        self._phase: Literal["mask", "weight"] = "mask"

    # ------------------------------------------------------------------ construction
    def layer_kwargs(self) -> dict[str, Any]:
        return {**super().layer_kwargs(), "score_slots": self.hparams.n_tasks}

    def _build(self, num_classes: int, input_shape: tuple[int, ...], scenario: str) -> None:
        super()._build(num_classes, input_shape, scenario)
        n = self.hparams.n_tasks
        self.register_buffer("kkt_source", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("kkt_accuracy", torch.full((n, n), float("nan")))

    def score_slot(self, task: int) -> int:
        return task

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        return super().trainable_parameters(task) + [layer.weight for layer in self.masked_layers()]

    # ------------------------------------------------------------------ knowledge transfer
    @torch.no_grad()
    def knn_accuracies(self, task: Task) -> Tensor:
        """k-NN accuracy on ``task``'s data of the features under every learned mask (NaN elsewhere)."""
        data = task.train
        n = max(3, int(self.hparams.knn_fraction * len(data)))
        x, y, _ = data.__getitems__(torch.randperm(len(data))[:n].tolist())
        x, y = self.preprocess(x.to(self.device)), y.to(self.device)
        n_fit = int(0.66 * len(y))
        k = min(self.hparams.knn_k, max(1, n_fit // 10))
        accs = torch.full((self.hparams.n_tasks,), float("nan"), device=self.device)
        was_training = self.training
        self.eval()
        for i in self.learned_tasks():
            feats = self.backbone(x, MaskSource("stored", i))
            accs[i] = (knn_predict(feats[:n_fit], y[:n_fit], feats[n_fit:], k) == y[n_fit:]).float().mean()
        self.train(was_training)
        return accs

    @torch.no_grad()
    def transfer_knowledge(self, task: Task) -> None:
        """KKT: start ``task``'s scores from the earlier mask(s) whose features classify it best."""
        accs = self.knn_accuracies(task)
        self.kkt_accuracy[task.id] = accs
        chance = 1.0 / len(task.classes)
        valid = ~accs.isnan()
        best = int(accs.masked_fill(~valid, -1.0).argmax())
        mode = self.hparams.sim_init
        if mode == "knn_all":
            sources = ((accs > chance) & valid).nonzero().flatten().tolist()
        else:
            sources = [best] if mode == "knn_always" or accs[best] > chance else []
        if not sources:
            return
        self.kkt_source[task.id] = best
        for layer in self.masked_layers():
            layer.scores[task.id].copy_(torch.stack([layer.scores[i] for i in sources]).mean(0))

    def on_task_start(self, task: Task) -> None:
        super().on_task_start(task)
        self.set_phase("mask")
        if self.hparams.sim_init != "none" and self.learned_tasks():
            self.transfer_knowledge(task)

    # ------------------------------------------------------------------ phases
    def on_train_start(self) -> None:
        epochs = self.trainer.epochs_per_task
        if self.hparams.weight_epochs >= epochs:
            raise ValueError(f"weight_epochs ({self.hparams.weight_epochs}) must leave at least one mask epoch of the "
                             f"{epochs} epochs per task")
        super().on_train_start()
        self.on_train_epoch_start()  # a run resumed inside an epoch gets no epoch start: take its phase here

    def on_train_epoch_start(self) -> None:
        """Switch to the weight phase for the last ``weight_epochs`` epochs of the task."""
        epochs = self.trainer.epochs_per_task
        epoch_in_task = self.current_epoch - (self.trainer.max_epochs - epochs)
        phase = "weight" if epoch_in_task >= epochs - self.hparams.weight_epochs else "mask"
        if phase != self._phase:
            self.set_phase(phase)
            self.refresh_editable()

    def set_phase(self, phase: Literal["mask", "weight"]) -> None:
        """Mask phase: only the task's scores get gradients; weight phase: only the weights."""
        self._phase = phase
        task = int(self.current_task)
        for layer in self.masked_layers():
            layer.scores[task].requires_grad_(phase == "mask")
            layer.weight.requires_grad_(phase == "weight")

    def editable_weights(self) -> list[tuple[MaskedLayer, Tensor]]:
        """Weight phase: ``E_t = M_t ∧ ¬(M_0 ∨ … ∨ M_{t−1})`` (ExSSNeT) or ``M_t`` (SSNeT); none in the mask phase."""
        if self._phase != "weight":
            return []
        task = int(self.current_task)
        editable = []
        for layer in self.masked_layers():
            current = layer.live_mask(task)
            editable.append((layer, current & ~self.union_mask(layer) if self.hparams.exclusive else current))
        return editable

    def on_task_end(self, task: Task) -> None:
        super().on_task_end(task)
        self._editable = []

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Two groups: the task's scores (the optimizer's ``lr``) and the weights (``weight_lr``, no decay).

        Parameters of the inactive phase have ``requires_grad=False``, hence no gradient, and are skipped.
        """
        h, task = self.hparams, int(self.current_task)
        layers = self.masked_layers()
        return [{"params": [layer.scores[task] for layer in layers]},
                {"params": [layer.weight for layer in layers], "lr": h.weight_lr, "weight_decay": 0.0}]
