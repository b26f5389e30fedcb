"""Supermask strategies (SupSup, WSN, ExSSNeT): layers, zero forgetting, checkpoints, task inference, KKT.

The streams are scikit-learn's 8x8 digits (no download), as in the CPU-sized checks
described in ``docs/methods/supermasks.md``; every run is cached per module and takes about a second on one thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from clframe import ContinualDataModule, ContinualTrainer
from clframe.callbacks import ContinualCallback
from clframe.cli import run_cli
from clframe.data.scenarios import PermutePixels, domain_incremental
from clframe.data.sources import load_source
from clframe.data.stream import Task, TaskStream
from clframe.metrics import average_accuracy, average_forgetting
from clframe.strategies import WSN, ContinualModule, ExSSNeT, SupSup
from clframe.strategies.supermask.exssnet import knn_predict
from clframe.strategies.supermask.layers import (
    MaskedLinear,
    MaskSource,
    binary_entropy,
    huffman_bits,
    pack_bits,
    score_mask,
    topk_mask,
    unpack_bits,
)
from tests.conftest import QUIET_TRAINER

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 1.0])
def test_topk_keeps_exactly_the_largest_entries(density: float) -> None:
    scores = torch.randn(37, 53)
    mask = topk_mask(scores, density)
    k = max(1, math.floor(density * scores.numel() + 1e-9))
    assert mask.dtype == torch.bool and mask.shape == scores.shape and int(mask.sum()) == k
    assert float(scores[mask].min()) >= float(scores[~mask].max()) if k < scores.numel() else bool(mask.all())
    # the NumPy selection used on the CPU agrees with torch.topk (the path other devices take)
    reference = torch.zeros(scores.numel(), dtype=torch.bool)
    reference[scores.flatten().topk(k).indices] = True
    assert torch.equal(mask.flatten(), reference)


@pytest.mark.parametrize("rule", ["topk", "threshold"])
def test_straight_through_gradient(rule: str) -> None:
    """∂L/∂S = ∂L/∂M · sign(S) for top-k on |S| (edge-popup), ∂L/∂M for the threshold rule."""
    torch.manual_seed(0)
    weight, scores, x = torch.randn(6, 9), torch.randn(6, 9, requires_grad=True), torch.randn(4, 9)
    mask = score_mask(scores, rule, density=0.3)
    expected_mask = topk_mask(scores.abs(), 0.3) if rule == "topk" else scores >= 0
    assert torch.equal(mask.bool(), expected_mask)
    if rule == "topk":
        assert int(mask.sum()) == math.floor(0.3 * 54)
    loss = F.linear(x, weight * mask).pow(2).sum()
    loss.backward()
    w_eff = (weight * mask).detach().requires_grad_(True)
    F.linear(x, w_eff).pow(2).sum().backward()
    d_mask = w_eff.grad * weight  # ∂L/∂M = ∂L/∂W_eff ⊙ W
    expected = d_mask * scores.detach().sign() if rule == "topk" else d_mask
    assert torch.allclose(scores.grad, expected)
    assert float(scores.grad[~expected_mask].abs().sum()) > 0  # dropped weights still get a gradient


def test_masked_layer_sources_and_initialisation() -> None:
    torch.manual_seed(0)
    layer = MaskedLinear(20, 7, n_tasks=3, density=0.25, weight_init="signed_constant")
    assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, math.sqrt(2 / 20)))
    assert not layer.weight.requires_grad and layer.scores[0].requires_grad
    assert float(layer.scores[0].detach().abs().max()) <= 1 / math.sqrt(20)  # kaiming-uniform, a = √5
    x = torch.randn(5, 20)
    live = layer.live_mask(0)
    layer.store_mask(1, live)
    assert torch.equal(layer.stored_mask(1), live)
    out_live, out_stored = layer(x, MaskSource("live", 1)), layer(x, MaskSource("stored", 1))
    assert torch.equal(out_live, out_stored)
    other = ~live
    layer.store_mask(2, other)
    alphas = torch.tensor([0.25, 0.75])
    superposed = layer(x, MaskSource("superposed", 1, tasks=(1, 2), alphas=alphas))
    assert torch.allclose(superposed, F.linear(x, layer.weight * (0.25 * live + 0.75 * other)), atol=1e-6)
    per_sample = layer(x, MaskSource("superposed", 1, tasks=(1, 2), alphas=alphas.expand(5, 2)))
    assert torch.allclose(per_sample, superposed, atol=1e-6)


def test_bit_packing_round_trip_and_storage_helpers() -> None:
    gen = torch.Generator().manual_seed(0)
    for numel in (1, 7, 8, 9, 1000, 4099):
        mask = torch.rand(numel, generator=gen) < 0.3
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)  # ≤ 1 bit per weight
        assert torch.equal(unpack_bits(packed, numel), mask)
    assert huffman_bits([45, 13, 12, 16, 9, 5]) == 224  # the textbook example (CLRS 16.3)
    assert huffman_bits([10]) == 10
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0.0) == 0.0
    assert binary_entropy(0.1) == pytest.approx(0.469, abs=1e-3)


def test_knn_predict_majority_vote() -> None:
    fit_x = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    fit_y = torch.tensor([0, 0, 1, 1, 1, 0])
    assert knn_predict(fit_x, fit_y, torch.tensor([[0.05], [5.05]]), k=3).tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- stream runs


class Probe(ContinualCallback):
    """Logits on fixed test inputs of every seen task after each task; weights at task start and end."""

    def __init__(self, n_per_task: int = 64) -> None:
        self.n = n_per_task
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.weights_start: dict[int, list[torch.Tensor]] = {}
        self.weights_end: dict[int, list[torch.Tensor]] = {}
        self.editable: dict[int, list[torch.Tensor]] = {}

    def inputs(self, trainer: ContinualTrainer, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _, t = trainer.datamodule.stream[task].test.__getitems__(list(range(self.n)))
        return x, t

    def _weights(self, module: Any) -> list[torch.Tensor]:
        return [layer.weight.detach().clone() for layer in module.masked_layers()]

    def on_task_start(self, trainer, pl_module, task: Task) -> None:
        self.weights_start[task.id] = self._weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        task = int(pl_module.current_task)
        if pl_module._editable and task not in self.editable:
            self.editable[task] = [e.clone() for _, e, _ in pl_module._editable]

    def on_task_end(self, trainer, pl_module, task: Task) -> None:
        self.weights_end[task.id] = self._weights(pl_module)

    @torch.no_grad()
    def on_task_evaluated(self, trainer, pl_module, task: Task, accuracies: list[float]) -> None:
        was_training = pl_module.training
        pl_module.eval()
        for j in range(task.id + 1):
            self.logits[(task.id, j)] = pl_module(*self.inputs(trainer, j)).clone()
        pl_module.train(was_training)


@dataclass
class Run:
    model: Any
    trainer: ContinualTrainer
    datamodule: ContinualDataModule
    probe: Probe
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def matrix(self) -> list[list[float]]:
        return self.trainer.accuracy_matrix


def related_stream(seed: int = 0) -> TaskStream:
    """Permuted digits A, C, B where B is A's permutation with 4 pixels swapped."""
    stream = domain_incremental(load_source("digits"), kind="permutation", n_tasks=3, seed=seed)
    perm_a = stream[0].train.input_transform.permutation
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:4]
    perm_b = perm_a.clone()
    perm_b[idx] = perm_a[idx.roll(1)]
    for split in (stream[2].train, stream[2].test):
        split.input_transform = PermutePixels(perm_b)
    return stream


