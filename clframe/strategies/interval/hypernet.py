"""A hypernetwork that maps a (point or interval) task embedding to every weight of a target network.

The hypernetwork is an MLP with ReLU hidden layers and no BatchNorm or dropout (hypnettorch's HMLP,
as used by HyperInterval). An interval embedding ``[e - eps, e + eps]`` is propagated by IBP
(:mod:`clframe.strategies.interval.ibp`), giving a box of target weights ``[theta_L, theta_U]``
whose midpoint is ``theta_M`` (the midpoint of the propagated box, not ``H(e)``).

Chunked generation (``chunk_size``): instead of one output layer with ``hidden x n_weights`` entries
(180 M parameters for the 1000-1000 Permuted-MNIST MLP), the network produces the weights
``chunk_size`` at a time from ``[embedding, chunk embedding]`` (von Oswald et al. 2020, ``ChunkedHMLP``);
the learnable chunk embeddings are points, so the interval comes from the task embedding alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from clframe.strategies.interval import ibp
from clframe.strategies.interval.ibp import Bound, Interval


class HyperNetwork(nn.Module):
    """MLP ``embedding -> flat target weights``, for point or interval embeddings.

    Args:
        num_outputs: number of target weights to generate.
        embedding_dim: size of the task embedding (the conditional input).
        hidden_sizes: ReLU hidden layers.
        chunk_size: generate the weights in chunks of this size (None: all at once).
        chunk_emb_dim: size of each chunk's learnable embedding.
    """

    def __init__(self, num_outputs: int, embedding_dim: int, hidden_sizes: Sequence[int] = (100, 100),
                 chunk_size: int | None = None, chunk_emb_dim: int = 8) -> None:
        super().__init__()
        if num_outputs < 1 or embedding_dim < 1:
            raise ValueError(f"num_outputs and embedding_dim must be positive, got {num_outputs}, {embedding_dim}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive (or None for no chunking), got {chunk_size}")
        self.num_outputs, self.embedding_dim = num_outputs, embedding_dim
        self.chunk_size = chunk_size
        if chunk_size is not None:
            n_chunks = math.ceil(num_outputs / chunk_size)
            self.chunk_embeddings = nn.Parameter(torch.randn(n_chunks, chunk_emb_dim))
        width = embedding_dim + (chunk_emb_dim if chunk_size is not None else 0)
        layers: list[nn.Linear] = []
        for h in hidden_sizes:
            layers.append(nn.Linear(width, h))
            width = h
        layers.append(nn.Linear(width, chunk_size if chunk_size is not None else num_outputs))
        self.layers = nn.ModuleList(layers)

    def forward(self, embedding: Bound) -> Bound:
        """Target weights for embeddings of shape ``(M,)`` or ``(B, M)``: ``(num_outputs,)`` or ``(B, num_outputs)``."""
        single = embedding.centre.dim() == 1 if isinstance(embedding, Interval) else embedding.dim() == 1
        h: Bound = _unsqueeze(embedding) if single else embedding
        if self.chunk_size is not None:
            h = self._with_chunks(h)
        for i, layer in enumerate(self.layers):
            h = ibp.linear(h, layer.weight, layer.bias)
            if i < len(self.layers) - 1:
                h = ibp.relu(h)
        if self.chunk_size is not None:  # (B, chunks, chunk_size) -> (B, num_outputs)
            h = _map(h, lambda t: t.flatten(1)[:, : self.num_outputs])
        return _map(h, lambda t: t[0]) if single else h

    def _with_chunks(self, e: Bound) -> Bound:
        """``(B, M)`` embeddings -> ``(B, chunks, M + C)`` inputs, one per chunk (chunk embeddings are points)."""
        b, n = (e.centre if isinstance(e, Interval) else e).shape[0], self.chunk_embeddings.shape[0]
        chunks = self.chunk_embeddings.unsqueeze(0).expand(b, -1, -1)
        if not isinstance(e, Interval):
            return torch.cat([e.unsqueeze(1).expand(-1, n, -1), chunks], dim=2)
        return Interval(torch.cat([e.centre.unsqueeze(1).expand(-1, n, -1), chunks], dim=2),
                        torch.cat([e.radius.unsqueeze(1).expand(-1, n, -1), torch.zeros_like(chunks)], dim=2))


def _map(x: Bound, fn) -> Bound:
    return Interval(fn(x.centre), fn(x.radius)) if isinstance(x, Interval) else fn(x)


def _unsqueeze(x: Bound) -> Bound:
    return _map(x, lambda t: t.unsqueeze(0))


# --------------------------------------------------------------------------------------------- target networks
def target_mlp(input_shape: Sequence[int], num_outputs: int, hidden_sizes: Sequence[int] = (400, 400),
               input_nonneg: bool = True) -> ibp.IntervalSequential:
    """Flatten -> (Linear -> ReLU)* -> Linear, every weight supplied from outside (HyperInterval's MNIST MLP)."""
    layers: list[ibp.IntervalLayer] = [ibp.IntervalFlatten()]
    width = math.prod(input_shape)
    for h in hidden_sizes:
        layers += [ibp.IntervalLinear(width, h, own_params=False), ibp.IntervalReLU()]
        width = h
    layers.append(ibp.IntervalLinear(width, num_outputs, own_params=False))
    return ibp.IntervalSequential(*layers, input_nonneg=input_nonneg)


def target_cnn(input_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (32, 64),
               hidden_sizes: Sequence[int] = (), input_nonneg: bool = True) -> ibp.IntervalSequential:
    """(Conv3x3 -> ReLU -> MaxPool2)* -> Flatten -> (Linear -> ReLU)* -> Linear, weights from outside."""
    c, height, width = input_shape
    layers: list[ibp.IntervalLayer] = []
    for ch in channels:
        layers += [ibp.IntervalConv2d(c, ch, 3, padding=1, own_params=False), ibp.IntervalReLU(),
                   ibp.IntervalMaxPool2d(2)]
        c, height, width = ch, height // 2, width // 2
    layers.append(ibp.IntervalFlatten())
    features = c * height * width
    for h in hidden_sizes:
        layers += [ibp.IntervalLinear(features, h, own_params=False), ibp.IntervalReLU()]
        features = h
    layers.append(ibp.IntervalLinear(features, num_outputs, own_params=False))
    return ibp.IntervalSequential(*layers, input_nonneg=input_nonneg)


TARGETS = {"mlp": target_mlp, "cnn": target_cnn}

