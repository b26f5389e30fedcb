"""InTAct: interval-based task activation consolidation (Krukowski et al. 2025), for any strategy.

After each task, InTAct records a box ``[l, u]`` of the activations that enter chosen linear layers
(per-neuron 5th/95th percentiles of the finished task's *training* data, merged with the earlier
boxes by union). While later tasks train, four terms keep the function fixed on the old boxes and
free elsewhere:

- ``Var``: mean per-neuron batch variance of the activations (keeps the boxes small; also on task 0);
- ``IntDrift``: the exact range ``[lo, hi]`` of the change of each protected layer's output over the
  old box, from the weight change ``dW = W - W0`` (interval arithmetic, no sampling):
  ``lo = relu(dW) l - relu(-dW) u + db``, ``hi = relu(dW) u - relu(-dW) l + db``,
  ``L_int = mean(lo^2) + mean(hi^2)``;
- ``Feat``: squared drift of the first protected layer's inputs against the frozen copy of the
  network from before the task, counted only where the current activation lies inside the box;
- ``Align``: on the dimensions where the batch's activation box does not overlap the old box, the
  distance between the two box centres, relative to the old box's mean half-width.

``L = L_task + lambda_var L_var + lambda_int L_int + lambda_feat L_feat + [align] L_align``.

The "interval layer" of the paper is a pass-through, so here it is an observer: a forward pre-hook
on each protected ``nn.Linear`` records its input; the network is not rebuilt and any strategy
carries InTAct by ``intact=InTActConfig(...)`` (``--model.intact='{lambda_var: 0.01}'``).
Protected layers: every trainable backbone ``nn.Linear`` but the first (the input layer is guarded by
Feat), plus the head in domain-incremental streams (where the head is shared) or when asked. In
class- and task-incremental streams the head's weights are not protected (past classes are masked
instead), but its input is still observed: Var and Align cover it, as in the reference code. Feat compares against a frozen copy of the *backbone*; strategies whose features
are not ``backbone(x)`` (prompt methods: prompts live outside the backbone) should set
``lambda_feat=0`` until their old-prompt feature path is wired in. The MLP version of the paper uses leaky-ReLU: ``backbone_kwargs: {activation: leaky_relu}``.

Choices against the reference code: boxes from training data, not the test split; the
loss is ``CE + regs`` (the reference's PromptInTAct counts CE twice); each term at its stated scope.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from clframe.data.stream import Task, passthrough_collate, without_augmentation
from clframe.errors import ConfigError

if TYPE_CHECKING:
    from clframe.strategies.base import ContinualModule


@dataclass
class InTActConfig:
    """InTAct's weights and switches (defaults: the reference MLP plugin's constructor values).

    Attributes:
        lambda_var, lambda_int, lambda_feat: weights of the Var, IntDrift and Feat terms.
        align: add the Align term (weight 1).
        lower_percentile, upper_percentile: the per-neuron box from the finished task's activations.
        layers: which linear layers IntDrift protects: ``hidden`` (backbone linears after the
            first), ``head``, ``all`` (both); ``None``: ``hidden``, plus ``head`` in domain-incremental
            streams.
        observe_head_input: when IntDrift leaves the head out, still take its input into Var and Align
            (and into Feat when it is the only observed layer), as the reference does for the interval
            layer in front of the classifier; ``False`` gives clframe's behaviour before this was fixed.
        box_batch_size: batch size of the task-end pass that records the boxes.
    """

    lambda_var: float = 0.01
    lambda_int: float = 1.0
    lambda_feat: float = 1.0
    align: bool = True
    lower_percentile: float = 5.0
    upper_percentile: float = 95.0
    layers: Literal["hidden", "head", "all"] | None = None
    observe_head_input: bool = True
    box_batch_size: int = 512

    def __post_init__(self) -> None:
        if min(self.lambda_var, self.lambda_int, self.lambda_feat) < 0:
            raise ConfigError("InTAct's lambda_var, lambda_int and lambda_feat must be non-negative")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ConfigError(
                f"InTAct needs 0 <= lower_percentile < upper_percentile <= 100, got "
                f"{self.lower_percentile} and {self.upper_percentile}")
        if self.layers not in (None, "hidden", "head", "all"):
            raise ConfigError(f"InTAct layers must be hidden, head or all, got {self.layers!r}")


def interval_output_change(delta_w: Tensor, delta_b: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Exact bounds ``[lo, hi]`` of ``dW a + db`` over the box ``lower <= a <= upper`` (per output unit)."""
    pos, neg = delta_w.clamp(min=0), (-delta_w).clamp(min=0)
    lo = pos @ lower - neg @ upper + delta_b
    hi = pos @ upper - neg @ lower + delta_b
    return lo, hi


def percentile(values: Tensor, q: float) -> Tensor:
    """Per-column ``q``-th percentile with linear interpolation (``torch.quantile`` caps its input size)."""
    ordered = values.sort(dim=0).values
    pos = (len(ordered) - 1) * q / 100.0
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[low] + (pos - low) * (ordered[high] - ordered[low])