def _reference_wsn() -> type[WSN]:
    """WSN as the reference code does it: gradient zeroing only, the optimizer over every parameter."""

    class ReferenceWSN(WSN):
        optimizer_groups = ContinualModule.optimizer_groups
        optimizer_step = L.LightningModule.optimizer_step

    return ReferenceWSN


MLP = {"backbone_kwargs": {"hidden_sizes": [256, 256]}}
SMALL = {"backbone_kwargs": {"hidden_sizes": [64, 64]}}
CONV = {"backbone": "conv", "backbone_kwargs": {"channels": [8, 16], "hidden_sizes": [32]}}
RUNS: dict[str, tuple[Any, dict[str, Any], int, dict[str, Any]]] = {
    # name: (strategy, kwargs, epochs per task, data module kwargs)
    "supsup": (SupSup, {**MLP, "mask_rule": "threshold", "head_outputs": 100, "lr": 1e-2, "infer_task_at_test": True,
                        "task_inference": "binary", "inference_objective": "g", "inference_scope": "sample"}, 5,
               {"scenario": "domain", "tasks": "permutation", "n_tasks": 5, "normalize": False}),
    "wsn": (WSN, {**MLP, "density": 0.1}, 3, {"scenario": "task", "n_tasks": 5, "normalize": False}),
    "wsn_adamw": (WSN, {**SMALL, "density": 0.3, "optimizer": "adamw", "weight_decay": 0.5}, 2,
                  {"scenario": "domain", "tasks": "permutation", "n_tasks": 3}),
    "wsn_reference_adamw": (_reference_wsn(), {**SMALL, "density": 0.3, "optimizer": "adamw", "weight_decay": 0.5}, 2,
                            {"scenario": "domain", "tasks": "permutation", "n_tasks": 3}),
    "exssnet": (ExSSNeT, {**SMALL, "density": 0.1, "weight_epochs": 2, "sim_init": "none"}, 4,
                {"scenario": "domain", "tasks": "permutation", "n_tasks": 3, "normalize": False}),
    "ssnet": (ExSSNeT, {**SMALL, "density": 0.1, "weight_epochs": 2, "sim_init": "none", "exclusive": False}, 4,
              {"scenario": "domain", "tasks": "permutation", "n_tasks": 3, "normalize": False}),
    "exssnet_conv": (ExSSNeT, {**CONV, "density": 0.2, "weight_epochs": 1}, 2, {"scenario": "task", "n_tasks": 5}),
    "exssnet_kkt": (ExSSNeT, {**SMALL, "density": 0.1, "weight_epochs": 0, "sim_init": "knn_best", "knn_fraction": 1.0},
                    2, {"stream": "related", "normalize": False}),
}
ZERO_FORGETTING = ["supsup", "wsn", "wsn_adamw", "exssnet", "exssnet_conv", "exssnet_kkt"]


