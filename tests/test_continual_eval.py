"""The ContinualEvaluation callback: per-iteration curves, stability metrics, outputs, no side effects."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from clframe import ER, ContinualDataModule, ContinualTrainer, Finetune
from clframe.callbacks import ContinualEvaluation
from tests.conftest import QUIET_TRAINER


class BNNet(nn.Module):
    """A backbone with BatchNorm and dropout: evaluation must not change either's behaviour in training."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3))
        self.num_features = 64

    def forward(self, x):
        return self.net(x)


def _run(tmp_path, callbacks=(), strategy=ER, epochs=1, n_tasks=3, logger=False, **model_kwargs):
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=n_tasks, batch_size=16,
                               class_order=list(range(2 * n_tasks)))
    if model_kwargs.get("backbone") is BNNet:
        model_kwargs = {**model_kwargs, "backbone": BNNet()}  # built after seeding: same init in every run
    model = strategy(**model_kwargs)
    trainer = ContinualTrainer(epochs_per_task=epochs, callbacks=list(callbacks), logger=logger,
                               default_root_dir=tmp_path, **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    return trainer, model


def test_evaluation_never_changes_training(tmp_path):
    _, plain = _run(tmp_path / "a", backbone=BNNet, buffer_size=50, lr=0.05)
    cb = ContinualEvaluation(every_n_steps=1, plots=False)
    _, evaluated = _run(tmp_path / "b", [cb], backbone=BNNet, buffer_size=50, lr=0.05)
    assert len(cb.steps) > 50
    for (name, a), (_, b) in zip(plain.state_dict().items(), evaluated.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name  # weights, BatchNorm statistics and the replay buffer
        else:
            assert torch.equal(a["generator"], b["generator"]), name  # the buffer's random state


class FlagRecorder(L.Callback):
    def __init__(self) -> None:
        self.before, self.mismatches = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [m.training for m in pl_module.modules()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mismatches += self.before != [m.training for m in pl_module.modules()]


def test_train_and_eval_flags_are_restored_exactly(tmp_path):
    from clframe import LwF  # its frozen teacher stays in eval mode while the student trains

    rec = FlagRecorder()
    _run(tmp_path, [ContinualEvaluation(plots=False), rec], strategy=LwF, backbone=BNNet, lr=0.05)
    assert rec.before is not None and not all(rec.before)  # mixed flags were present
    assert rec.mismatches == 0


def test_every_step_is_evaluated_on_fixed_subsets(tmp_path):
    cb = ContinualEvaluation(every_n_steps=1, samples_per_task=20, plots=False)
    trainer, _ = _run(tmp_path, [cb])
    steps = sorted(set(cb.steps))
    assert steps == list(range(0, trainer.global_step + 1))
    assert len(cb.task_ends) == 3 and cb.task_ends[-1] == trainer.global_step
    # each evaluation scores exactly 20 samples per seen task: accuracies are multiples of 1/20
    for row, task in zip(cb.accuracy, cb.trained_task, strict=True):
        seen = row[: task + 1]
        assert all(abs(a * 20 - round(a * 20)) < 1e-9 for a in seen)
        assert all(a != a for a in row[task + 1:])  # future tasks not evaluated


def test_period_and_epoch_end_evaluations(tmp_path):
    cb = ContinualEvaluation(every_n_steps=7, plots=False)
    trainer, _ = _run(tmp_path, [cb], epochs=2)
    assert all(s % 7 == 0 or s in _epoch_ends(trainer, cb) for s in cb.steps)
    assert trainer.global_step in cb.steps


def _epoch_ends(trainer, cb):
    per_task = trainer.global_step // len(cb.task_ends)
    return {k * per_task // 2 for k in range(1, 2 * len(cb.task_ends) + 1)} | set(cb.task_ends) | {0}


def test_outputs_metrics_curves_and_plots(tmp_path):
    cb = ContinualEvaluation(every_n_steps=1)
    trainer, _ = _run(tmp_path, [cb], logger=CSVLogger(tmp_path, name="logs"))
    out = trainer.log_dir
    metrics = trainer.continual_results["metrics"]
    for key in ("final/avg_acc", "final/avg_forgetting", "final/bwt", "stability/min_acc", "stability/wc_acc",
                "stability/wf10", "stability/wp10", "stability/wf100", "stability/gap_depth"):
        assert key in metrics, key
    saved = json.loads(open(f"{out}/results.json").read())
    assert saved["metrics"]["stability/min_acc"] == pytest.approx(metrics["stability/min_acc"])
    with open(f"{out}/continual_eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cb.steps) and "acc_task_2" in rows[0] and "loss_task_0" in rows[0]
    for png in ("stability_gap.png", "accuracy_matrix.png"):
        assert open(f"{out}/{png}", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    logged = open(f"{out}/metrics.csv").read()
    assert "stability/min_acc" in logged and "continual_eval/acc_task_0" in logged


def test_er_split_digits_shows_the_gap(tmp_path):
    """CPU-sized check (one seed): ER has a deep gap that end-of-epoch evaluation hides."""
    kw = dict(backbone_kwargs={"hidden_sizes": [400, 400], "init": "default"}, buffer_size=100,
              buffer_policy="class_balanced", new_weight=0.5, lr=0.01, momentum=0.9)
    fine = ContinualEvaluation(every_n_steps=1, plots=False)
    trainer, _ = _run(tmp_path / "fine", [fine], epochs=5, n_tasks=5, **kw)
    m = trainer.continual_results["metrics"]
    acc, min_acc, wc = m["final/avg_acc"], m["stability/min_acc"], m["stability/wc_acc"]
    assert acc >= 0.8
    assert min_acc <= acc - 0.3
    assert wc < acc
    coarse = ContinualEvaluation(every_n_steps=10**6, plots=False)  # only at epoch ends
    trainer, _ = _run(tmp_path / "coarse", [coarse], epochs=5, n_tasks=5, **kw)
    assert trainer.continual_results["metrics"]["stability/min_acc"] > min_acc + 0.1

    ft = ContinualEvaluation(every_n_steps=1, plots=False)
    trainer, _ = _run(tmp_path / "ft", [ft], strategy=Finetune, epochs=5, n_tasks=5,
                      backbone_kwargs=kw["backbone_kwargs"], lr=0.01, momentum=0.9)
    m = trainer.continual_results["metrics"]
    assert m["final/avg_acc"] < 0.3 and m["stability/min_acc"] < 0.05


def test_plots_reach_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="clframe-tests")
    try:
        trainer, _ = _run(tmp_path, [ContinualEvaluation()], n_tasks=2, logger=logger, buffer_size=20)
    finally:
        wandb.finish()
    media = list(tmp_path.rglob("media/images/continual_eval/*.png"))
    assert len(media) == 2
    assert "stability/min_acc" in trainer.continual_results["metrics"]


def test_stability_metrics_without_end_of_task_tests(tmp_path):
    cb = ContinualEvaluation(every_n_steps=5, plots=False)
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=32, class_order=[0, 1, 2, 3])
    trainer = ContinualTrainer(epochs_per_task=1, eval_after_task=False, callbacks=[cb], logger=False,
                               default_root_dir=tmp_path, **QUIET_TRAINER)
    trainer.fit(ER(buffer_size=20), datamodule=data)
    assert trainer.accuracy_matrix == [[], []]
    assert "stability/min_acc" in trainer.continual_results["metrics"]
    assert (tmp_path / "continual_eval.csv").exists()
