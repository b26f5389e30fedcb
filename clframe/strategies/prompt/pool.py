"""Prompt containers shared by the prompt methods: key-query matching, batch voting, orthogonality.

Everything here is plain tensors and ``nn.Parameter``s; the strategies decide where prompts go.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.errors import ConfigError


def uniform_parameter(*shape: int, scale: float) -> nn.Parameter:
    """``U(0, scale)``: Flax's ``uniform()`` is ``scale = 0.01`` (official L2P), the PyTorch ports use ``scale = 1``."""
    return nn.Parameter(torch.rand(*shape) * scale)


def cosine_matrix(q: Tensor, keys: Tensor) -> Tensor:
    """``cos(q_b, k_i)`` for every query row and key row: ``(batch, n_keys)``."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).transpose(-2, -1)


def batch_vote(idx: Tensor, n_items: int, top: int) -> Tensor:
    """Majority vote of a batch's selections (the reference code's ``batchwise_prompt``).

    Every sample then uses the ``top`` items selected most often in the batch. It leaks task identity
    when an evaluation batch comes from one task, which is why clframe selects per sample by default.
    Ties go to the lower index (a stable, deterministic order).
    """
    counts = torch.bincount(idx.flatten(), minlength=n_items)
    order = torch.argsort(counts, descending=True, stable=True)[:top]
    return order.unsqueeze(0).expand(idx.shape[0], -1)


class PromptPool(nn.Module):
    """L2P's pool: ``M`` prompts of ``length`` tokens, each with a key; a query picks the ``top`` closest keys.

    Args:
        size: ``M``.
        length: ``L_p`` tokens per prompt.
        dim: token width.
        top: ``N`` prompts selected per sample.
        init_scale: prompts and keys start ``U(0, init_scale)``.
    """

    def __init__(self, size: int, length: int, dim: int, top: int, init_scale: float = 0.01) -> None:
        super().__init__()
        if not 1 <= top <= size:
            raise ConfigError(f"top_k must be between 1 and the pool size {size}, got {top}")
        if length < 1:
            raise ConfigError(f"prompt_length must be positive, got {length}")
        self.top = top
        self.prompts = uniform_parameter(size, length, dim, scale=init_scale)
        self.keys = uniform_parameter(size, dim, scale=init_scale)

    @property
    def size(self) -> int:
        return self.prompts.shape[0]

    def select(self, query: Tensor, batchwise: bool = False) -> tuple[Tensor, Tensor]:
        """Indices ``(batch, N)`` of the selected prompts and the cosine similarities ``(batch, M)``.

        The selection itself is not differentiable: keys learn only from the pull term computed on the
        returned similarities.
        """
        sim = cosine_matrix(query, self.keys)
        idx = sim.detach().topk(self.top, dim=1).indices
        if batchwise:
            idx = batch_vote(idx, self.size, self.top)
        return idx, sim

    def tokens(self, idx: Tensor) -> Tensor:
        """The selected prompts as one token block ``(batch, N * L_p, dim)``."""
        return self.prompts[idx].flatten(1, 2)


def ortho_penalty(rows: Tensor) -> Tensor:
    """CODA-P's ``O(B) = mean((B B^T - I)^2)`` over the rows in use (flattened beyond the first dimension)."""
    b = rows.flatten(1)
    gram = b @ b.T
    return (gram - torch.eye(len(b), device=b.device, dtype=b.dtype)).pow(2).mean()


@torch.no_grad()
def gram_schmidt_rows_(weight: Tensor, start: int, stop: int, generator: torch.Generator | None = None) -> None:
    """Redraw rows ``[start, stop)`` of ``weight`` (flattened beyond dim 0) Gaussian, orthogonal to every earlier
    row and to each other, and of unit norm; rows outside the block are untouched (in place).

    CODA-P does this at every task start for the new components, keys and attention vectors.
    """
    flat = weight.view(weight.shape[0], -1)
    if stop > flat.shape[1]:
        raise ConfigError(f"cannot make {stop} rows of width {flat.shape[1]} orthogonal: use fewer components "
                          "(pool_size) or wider rows")
    fresh = torch.randn(stop - start, flat.shape[1], generator=generator, dtype=torch.float64).to(flat.device)
    # earlier rows may have drifted from orthogonality while they trained: project against their span
    basis = torch.linalg.qr(flat[:start].double().T).Q.T if start else fresh.new_zeros(0, flat.shape[1])
    rows: list[Tensor] = []
    for r in fresh:
        for _ in range(2):  # twice: classical Gram-Schmidt loses orthogonality in one pass
            r = r - (basis @ r) @ basis
            for prev in rows:
                r = r - (prev @ r) * prev
        rows.append(r / r.norm())
    flat[start:stop] = torch.stack(rows).to(flat.dtype)
