"""Prompt methods on a frozen ViT (L2P, DualPrompt, CODA-Prompt, OnePrompt, OVOR): mechanics exactly,
and every strategy end to end for two tasks through ContinualTrainer on a tiny random ViT and 8x8 digits.

The ViT is timm's ``vit_tiny_patch16_224`` shrunk through create_model arguments (16 px, patch 4, 3 blocks,
width 32) with random weights: the behaviour of the methods needs a pretrained backbone, their mechanics do not.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from clframe import ContinualDataModule, ContinualTrainer
from clframe.callbacks import ContinualCallback
from clframe.cli import ContinualCLI, run_cli
from clframe.errors import ConfigError
from clframe.strategies import L2P, OVOR, CODAPrompt, DualPrompt, LinearProbe, NearestClassMean, OnePrompt
from clframe.strategies.prompt import PromptViT, VORConfig
from clframe.strategies.prompt.ovor import (
    energy,
    kth_nn_distance,
    npos_candidates,
    select_outliers,
    synthesize_outliers,
    vor_loss,
)
from clframe.strategies.prompt.pool import gram_schmidt_rows_, ortho_penalty

REPO = Path(__file__).resolve().parents[1]
VIT = {"img_size": 16, "patch_size": 4, "depth": 3, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2.0}
COMMON = {"backbone": "vit_tiny_patch16_224", "pretrained": False, "backbone_kwargs": VIT, "lr": 0.01}
SMALL = {
    L2P: {"pool_size": 6, "prompt_length": 2, "top_k": 2},
    DualPrompt: {"g_layers": [0], "e_layers": [1, 2], "g_length": 4, "e_length": 4},
    CODAPrompt: {"pool_size": 4, "prompt_length": 4, "layers": [0, 1, 2], "ortho_weight": 0.1},
    OnePrompt: {"g_layers": [0], "e_layers": [1, 2], "g_length": 4, "e_length": 8},
    OVOR: {"g_layers": [0], "e_layers": [1, 2], "g_length": 4, "e_length": 8,
           "vor": {"epochs": 1, "k": 5, "select": 10, "sample_from": 20, "num_per_class": 10}},
    LinearProbe: {},
    NearestClassMean: {},
}


def make(cls, **kwargs):
    return cls(**COMMON, **{**SMALL[cls], **kwargs})


def digits(n_tasks: int = 2, per_class: int = 24) -> ContinualDataModule:
    return ContinualDataModule(source="digits", n_tasks=n_tasks, batch_size=32, train_samples_per_class=per_class,
                               test_samples_per_class=10)


def bound(cls, n_tasks: int = 2, task: int = 0, **kwargs):
    """A strategy bound to a digits stream and started on ``task`` (no trainer)."""
    torch.manual_seed(0)
    model = make(cls, **kwargs)
    stream = digits(n_tasks).stream
    model.bind_stream(stream)
    for t in stream.tasks[: task + 1]:
        model.on_task_start(t)
    model.train()
    return model, stream


def batch_of(stream, task: int, n: int = 16):
    data = stream.tasks[task].train
    return data.__getitems__(list(range(min(n, len(data)))))


# ---------------------------------------------------------------------------------------------- the prompted ViT


def manual_attention(attn, x, pk=None, pv=None):
    """Multi-head attention written out from the timm module's weights, with optional prefixes."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    if pk is not None:
        k = torch.cat([pk.reshape(b, -1, h, d).transpose(1, 2), k], dim=2)
        v = torch.cat([pv.reshape(b, -1, h, d).transpose(1, 2), v], dim=2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, c)), scores


def test_prefix_attention_equals_the_manual_computation_and_zero_prefixes_rescale():
    torch.manual_seed(0)
    vit = PromptViT("vit_tiny_patch16_224", in_chans=1, **VIT)
    wrapped = vit.vit.blocks[1].attn
    inner = wrapped.inner
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), inner(x))  # no prefix: timm's own forward
        pk, pv = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
        wrapped.prefix = (pk, pv)
        got = wrapped(x)
        expected, _ = manual_attention(inner, x, pk, pv)
        assert got.shape == x.shape  # queries and sequence length unchanged
        assert torch.allclose(got, expected, atol=1e-5)
        # zero keys and values: every prefix position scores 0 and adds nothing, so each head's output is the
        # plain output scaled by Z / (Z + L), Z = sum_j exp(score_j)
        wrapped.prefix = (torch.zeros(3, 5, 32), torch.zeros(3, 5, 32))
        got = wrapped(x)
        wrapped.prefix = None
        b, n, h, d = 3, 7, inner.num_heads, inner.head_dim
        _, scores = manual_attention(inner, x)
        z = scores.exp().sum(-1, keepdim=True)
        q, k, v = inner.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        plain = scores.softmax(-1) @ v
        scaled = plain * z / (z + 5)
        expected = inner.proj(scaled.transpose(1, 2).reshape(b, n, h * d))
        assert torch.allclose(got, expected, atol=1e-5)


