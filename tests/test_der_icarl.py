"""DER, DER++ and iCaRL: stored logits, the logit-matching term, herding, nearest-mean-of-exemplars,
the exemplar budget, checkpoints (round trip and bit-exact resume) and the shipped configs.

Everything runs on scikit-learn's digits (no data needed) in a few seconds on one thread.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from clframe import ContinualDataModule, ContinualTrainer
from clframe.callbacks import ContinualCallback, ContinualEvaluation
from clframe.cli import run_cli
from clframe.errors import ConfigError
from clframe.strategies import DER, DERpp, ICaRL
from clframe.strategies.replay.icarl import herding
from tests.conftest import QUIET_TRAINER
from tests.helpers.resume import assert_same_matrix_and_weights, fit_saving_every_step

REPO = Path(__file__).resolve().parents[1]
CLASS_ORDER = list(range(9))  # 3 tasks x 3 classes


def _digits(n_tasks: int = 3, batch_size: int = 32, scenario: str = "class") -> ContinualDataModule:
    return ContinualDataModule(source="digits", scenario=scenario, n_tasks=n_tasks, batch_size=batch_size,
                               class_order=CLASS_ORDER[: 3 * n_tasks])


def _batches(dm: ContinualDataModule, task: int, n: int, size: int = 10):
    data = dm.stream[task].train
    return [data.__getitems__(list(range(i * size, (i + 1) * size))) for i in range(n)]


def _manual_steps(model, batches, step: bool = True) -> list[torch.Tensor]:
    """Training steps outside a Trainer; returns the raw logits of each batch just before its step."""
    opt = model.configure_optimizers()
    seen = []
    for i, batch in enumerate(batches):
        with torch.no_grad():
            seen.append(model.head(model.features(batch[0])).clone())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a trainer
            loss = model.training_step(batch, i)
        if step:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return seen


# ---------------------------------------------------------------------------------------------- DER / DER++


@pytest.mark.parametrize("cls", [DER, DERpp])
def test_buffer_logits_are_the_outputs_at_insertion(cls) -> None:
    """Reservoir fill phase: slot i holds sample i with the raw logits of the forward pass that inserted it."""
    torch.manual_seed(0)
    dm = _digits()
    model = cls(buffer_size=50, replay_batch_size=8, lr=0.1)
    model.bind_stream(dm.stream)
    batches = _batches(dm, 0, 3)
    before = _manual_steps(model, batches)
    stored = model.buffer.data_logits
    assert stored.shape == (50, 9) and len(model.buffer) == 30
    for i, logits in enumerate(before):
        assert torch.equal(model.buffer.data_x[10 * i:10 * (i + 1)], batches[i][0])
        torch.testing.assert_close(stored[10 * i:10 * (i + 1)], logits, rtol=0, atol=1e-6)
    # the weights moved after insertion, so the network's current outputs differ from what was stored
    with torch.no_grad():
        assert not torch.allclose(model.head(model.features(batches[0][0])), before[0], atol=1e-4)
    # raw head outputs: the scenario mask (most negative float for unseen classes) never reaches the buffer
    assert bool(model.hparams.mask_unseen_classes) and stored[:30].abs().max() < 100


def test_der_term_is_zero_right_after_insertion_and_grows_after_updates() -> None:
    torch.manual_seed(0)
    dm = _digits()
    model = DER(buffer_size=100, replay_batch_size=20, alpha=1.0, lr=0.1)
    model.bind_stream(dm.stream)
    batches = _batches(dm, 0, 2)
    _manual_steps(model, batches, step=False)  # insert, weights unchanged
    with torch.no_grad():
        assert model.logit_matching(model.buffer.all()).item() == pytest.approx(0.0, abs=1e-10)
    _manual_steps(model, _batches(dm, 0, 3)[2:])  # one update
    with torch.no_grad():
        assert model.logit_matching(model.buffer.all()).item() > 1e-6


def test_der_loss_combines_ce_mse_and_replayed_ce() -> None:
    """DER++'s loss equals the formula, drawing two independent buffer batches in order."""
    torch.manual_seed(0)
    dm = _digits()
    model = DERpp(buffer_size=100, replay_batch_size=6, alpha=0.7, beta=0.3, lr=0.1)
    model.bind_stream(dm.stream)
    _manual_steps(model, _batches(dm, 0, 3))
    x, y, t = _batches(dm, 0, 4)[3]
    gen_state = model.buffer.generator.get_state()
    loss = model.training_loss((x, y, t))
    model.buffer.generator.set_state(gen_state)
    first, second = model.buffer.sample(6), model.buffer.sample(6)
    assert not torch.equal(first["x"], second["x"])
    with torch.no_grad():
        expected = (F.cross_entropy(model(x, t), y)
                    + 0.7 * F.mse_loss(model.head(model.features(first["x"])), first["logits"])
                    + 0.3 * F.cross_entropy(model(second["x"], second["t"]), second["y"]))
    torch.testing.assert_close(loss.detach(), expected)