def run_stream(name: str, root: Path) -> Run:
    cls, kwargs, epochs, data_kwargs = RUNS[name]
    data_kwargs = {"batch_size": 32, "seed": 0, **data_kwargs}
    L.seed_everything(0, verbose=False)
    if data_kwargs.pop("stream", None) == "related":
        dm = ContinualDataModule.from_stream(related_stream(), **data_kwargs)
    else:
        dm = ContinualDataModule(source="digits", **data_kwargs)
    probe = Probe()
    trainer = ContinualTrainer(epochs_per_task=epochs, logger=False, default_root_dir=root, callbacks=[probe],
                               accelerator="cpu", devices=1, **QUIET_TRAINER)
    model = cls(**kwargs)
    trainer.fit(model, datamodule=dm)
    return Run(model, trainer, dm, probe)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            cache[name] = run_stream(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------- zero forgetting


@pytest.mark.parametrize("name", ZERO_FORGETTING)
def test_later_tasks_leave_earlier_predictions_bit_identical(runs, name: str) -> None:
    run = runs(name)
    n = len(run.datamodule.stream)
    assert all(run.matrix[i][i] > 0.5 for i in range(n)), run.matrix  # every task was learned (chance ≤ 0.5)
    for j in range(n):
        first, last = run.probe.logits[(j, j)], run.probe.logits[(n - 1, j)]
        assert torch.equal(first, last), f"{name}: task {j}'s logits changed after training later tasks"
    if not run.model.hparams.get("infer_task_at_test"):  # with inferred ids, more masks make inference harder
        assert all(run.matrix[i][j] == run.matrix[j][j] for j in range(n) for i in range(j, n)), run.matrix
        assert average_forgetting(run.matrix) == 0.0


@pytest.mark.parametrize("name", ["ssnet", "wsn_reference_adamw"])
def test_the_forgetting_check_catches_shared_weight_updates(runs, name: str) -> None:
    """Negative controls: SSNeT edits weights earlier masks use; reference-style WSN lets AdamW decay them."""
    run = runs(name)
    n = len(run.datamodule.stream)
    changed = [j for j in range(n - 1) if not torch.equal(run.probe.logits[(j, j)], run.probe.logits[(n - 1, j)])]
    assert changed, f"{name} should change earlier tasks' predictions"


def test_shared_weights_do_train_in_wsn_and_exssnet(runs) -> None:
    """The invariance above is not trivial: weights outside earlier masks move during later tasks."""
    for name in ("wsn", "exssnet"):
        probe = runs(name).probe
        moved = sum(int((a != b).sum()) for a, b in zip(probe.weights_start[1], probe.weights_end[1], strict=True))
        assert moved > 0, name


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["supsup", "wsn", "exssnet", "exssnet_conv"])
def test_checkpoint_round_trip_keeps_every_task(runs, name: str, tmp_path: Path) -> None:
    run = runs(name)
    path = tmp_path / f"{name}.ckpt"
    run.trainer.save_checkpoint(path)
    cls = type(run.model)
    loaded = cls.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(loaded, cls) and loaded.hparams.n_tasks == len(run.datamodule.stream)
    assert torch.equal(loaded.learned, run.model.learned) and bool(loaded.learned.all())
    for a, b in zip(loaded.masked_layers(), run.model.masked_layers(), strict=True):
        assert torch.equal(a.packed_masks, b.packed_masks) and torch.equal(a.weight, b.weight)
    run.model.eval()
    loaded.eval()
    with torch.no_grad():
        for task in run.datamodule.stream:
            x, _, t = task.test.__getitems__(list(range(len(task.test))))
            assert torch.equal(loaded(x, t), run.model(x, t)), f"task {task.id}: predictions differ after loading"
            assert torch.equal(loaded(x[:64], t[:64]), run.probe.logits[(task.id, task.id)])
    if name == "supsup":
        x, _, _ = run.datamodule.stream[2].test.__getitems__(list(range(64)))
        assert torch.equal(loaded.infer_tasks(x), run.model.infer_tasks(x))


