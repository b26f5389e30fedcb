"""SupSup: Supermasks in Superposition (Wortsman, Ramanujan et al., NeurIPS 2020).

A random network with signed-constant weights is never trained; each task learns only a binary
supermask (its scores), so nothing shared changes and nothing is forgotten. When the task is not
given, all stored masks are superimposed with coefficients ``α_i = 1/k`` and one gradient of the
output entropy with respect to ``α`` picks the mask (``t̂ = argmin_i ∂H/∂α_i``).

clframe choices (see docs/methods/supermasks.md): the argmin runs over learned tasks only (``α`` has
one entry per stored mask, so an unlearned slot can never be picked); the default infers once per test batch from
its first ``inference_samples`` images, as the reference code does, and ``inference_scope="sample"``
infers every sample on its own (for mixed batches). The exhaustive per-mask entropy baseline is kept
(``task_inference="exhaustive"``). Scores are re-initialised at every task start (no score
transfer), so one score tensor per layer is kept instead of one per task.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.data.stream import Batch, Task
from clframe.errors import ConfigError
from clframe.optim import OptimizerArg
from clframe.strategies.supermask.base import SupermaskModule
from clframe.strategies.supermask.layers import MaskedLinear, MaskRule, MaskSource, er_density


class SupSup(SupermaskModule):
    """Fixed random network, one learned supermask per task, task inference by superposition.

    Args:
        density: fraction of weights kept by ``mask_rule="topk"`` (SupSup's ``--sparsity``, GG).
        er_sparsity: Erdős–Rényi layer-wise densities instead of one ``density``: each masked layer keeps
            ``min(0.5, er_sparsity * (fan_out + fan_in) / numel)`` of its weights (the official GG
            SplitCIFAR-100 configs, ``--er-sparsity`` with ``--sparsity`` 1..32). Needs ``mask_rule="topk"``.
        mask_rule: ``"topk"`` (GG scripts) or ``"threshold"`` (``S ≥ 0``; the GN MNIST scripts).
        head_outputs: total output units (the reference's ``--output-size``); the first ``num_classes``
            are real, the rest superfluous. Cross-entropy pushes superfluous units down on every
            task's data, which is what makes the entropy gradient informative for task inference.
        task_inference: how the task is found when it is not given: ``"oneshot"`` (one entropy
            gradient), ``"binary"`` (bisection: keep the candidates whose gradient is at or below the
            ``1/log_base`` quantile, repeat), or ``"exhaustive"`` (run every mask, lowest objective).
        inference_objective: ``"entropy"`` (H) or ``"g"`` (mean logsumexp with the real logits
            detached, so only superfluous units carry gradient).
        inference_scope: ``"batch"`` (one task per batch from its first ``inference_samples`` images)
            or ``"sample"`` (each sample on its own).
        inference_samples: images per batch used by ``inference_scope="batch"`` (reference: 1 for
            PermutedMNIST, 128 for RotatingMNIST).
        log_base: bisection keeps the lowest ``1/log_base`` of the candidates per step.
        infer_task_at_test: the accuracy matrix uses inferred task ids (scenario GNu); a sample only
            counts as correct when its task is also right (unshared labels). Given-task accuracy and
            task-inference accuracy are logged as ``test/given_task_acc`` and ``test/task_inference_acc``.
    """

    def __init__(self, density: float = 0.5, mask_rule: MaskRule = "topk", er_sparsity: float | None = None,
                 head_outputs: int | None = None,
                 task_inference: Literal["oneshot", "binary", "exhaustive"] = "oneshot",
                 inference_objective: Literal["entropy", "g"] = "entropy",
                 inference_scope: Literal["batch", "sample"] = "batch", inference_samples: int = 1,
                 log_base: int = 2, infer_task_at_test: bool = False,
                 optimizer: OptimizerArg = "adam", lr: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(density=density, optimizer=optimizer, lr=lr, **kwargs)
        if er_sparsity is not None and (er_sparsity <= 0 or mask_rule != "topk"):
            raise ConfigError(f"er_sparsity must be positive and needs mask_rule='topk', got er_sparsity={er_sparsity}, "
                              f"mask_rule={mask_rule!r}")
        if inference_samples < 1 or log_base < 2:
            raise ValueError(f"inference_samples must be ≥ 1 and log_base ≥ 2, got {inference_samples}, {log_base}")
        if task_inference == "exhaustive" and inference_objective == "g":
            raise ValueError("exhaustive inference compares entropies; the G objective is only meaningful as a "
                             "gradient (inference_objective='entropy' with task_inference='exhaustive')")
        self.task_inference_accuracy: list[float] = []
        self.given_task_accuracy: list[float] = []
        self.inferred_mask_accuracy: list[float] = []
        self._infer_counts: Tensor | None = None

    # ------------------------------------------------------------------ construction
    def layer_kwargs(self) -> dict[str, Any]:
        return {**super().layer_kwargs(), "rule": self.hparams.mask_rule}

    def build_head(self, num_features: int, num_classes: int) -> nn.Module:
        outputs = self.hparams.head_outputs or num_classes
        if outputs < num_classes:
            raise ValueError(f"head_outputs ({outputs}) must be at least the number of classes ({num_classes})")
        return MaskedLinear(num_features, outputs, n_tasks=self.hparams.n_tasks, **self.layer_kwargs())

    def _build(self, num_classes: int, input_shape: tuple[int, ...], scenario: str) -> None:
        super()._build(num_classes, input_shape, scenario)
        if self.hparams.er_sparsity is not None:  # derived from the shapes: a checkpoint rebuilds the same
            for layer in self.masked_layers():
                layer.density = er_density(layer.weight.shape, self.hparams.er_sparsity)

    def on_task_start(self, task: Task) -> None:
        """Fresh scores for the new task (the finished tasks keep their stored masks)."""
        super().on_task_start(task)
        with torch.no_grad():
            for layer in self.masked_layers():
                layer.scores[0].copy_(layer.fresh_scores())

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Batch) -> Tensor:
        """Cross-entropy over real (task-masked) and superfluous outputs."""
        x, y, t = batch
        out = self.task_outputs(x, t)
        n = len(self.class_task)
        return F.cross_entropy(torch.cat([self.mask_logits(out[:, :n], t), out[:, n:]], 1), y)

    # ------------------------------------------------------------------ task inference
    def task_objective(self, outputs: Tensor) -> Tensor:
        """Per-sample objective whose gradient w.r.t. the mask coefficients points at the task."""
        if self.hparams.inference_objective == "entropy":
            return -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
        real = torch.zeros(outputs.shape[1], dtype=torch.bool, device=outputs.device)
        real[: len(self.class_task)] = True
        return torch.where(real, outputs.detach(), outputs).logsumexp(1)

    def _alpha_gradient(self, x: Tensor, tasks: tuple[int, ...], alphas: Tensor) -> Tensor:
        alphas = alphas.detach().requires_grad_(True)
        out = self.network_forward(x, MaskSource("superposed", tasks[0], tasks=tasks, alphas=alphas))
        obj = self.task_objective(out)
        return torch.autograd.grad(obj.mean() if alphas.dim() == 1 else obj.sum(), alphas)[0]

    def _select(self, x: Tensor, tasks: tuple[int, ...]) -> Tensor:
        """Index into ``tasks`` per row of ``x`` (scope ``sample``) or one index (scope ``batch``)."""
        k, per_sample = len(tasks), self.hparams.inference_scope == "sample"
        method = self.hparams.task_inference
        if method == "exhaustive":
            with torch.no_grad():
                obj = torch.stack([self.task_objective(self.network_forward(x, MaskSource("stored", t)))
                                   for t in tasks])  # (k, n)
            return obj.argmin(0) if per_sample else obj.mean(1).argmin()
        shape = (len(x), k) if per_sample else (k,)
        alive = torch.ones(shape, dtype=torch.bool, device=x.device)
        while True:
            alphas = alive.float() / alive.sum(-1, keepdim=True)
            grad = self._alpha_gradient(x, tasks, alphas).masked_fill(~alive, torch.inf)
            if method == "oneshot":
                return grad.argmin(-1)
            # bisection: keep the survivors at or below the ((n_alive - 1) // log_base)-th smallest gradient
            n_alive = alive.sum(-1, keepdim=True)
            cut = grad.sort(-1).values.gather(-1, (n_alive - 1) // self.hparams.log_base)
            shrunk = alive & (grad <= cut)
            if bool((shrunk.sum(-1) <= 1).all()) or torch.equal(shrunk, alive):  # done, or ties stop progress
                return grad.masked_fill(~shrunk, torch.inf).argmin(-1)
            alive = shrunk

    def infer_tasks(self, x: Tensor) -> Tensor:
        """Task ids for a batch of (uint8 or float) inputs, chosen among the learned tasks only."""
        learned = tuple(self.learned_tasks())
        if not learned:
            raise RuntimeError("no task has been learned yet, so there is no mask to infer")
        if len(learned) == 1:
            return torch.full((len(x),), learned[0], dtype=torch.long, device=x.device)
        batch_scope = self.hparams.inference_scope == "batch"
        # Lightning tests under inference_mode; the entropy gradient needs autograd on a normal copy.
        with torch.inference_mode(False), torch.enable_grad():
            xs = self.preprocess((x[: self.hparams.inference_samples] if batch_scope else x).clone())
            index = self._select(xs, learned)
        ids = torch.tensor(learned, device=x.device)[index]
        return ids.expand(len(x)).clone() if batch_scope else ids

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self) -> None:
        super()._eval_start()
        self._infer_counts = torch.zeros(4, self._task_accuracy.num_tasks, device=self.device)

    def _eval_step(self, batch: Batch) -> None:
        """Tests with inferred task ids when asked to; validation (model selection) keeps the given ids."""
        if not (self.hparams.infer_task_at_test and self.trainer.testing):
            return super()._eval_step(batch)
        x, y, t = batch
        t_hat = self.infer_tasks(x)
        right_task = t_hat == t
        preds = self(x, t_hat).argmax(1)
        class_right = preds == y
        correct = class_right & right_task
        given = self(x, t).argmax(1) == y
        n = self._task_accuracy.num_tasks

        def per_task(hits: Tensor) -> Tensor:
            return torch.bincount(t, weights=hits.to(self._infer_counts.dtype), minlength=n)[:n]

        total = per_task(torch.ones_like(correct))
        self.record_predictions(preds, y, t, correct=correct)
        self._infer_counts += torch.stack([per_task(right_task), per_task(given), per_task(class_right), total])

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if not self.hparams.infer_task_at_test:
            return
        counts = self.trainer.strategy.reduce(self._infer_counts, reduce_op="sum")
        seen = counts[3] > 0
        rates = counts[:3, seen] / counts[3, seen]
        self.task_inference_accuracy, self.given_task_accuracy = rates[0].tolist(), rates[1].tolist()
        # Shared labels (domain streams: every task uses the same real outputs): the class predicted with
        # the inferred mask, right or wrong task. Not the reference's GNu score: its scripts set
        # unshared_labels, so a wrongly inferred task counts as wrong, as in the accuracy matrix.
        self.inferred_mask_accuracy = rates[2].tolist()
        self.log_dict({"test/task_inference_acc": float(rates[0].mean()), "test/given_task_acc": float(rates[1].mean()),
                       "test/inferred_mask_acc": float(rates[2].mean())}, sync_dist=False)
