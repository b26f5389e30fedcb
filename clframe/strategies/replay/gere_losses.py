"""GeRe's replay losses in one place: label fitting (CE), logit imitation (KL), feature imitation
(L1, L2) and the threshold-margin loss (TM), plus the per-unit thresholds and the int8 band codes.

Every loss takes tensors shaped ``(..., units)`` with an optional boolean ``mask`` of shape ``(...)``
(valid tokens of padded text; ``None`` for images), so one implementation serves vision features
``(batch, d)`` and language-model hidden states ``(batch, length, d)`` alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

REPLAY_LOSSES = ("ce", "kl", "l1", "l2", "tm")
"""The loss names ``GeRe(replay_loss=...)`` accepts, combined with ``+`` (``"ce+tm"``)."""


def parse_replay_loss(spec: str) -> tuple[str, ...]:
    """``"ce+tm"`` -> ``("ce", "tm")``; ``"none"`` or ``""`` -> ``()`` (no replay)."""
    names = tuple(p.strip().lower() for p in spec.split("+") if p.strip() and p.strip().lower() != "none")
    unknown = [n for n in names if n not in REPLAY_LOSSES]
    if unknown:
        raise ValueError(f"unknown replay loss {unknown}; allowed: {', '.join(REPLAY_LOSSES)} joined by '+', or 'none'")
    if len(set(names)) != len(names):
        raise ValueError(f"replay loss {spec!r} names a loss twice")
    return names


def _valid(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of ``x`` (flattened to ``(n, units)``) at valid positions."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if mask is None else flat[mask.reshape(-1)]


# ---------------------------------------------------------------------------- thresholds and bands
def unit_thresholds(features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-unit ``(mu - sigma, mu + sigma)`` over every valid token/sample (population std, as the paper's
    ``sigma = sqrt(E[r^2] - mu^2)``), computed in float64 so large sets do not lose precision."""
    r = _valid(features, mask).double()
    mu = r.mean(0)
    sigma = (r.pow(2).mean(0) - mu.pow(2)).clamp(min=0).sqrt()
    return (mu - sigma).float(), (mu + sigma).float()


def band_codes(anchors: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """int8 band of each anchor element: +1 at or above ``hi``, -1 at or below ``lo``, 0 between.
    TM needs nothing else from the anchors, so this is an exact, 4x smaller cache than float32."""
    return (anchors >= hi).to(torch.int8) - (anchors <= lo).to(torch.int8)


# ---------------------------------------------------------------------------- losses
def threshold_margin(h: Tensor, bands: Tensor, lo: Tensor, hi: Tensor, mask: Tensor | None = None,
                     reduction: str = "violations") -> Tensor:
    """The three-band hinge: POS units must stay >= ``hi``, NEG units <= ``lo``, NEU units inside ``[lo, hi]``.

    ``reduction="violations"`` divides the summed hinge by the number of violating elements (the
    reference code; 0 when nothing violates), ``"all"`` by the number of valid elements.
    """
    pos, neg = bands == 1, bands == -1
    above, below = F.relu(h - hi), F.relu(lo - h)
    loss = torch.where(pos, F.relu(hi - h), torch.where(neg, F.relu(h - lo), above + below))
    if mask is not None:
        loss = loss * mask.unsqueeze(-1).to(loss.dtype)
    total = loss.sum()
    if reduction == "violations":
        return total / (loss != 0).sum().clamp(min=1)
    if reduction == "all":
        valid = h.shape[-1] * (mask.sum() if mask is not None else h.numel() // h.shape[-1])
        return total / valid
    raise ValueError(f"tm reduction must be 'violations' or 'all', got {reduction!r}")


def feature_distance(h: Tensor, ref: Tensor, p: int, mask: Tensor | None = None) -> Tensor:
    """Mean ``|h - ref|`` (p=1) or ``(h - ref)^2`` (p=2) over valid elements."""
    diff = _valid(h, mask) - _valid(ref, mask)
    return diff.abs().mean() if p == 1 else diff.pow(2).mean()


def logit_kl(logits: Tensor, ref_logits: Tensor, temperature: float = 2.0, mask: Tensor | None = None,
             t2_scale: bool = False) -> Tensor:
    """``KL(softmax(ref/T) || softmax(logits/T))`` summed over classes/vocabulary, averaged over valid
    positions (pads masked, unlike the reference function); ``t2_scale`` multiplies by ``T^2``."""
    s = F.log_softmax(_valid(logits, mask).float() / temperature, dim=-1)
    p = F.log_softmax(_valid(ref_logits, mask).float() / temperature, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1).mean()
    return kl * temperature**2 if t2_scale else kl


@dataclass
class ReplayOutputs:
    """What the current model produced on the replay part of a batch, and the stored references.

    ``ce`` is the replay label-fitting loss already reduced by the model's own loss (class CE for
    images, token CE for text); the rest are raw tensors. Fields a loss does not use may be ``None``.
    """

    ce: Tensor | None = None
    logits: Tensor | None = None
    features: Tensor | None = None
    mask: Tensor | None = None
    ref_logits: Tensor | None = None
    ref_features: Tensor | None = None
    bands: Tensor | None = None
    lo: Tensor | None = None
    hi: Tensor | None = None
    temperature: float = 2.0
    kl_t2_scale: bool = False
    tm_reduction: str = "violations"


ReplayLossFn = Callable[[ReplayOutputs], Tensor]
LOSS_FNS: dict[str, ReplayLossFn] = {
    "ce": lambda o: o.ce,
    "kl": lambda o: logit_kl(o.logits, o.ref_logits, o.temperature, o.mask, o.kl_t2_scale),
    "l1": lambda o: feature_distance(o.features, o.ref_features, 1, o.mask),
    "l2": lambda o: feature_distance(o.features, o.ref_features, 2, o.mask),
    "tm": lambda o: threshold_margin(o.features, o.bands, o.lo, o.hi, o.mask, o.tm_reduction),
}
"""Registry: loss name -> function of :class:`ReplayOutputs`. Add an entry to add a replay loss."""


def replay_loss_terms(names: tuple[str, ...], out: ReplayOutputs) -> dict[str, Tensor]:
    """Each selected loss on ``out``, by name."""
    return {n: LOSS_FNS[n](out) for n in names}