def test_mixed_task_batches_match_per_task_forwards(runs) -> None:
    run = runs("exssnet")
    model, stream = run.model.eval(), run.datamodule.stream
    xs, ts = zip(*[(x, t) for x, _, t in (task.test.__getitems__(list(range(5))) for task in stream)], strict=True)
    x, t = torch.cat(xs), torch.cat(ts)
    perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(x[perm], t[perm])
        for task in stream:
            sel = t[perm] == task.id
            assert torch.allclose(mixed[sel], model(x[perm][sel], t[perm][sel]), atol=1e-6)


def test_mask_storage_report(runs) -> None:
    model = runs("wsn").model
    report = model.mask_storage()
    n_weights = sum(layer.weight.numel() for layer in model.masked_layers())
    assert report["weights"] == n_weights and report["tasks"] == 5
    assert n_weights <= report["bits_per_task"] < n_weights + 8 * len(model.masked_layers())  # ≤ 1 bit/weight + padding
    assert report["density"] == pytest.approx(0.1, abs=1e-3)
    assert report["entropy_bits_per_task"] == pytest.approx(n_weights * binary_entropy(0.1), rel=1e-2)
    assert report["huffman_bits_per_task"] < report["bits_per_task"]


# ---------------------------------------------------------------------------------------------- SupSup task inference


def _test_inputs(stream: TaskStream) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [task.test.__getitems__(list(range(len(task.test)))) for task in stream]
    return torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts])


def test_supsup_one_shot_inference_finds_the_task(runs) -> None:
    """5 permuted-digits tasks, width 256: ≥ 80 % from 1 image, ≥ 95 % from 8 images.

    Inputs in [0, 1] as calibrated here: with mean/std normalisation the same runs gave
    0.72-0.88 (1 image) and 0.86-0.99 (8 images) over seeds 0-2, against 0.88-0.95 / 0.95-1.0 in [0, 1].
    The exhaustive per-mask entropy baseline has no calibrated figure for 5 tasks; it must be far
    above chance (0.2)."""
    run = runs("supsup")
    model = run.model.eval()
    x, t = _test_inputs(run.datamodule.stream)
    h = model.hparams
    saved = (h.task_inference, h.inference_objective, h.inference_scope, h.inference_samples)
    try:
        h.task_inference, h.inference_objective, h.inference_scope = "oneshot", "entropy", "sample"
        one_image = float((model.infer_tasks(x) == t).float().mean())
        h.inference_scope, h.inference_samples = "batch", 8
        gen, hits = torch.Generator().manual_seed(0), []
        for task in range(5):
            idx = (t == task).nonzero().flatten()
            for _ in range(50):  # 8 random images of one task, as in a shuffled test batch
                hits.append(int(model.infer_tasks(x[idx[torch.randperm(len(idx), generator=gen)[:8]]])[0]) == task)
        eight_images = sum(hits) / len(hits)
        h.task_inference, h.inference_scope = "exhaustive", "sample"
        exhaustive = float((model.infer_tasks(x) == t).float().mean())
    finally:
        h.task_inference, h.inference_objective, h.inference_scope, h.inference_samples = saved
    assert one_image >= 0.8 and eight_images >= 0.95 and exhaustive >= 0.6, (one_image, eight_images, exhaustive)