def test_prompted_forward_lengths_and_query():
    torch.manual_seed(0)
    vit = PromptViT("vit_tiny_patch16_224", in_chans=1, **VIT)
    x = torch.randn(2, 1, 8, 8)  # resized to 16 px inside: 16 patches + [CLS]
    plain = vit.forward_tokens(x)
    assert plain.shape == (2, 17, 32)
    prompted = vit.forward_tokens(x, prompts=torch.randn(2, 6, 32))
    assert prompted.shape == (2, 23, 32)  # prompt tuning grows the sequence
    prefixed = vit.forward_tokens(x, prefixes={0: (torch.randn(1, 3, 32), torch.randn(1, 3, 32))})
    assert prefixed.shape == plain.shape and not torch.allclose(prefixed, plain)  # prefix tuning does not
    q = vit.query(x)
    assert torch.equal(q, plain[:, 0]) and not q.requires_grad
    assert all(blk.attn.prefix is None for blk in vit.vit.blocks)  # cleared after the call
    with pytest.raises(ConfigError, match="out of range"):
        vit.forward_tokens(x, prefixes={5: (torch.zeros(1, 2, 32), torch.zeros(1, 2, 32))})


def test_local_checkpoint_loads_and_a_mismatched_one_is_refused(tmp_path):
    torch.manual_seed(0)
    import timm

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, in_chans=1, **VIT)
    path = tmp_path / "vit.pt"
    torch.save(src.state_dict(), path)
    vit = PromptViT("vit_tiny_patch16_224", in_chans=1, checkpoint_path=str(path), pretrained=True, **VIT)
    assert torch.equal(vit.vit.blocks[2].attn.inner.qkv.weight, src.blocks[2].attn.qkv.weight)
    assert torch.equal(vit.vit.pos_embed, src.pos_embed)
    with pytest.raises(ConfigError, match="does not fit"):
        PromptViT("vit_tiny_patch16_224", in_chans=1, checkpoint_path=str(path), **{**VIT, "depth": 4})
    with pytest.raises(ConfigError, match="not a file"):
        PromptViT("vit_tiny_patch16_224", in_chans=1, checkpoint_path=str(tmp_path / "missing.pt"), **VIT)


# ---------------------------------------------------------------------------------------------- L2P


def test_l2p_surrogate_loss_pulls_selected_keys_toward_queries():
    torch.manual_seed(0)
    model, _ = bound(L2P)
    pool = model.pool
    queries = torch.randn(16, 32)
    opt = torch.optim.Adam([pool.keys], lr=0.05)

    def selected_cos() -> float:
        idx, sim = pool.select(queries)
        return float(sim.gather(1, idx).mean().detach())

    before = selected_cos()
    for _ in range(20):
        idx, sim = pool.select(queries)
        pull = (1 - sim.gather(1, idx)).sum(1).mean()
        opt.zero_grad()
        pull.backward()
        opt.step()
    assert selected_cos() > before + 0.1


def test_l2p_keys_learn_only_from_the_pull_term_and_selection_is_per_sample():
    model, stream = bound(L2P)
    x, y, t = batch_of(stream, 0)
    out = model.encode(model.preprocess(x), t, train=True)
    ce = F.cross_entropy(model.mask_train_logits(model.head(out.features), t), y)
    ce.backward()
    assert model.pool.keys.grad is None or not model.pool.keys.grad.any()
    assert model.pool.prompts.grad is not None and model.pool.prompts.grad.any()
    model.zero_grad()
    out.aux_loss.backward()
    assert model.pool.keys.grad.any()
    # per sample: different queries may pick different prompts; batch voting gives all the same
    q = torch.randn(32, 32)
    idx, _ = model.pool.select(q)
    assert idx.shape == (32, 2) and len({tuple(r) for r in idx.tolist()}) > 1
    voted, _ = model.pool.select(q, batchwise=True)
    assert (voted == voted[:1]).all()


