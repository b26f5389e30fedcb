"""Supermask layers: fixed-shape weights gated per task by binary masks learned through real scores.

A masked layer computes with ``W ⊙ M``. Where ``M`` comes from is described by a :class:`MaskSource`:
the *live* scores being trained (``M = h(S)`` with a straight-through estimator), the bit-packed
mask *stored* for a finished task, or a *superposition* ``Σ_i α_i M_i`` of stored masks (SupSup's
task inference). Stored masks are registered buffers (1 bit per weight per task), so they travel
in ``state_dict`` and checkpoints.

Conventions:
- ``density`` is the fraction of weights **kept**, per layer: ``⌊density · numel⌋`` entries of
  ``|S|`` (one exact-count rule for SupSup, WSN and ExSSNeT; WSN's percentile rule keeps one entry
  more at most).
- The top-k mask is computed from ``|S|`` and its gradient passes straight through to ``|S|``, so
  autograd multiplies by ``sign(S)`` on the way to ``S`` (without that factor the scores learn
  nothing useful).
- ``rule="threshold"`` is SupSup's GN/NN mask ``M = 1[S ≥ 0]`` (density free, ~50 % at init).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

MaskRule = Literal["topk", "threshold"]
WeightInit = Literal["signed_constant", "kaiming"]
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- masks
def topk_mask(scores: Tensor, density: float) -> Tensor:
    """Boolean mask of the ``⌊density · numel⌋`` largest entries of ``scores`` (at least one).

    On the CPU NumPy's introselect (``argpartition``) replaces ``torch.topk``: it is 2-5x faster on
    layers of 10^4-10^5 weights, and this selection runs in every training step.
    """
    flat = scores.detach().flatten()
    n = flat.numel()
    k = max(1, math.floor(density * n + 1e-9))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        mask[torch.from_numpy(np.argpartition(flat.numpy(), n - k)[n - k:])] = True
    else:
        mask[flat.topk(k, sorted=False).indices] = True
    return mask.view_as(scores)


def er_density(weight_shape: Sequence[int], epsilon: float, cap: float = 0.5) -> float:
    """Erdős–Rényi layer-wise density: ``min(cap, epsilon * (fan_out + fan_in) / numel)``.

    ``fan_out``/``fan_in`` are the first two weight dimensions (channels for a convolution) and ``numel``
    counts the kernel too, so wide layers keep a smaller fraction than narrow ones; ``epsilon`` sets the
    overall budget (SupSup's ``--er-sparsity`` with ``--sparsity epsilon``, capped at one half there).
    """
    numel = math.prod(weight_shape)
    return min(cap, epsilon * (weight_shape[0] + weight_shape[1]) / numel)


class _TopK(torch.autograd.Function):
    """Edge-popup: forward the top-k mask, pass the gradient straight through (to ``|S|``)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, density: float) -> Tensor:
        return topk_mask(scores, density).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Threshold(torch.autograd.Function):
    """SupSup's GN mask ``1[S ≥ 0]`` with a straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor) -> Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def score_mask(scores: Tensor, rule: MaskRule, density: float) -> Tensor:
    """The differentiable float mask ``h(S)`` of the live scores."""
    if rule == "topk":
        return _TopK.apply(scores.abs(), density)
    return _Threshold.apply(scores)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte (most significant bit first)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat boolean tensor."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.flatten()[:numel].bool()


def binary_entropy(p: float) -> float:
    """``H₂(p)`` in bits: what an ideal entropy coder needs per weight for a mask of density ``p``."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def huffman_bits(counts: Sequence[int]) -> int:
    """Total length in bits of a Huffman code for symbols with these counts (1 bit each if only one)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) <= 1:
        return sum(heap)
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged  # every merge adds one bit to each symbol below it
        heapq.heappush(heap, merged)
    return total


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class MaskSource:
    """Which mask the masked layers apply in one forward pass.

    ``kind="live"``: the scores of ``slot`` (being trained); ``"stored"``: the stored mask of ``task``;
    ``"superposed"``: ``Σ_i alphas[..., i] · M_{tasks[i]}`` over stored masks, with ``alphas`` of shape
    ``(k,)`` (one superposition for the batch) or ``(batch, k)`` (one per sample). ``task`` also picks
    the per-task BatchNorm statistics.
    """

    kind: Literal["live", "stored", "superposed"]
    task: int
    slot: int = 0
    tasks: tuple[int, ...] = ()
    alphas: Tensor | None = None


# ---------------------------------------------------------------------------------------------- layers
class MaskedLayer(nn.Module):
    """Weights, score slots and bit-packed per-task masks; subclasses only say how to apply a weight.

    Args:
        weight_shape: shape of the weight tensor (no bias: a bias cannot be masked per task and would
            be shared state that changes old tasks).
        fan_in: fan-in used by the initialisations.
        n_tasks: number of stored-mask rows (one per task of the stream).
        score_slots: score tensors kept (1 for SupSup/WSN, ``n_tasks`` for ExSSNeT, whose knowledge
            transfer copies earlier scores).
        density: fraction of weights kept by ``rule="topk"``.
        rule: ``"topk"`` on ``|S|`` or ``"threshold"`` (``S ≥ 0``).
        weight_init: ``"signed_constant"`` (``±gain/√fan_in``, ReLU gain √2; SupSup, ExSSNeT) or
            ``"kaiming"`` (PyTorch's default kaiming-uniform with ``a = √5``; WSN, whose weights train).
    """

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, n_tasks: int, score_slots: int = 1,
                 density: float = 0.5, rule: MaskRule = "topk", weight_init: WeightInit = "signed_constant") -> None:
        super().__init__()
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density (fraction of weights kept) must be in (0, 1], got {density}")
        if rule not in ("topk", "threshold"):
            raise ValueError(f"rule must be 'topk' or 'threshold', got {rule!r}")
        self.density, self.rule, self.fan_in = float(density), rule, fan_in
        self.weight = nn.Parameter(torch.empty(weight_shape), requires_grad=False)
        self._init_weight(weight_init)
        self.scores = nn.ParameterList([nn.Parameter(self.fresh_scores()) for _ in range(score_slots)])
        self.register_buffer("packed_masks", torch.zeros(n_tasks, math.ceil(self.weight.numel() / 8), dtype=torch.uint8))
        self._stack_cache: tuple[tuple[int, ...], Tensor] | None = None
        self._live_cache: tuple[int, int, Tensor] | None = None  # (slot, scores version, float mask)

    def _init_weight(self, weight_init: WeightInit) -> None:
        if weight_init == "signed_constant":
            nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
            with torch.no_grad():
                self.weight.copy_(self.weight.sign() * math.sqrt(2.0) / math.sqrt(self.fan_in))
        elif weight_init == "kaiming":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"weight_init must be 'signed_constant' or 'kaiming', got {weight_init!r}")

    def fresh_scores(self) -> Tensor:
        """Scores ~ kaiming-uniform with ``a = √5``, i.e. U(−1/√fan_in, 1/√fan_in)."""
        scores = torch.empty_like(self.weight)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        return scores

    # ------------------------------------------------------------------ masks
    def live_mask(self, slot: int = 0) -> Tensor:
        """The current boolean mask of a score slot (no gradient)."""
        scores = self.scores[slot].detach()
        return topk_mask(scores.abs(), self.density) if self.rule == "topk" else scores >= 0

    def stored_mask(self, task: int) -> Tensor:
        """The stored boolean mask of ``task``, shaped like the weight."""
        return unpack_bits(self.packed_masks[task], self.weight.numel()).view_as(self.weight)

    def store_mask(self, task: int, mask: Tensor) -> None:
        self.packed_masks[task] = pack_bits(mask)
        self._stack_cache = None

    def _stacked(self, tasks: tuple[int, ...]) -> Tensor:
        """Float masks of ``tasks`` as a (k, numel) matrix, cached: superposition is then one GEMV."""
        cache = self._stack_cache
        if cache is None or cache[0] != tasks or cache[1].device != self.weight.device:
            with torch.inference_mode(False):
                rows = [unpack_bits(self.packed_masks[t], self.weight.numel()) for t in tasks]
                cache = (tasks, torch.stack(rows).to(self.weight.dtype))
            self._stack_cache = cache
        return cache[1]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._stack_cache = self._live_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ forward
    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _live(self, slot: int) -> Tensor:
        """The live float mask; cached while the scores are frozen (ExSSNeT's weight phase, evaluation)."""
        scores = self.scores[slot]
        if scores.requires_grad and torch.is_grad_enabled():
            return score_mask(scores, self.rule, self.density)
        cache = self._live_cache
        if cache is None or cache[:2] != (slot, scores._version) or cache[2].device != scores.device:
            with torch.inference_mode(False):  # a cache made during a test pass must serve training too
                cache = (slot, scores._version, self.live_mask(slot).to(scores.dtype))
            self._live_cache = cache
        return cache[2]

    def forward(self, x: Tensor, source: MaskSource) -> Tensor:
        if source.kind == "live":
            mask = self._live(source.slot)
        elif source.kind == "stored":
            mask = self.stored_mask(source.task).to(self.weight.dtype)
        else:
            stacked, alphas = self._stacked(source.tasks), source.alphas
            if alphas is None:
                raise ValueError("a superposed mask source needs alphas")
            if alphas.dim() == 2:  # one superposition per sample: k forwards, mixed per sample
                outs = torch.stack([self.apply_weight(x, self.weight * m.view_as(self.weight)) for m in stacked], 1)
                return (alphas.view(*alphas.shape, *[1] * (outs.dim() - 2)) * outs).sum(1)
            mask = (alphas @ stacked).view_as(self.weight)
        return self.apply_weight(x, self.weight * mask)


class MaskedLinear(MaskedLayer):
    """``y = x (W ⊙ M)ᵀ`` without bias."""

    def __init__(self, in_features: int, out_features: int, **kwargs: Any) -> None:
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), fan_in=in_features, **kwargs)

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, density={self.density}, rule={self.rule}"


