"""Per-step and per-task work that is skipped because it has no effect: Lightning's empty hooks, a pass-through
profiler context per call, the model summary and hyperparameters sent again with every task, the identity
normalisation. Each skip must leave what users see unchanged."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import LambdaCallback, ModelSummary
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.profilers import SimpleProfiler

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.hooks import PER_BATCH_HOOKS, PassThrough
from tests.conftest import QUIET_TRAINER


class _Counts(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


class _CountingER(ER):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backwards = 0

    def on_after_backward(self) -> None:
        self.backwards += 1


def _dm() -> ContinualDataModule:
    return ContinualDataModule(n_tasks=3, class_order=list(range(6)), batch_size=16)


def test_overridden_hooks_run_and_no_shadow_is_left_behind(tmp_path):
    counts, lam = _Counts(), []
    lambda_cb = LambdaCallback(on_train_batch_start=lambda *a: lam.append(1))
    trainer = ContinualTrainer(steps_per_task=4, default_root_dir=tmp_path, logger=False, callbacks=[counts, lambda_cb],
                               **QUIET_TRAINER)
    model = _CountingER(buffer_size=20)
    trainer.fit(model, datamodule=_dm())
    assert counts.batches == model.backwards == len(lam) == 12
    for obj in (model, *trainer.callbacks):
        assert not [name for name in PER_BATCH_HOOKS if vars(obj).get(name, 0) is None], type(obj).__name__
    assert callable(model.on_train_batch_start) and callable(counts.on_before_backward)


class _TransferringER(ER):
    """Overrides the three batch-transfer hooks: each must still be called, every batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = {"before": 0, "transfer": 0, "after": 0}

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.calls["before"] += 1
        return batch

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.calls["transfer"] += 1
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls["after"] += 1
        return batch


class _NoBatchIdxER(ER):
    """A ``training_step`` without ``batch_idx``: Lightning passes the batch alone, and so must the shortcut."""

    def training_step(self, batch):  # type: ignore[override]
        return super().training_step(batch, 0)


class _DataHookModule(ContinualDataModule):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.after = getattr(self, "after", 0) + 1
        return batch


LEAN_DISPATCH = ("_build_kwargs", "_on_before_batch_transfer", "_apply_batch_transfer_handler")


def _no_lean_dispatch_left(trainer, model) -> bool:
    return not any(name in vars(obj) for obj in (model, trainer.fit_loop.epoch_loop) for name in LEAN_DISPATCH)


def test_overridden_batch_transfer_hooks_run_every_batch(tmp_path):
    trainer = ContinualTrainer(steps_per_task=4, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
    model = _TransferringER(buffer_size=20)
    trainer.fit(model, datamodule=_dm())
    # 12 training batches, plus the evaluation batches (each seen task's test set after each task)
    assert model.calls["before"] == model.calls["transfer"] == model.calls["after"] > 12
    assert _no_lean_dispatch_left(trainer, model)


def test_a_data_module_hook_and_a_step_without_batch_idx_are_honoured(tmp_path):
    dm = ContinualDataModule(n_tasks=3, class_order=list(range(6)), batch_size=16)
    hooked = _DataHookModule(n_tasks=3, class_order=list(range(6)), batch_size=16)
    rows = []
    for datamodule in (dm, hooked):
        torch.manual_seed(0)
        trainer = ContinualTrainer(steps_per_task=3, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
        model = _NoBatchIdxER(buffer_size=20)
        trainer.fit(model, datamodule=datamodule)
        rows.append(trainer.accuracy_matrix)
        assert _no_lean_dispatch_left(trainer, model)
    assert hooked.after > 9 and repr(rows[0]) == repr(rows[1])  # repr: NaN (not yet seen) equals NaN


def test_default_profiler_is_a_pass_through_and_a_given_one_is_kept(tmp_path):
    assert isinstance(ContinualTrainer(logger=False, **QUIET_TRAINER).profiler, PassThrough)
    given = ContinualTrainer(logger=False, profiler=SimpleProfiler(), **QUIET_TRAINER).profiler
    assert isinstance(given, SimpleProfiler)


def test_summary_and_hyperparameters_go_out_once_per_stream(tmp_path, monkeypatch):
    summaries, logged = [], []
    monkeypatch.setattr(ModelSummary, "on_fit_start", lambda *a, **k: summaries.append(1))  # Rich one too
    original = CSVLogger.log_hyperparams
    monkeypatch.setattr(CSVLogger, "log_hyperparams", lambda self, *a, **k: (logged.append(1), original(self, *a, **k)))
    trainer = ContinualTrainer(steps_per_task=2, default_root_dir=tmp_path, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=True)
    model, dm = ER(buffer_size=20), _dm()
    trainer.fit(model, datamodule=dm)
    assert len(summaries) == 1 and len(logged) == 1  # 3 fits and 3 tests
    assert "buffer_size" in (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert any(isinstance(cb, ModelSummary) for cb in trainer.callbacks)  # back for later runs
    assert model._log_hyperparams and dm._log_hyperparams


def test_identity_normalisation_is_skipped_and_exact():
    raw = ContinualDataModule(n_tasks=2, class_order=list(range(4)), normalize=False)
    model = ER(buffer_size=10)
    model.bind_stream(raw.stream)
    assert not model._normalize_inputs
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(model.preprocess(x), x.float().div_(255.0))
    normalised = ER(buffer_size=10)
    normalised.bind_stream(ContinualDataModule(n_tasks=2, class_order=list(range(4))).stream)
    assert normalised._normalize_inputs
    model.load_state_dict(normalised.state_dict())  # mean and std come with the weights
    assert model._normalize_inputs and torch.equal(model.preprocess(x), normalised.preprocess(x))