def test_der_checkpoint_round_trip(tmp_path) -> None:
    L.seed_everything(0)
    dm = _digits(n_tasks=2)
    model = DERpp(buffer_size=60, lr=0.05)
    trainer = ContinualTrainer(epochs_per_task=1, logger=False, default_root_dir=tmp_path, **QUIET_TRAINER)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "derpp.ckpt")
    loaded = DERpp.load_from_checkpoint(tmp_path / "derpp.ckpt", map_location="cpu")
    assert loaded.buffer.fields == ["x", "y", "t", "logits"]
    for name in loaded.buffer.fields:
        assert torch.equal(getattr(loaded.buffer, f"data_{name}"), getattr(model.buffer, f"data_{name}")), name
    a, b = model.buffer.sample(16), loaded.buffer.sample(16)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- iCaRL pieces


def test_herding_matches_a_brute_force_greedy_and_starts_closest_to_the_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    chosen = herding(feats, 6)
    mu = feats.mean(0)
    assert int(chosen[0]) == int((feats - mu).norm(dim=1).argmin())
    picked: list[int] = []
    for k in range(6):  # iCaRL Algorithm 4, written out
        best = min((i for i in range(40) if i not in picked),
                   key=lambda i: float((mu - (feats[picked].sum(0) + feats[i]) / (k + 1)).norm()))
        picked.append(best)
    assert chosen.tolist() == picked
    assert herding(feats[:3], 10).sort().values.tolist() == [0, 1, 2]  # fewer rows than asked: all of them


class MemoryProbe(ContinualCallback):
    """The exemplar memory after each task's end hook."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_task_end(self, trainer, pl_module, task) -> None:
        self.snapshots.append({k: v.clone() for k, v in pl_module.memory.all().items()})


@pytest.fixture(scope="module")
def icarl_run(tmp_path_factory):
    L.seed_everything(0)
    dm = _digits(n_tasks=3)
    model = ICaRL(buffer_size=36, lr=0.1)
    probe = MemoryProbe()
    trainer = ContinualTrainer(epochs_per_task=2, logger=False, callbacks=[probe],
                               default_root_dir=tmp_path_factory.mktemp("icarl"), **QUIET_TRAINER)
    trainer.fit(model, datamodule=dm)
    return model, trainer, dm, probe


def test_icarl_memory_per_class_shrinks_as_classes_arrive(icarl_run) -> None:
    model, trainer, dm, probe = icarl_run
    for task, snap in enumerate(probe.snapshots):
        n_seen = 3 * (task + 1)
        counts = torch.bincount(snap["y"], minlength=9)
        assert counts[:n_seen].tolist() == [36 // n_seen] * n_seen and counts[n_seen:].sum() == 0
        assert sorted(snap["rank"][snap["y"] == 0].tolist()) == list(range(36 // n_seen))
    # an old class keeps the best-ranked prefix of its herding order
    for before, after in zip(probe.snapshots, probe.snapshots[1:], strict=False):
        for c in range(3):
            keep = after["rank"][after["y"] == c]
            old = before["x"][before["y"] == c][before["rank"][before["y"] == c].argsort()]
            new = after["x"][after["y"] == c][keep.argsort()]
            assert torch.equal(new, old[: len(new)])
    assert model.teacher is not None and not any(p.requires_grad for p in model.teacher.parameters())


def test_icarl_first_exemplar_is_closest_to_the_class_mean(icarl_run) -> None:
    """Re-run the last task's herding by hand with the final network: same first pick per class."""
    model, trainer, dm, probe = icarl_run
    task = dm.stream[2]
    x, y, _ = task.train.__getitems__(list(range(len(task.train))))
    model.eval()
    with torch.no_grad():
        feats = F.normalize(model.features(x), dim=1)
    last = probe.snapshots[-1]
    for c in task.classes:
        rows = (y == c).nonzero().flatten()
        closest = rows[(feats[rows] - feats[rows].mean(0)).norm(dim=1).argmin()]
        first = last["x"][(last["y"] == c) & (last["rank"] == 0)]
        assert torch.equal(first[0], x[closest])