class MaskedConv2d(MaskedLayer):
    """2-D convolution with ``W ⊙ M``, without bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 **kwargs: Any) -> None:
        self.stride, self.padding = stride, padding
        super().__init__((out_channels, in_channels, kernel_size, kernel_size),
                         fan_in=in_channels * kernel_size * kernel_size, **kwargs)

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, stride={self.stride}, padding={self.padding}, density={self.density}"


class TaskBatchNorm2d(nn.Module):
    """Non-affine BatchNorm with running statistics per task (shared statistics would change old tasks)."""

    def __init__(self, n_tasks: int, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(n_tasks, channels))
        self.register_buffer("running_var", torch.ones(n_tasks, channels))

    def forward(self, x: Tensor, source: MaskSource) -> Tensor:
        if source.kind == "superposed":
            raise ValueError("per-task BatchNorm has no statistics for a superposition of masks; "
                             "task inference needs a backbone without BatchNorm (e.g. the masked MLP)")
        t = source.task
        return F.batch_norm(x, self.running_mean[t], self.running_var[t], training=self.training,
                            momentum=self.momentum, eps=self.eps)


# ---------------------------------------------------------------------------------------------- backbones
class MaskedSequential(nn.Sequential):
    """A sequence whose masked layers and per-task BatchNorms receive the mask source."""

    num_features: int

    def forward(self, x: Tensor, source: MaskSource) -> Tensor:  # type: ignore[override]
        for module in self:
            x = module(x, source) if isinstance(module, MaskedLayer | TaskBatchNorm2d) else module(x)
        return x

    def masked_layers(self) -> list[MaskedLayer]:
        return [m for m in self if isinstance(m, MaskedLayer)]


def masked_mlp(input_shape: Sequence[int], n_tasks: int, hidden_sizes: Sequence[int] = (300, 100),
               **layer_kwargs: Any) -> MaskedSequential:
    """Flatten, then masked Linear + ReLU layers (LeNet-300-100 by default, FC1024 with [1024, 1024])."""
    return _with_masked_fc([nn.Flatten()], math.prod(input_shape), hidden_sizes, n_tasks, **layer_kwargs)


def masked_convnet(input_shape: Sequence[int], n_tasks: int, channels: Sequence[int] = (32, 64),
                   hidden_sizes: Sequence[int] = (256,), **layer_kwargs: Any) -> MaskedSequential:
    """3x3 masked convs, each with per-task non-affine BN, ReLU and 2x2 max-pool; then masked Linear + ReLU."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in channels:
        layers += [MaskedConv2d(c, out, 3, padding=1, n_tasks=n_tasks, **layer_kwargs), TaskBatchNorm2d(n_tasks, out),
                   nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    return _with_masked_fc([*layers, nn.Flatten()], c * h * w, hidden_sizes, n_tasks, **layer_kwargs)


def _with_masked_fc(layers: list[nn.Module], width: int, hidden_sizes: Sequence[int], n_tasks: int,
                    **layer_kwargs: Any) -> MaskedSequential:
    """``layers`` (ending in ``width`` features), then masked Linear + ReLU layers of ``hidden_sizes``."""
    for size in hidden_sizes:
        layers += [MaskedLinear(width, size, n_tasks=n_tasks, **layer_kwargs), nn.ReLU()]
        width = size
    net = MaskedSequential(*layers)
    net.num_features = width
    return net


MASKED_BACKBONES = {"mlp": masked_mlp, "conv": masked_convnet}