# ---------------------------------------------------------------------------------------------- DualPrompt


def test_dualprompt_trains_the_true_e_prompt_and_tests_by_key_match():
    model, stream = bound(DualPrompt, task=1)
    x, y, t = batch_of(stream, 1)
    out = model.encode(model.preprocess(x), t, train=True)
    (model.head(out.features).sum() + out.aux_loss).backward()
    grads = model.e_prompts.grad.flatten(1).abs().sum(1)
    assert grads[1] > 0 and grads[0] == 0  # the true task's E-prompt only
    assert model.e_keys.grad[1].any() and not model.e_keys.grad[0].any()
    # test: argmax cosine over the tasks seen so far
    q = model.backbone.query(model.preprocess(x))
    with torch.no_grad():
        model.e_keys[0] = -q.mean(0)
        model.e_keys[1] = q.mean(0)
    model.eval()
    assert (model.encode(model.preprocess(x), None, train=False).task_pred == 1).all()
    with torch.no_grad():
        model.e_keys[0], model.e_keys[1] = q.mean(0), -q.mean(0)
    assert (model.task_selection(x) == 0).all()


def test_dualprompt_new_e_prompt_starts_as_a_copy_of_the_previous_one():
    """The official shared_prompt_pool: slot t starts as the trained slot t-1; keys are not copied."""
    model, stream = bound(DualPrompt, n_tasks=5, task=0)
    assert float(model.e_prompts.max()) <= 0.01 and float(model.g_prompts.max()) <= 0.01  # U(0, 0.01)
    with torch.no_grad():
        model.e_prompts[0].add_(1.0)  # "trained" E-prompt 0
    keys = model.e_keys.detach().clone()
    model.on_task_start(stream.tasks[1])
    assert torch.equal(model.e_prompts[1], model.e_prompts[0]) and torch.equal(model.e_keys, keys)
    untouched = model.e_prompts[2].detach().clone()
    off, stream = bound(DualPrompt, n_tasks=5, task=1, copy_previous_e_prompt=False)
    assert not torch.equal(off.e_prompts[1], off.e_prompts[0])
    assert torch.equal(model.e_prompts[2], untouched)  # later slots wait for their own task


def test_dualprompt_key_match_over_the_pool_or_the_seen_tasks():
    model, stream = bound(DualPrompt, n_tasks=5, task=1)
    x, _, _ = batch_of(stream, 1)
    q = model.backbone.query(model.preprocess(x))
    with torch.no_grad():
        model.e_keys.copy_(-q.mean(0).expand_as(model.e_keys))
        model.e_keys[4] = q.mean(0)  # an untrained slot matches best
        model.e_keys[1] = 0.5 * q.mean(0) - 0.5 * q.mean(0).flip(0)
    assert (model.task_selection(x) == 4).all()  # official: every slot of the pool
    model.hparams.key_match = "seen"
    assert (model.task_selection(x) <= 1).all()


# ---------------------------------------------------------------------------------------------- CODA-Prompt