class IntervalActivation(nn.Module):
    """The activation box of one layer's input, and the training batch's activations the losses read."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("lower", torch.zeros(features))
        self.register_buffer("upper", torch.zeros(features))
        self.register_buffer("has_box", torch.tensor(False))
        self.batch: list[Tensor] = []
        self.recorded: list[Tensor] | None = None
        self.capturing = False

    def observe(self, activations: Tensor) -> None:
        a = activations.flatten(1)
        if self.recorded is not None:
            self.recorded.append(a.detach())
        elif self.capturing and torch.is_grad_enabled() and activations.requires_grad:  # not teachers
            self.batch.append(a)

    def take_batch(self) -> Tensor | None:
        batch, self.batch, self.capturing = self.batch, [], False
        return torch.cat(batch) if batch else None

    def merge_recorded(self, lower_q: float, upper_q: float) -> None:
        """Box of the recorded activations, merged into the stored box by union (boxes only grow)."""
        values = torch.cat(self.recorded).float()
        self.recorded = None
        lower, upper = percentile(values, lower_q), percentile(values, upper_q)
        if bool(self.has_box):
            lower, upper = torch.minimum(lower, self.lower), torch.maximum(upper, self.upper)
        self.lower.copy_(lower)
        self.upper.copy_(upper)
        self.has_box.fill_(True)


class InTAct(nn.Module):
    """The regulariser: observers on the protected layers, old weights, the frozen network, the terms."""

    def __init__(self, config: InTActConfig) -> None:
        super().__init__()
        self.config = config
        self.intervals = nn.ModuleList()
        self.layer_names: list[str] = []
        self.drift: list[bool] = []  # per observed layer: whether IntDrift protects its weights
        self.old_network: nn.Module | None = None
        self._inputs: list[Tensor] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.last_terms: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ wiring
    def attach(self, module: ContinualModule) -> None:
        """Find the protected linear layers of ``module`` and hook them (called when the network is built)."""
        cfg = self.config
        layers = cfg.layers or ("all" if module.scenario == "domain" else "hidden")
        names: list[str] = []
        if layers in ("hidden", "all"):  # trainable ones only: a frozen backbone (prompt methods) cannot drift
            linears = [f"backbone.{n}" for n, m in module.backbone.named_modules()
                       if isinstance(m, nn.Linear) and m.weight.requires_grad]
            names += linears[1:]
        drift = [True] * len(names)
        if layers in ("head", "all"):
            if not isinstance(module.head, nn.Linear):
                raise ConfigError("InTAct protects the head only when it is one nn.Linear")
            names.append("head")
            drift.append(True)
        elif cfg.observe_head_input and isinstance(module.head, nn.Linear):
            names.append("head")  # the head's input enters Var, Align (and Feat when first), not IntDrift
            drift.append(False)
        if not names:
            raise ConfigError(
                "InTAct found no linear layer to protect: the backbone has fewer than two nn.Linear layers. "
                "Use intact.layers='head' (or 'all') to protect the classifier, or an MLP backbone.")
        self.layer_names, self.drift = names, drift
        if cfg.lambda_feat > 0:  # copied before the observers are hooked in: the copy must not report to them
            self.old_network = copy.deepcopy(module.backbone).requires_grad_(False)
        for i, name in enumerate(names):
            linear = module.get_submodule(name)
            self.intervals.append(IntervalActivation(linear.in_features))
            self.register_buffer(f"old_weight_{i}", linear.weight.detach().clone())
            self.register_buffer(f"old_bias_{i}", linear.bias.detach().clone() if linear.bias is not None
                                 else torch.zeros(linear.out_features))
            self._hooks.append(linear.register_forward_pre_hook(self._observer(i)))
        self._hooks.append(module.backbone.register_forward_pre_hook(self._input_observer))

    def train(self, mode: bool = True) -> InTAct:
        """The frozen copy of the network stays in eval mode (no dropout, fixed batch-norm statistics) whatever
        mode its owner switches to."""
        super().train(mode)
        if self.old_network is not None:
            self.old_network.eval()
        return self

    def _observer(self, i: int):
        def hook(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            self.intervals[i].observe(args[0])
        return hook

    def _input_observer(self, _: nn.Module, args: tuple[Tensor, ...]) -> None:
        if self.intervals[0].capturing and torch.is_grad_enabled():
            self._inputs.append(args[0].detach())

    def begin_step(self) -> None:
        """Observe the forwards of the coming training step (not Fisher passes, teachers or evaluation)."""
        self._inputs = []
        for ia in self.intervals:
            ia.batch, ia.capturing = [], True

    @property
    def active(self) -> bool:
        """Whether an earlier task left boxes (the drift terms apply from the second task on)."""
        return bool(self.intervals[0].has_box)

    # ------------------------------------------------------------------ task boundaries
    def on_task_start(self, module: ContinualModule, task: Task) -> None:
        """Freeze the weights the drift terms compare with (the network as the previous task left it)."""
        for i, name in enumerate(self.layer_names):
            linear = module.get_submodule(name)
            getattr(self, f"old_weight_{i}").copy_(linear.weight.detach())
            if linear.bias is not None:
                getattr(self, f"old_bias_{i}").copy_(linear.bias.detach())
        if self.old_network is not None:
            self.old_network.load_state_dict(module.backbone.state_dict())
            self.old_network.eval()

    @torch.no_grad()
    def on_task_end(self, module: ContinualModule, task: Task) -> None:
        """Record the boxes from the finished task's training data (eval mode, no augmentation)."""
        data = without_augmentation(task.train)
        was_training = module.training
        module.eval()
        for ia in self.intervals:
            ia.recorded = []
        try:
            loader = DataLoader(data, batch_size=self.config.box_batch_size, shuffle=False,
                                collate_fn=passthrough_collate)
            for x, _, t in loader:
                module(x.to(module.device), t.to(module.device))
            for ia in self.intervals:
                ia.merge_recorded(self.config.lower_percentile, self.config.upper_percentile)
        finally:
            for ia in self.intervals:
                ia.recorded = None
            module.train(was_training)

    def box_widths(self) -> list[float]:
        """Mean box width per protected layer (worth watching: wide boxes mean stiff training)."""
        return [float((ia.upper - ia.lower).mean()) for ia in self.intervals]

    # ------------------------------------------------------------------ the loss
    def penalty(self, module: ContinualModule) -> Tensor:
        """The InTAct terms for the training forwards since the last call (then forgotten)."""
        cfg = self.config
        acts = [ia.take_batch() for ia in self.intervals]
        inputs, self._inputs = self._inputs, []
        zero = module.head.weight.new_zeros(())
        terms = {"var": zero, "int": zero, "feat": zero, "align": zero}
        if acts[0] is None:
            return zero
        terms["var"] = sum((a.var(dim=0, unbiased=False).mean() for a in acts if a is not None and len(a) > 1), zero)
        if self.active:
            for i, (name, ia) in enumerate(zip(self.layer_names, self.intervals, strict=True)):
                if self.drift[i]:
                    linear = module.get_submodule(name)
                    db = (linear.bias - getattr(self, f"old_bias_{i}")) if linear.bias is not None else 0.0
                    lo, hi = interval_output_change(linear.weight - getattr(self, f"old_weight_{i}"), db,
                                                    ia.lower, ia.upper)
                    terms["int"] = terms["int"] + lo.pow(2).mean() + hi.pow(2).mean()
                if cfg.align and acts[i] is not None:
                    terms["align"] = terms["align"] + self._align(acts[i], ia)
            if cfg.lambda_feat > 0 and inputs:
                terms["feat"] = self._feature_drift(acts[0], torch.cat(inputs))
        self.last_terms = {k: v.detach() for k, v in terms.items()}  # tensors: no host sync per step
        if module._trainer is not None and module.step_metrics_wanted():
            module.log_dict({f"train/intact_{k}": v for k, v in self.last_terms.items()}, on_step=True, on_epoch=False)
        return (cfg.lambda_var * terms["var"] + cfg.lambda_int * terms["int"] + cfg.lambda_feat * terms["feat"]
                + terms["align"])

    def _feature_drift(self, current: Tensor, inputs: Tensor) -> Tensor:
        """``sum(M (A_old - A)^2) / (sum(M) + 1e-8)``, M: current activation inside the old box."""
        ia = self.intervals[0]
        ia.recorded = []  # run the frozen network with the first observer recording its input
        hook = self._old_observer()
        try:
            with torch.no_grad():
                self.old_network(inputs)
            old = torch.cat(ia.recorded)
        finally:
            ia.recorded = None
            hook.remove()
        if old.shape != current.shape:  # forwards the observers saw that did not start at the backbone
            return current.new_zeros(())
        inside = ((current >= ia.lower) & (current <= ia.upper)).to(current.dtype).detach()
        return (inside * (old - current).pow(2)).sum() / (inside.sum() + 1e-8)

    def _old_observer(self) -> torch.utils.hooks.RemovableHandle:
        """Hook the frozen network's copy of the first protected layer (its input is A_old)."""
        name = self.layer_names[0]
        if name == "head":  # the head's input is the backbone's output: observe that instead
            return self.old_network.register_forward_hook(lambda _m, _a, out: self.intervals[0].recorded.append(
                out.flatten(1).detach()))
        layer = self.old_network.get_submodule(name.removeprefix("backbone."))
        return layer.register_forward_pre_hook(lambda _m, args: self.intervals[0].recorded.append(
            args[0].flatten(1).detach()))

    @staticmethod
    def _align(acts: Tensor, ia: IntervalActivation) -> Tensor:
        """Distance between the batch box's and the old box's centres on the dimensions where they do not
        overlap, relative to the old box's mean half-width."""
        low, high = acts.min(dim=0).values, acts.max(dim=0).values
        apart = ((low > ia.upper) | (high < ia.lower)).detach()
        if not bool(apart.any()):
            return acts.new_zeros(())
        centre_new, centre_old = (low + high) / 2, (ia.lower + ia.upper) / 2
        return (centre_new - centre_old)[apart].norm() / ((ia.upper - ia.lower).mean() / 2 + 1e-8)
