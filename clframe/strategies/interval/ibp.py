"""Interval bound propagation (IBP) in centre/radius form: functions plus small modules.

A box is an :class:`Interval` ``[centre - radius, centre + radius]`` (element-wise, ``radius >= 0``);
a plain tensor is a point (a box of radius 0). Every function takes points or intervals for both the
input and the weights and returns the tightest of the cheap sound bounds for that combination
(``docs/methods/interval.md``):

* point weights, interval input: ``y_c = W x_c + b``, ``y_r = |W| x_r`` (exact per layer);
* interval weights, point input: ``y_c = W_c x + b_c``, ``y_r = W_r |x| + b_r`` (exact per layer);
* interval weights, interval input known to be non-negative (after ReLU, pixels in [0, 1]):
  ``y_L = W_L⁺ x_L + W_L⁻ x_U + b_L``, ``y_U = W_U⁺ x_U + W_U⁻ x_L + b_U`` (exact per product);
* interval weights, general interval input: the midpoint-radius product (Rump 1999)
  ``y_c = W_c x_c + b_c``, ``y_r = |W_c| x_r + W_r (|x_c| + x_r) + b_r``, sound for any signs.

Soundness: for any weights and inputs inside their boxes the real output lies inside the returned box.
The modules know whether their input is non-negative statically (``IntervalSequential`` tracks it
through ReLU, pooling and flattening), so choosing the formula never syncs with the device.
The functions are shared by HyperInterval (interval weights from a hypernetwork) and InTAct
(point weights, interval activations); modules either own point parameters or take weights per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Interval(NamedTuple):
    """A box ``[centre - radius, centre + radius]``; ``radius`` must be non-negative."""

    centre: Tensor
    radius: Tensor

    @property
    def lower(self) -> Tensor:
        return self.centre - self.radius

    @property
    def upper(self) -> Tensor:
        return self.centre + self.radius

    @classmethod
    def from_bounds(cls, lower: Tensor, upper: Tensor) -> Interval:
        return cls((upper + lower) / 2, (upper - lower) / 2)


Bound = Tensor | Interval
"""A point (plain tensor) or an interval."""


def as_interval(x: Bound) -> Interval:
    return x if isinstance(x, Interval) else Interval(x, torch.zeros_like(x))


def _bilinear(op: Callable[[Tensor, Tensor], Tensor], x: Bound, w: Bound, nonneg: bool) -> Bound:
    """Bounds of ``op(x, w)`` for an operator linear in each argument (matmul, convolution)."""
    if not isinstance(w, Interval):
        if not isinstance(x, Interval):
            return op(x, w)
        return Interval(op(x.centre, w), op(x.radius, w.abs()))
    if not isinstance(x, Interval):
        return Interval(op(x, w.centre), op(x.abs(), w.radius))
    if nonneg:
        wl, wu, xl, xu = w.lower, w.upper, x.lower, x.upper
        lower = op(xl, wl.clamp(min=0)) + op(xu, wl.clamp(max=0))
        upper = op(xu, wu.clamp(min=0)) + op(xl, wu.clamp(max=0))
        return Interval.from_bounds(lower, upper)
    centre = op(x.centre, w.centre)
    radius = op(x.radius, w.centre.abs()) + op(x.centre.abs() + x.radius, w.radius)
    return Interval(centre, radius)


def _add_bias(y: Bound, b: Bound | None) -> Bound:
    if b is None:
        return y
    if not isinstance(y, Interval) and not isinstance(b, Interval):
        return y + b
    y, b = as_interval(y), as_interval(b)
    return Interval(y.centre + b.centre, y.radius + b.radius)


def linear(x: Bound, weight: Bound, bias: Bound | None = None, nonneg: bool = False) -> Bound:
    """``x Wᵀ + b`` for points or intervals; ``nonneg`` promises ``x >= 0`` (tighter exact form)."""
    return _add_bias(_bilinear(F.linear, x, weight, nonneg), bias)


def conv2d(x: Bound, weight: Bound, bias: Bound | None = None, nonneg: bool = False, stride: int = 1,
           padding: int = 0) -> Bound:
    """2-D convolution for points or intervals (same rules as :func:`linear`)."""
    def op(a: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(a, w, stride=stride, padding=padding)
    y = _bilinear(op, x, weight, nonneg)
    if bias is None:
        return y
    b = Interval(bias.centre.view(-1, 1, 1), bias.radius.view(-1, 1, 1)) if isinstance(bias, Interval) else bias.view(-1, 1, 1)
    return _add_bias(y, b)


def monotone(fn: Callable[[Tensor], Tensor], x: Bound) -> Bound:
    """An element-wise non-decreasing function applied to both ends of the box (ReLU, sigmoid, tanh)."""
    if not isinstance(x, Interval):
        return fn(x)
    return Interval.from_bounds(fn(x.lower), fn(x.upper))


def relu(x: Bound) -> Bound:
    return monotone(F.relu, x)


def max_pool2d(x: Bound, kernel_size: int, stride: int | None = None) -> Bound:
    """Max pooling is monotone in every input, so it maps lower to lower and upper to upper."""
    return monotone(lambda t: F.max_pool2d(t, kernel_size, stride), x)


def avg_pool2d(x: Bound, kernel_size: int, stride: int | None = None) -> Bound:
    """Average pooling is linear with non-negative weights: pool the centre and the radius."""
    if not isinstance(x, Interval):
        return F.avg_pool2d(x, kernel_size, stride)
    return Interval(F.avg_pool2d(x.centre, kernel_size, stride), F.avg_pool2d(x.radius, kernel_size, stride))


def flatten(x: Bound, start_dim: int = 1) -> Bound:
    if not isinstance(x, Interval):
        return x.flatten(start_dim)
    return Interval(x.centre.flatten(start_dim), x.radius.flatten(start_dim))


def worst_case_logits(logits: Interval, target: Tensor) -> Tensor:
    """``z_worst[c] = z_L[c]`` for the true class, ``z_U[c]`` otherwise (the IBP worst case)."""
    true = F.one_hot(target, logits.centre.shape[-1]).bool()
    return torch.where(true, logits.lower, logits.upper)


# --------------------------------------------------------------------------------------------- modules
class IntervalLayer(nn.Module):
    """A layer that maps points or intervals; parametric layers own point weights or take them per call.

    ``param_shapes`` lists the shapes of the weights the layer needs from outside (empty when it owns
    them or has none); ``output_nonneg`` says whether the output is non-negative for a given input.
    """

    def param_shapes(self) -> list[torch.Size]:
        return []

    def output_nonneg(self, input_nonneg: bool) -> bool:
        return input_nonneg

    def forward(self, x: Bound, params: Sequence[Bound] = (), nonneg: bool = False) -> Bound:
        raise NotImplementedError


class _Parametric(IntervalLayer):
    """Shared parameter handling of Linear and Conv2d: own point weights, or weights given per call."""

    def __init__(self, weight_shape: tuple[int, ...], fan_in: int, bias: bool, own_params: bool) -> None:
        super().__init__()
        self.shapes = [torch.Size(weight_shape)] + ([torch.Size(weight_shape[:1])] if bias else [])
        self.own_params = own_params
        if own_params:
            bound = 1 / math.sqrt(fan_in)
            self.weight = nn.Parameter(torch.empty(weight_shape).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(weight_shape[0]).uniform_(-bound, bound)) if bias else None

    def param_shapes(self) -> list[torch.Size]:
        return [] if self.own_params else list(self.shapes)

    def output_nonneg(self, input_nonneg: bool) -> bool:
        return False

    def _weights(self, params: Sequence[Bound]) -> tuple[Bound, Bound | None]:
        if self.own_params:
            return self.weight, self.bias
        if len(params) != len(self.shapes):
            raise ValueError(f"{type(self).__name__} needs {len(self.shapes)} weight tensors, got {len(params)}")
        return params[0], params[1] if len(params) > 1 else None


class IntervalLinear(_Parametric):
    """Linear layer on points or intervals, with point (own) or interval (given) weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, own_params: bool = True) -> None:
        super().__init__((out_features, in_features), in_features, bias, own_params)

    def forward(self, x: Bound, params: Sequence[Bound] = (), nonneg: bool = False) -> Bound:
        return linear(x, *self._weights(params), nonneg=nonneg)