@pytest.mark.parametrize("method", ["oneshot", "binary", "exhaustive"])
def test_supsup_inference_only_picks_learned_tasks(runs, method: str) -> None:
    run = runs("supsup")
    model = run.model.eval()
    x, t = _test_inputs(run.datamodule.stream)
    learned, h = model.learned.clone(), model.hparams
    saved = (h.task_inference, h.inference_objective)
    h.task_inference, h.inference_objective = method, "entropy"
    try:
        model.learned[3:] = False  # as if tasks 3 and 4 were not learned yet
        inferred = model.infer_tasks(x)
        assert set(inferred.unique().tolist()) <= {0, 1, 2}
        seen = t < 3
        assert float((inferred[seen] == t[seen]).float().mean()) > 0.6  # chance: 1/3
    finally:
        model.learned.copy_(learned)
        h.task_inference, h.inference_objective = saved


def test_supsup_reports_inferred_and_given_task_accuracy(runs) -> None:
    run = runs("supsup")
    model, matrix = run.model, run.matrix
    assert len(model.task_inference_accuracy) == len(model.given_task_accuracy) == 5
    assert min(model.task_inference_accuracy) >= 0.8 and min(model.given_task_accuracy) > 0.9
    # with inferred ids a sample counts only if its task is right too: never above the given-task accuracy
    assert all(a <= g + 1e-9 for a, g in zip(matrix[-1], model.given_task_accuracy, strict=True))
    # the class with the inferred mask (shared labels) is right at least whenever task and class both are
    assert all(a <= c + 1e-9 for a, c in zip(matrix[-1], model.inferred_mask_accuracy, strict=True))
    assert average_accuracy(matrix) > 0.85
    with pytest.raises(ValueError, match="task id"):
        runs("wsn").model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- WSN


def test_wsn_freezes_earlier_weights_and_stays_within_capacity(runs) -> None:
    run = runs("wsn")
    model, probe = run.model, run.probe
    assert average_accuracy(run.matrix) >= 0.97, run.matrix
    layers = model.masked_layers()
    for task in range(1, 5):
        for i, layer in enumerate(layers):
            used = model.union_mask(layer, range(task))
            start, end = probe.weights_start[task][i], probe.weights_end[task][i]
            assert torch.equal(start[used], end[used]), f"task {task} moved a weight an earlier task uses"
            for t in range(5):
                assert int(layer.stored_mask(t).sum()) == math.floor(0.1 * layer.weight.numel() + 1e-9)
    capacity = model.mask_storage()["capacity"]
    assert 0.1 < capacity < min(1.0, 5 * 0.1)
    assert len(model.head.weights) == 5


def test_wsn_restores_frozen_weights_that_adamw_decay_would_move(runs) -> None:
    """Regression: gradient zeroing alone lets AdamW's decoupled decay move frozen weights."""
    ours, reference = runs("wsn_adamw"), runs("wsn_reference_adamw")
    assert average_forgetting(ours.matrix) == 0.0 and ours.matrix[-1][0] == ours.matrix[0][0]
    used = ours.model.union_mask(ours.model.masked_layers()[0], [0])
    assert torch.equal(ours.probe.weights_start[1][0][used], ours.probe.weights_end[2][0][used])
    ref_used = reference.model.union_mask(reference.model.masked_layers()[0], [0])
    assert not torch.equal(reference.probe.weights_start[1][0][ref_used], reference.probe.weights_end[2][0][ref_used])


