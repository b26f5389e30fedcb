"""Virtual Outlier Regularisation (VOR) of OVOR (Huang et al., ICLR 2024), usable on any prompt strategy.

VOR fine-tunes only the head during the last ``epochs`` epochs of every task so the current task's logits
are high on real features and low on synthetic outliers just outside the task's feature clusters, which
reduces inter-task confusion in rehearsal-free class-incremental learning. At the start of every VOR
epoch:

1. ``z`` = prompted features of all current-task training images (augmented like training batches),
   detached;
2. NPOS outliers: ``ẑ = z / ||z||``; the ``select`` points with the largest K-th-nearest-neighbour
   distance among all current-task ``ẑ`` are the boundary points; ``sample_from`` candidates are drawn
   around each (``boundary + cov · N(0, I)``; ``outlier_center="origin"`` is the released code's
   ``cov · N(0, I)`` without the boundary point); the ``num_per_class · |C_t|`` candidates with the
   largest K-th-NN distance to the ``ẑ`` are kept;
3. every batch: ``CE_masked + λ [Huber(relu(E(z) − τ_id)) + Huber(relu(τ_ood − E(v)))]`` on the head only,
   with ``E(u) = −logsumexp`` over the current task's logits, ``v`` a share of the outliers
   (``max(1, N_ood // batches)`` per batch: the released code's share can be 0, which crashes its loader).

Outliers live in the normalised feature space; the head sees unnormalised real features (as in the
reference). The thresholds are tied to a ViT-B head's logit scale: retune them for other backbones from
the logged ``train/vor_energy_id`` and ``train/vor_energy_ood``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from clframe.errors import ConfigError


@dataclass
class VORConfig:
    """Switches and constants of VOR (defaults: the OVOR repository's ``configs/common.yaml``, CIFAR-100 schedule).

    Attributes:
        epochs: ``E2``, the last epochs of every task that train the head with VOR (``[0, 16, 4]`` on CIFAR-100,
            ``[0, 40, 10]`` on ImageNet-R, with ``trainer.epochs_per_task = warm + E1 + E2``).
        warmup_epochs: phase 0: the first epochs of tasks after the first train the head alone on detached features.
        weight: ``λ``.
        tau_id, tau_ood: energy thresholds ``τ_id``, ``τ_ood``.
        k: K of the K-th-nearest-neighbour distance.
        select: number of boundary points.
        sample_from: candidates drawn around each boundary point.
        cov: noise scale of the candidates.
        num_per_class: outliers kept per class of the task.
        outlier_center: ``boundary`` (paper) or ``origin`` (released code: noise only, near the origin).
        huber_delta: Huber's ``δ``.
        feature_batch_size: batch size of the feature pass at each VOR epoch start.
    """

    epochs: int = 4
    warmup_epochs: int = 0
    weight: float = 0.1
    tau_id: float = -15.0
    tau_ood: float = -3.0
    k: int = 50
    select: int = 50
    sample_from: int = 600
    cov: float = 0.1
    num_per_class: int = 40
    outlier_center: Literal["boundary", "origin"] = "boundary"
    huber_delta: float = 1.0
    feature_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.warmup_epochs < 0:
            raise ConfigError(f"vor.epochs must be at least 1 and vor.warmup_epochs non-negative, got "
                              f"{self.epochs} and {self.warmup_epochs}")
        if min(self.k, self.select, self.sample_from, self.num_per_class, self.feature_batch_size) < 1:
            raise ConfigError("vor.k, vor.select, vor.sample_from, vor.num_per_class and vor.feature_batch_size "
                              "must be positive")
        if self.outlier_center not in ("boundary", "origin"):
            raise ConfigError(f"vor.outlier_center must be 'boundary' or 'origin', got {self.outlier_center!r}")
        if self.cov <= 0 or self.weight < 0 or self.huber_delta <= 0:
            raise ConfigError("vor.cov and vor.huber_delta must be positive and vor.weight non-negative")


def energy(logits: Tensor, classes: Tensor) -> Tensor:
    """``E(u) = −logsumexp`` of the logits of ``classes`` (a boolean column mask): low on in-distribution inputs."""
    return -torch.logsumexp(logits[:, classes], dim=1)


def vor_loss(id_logits: Tensor, ood_logits: Tensor, classes: Tensor, tau_id: float, tau_ood: float,
             delta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The VOR term ``Huber(relu(E(z) − τ_id)) + Huber(relu(τ_ood − E(v)))`` (batch means), and both energies."""
    e_id, e_ood = energy(id_logits, classes), energy(ood_logits, classes)
    over = F.relu(e_id - tau_id)
    under = F.relu(tau_ood - e_ood)
    term = F.huber_loss(over, torch.zeros_like(over), delta=delta) + F.huber_loss(under, torch.zeros_like(under), delta=delta)
    return term, e_id.detach(), e_ood.detach()


def kth_nn_distance(points: Tensor, reference: Tensor, k: int, exclude_self: bool = False, chunk: int = 4096) -> Tensor:
    """Exact L2 distance of every point to its ``k``-th nearest reference point (chunked ``cdist``).

    ``exclude_self``: ``points`` is ``reference`` and a point is not its own neighbour.
    """
    n_ref = len(reference) - (1 if exclude_self else 0)
    if not 1 <= k <= n_ref:
        raise ConfigError(f"the K-th-nearest-neighbour distance needs 1 <= k <= {n_ref} neighbours, got k={k}")
    out = []
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start:start + chunk], reference)
        if exclude_self:
            rows = torch.arange(start, start + len(d), device=d.device)
            d[torch.arange(len(d), device=d.device), rows] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def npos_candidates(features: Tensor, k: int, select: int, sample_from: int, cov: float,
                    center: Literal["boundary", "origin"] = "boundary",
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, int]:
    """Candidates around the boundary of the normalised features.

    Returns ``(candidates (select · sample_from, D), normalised features, effective k)``; ``k`` and
    ``select`` are clipped to the number of features available.
    """
    z = F.normalize(features.float(), dim=1)
    n = len(z)
    if n < 2:
        raise ConfigError("VOR needs at least two training samples in the task")
    k = min(k, n - 1)
    select = min(select, n)
    boundary = z[kth_nn_distance(z, z, k, exclude_self=True).topk(select).indices]
    noise = torch.randn(select, sample_from, z.shape[1], generator=generator, device="cpu").to(z.device) * cov
    cand = noise + boundary[:, None] if center == "boundary" else noise
    return cand.reshape(-1, z.shape[1]), z, k


def select_outliers(candidates: Tensor, normalised: Tensor, k: int, keep: int) -> Tensor:
    """The ``keep`` candidates farthest (K-th-NN distance) from the normalised in-distribution features."""
    dist = kth_nn_distance(candidates, normalised, k)
    return candidates[dist.topk(min(keep, len(candidates))).indices]


def synthesize_outliers(features: Tensor, n_classes: int, cfg: VORConfig, generator: torch.Generator | None = None) -> Tensor:
    """NPOS virtual outliers of one task: ``cfg.num_per_class · n_classes`` points in the normalised feature space."""
    cand, z, k = npos_candidates(features, cfg.k, cfg.select, cfg.sample_from, cfg.cov, cfg.outlier_center, generator)
    return select_outliers(cand, z, k, cfg.num_per_class * n_classes)