class IntervalConv2d(_Parametric):
    """2-D convolution on points or intervals, with point (own) or interval (given) weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, own_params: bool = True) -> None:
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), in_channels * kernel_size**2, bias,
                         own_params)
        self.stride, self.padding = stride, padding

    def forward(self, x: Bound, params: Sequence[Bound] = (), nonneg: bool = False) -> Bound:
        return conv2d(x, *self._weights(params), nonneg=nonneg, stride=self.stride, padding=self.padding)


class IntervalReLU(IntervalLayer):
    def output_nonneg(self, input_nonneg: bool) -> bool:
        return True

    def forward(self, x: Bound, params: Sequence[Bound] = (), nonneg: bool = False) -> Bound:
        return relu(x)


class IntervalMaxPool2d(IntervalLayer):
    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Bound, params: Sequence[Bound] = (), nonneg: bool = False) -> Bound:
        return max_pool2d(x, self.kernel_size, self.stride)


class IntervalAvgPool2d(IntervalMaxPool2d):
    def forward(self, x: Bound, params: Sequence[Bound] = (), nonneg: bool = False) -> Bound:
        return avg_pool2d(x, self.kernel_size, self.stride)


class IntervalFlatten(IntervalLayer):
    def forward(self, x: Bound, params: Sequence[Bound] = (), nonneg: bool = False) -> Bound:
        return flatten(x)


def split_flat(flat: Bound, shapes: Sequence[torch.Size]) -> list[Bound]:
    """Cut a flat weight vector (point or interval) into tensors of the given shapes (views, no copies)."""
    sizes = [math.prod(s) for s in shapes]
    if not isinstance(flat, Interval):
        return [p.view(s) for p, s in zip(flat.split(sizes), shapes, strict=True)]
    return [Interval(c.view(s), r.view(s)) for c, r, s in
            zip(flat.centre.split(sizes), flat.radius.split(sizes), shapes, strict=True)]


class IntervalSequential(nn.Module):
    """A chain of interval layers; ``forward(x, weights)`` takes every external weight as one flat vector.

    ``input_nonneg`` declares the input non-negative (e.g. pixels in [0, 1]), which selects the exact
    non-negative form in the first layer when both input and weights are intervals; after that the
    container tracks non-negativity itself.
    """

    def __init__(self, *layers: IntervalLayer, input_nonneg: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.input_nonneg = input_nonneg
        self._shapes = [layer.param_shapes() for layer in layers]

    def param_shapes(self) -> list[torch.Size]:
        return [s for shapes in self._shapes for s in shapes]

    @property
    def num_params(self) -> int:
        """Length of the flat weight vector ``forward`` expects."""
        return sum(math.prod(s) for s in self.param_shapes())

    def forward(self, x: Bound, weights: Bound | None = None) -> Bound:
        params = split_flat(weights, self.param_shapes()) if weights is not None else []
        if len(params) != len(self.param_shapes()):
            raise ValueError(f"this network needs {self.num_params} external weights; pass them as `weights`")
        nonneg, k = self.input_nonneg, 0
        for layer, shapes in zip(self.layers, self._shapes, strict=True):
            x = layer(x, params[k:k + len(shapes)], nonneg)
            nonneg, k = layer.output_nonneg(nonneg), k + len(shapes)
        return x