# ---------------------------------------------------------------------------------------------- ExSSNeT


def test_exssnet_edits_only_exclusive_weights(runs) -> None:
    run = runs("exssnet")
    model, probe = run.model, run.probe
    layers = model.masked_layers()
    for task in range(3):
        editable = probe.editable[task]
        for i, layer in enumerate(layers):
            current, old = layer.stored_mask(task), model.union_mask(layer, range(task))
            assert not bool((editable[i] & old).any()), "an editable weight belongs to an earlier mask"
            assert not bool((editable[i] & ~current).any()), "an editable weight is outside the current mask"
            if task == 0:
                assert torch.equal(editable[i], current)
            start, end = probe.weights_start[task][i], probe.weights_end[task][i]
            assert torch.equal(start[~editable[i]], end[~editable[i]]), "a non-editable weight changed"
        assert any(bool((probe.weights_start[task][i] != probe.weights_end[task][i]).any()) for i in range(len(layers)))
    ssnet = runs("ssnet")
    ssnet_editable = ssnet.probe.editable[2]
    assert any(bool((e & ssnet.model.union_mask(layer, [0, 1])).any())
               for e, layer in zip(ssnet_editable, ssnet.model.masked_layers(), strict=True))


def test_kkt_starts_from_the_related_task(runs) -> None:
    """Task 2 is task 0 with four pixels swapped: its k-NN accuracy under mask 0 is the best one."""
    model = runs("exssnet_kkt").model
    assert model.kkt_source.tolist() == [-1, 0, 0]
    acc = model.kkt_accuracy
    assert bool(acc[0].isnan().all()) and acc[2, 0] > acc[2, 1] > 0.1


@pytest.mark.parametrize("mode, accs, expected", [
    ("knn_best", [0.05, 0.08], None),  # nothing beats chance (0.1): scores stay random
    ("knn_always", [0.05, 0.08], [1]),
    ("knn_best", [0.5, 0.9], [1]),
    ("knn_all", [0.5, 0.9], [0, 1]),
])
def test_kkt_selection_rules(monkeypatch, mode: str, accs: list[float], expected: list[int] | None) -> None:
    torch.manual_seed(0)
    model = ExSSNeT(**SMALL, sim_init=mode, num_classes=10, input_shape=[1, 8, 8], scenario="domain", n_tasks=3)
    model.learned[:2] = True
    before = [layer.scores[2].detach().clone() for layer in model.masked_layers()]
    monkeypatch.setattr(model, "knn_accuracies", lambda task: torch.tensor([*accs, float("nan")]))
    task = Task(id=2, classes=tuple(range(10)), train=None, test=None)  # type: ignore[arg-type]
    model.transfer_knowledge(task)
    for layer, old in zip(model.masked_layers(), before, strict=True):
        want = old if expected is None else torch.stack([layer.scores[i] for i in expected]).mean(0)
        assert torch.equal(layer.scores[2].detach(), want)
    assert int(model.kkt_source[2]) == (-1 if expected is None else 1)


def test_exssnet_resumes_mid_task_from_a_checkpoint(tmp_path: Path) -> None:
    """A checkpoint written in task 1's weight phase resumes the stream with task 0's mask and weights intact."""

    def setup(name: str) -> tuple[ContinualDataModule, ExSSNeT, ContinualTrainer]:
        L.seed_everything(0, verbose=False)
        dm = ContinualDataModule(source="digits", scenario="domain", tasks="permutation", n_tasks=3, batch_size=32, normalize=False)
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = ContinualTrainer(epochs_per_task=2, logger=False, callbacks=[ckpt], default_root_dir=tmp_path,
                                   **{**QUIET_TRAINER, "enable_checkpointing": True})
        return dm, ExSSNeT(**SMALL, density=0.2, weight_epochs=1, sim_init="knn_best"), trainer

    dm, full, trainer = setup("full")
    trainer.fit(full, datamodule=dm)
    dm2, resumed, trainer2 = setup("resumed")
    trainer2.fit(resumed, datamodule=dm2, ckpt_path=tmp_path / "full" / "epoch=3.ckpt")  # task 1, weight epoch
    assert trainer2.global_step == trainer.global_step and bool(resumed.learned.all())
    assert trainer2.accuracy_matrix[0] == pytest.approx(trainer.accuracy_matrix[0], nan_ok=True)
    x, _, t = dm.stream[0].test.__getitems__(list(range(64)))
    full.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(x, t), full(x, t))
    assert average_forgetting(trainer2.accuracy_matrix) == 0.0