def test_icarl_nme_uses_the_exemplar_means(icarl_run) -> None:
    model, trainer, dm, probe = icarl_run
    model.eval()
    stored = model.memory.all()
    with torch.no_grad():
        feats = F.normalize(model.features(stored["x"]), dim=1)
        means = torch.stack([F.normalize(feats[stored["y"] == c].mean(0), dim=0) for c in range(9)])
        torch.testing.assert_close(model.class_means, means)
        assert model.nme_ready and bool(model.has_mean.all())
        correct, total = 0, 0
        for task in dm.stream:
            x, y, t = task.test.__getitems__(list(range(len(task.test))))
            f = F.normalize(model.features(x), dim=1)
            by_hand = torch.cdist(f, means).argmin(1)
            assert torch.equal(model(x, t).argmax(1), by_hand)
            correct += int((by_hand == y).sum())
            total += len(y)
        # the accuracy matrix was computed with NME as well
        row = trainer.accuracy_matrix[-1]
        per_task = [float((torch.cdist(F.normalize(model.features(tk.test.__getitems__(list(range(len(tk.test))))[0]),
                                                   dim=1), means).argmin(1) == tk.test.targets).float().mean())
                    for tk in dm.stream]
    assert row == pytest.approx(per_task)
    assert correct / total > 0.6


def test_icarl_checkpoint_round_trip(icarl_run, tmp_path) -> None:
    model, trainer, dm, probe = icarl_run
    trainer.save_checkpoint(tmp_path / "icarl.ckpt")
    loaded = ICaRL.load_from_checkpoint(tmp_path / "icarl.ckpt", map_location="cpu")
    assert loaded.nme_ready and loaded.teacher is not None
    for name in model.memory.fields:
        assert torch.equal(getattr(loaded.memory, f"data_{name}"), getattr(model.memory, f"data_{name}")), name
    assert torch.equal(loaded.class_means, model.class_means) and torch.equal(loaded.has_mean, model.has_mean)
    x, _, t = dm.stream[1].test.__getitems__(list(range(32)))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def _icarl_every_step(root: Path, ckpt_path: Path | None = None):
    return fit_saving_every_step(root, lambda: ICaRL(buffer_size=24, lr=0.1),
                                 {"source": "digits", "n_tasks": 3, "batch_size": 64, "class_order": list(range(6))},
                                 ckpt_path)


def test_icarl_resume_mid_task_is_bit_exact(tmp_path) -> None:
    """Resumed inside task 1 (teacher, exemplars merged into the epoch): the same run to the last bit."""
    full = _icarl_every_step(tmp_path / "full")
    per_epoch = full[0].global_step // 6
    step = 2 * per_epoch + per_epoch // 2 + 1  # second task, first epoch, mid-epoch
    assert_same_matrix_and_weights(full, _icarl_every_step(tmp_path / "resumed", tmp_path / "full" / f"step={step}.ckpt"))


def test_icarl_with_continual_evaluation_and_task_incremental_streams(tmp_path) -> None:
    L.seed_everything(0)
    dm = _digits(n_tasks=2, scenario="task")
    model = ICaRL(buffer_size=30, lr=0.1, replay_batch_size=8)
    evaluation = ContinualEvaluation(every_n_steps=5, samples_per_task=50)
    trainer = ContinualTrainer(epochs_per_task=1, logger=False, callbacks=[evaluation], default_root_dir=tmp_path,
                               **QUIET_TRAINER)
    trainer.fit(model, datamodule=dm)
    assert len(trainer.accuracy_matrix) == 2 and trainer.continual_results["metrics"]["final/avg_acc"] > 0.5
    x, _, t = dm.stream[1].test.__getitems__(list(range(20)))
    model.eval()
    with torch.no_grad():
        pred = model(x, t).argmax(1)
    assert set(pred.tolist()) <= set(dm.stream[1].classes)  # NME restricted to the sample's task


def test_icarl_refuses_domain_streams_and_tiny_memories() -> None:
    with pytest.raises(ConfigError, match="domain"):
        ICaRL(buffer_size=50).bind_stream(ContinualDataModule(source="digits", scenario="domain", tasks="permutation", n_tasks=2).stream)
    with pytest.raises(ConfigError, match="buffer_size"):
        ICaRL(buffer_size=5).bind_stream(_digits().stream)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config", ["der", "der_200", "derpp", "derpp_200", "icarl", "icarl_200"])
def test_config_runs_from_the_cli(config: str, tmp_path) -> None:
    """Each shipped config runs end to end (on the bundled digits, one batch per task)."""
    cli = run_cli(["fit", "--config", str(REPO / "configs/split_mnist" / f"{config}.yaml"), "--data.source=digits",
                   "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                   "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    assert type(cli.model).__name__ == {"der": "DER", "derpp": "DERpp", "icarl": "ICaRL"}[config.split("_")[0]]
    assert cli.model.hparams.buffer_size == (200 if config.endswith("_200") else 500)
    assert len(cli.trainer.accuracy_matrix) == 5