def test_orthogonality_penalty_and_gram_schmidt():
    eye = torch.eye(6, 10)
    assert float(ortho_penalty(eye)) == 0.0
    assert float(ortho_penalty(eye + 0.1 * torch.randn(6, 10))) > 0
    w = torch.rand(8, 3, 4)  # rows flattened to width 12
    keep = w[:3].clone()
    gram_schmidt_rows_(w, 3, 8)
    assert torch.equal(w[:3], keep)  # earlier rows untouched
    new = w[3:].flatten(1)
    assert torch.allclose(new @ new.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(new @ keep.flatten(1).T, torch.zeros(5, 3), atol=1e-5)
    with pytest.raises(ConfigError, match="orthogonal"):
        gram_schmidt_rows_(torch.rand(20, 4), 0, 20)


def test_coda_old_components_get_no_gradient_and_all_weights_are_used():
    model, stream = bound(CODAPrompt, task=1)  # 4 components, 2 tasks: task 1 owns rows [2, 4)
    assert model.task_block(1) == (2, 4)
    new_keys = model.keys[0, 2:4]
    assert torch.allclose(new_keys @ new_keys.T, torch.eye(2), atol=1e-5)  # Gram-Schmidt at task start
    x, y, t = batch_of(stream, 1)
    out = model.encode(model.preprocess(x), t, train=True)
    assert out.aux_loss > 0  # ortho_weight 0.1
    (F.cross_entropy(model.mask_train_logits(model.head(out.features), t), y) + out.aux_loss).backward()
    for p in (model.components, model.keys, model.attention):
        assert not p.grad[:, :2].any() and p.grad[:, 2:4].any()
    alpha = model.weights(model.backbone.query(model.preprocess(x)), model.keys[0, :4], model.attention[0, :4])
    assert alpha.shape == (len(x), 4) and (alpha != 0).all()  # a weighted sum over every row in use, no top-k


# ---------------------------------------------------------------------------------------------- VOR


def clusters(n_per_class: int = 60, dim: int = 16, n_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    means = F.normalize(torch.randn(n_classes, dim, generator=g), dim=1) * 10
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return means[labels] + 0.2 * torch.randn(len(labels), dim, generator=g), labels


def test_vor_outliers_lie_outside_the_class_clusters():
    feats, labels = clusters()
    cfg = VORConfig(k=10, select=20, sample_from=30, num_per_class=15)
    gen = torch.Generator().manual_seed(1)
    cand, z, k = npos_candidates(feats, cfg.k, cfg.select, cfg.sample_from, cfg.cov, "boundary", gen)
    assert cand.shape == (cfg.select * cfg.sample_from, 16) and k == 10  # candidate count = select * sample_from
    outliers = select_outliers(cand, z, k, cfg.num_per_class * 3)
    assert outliers.shape == (cfg.num_per_class * 3, 16)  # kept = num_per_class * |C_t|
    assert torch.equal(synthesize_outliers(feats, 3, cfg, torch.Generator().manual_seed(1)), outliers)
    # lower density than the data: K-th-NN distance above every inlier's
    id_knn = kth_nn_distance(z, z, k, exclude_self=True)
    assert kth_nn_distance(outliers, z, k).min() > id_knn.max()
    # outside the cluster each was drawn around: farther from the nearest class mean than nearly all inliers
    means = torch.stack([z[labels == c].mean(0) for c in range(3)])
    id_dist = torch.cdist(z, means).gather(1, labels[:, None]).squeeze(1)
    out_dist = torch.cdist(outliers, means).min(1).values
    assert out_dist.min() > id_dist.quantile(0.95)


def test_vor_energy_and_loss():
    logits = torch.randn(5, 6)
    classes = torch.tensor([False, False, True, True, True, False])
    assert torch.allclose(energy(logits, classes), -torch.logsumexp(logits[:, 2:5], dim=1))
    high = torch.full((4, 6), 20.0)  # E = -20 - log 3 <= tau_id = -15
    low = torch.full((4, 6), -20.0)  # E = 20 - log 3 >= tau_ood = -3
    term, e_id, e_ood = vor_loss(high, low, classes, -15.0, -3.0)
    assert float(term) == 0.0 and (e_id <= -15).all() and (e_ood >= -3).all()
    term, _, _ = vor_loss(low, high, classes, -15.0, -3.0)
    assert float(term) > 0


def test_class_incremental_training_masks_old_classes():
    model, stream = bound(OnePrompt, task=1)
    x, y, t = batch_of(stream, 1)
    logits = model.mask_train_logits(torch.zeros(len(x), 10), t)
    old = model.class_task == 0
    assert (logits[:, old] == torch.finfo(logits.dtype).min).all() and (logits[:, ~old] == 0).all()
    model.eval()
    test_mask = model.logit_mask(t)  # at test: every class seen so far
    assert test_mask[0, old].all() and test_mask[0, ~old].all()


def test_parameter_counts_and_inference_cost():
    for cls in (L2P, DualPrompt, CODAPrompt, OnePrompt):
        model, _ = bound(cls)
        report = model.parameter_report()
        assert report["trainable"] == report["prompt"] + report["head"] == sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        assert model.forward_passes_per_image == (1 if cls is OnePrompt else 2)
    model, _ = bound(OnePrompt)
    assert model.parameter_report()["prompt"] == (1 * 4 + 2 * 8) * 32
    # the ViT-B figure: G 10 x 768 at 2 blocks, E 40 x 768 at 3 blocks
    assert (2 * 10 + 3 * 40) * 768 == 107_520


# ---------------------------------------------------------------------------------------------- end to end


class Probe(ContinualCallback):
    """Snapshots at every task end, and the phase of every training epoch."""

    def __init__(self) -> None:
        self.backbone: dict[str, torch.Tensor] | None = None
        self.task_end: list[dict[str, torch.Tensor]] = []
        self.phases: list[tuple[str, bool]] = []

    def on_task_start(self, trainer, pl_module, task) -> None:
        if self.backbone is None:
            self.backbone = {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.phases.append((pl_module._phase, pl_module._vor_outliers is not None))

    def on_task_end(self, trainer, pl_module, task) -> None:
        self.task_end.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for cls in (L2P, DualPrompt, CODAPrompt, OnePrompt, OVOR):
        L.seed_everything(0)
        model, probe = make(cls), Probe()
        trainer = ContinualTrainer(epochs_per_task=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[probe],
                                   default_root_dir=tmp_path_factory.mktemp(cls.__name__))
        trainer.fit(model, datamodule=digits())
        out[cls] = (model, trainer, probe)
    return out


@pytest.mark.parametrize("cls", [L2P, DualPrompt, CODAPrompt, OnePrompt, OVOR], ids=lambda c: c.__name__)
def test_each_strategy_runs_two_tasks_with_a_frozen_backbone(runs, cls):
    model, trainer, probe = runs[cls]
    matrix = trainer.accuracy_matrix
    assert len(matrix) == 2 and all(0 <= a <= 1 for a in matrix[1]) and 0 <= matrix[0][0] <= 1
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in probe.backbone.items())  # weights unchanged
    first, second = probe.task_end
    assert not torch.equal(first["head.weight"], second["head.weight"])
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for p in model.parameters() if p.requires_grad}


def test_coda_components_of_the_first_task_are_unchanged_by_the_second(runs):
    model, _, probe = runs[CODAPrompt]
    first, second = probe.task_end
    for name in ("components", "keys", "attention"):
        assert torch.equal(first[name][:, :2], second[name][:, :2])
        assert not torch.equal(first[name][:, 2:], second[name][:, 2:])


def test_dualprompt_logs_task_id_accuracy(runs):
    model, _, _ = runs[DualPrompt]
    assert len(model.task_id_accuracy) == 2 and model.task_id_accuracy[0] == 1.0  # one task: always right


def test_ovor_trains_the_head_with_outliers_in_its_last_epoch(runs):
    model, _, probe = runs[OVOR]
    assert probe.phases == [("prompt", False), ("vor", True)] * 2
    assert [ph for ph, _ in runs[OnePrompt][2].phases] == ["prompt"] * 4


def test_vor_needs_a_prompt_epoch():
    L.seed_everything(0)
    model = make(OnePrompt, vor={"epochs": 2})
    trainer = ContinualTrainer(epochs_per_task=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                               enable_model_summary=False, accelerator="cpu", devices=1)
    with pytest.raises(ConfigError, match="epochs_per_task"):
        trainer.fit(model, datamodule=digits())


def test_size_checks():
    with pytest.raises(ConfigError, match="divisible"):
        bound(CODAPrompt, n_tasks=5)
    with pytest.raises(ConfigError, match="e_pool_size"):
        bound(DualPrompt, n_tasks=5, e_pool_size=2)
    with pytest.raises(ConfigError, match="even"):
        make(DualPrompt, e_length=3)


# ---------------------------------------------------------------------------------------------- configs


def test_the_tiny_configs_parse_and_one_runs_through_the_cli(tmp_path):
    for name in ("l2p", "dualprompt", "coda_prompt", "oneprompt", "ovor"):
        cli = ContinualCLI(args=["--config", str(REPO / "configs" / "prompt" / f"{name}_tiny_cifar10.yaml")],
                           run=False)
        assert cli.model.hparams.checkpoint_path == "runs/backbones/vit_tiny_tinyimagenet.pt"
        assert cli.model.hparams.backbone_kwargs["embed_dim"] == 192 and cli.datamodule.hparams.source == "cifar10"
    cli = ContinualCLI(args=["--config", str(REPO / "configs" / "prompt" / "ovor_vitb_cifar100.yaml")], run=False)
    assert isinstance(cli.model, OVOR) and cli.model.vor_config.tau_id == -15.0
    cli = run_cli(["fit", "--config", str(REPO / "configs" / "prompt" / "l2p_tiny_cifar10.yaml"),
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                   "--trainer.epochs_per_task=1", "--model.init_args.checkpoint_path=null",
                   "--model.init_args.pretrained=false",
                   '--model.init_args.backbone_kwargs={img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 4}',
                   "--data.source=digits", "--data.n_tasks=2", "--data.train_samples_per_class=8",
                   "--data.test_samples_per_class=5", "--data.batch_size=16"])
    assert isinstance(cli.model, L2P) and len(cli.trainer.accuracy_matrix) == 2


def test_a_trained_model_reloads_from_its_state_dict(runs):
    for cls in (DualPrompt, CODAPrompt):
        model = runs[cls][0]
        fresh = make(cls)
        fresh.bind_stream(digits().stream)
        fresh.load_state_dict(model.state_dict())
        x, _, t = batch_of(digits().stream, 1)
        model.eval(), fresh.eval()
        with torch.no_grad():
            assert torch.equal(model(x, t), fresh(x, t))


# ---------------------------------------------------------------------------------------------- frozen-feature baselines


def test_linear_probe_trains_only_the_head_on_frozen_features_with_old_classes_masked():
    model, stream = bound(LinearProbe, task=1)
    report = model.parameter_report()
    assert report == {**report, "prompt": 0, "head": 32 * 10 + 10, "trainable": 32 * 10 + 10}
    assert model.forward_passes_per_image == 1
    x, y, t = batch_of(stream, 1)
    with torch.no_grad():
        assert torch.equal(model.features(x), model.backbone(model.preprocess(x)))  # the prompt-free [CLS]
    loss = model.training_loss((x, y, t))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    old = model.class_task == 0
    assert model.head.weight.grad[old].abs().sum() == 0 and model.head.weight.grad[~old].abs().sum() > 0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_class_mean_needs_no_steps_and_predicts_the_nearest_mean(tmp_path, metric):
    L.seed_everything(0)
    model = make(NearestClassMean, metric=metric)
    trainer = ContinualTrainer(epochs_per_task=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                               enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    dm = digits()
    trainer.fit(model, datamodule=dm)
    assert len(trainer.accuracy_matrix) == 2
    assert model.parameter_report()["trainable"] == 0 and not any(p.requires_grad for p in model.parameters())
    assert model.forward_passes_per_image == 1
    stream = dm.stream
    model.eval()
    with torch.no_grad():
        for task in stream.tasks:  # the means are those of the frozen training features
            x, y, t = task.train.__getitems__(list(range(len(task.train))))
            feats = model.backbone(model.preprocess(x))
            feats = F.normalize(feats, dim=1) if metric == "cosine" else feats
            for c in task.classes:
                assert torch.allclose(model.class_means[c], feats[y == c].mean(0), atol=1e-5)
        x, y, t = batch_of(stream, 0)
        feats = model.backbone(model.preprocess(x))
        means = model.class_means
        if metric == "cosine":
            expected = (F.normalize(feats, dim=1) @ F.normalize(means, dim=1).T).argmax(1)
        else:
            expected = torch.cdist(feats, means).argmin(1)
        assert torch.equal(model(x, t).argmax(1), expected)
    accuracy = trainer.accuracy_matrix[1]
    assert all(0 <= a <= 1 for a in accuracy)


def test_nearest_class_mean_masks_unseen_classes_and_reloads(tmp_path):
    model, stream = bound(NearestClassMean, task=0)
    x, y, t = batch_of(stream, 0)
    model.training_step((x, y, t), 0)
    model.on_task_end(stream.tasks[0])
    model.eval()
    with torch.no_grad():
        logits = model(x, t)
    unseen = model.class_task == 1
    assert (logits[:, unseen] == torch.finfo(logits.dtype).min).all()
    fresh = make(NearestClassMean)
    fresh.bind_stream(stream)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, t), logits)
    with pytest.raises(ConfigError, match="metric"):
        make(NearestClassMean, metric="manhattan")