# ---------------------------------------------------------------------------------------------- configs and errors


@pytest.mark.parametrize("config, overrides", [
    ("split_mnist/exssnet_til.yaml", ["--trainer.epochs_per_task=2", "--model.weight_epochs=1"]),
    ("permuted_mnist/supsup.yaml", ["--data.n_tasks=2", "--trainer.epochs_per_task=1", "--trainer.limit_train_batches=10",
                                    "--data.batch_size=32"]),
])
def test_configs_run_through_the_cli(tmp_path: Path, config: str, overrides: list[str]) -> None:
    cli = run_cli(["fit", "--config", str(REPO / "configs" / config), "--data.source=digits",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_checkpointing=false", "--trainer.logger=false", *overrides])
    n, model = len(cli.datamodule.stream), cli.model
    assert len(cli.trainer.accuracy_matrix) == n and bool(model.learned.all())
    if model.hparams.get("infer_task_at_test"):
        assert len(model.task_inference_accuracy) == len(model.given_task_accuracy) == n
    else:
        assert average_forgetting(cli.trainer.accuracy_matrix) == 0.0


def test_invalid_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="masked backbone"):
        SupSup(backbone="resnet18", num_classes=10, input_shape=[1, 8, 8], scenario="task", n_tasks=5)
    with pytest.raises(ValueError, match="density"):
        WSN(density=0.0, num_classes=10, input_shape=[1, 8, 8], scenario="task", n_tasks=5)
    dm = ContinualDataModule(source="digits", scenario="task", n_tasks=5)
    with pytest.raises(ValueError, match="mask slots for 3 tasks"):
        ContinualTrainer(epochs_per_task=1, logger=False, **QUIET_TRAINER).fit(
            WSN(num_classes=10, input_shape=[1, 8, 8], scenario="task", n_tasks=3), datamodule=dm)
    with pytest.raises(ValueError, match="weight_epochs"):
        ContinualTrainer(epochs_per_task=2, logger=False, default_root_dir=tmp_path, **QUIET_TRAINER).fit(
            ExSSNeT(**SMALL, weight_epochs=2), datamodule=dm)
    with pytest.raises(ValueError, match="exhaustive"):
        SupSup(task_inference="exhaustive", inference_objective="g")
    assert isinstance(SupSup(num_classes=10, input_shape=[1, 8, 8], scenario="task", n_tasks=2).head, nn.Module)


# ---------------------------------------------------------------------------------------------- slow calibration


@pytest.mark.slow
def test_exssnet_beats_supsup_at_low_density(tmp_path: Path) -> None:
    """5 permuted-digits tasks, 10 % kept, 10 + 10 epochs: ExSSNeT ≥ SupSup + 3 points, no forgetting."""

    def final(model: Any, epochs: int) -> list[list[float]]:
        L.seed_everything(0, verbose=False)
        dm = ContinualDataModule(source="digits", scenario="domain", tasks="permutation", n_tasks=5, batch_size=32, normalize=False)
        trainer = ContinualTrainer(epochs_per_task=epochs, logger=False, default_root_dir=tmp_path, **QUIET_TRAINER)
        trainer.fit(model, datamodule=dm)
        return trainer.accuracy_matrix

    kwargs = {**MLP, "density": 0.1, "sim_init": "none"}
    supsup = final(ExSSNeT(**kwargs, weight_epochs=0), 10)
    exssnet = final(ExSSNeT(**kwargs, weight_epochs=10), 20)
    ssnet = final(ExSSNeT(**kwargs, weight_epochs=10, exclusive=False), 20)
    assert average_forgetting(exssnet) == 0.0 and average_forgetting(ssnet) > 0.0
    assert average_accuracy(exssnet) >= average_accuracy(supsup) + 0.03, (average_accuracy(exssnet), average_accuracy(supsup))
