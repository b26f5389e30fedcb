"""GeRe: general-samples replay (Zhang et al. 2025, arXiv 2508.04676), for image classifiers and causal LMs.

One small fixed *general* set (generic images or text, not downstream data) is replayed in every task
to keep the starting model's general capability. The replay loss is chosen in one place
(:mod:`clframe.strategies.replay.gere_losses`): label fitting (``ce``), logit imitation against the
frozen starting model (``kl``), feature imitation (``l1``, ``l2``) and the threshold-margin hinge
(``tm``), combined with ``+`` (``replay_loss="ce+tm"`` is the paper's method).

The "chosen layer" is the input of the general head: the pooled backbone features of an image model,
or the final hidden state after the final norm (the input of ``lm_head``) of a language model.
Anchors and per-unit thresholds ``mu +/- sigma`` come from the model at the start of the first task
and are computed once (``anchor="base"``); TM only needs each anchor element's band, stored as int8.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.data.general import GeneralReplaySampler, GeneralSet, build_general_set
from clframe.data.stream import Batch, TaskStream
from clframe.errors import ConfigError
from clframe.strategies.base import ContinualModule, frozen_copy
from clframe.strategies.replay.gere_losses import (
    ReplayOutputs,
    band_codes,
    parse_replay_loss,
    replay_loss_terms,
    unit_thresholds,
)


class GeRe(ContinualModule):
    """General-samples replay with a selectable replay loss.

    ``L = L_ce + sum_term w * L_term`` where ``L_ce`` is the task CE mixed with the replay CE (when
    ``ce`` is selected) and the terms are the selected ``kl``/``l1``/``l2``/``tm`` losses on the replay part.

    Args:
        general: the general set: a :class:`~clframe.data.general.GeneralSet` or a spec mapping for
            :func:`~clframe.data.general.build_general_set` (``{source: digits, n: 500}``,
            ``{text_file: text/wikitext-2/wiki.valid.tokens, n: 1000, max_length: 128}``).
        general_eval: held-out general data to score the general capability after every task
            (accuracy of the general head for images, perplexity for text); same forms as ``general``.
        replay_loss: ``"none"`` or loss names joined by ``+`` (``ce``, ``kl``, ``l1``, ``l2``, ``tm``).
        loss_weight: weight ``w`` of the non-CE terms: a number, or ``"dy"`` (``w = stopgrad(L_ce / L_term)``,
            so the term equals the CE term numerically; the paper's README setting).
        replays_per_batch: ``None``: natural share (every general sample once per epoch); ``k``: exactly
            ``k`` general samples per global batch (all DDP ranks together), added to the task batch.
        general_classes: size of a new general head for image backbones without a ``pretrained_head``
            (ignored for language models, whose general head is ``lm_head``).
        ce_mix: ``"sample"``: every sample's CE counts once (task and replay alike); ``"halve"``:
            ``(mean task CE + mean replay CE) / 2`` (the reference code's form).
        temperature, kl_t2_scale: the KL temperature; multiply the KL by ``T^2`` or not (reference: not).
        tm_reduction: ``"violations"`` (divide by violating elements, reference) or ``"all"``.
        anchor: ``"base"``: anchors of the starting model, once; ``"previous_task"``: recomputed at every
            task start (a different method, named as such).
        anchor_batch_size: batch size of the anchor and evaluation passes.
        freeze_bn: keep batch-norm statistics and dropout in eval mode while training (pretrained image
            backbones with small batches; also what makes TM exactly 0 at step 0 for BN networks).
        replay_seed: seed of the general sampler.
    """

    checkpointed_attributes = ("general_scores",)  # results so far; a resumed run must not re-take the first

    def __init__(
        self,
        general: dict[str, Any] | GeneralSet | None = None,
        general_eval: dict[str, Any] | GeneralSet | None = None,
        replay_loss: str = "ce+tm",
        loss_weight: float | str = "dy",
        replays_per_batch: int | None = None,
        general_classes: int | None = None,
        ce_mix: Literal["sample", "halve"] = "sample",
        temperature: float = 2.0,
        kl_t2_scale: bool = False,
        tm_reduction: Literal["violations", "all"] = "violations",
        anchor: Literal["base", "previous_task"] = "base",
        anchor_batch_size: int = 64,
        freeze_bn: bool = False,
        replay_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        self.replay_losses = parse_replay_loss(replay_loss)
        if isinstance(loss_weight, str) and loss_weight != "dy":
            try:
                loss_weight = float(loss_weight)
            except ValueError as err:
                raise ConfigError(f"loss_weight must be a number or 'dy', got {loss_weight!r}") from err
        if ce_mix not in ("sample", "halve") or anchor not in ("base", "previous_task"):
            raise ConfigError(f"ce_mix must be 'sample'|'halve' and anchor 'base'|'previous_task'; got {ce_mix!r}, {anchor!r}")
        if self.replay_losses and general is None:
            raise ConfigError(f"replay_loss={replay_loss!r} needs a general set (general=...)")
        super().__init__(**kwargs)
        for key, value in (("general", general), ("general_eval", general_eval)):
            if isinstance(value, GeneralSet):  # keep tensors out of the logged hyperparameters
                self.hparams[key] = self._hparams_initial[key] = f"<GeneralSet {value.name}, n={len(value)}>"
        self.hparams.loss_weight = loss_weight
        if loss_weight == "dy" and set(self.replay_losses) - {"ce"} and self.hparams.get("optimizer") == "sgd":
            # the term is ~0 right after step 0, so w = L_ce / term is huge and the term's gradient scales like
            # L_ce / (summed deviation): SGD takes that step as is and diverges (Adam-type optimisers normalise it)
            warnings.warn("loss_weight='dy' with SGD: the replay term's gradient explodes right after step 0 "
                          "(measured in benchmarks/results/gere.md); use adam/adamw (as the reference) or a fixed weight",
                          stacklevel=2)
        self._general_spec, self._general_eval_spec = general, general_eval
        self.general_set: GeneralSet | None = None
        self.general_eval_set: GeneralSet | None = None
        self.general_head: nn.Linear | None = None
        self.reference: nn.ModuleDict | None = None
        self.general_scores: list[float] = []
        """General capability before the first task and after every task (accuracy, or perplexity for text)."""
        self.sampler: GeneralReplaySampler | None = None
        self._batch_idx = 0
        for name in ("tm_lo", "tm_hi", "tm_bands", "ref_features"):
            self.register_buffer(name, torch.empty(0))
        self.register_buffer("anchor_task", torch.tensor(-1))

    # ------------------------------------------------------------------ construction
    @property
    def is_lm(self) -> bool:
        return hasattr(self.backbone, "token_outputs")

    def build_network(self, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
        backbone, head = super().build_network(num_classes, input_shape)
        general_classes = self.hparams.general_classes
        if not hasattr(backbone, "token_outputs") and getattr(backbone, "pretrained_head", None) is None:
            if general_classes is None and self.replay_losses:
                raise ConfigError("an image backbone without `pretrained_head` needs general_classes (the general "
                                  "head's number of classes)")
            if general_classes is not None:
                self.general_head = nn.Linear(backbone.num_features, general_classes)
        return backbone, head

    def bind_stream(self, stream: TaskStream) -> None:
        super().bind_stream(stream)
        if self.replay_losses and self.general_set is None:
            self.general_set = build_general_set(self._general_spec, getattr(self.backbone, "tokenizer", None))
        if self._general_eval_spec is not None and self.general_eval_set is None:
            self.general_eval_set = build_general_set(self._general_eval_spec, getattr(self.backbone, "tokenizer", None))

    def _general_head(self) -> nn.Module:
        return self.general_head if self.general_head is not None else self.backbone.pretrained_head

    # ------------------------------------------------------------------ forward on general data
    def preprocess(self, x: Tensor) -> Tensor:
        """Token ids pass through unchanged; images are scaled and normalised as usual."""
        return x if x.dtype == torch.long and x.dim() == 2 else super().preprocess(x)

    def general_outputs(self, x: Tensor, mask: Tensor | None = None, model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """``(features at the chosen layer, general logits)`` of the current model (or of ``model``, the frozen
        reference): pooled features and general-head logits for images, final hidden states and token logits for text."""
        if model is not None:
            backbone, head = model["backbone"], (model["head"] if "head" in model else None)
        else:
            backbone, head = self.backbone, None
        if hasattr(backbone, "token_outputs"):
            return backbone.token_outputs(x, mask)
        feats = backbone(self.preprocess(x))
        return feats, (head if head is not None else self._general_head())(feats)

    def general_ce(self, logits: Tensor, x: Tensor, y: Tensor | None, mask: Tensor | None) -> Tensor:
        """Per-sample label-fitting loss: class CE for images; token-mean next-token CE for text (targets:
        the input ids, or ``y`` when the set carries them, e.g. when its inputs are cached hidden states)."""
        if mask is None:
            return F.cross_entropy(logits, y, reduction="none")
        ids = x if y is None else y
        tok = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
        valid = mask[:, 1:].to(tok.dtype)
        return (tok * valid).sum(1) / valid.sum(1).clamp(min=1)

    # ------------------------------------------------------------------ anchors
    def _move_general(self) -> None:
        g = self.general_set
        for name, value in (("general_x", g.inputs), ("general_y", g.labels), ("general_mask", g.mask)):
            if value is not None and getattr(self, name, None) is None:  # fixed data: rebuilt, never checkpointed
                self.register_buffer(name, value.to(self.device), persistent=False)

    @torch.no_grad()
    def _general_pass(self, g: GeneralSet, fn) -> list:
        """``fn(features, logits, x, y, mask)`` over the set in eval mode, batch by batch."""
        was_training, out = self.training, []
        self.eval()
        bs = self.hparams.anchor_batch_size
        for i in range(0, len(g), bs):
            x = g.inputs[i: i + bs].to(self.device)
            y = g.labels[i: i + bs].to(self.device) if g.labels is not None else None
            m = g.mask[i: i + bs].to(self.device) if g.mask is not None else None
            h, logits = self.general_outputs(x, m)
            out.append(fn(h, logits, x, y, m))
        self.train(was_training)
        return out

    def compute_anchors(self) -> None:
        """Features of the current model on the general set -> per-unit thresholds and int8 bands
        (plus float anchors for L1/L2, and a frozen copy of the model for KL)."""
        g = self.general_set
        feats = torch.cat(self._general_pass(g, lambda h, *_: h.float()))
        mask = g.mask.to(self.device) if g.mask is not None else None
        lo, hi = unit_thresholds(feats, mask)
        bands = band_codes(feats, lo, hi)
        if mask is not None:
            bands = bands * mask.unsqueeze(-1).to(bands.dtype)
        self.tm_lo, self.tm_hi, self.tm_bands = lo, hi, bands
        self.ref_features = feats if {"l1", "l2"} & set(self.replay_losses) else torch.empty(0, device=self.device)
        if "kl" in self.replay_losses:
            self._snapshot_reference()
        self.anchor_task.fill_(int(self.current_task))

    def _snapshot_reference(self) -> None:
        parts = {"backbone": self.backbone} if self.is_lm else {"backbone": self.backbone, "head": self._general_head()}
        self.reference = frozen_copy(**parts)

    def materialize_state(self, state_dict) -> None:
        if self.reference is None and any(k.startswith("reference.") for k in state_dict):
            self._snapshot_reference()
        super().materialize_state(state_dict)

    def train(self, mode: bool = True) -> GeRe:
        super().train(mode)
        if mode and self.hparams.freeze_bn and self.backbone is not None:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                    m.eval()
        return self

    def on_train_start(self) -> None:
        """Once per task, with the model on its device: general set on the device, anchors (first task, or
        every task with ``anchor="previous_task"``), the general score before the first task, the sampler."""
        super().on_train_start()
        if self.general_eval_set is not None and not self.general_scores and int(self.current_task) == 0:
            self.general_scores.append(self.evaluate_general())
        if not self.replay_losses:
            return
        self._move_general()
        first = int(self.anchor_task) < 0
        if first or (self.hparams.anchor == "previous_task" and int(self.anchor_task) != int(self.current_task)):
            self.compute_anchors()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        self.sampler = GeneralReplaySampler(len(self.general_set), self.hparams.replays_per_batch,
                                            seed=self.hparams.replay_seed, rank=rank, world_size=world)

    def on_task_end(self, task) -> None:
        super().on_task_end(task)
        if self.general_eval_set is not None:
            self.general_scores.append(self.evaluate_general())

    def evaluate_general(self) -> float:
        """General capability on ``general_eval``: general-head accuracy (images) or perplexity (text)."""
        g = self.general_eval_set
        if g is None:
            raise ConfigError("evaluate_general needs general_eval")
        if g.mask is not None:
            def tokens(h, logits, x, y, m):
                ids = x if y is None else y
                ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
                v = m[:, 1:].float()
                return torch.stack([(ce * v).sum(), v.sum()])
            total = torch.stack(self._general_pass(g, tokens)).sum(0)
            return float(torch.exp(total[0] / total[1]))
        hits = self._general_pass(g, lambda h, logits, x, y, m: torch.stack([(logits.argmax(1) == y).sum(), y.new_tensor(len(y))]))
        total = torch.stack(hits).sum(0)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def replay_indices(self) -> Tensor:
        """This rank's general indices for the current step."""
        trainer = self._trainer
        steps = int(trainer.num_training_batches) if trainer is not None else 1
        epoch = trainer.current_epoch if trainer is not None else 0
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        return self.sampler.indices(epoch, self._batch_idx, max(steps, 1), accumulate).to(self.device)

    def replay_outputs(self, idx: Tensor) -> ReplayOutputs:
        """The current model's outputs on the general samples ``idx`` and their stored references."""
        h = self.hparams
        x = self.general_x[idx]
        y = self.general_y[idx] if getattr(self, "general_y", None) is not None else None
        mask = self.general_mask[idx] if getattr(self, "general_mask", None) is not None else None
        feats, logits = self.general_outputs(x, mask)
        out = ReplayOutputs(logits=logits, features=feats, mask=mask, temperature=h.temperature,
                            kl_t2_scale=h.kl_t2_scale, tm_reduction=h.tm_reduction)
        if "ce" in self.replay_losses:
            out.ce = self.general_ce(logits, x, y, mask)
        if "tm" in self.replay_losses:
            out.bands, out.lo, out.hi = self.tm_bands[idx], self.tm_lo, self.tm_hi
        if self.ref_features.numel():
            out.ref_features = self.ref_features[idx]
        if "kl" in self.replay_losses:
            with torch.no_grad():
                out.ref_logits = self.general_outputs(x, mask, model=self.reference)[1]
        return out

    def training_loss(self, batch: Batch) -> Tensor:
        x, y, t = batch
        task_ce = F.cross_entropy(self(x, t), y, reduction="none")
        if not self.replay_losses or self.sampler is None:
            return task_ce.mean()
        idx = self.replay_indices()
        self.log("train/replay_share", len(idx) / (len(idx) + len(y)), on_step=True, on_epoch=False)
        if len(idx) == 0:
            return task_ce.mean()
        out = self.replay_outputs(idx)
        terms = replay_loss_terms(self.replay_losses, out)
        if "ce" in terms:
            replay_ce = terms.pop("ce")
            self.log("train/replay_ce", replay_ce.mean().detach(), on_step=True, on_epoch=False)
            if self.hparams.ce_mix == "halve":
                loss_ce = (task_ce.mean() + replay_ce.mean()) / 2
            else:
                loss_ce = torch.cat([task_ce, replay_ce]).mean()
        else:
            loss_ce = task_ce.mean()
        loss = loss_ce
        w = self.hparams.loss_weight
        for name, term in terms.items():
            self.log(f"train/replay_{name}", term.detach(), on_step=True, on_epoch=False)
            if w == "dy":
                weight = torch.where(term > 0, loss_ce.detach() / term.detach().clamp(min=1e-12), term.new_zeros(()))
            else:
                weight = float(w)
            loss = loss + weight * term
        return loss
