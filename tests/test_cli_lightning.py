"""Lightning's subcommands and conventions from the clframe command: test / validate / predict report,
every logger gets a folder per run (kept on resume), any backbone from the default config, a quiet console."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.cli import canonical_strategy_args, run_cli
from clframe.errors import ConfigError
from tests.conftest import QUIET_TRAINER

TINY = ["--trainer.enable_progress_bar=false", "--trainer.steps_per_task=3", "--data.n_tasks=2"]


# ---------------------------------------------------------------------------------------------- subcommands
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short default run with a validation split and a last.ckpt."""
    root = tmp_path_factory.mktemp("fit")
    common = [*TINY, "--data.val_fraction=0.2", f"--trainer.default_root_dir={root}"]
    cli = run_cli(["fit", *common, "--trainer.enable_checkpointing=true", "--trainer.callbacks+=ModelCheckpoint",
                   f"--trainer.callbacks.dirpath={root / 'ckpt'}", "--trainer.callbacks.save_last=true"])
    return root, common, cli.trainer.accuracy_matrix


def test_fit_prints_its_log_folder_at_start_and_end(fitted, capsys):
    root, common, _ = fitted
    run_cli(["fit", *common, "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root / 'other'}"])
    out = capsys.readouterr().out
    folder = (root / "other" / "lightning_logs" / "version_0").resolve()
    assert f"clframe: logging to {folder}" in out and f"clframe: logs and results in {folder}" in out
    assert out.index("logging to") < out.index("Accuracy matrix") < out.index("logs and results in")


def test_test_subcommand_prints_logs_and_writes_the_matrix_row(fitted, capsys):
    root, common, matrix = fitted
    cli = run_cli(["test", *common, "--ckpt_path", str(root / "ckpt" / "last.ckpt")])
    out = capsys.readouterr().out
    assert "Test accuracy of the checkpoint (trained up to task 1)" in out and "test/avg_acc_seen" in out
    assert cli.evaluation["row"] == pytest.approx(matrix[-1])  # the last row of the fit's accuracy matrix
    folder = Path(cli.trainer.log_dir)
    assert json.loads((folder / "test_results.json").read_text())["row"] == pytest.approx(matrix[-1])
    header = (folder / "metrics.csv").read_text().splitlines()[0]
    assert "test/acc_task_0" in header and "test/acc_task_1" in header


def test_validate_subcommand_reports_the_validation_row(fitted, capsys):
    root, common, _ = fitted
    cli = run_cli(["validate", *common, "--ckpt_path", str(root / "ckpt" / "last.ckpt")])
    assert "Validation accuracy of the checkpoint" in capsys.readouterr().out
    assert set(cli.evaluation["metrics"]) == {"val/acc_task_0", "val/acc_task_1", "val/avg_acc_seen"}


def test_predict_subcommand_returns_predictions_with_task_ids(fitted):
    root, common, matrix = fitted
    cli = run_cli(["predict", *common, "--ckpt_path", str(root / "ckpt" / "last.ckpt")])
    pred = cli.predictions
    assert set(pred) == {"task_id", "target", "prediction"} and set(pred["task_id"].tolist()) == {0, 1}
    correct = (pred["prediction"] == pred["target"]).float()
    for task in (0, 1):
        assert correct[pred["task_id"] == task].mean().item() == pytest.approx(matrix[-1][task])
    lines = (Path(cli.trainer.log_dir) / "predictions.csv").read_text().splitlines()
    assert lines[0] == "task_id,target,prediction" and len(lines) == len(correct) + 1


# ---------------------------------------------------------------------------------------------- run folders
class _RunLogger(Logger):
    """A logger with a run id and a save_dir but no versioned folder of its own (like wandb)."""

    counter = 0

    def __init__(self, save_dir: Path) -> None:
        super().__init__()
        _RunLogger.counter += 1
        self._save_dir, self._version = str(save_dir), f"run{_RunLogger.counter}"

    name = property(lambda self: "project")
    version = property(lambda self: self._version)
    save_dir = property(lambda self: self._save_dir)

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _short_run(root: Path, logger, ckpt_path=None, every_step: bool = False):
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=64, class_order=list(range(4)))
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")] \
        if every_step else []
    trainer = ContinualTrainer(epochs_per_task=1, logger=logger, callbacks=callbacks, default_root_dir=root,
                               **{**QUIET_TRAINER, "enable_checkpointing": every_step})
    trainer.fit(ER(buffer_size=20, backbone_kwargs={"hidden_sizes": [16]}), datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_a_logger_without_versions_gets_a_folder_per_run(tmp_path):
    first = _short_run(tmp_path, _RunLogger(tmp_path))
    second = _short_run(tmp_path, _RunLogger(tmp_path))
    assert first.log_dir != second.log_dir
    for trainer in (first, second):
        assert Path(trainer.log_dir).parent == tmp_path / "project"
        assert (Path(trainer.log_dir) / "results.json").is_file()


def test_a_resumed_run_logs_on_in_its_own_folder(tmp_path, capsys):
    full = _short_run(tmp_path, CSVLogger(tmp_path), every_step=True)
    mid = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))[3]
    capsys.readouterr()
    resumed = _short_run(tmp_path, CSVLogger(tmp_path), ckpt_path=mid)
    assert resumed.log_dir == full.log_dir
    assert f"clframe: logging to {Path(full.log_dir).resolve()}" in capsys.readouterr().out  # said at the start too
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]


# ---------------------------------------------------------------------------------------------- backbones
def test_a_timm_backbone_runs_from_the_default_config(tmp_path):
    cli = run_cli(["fit", *TINY, "--trainer.steps_per_task=1", f"--trainer.default_root_dir={tmp_path}",
                   "--model.backbone=timm:resnet18"])
    assert type(cli.model.backbone).__name__ == "ResNet" and len(cli.trainer.accuracy_matrix) == 2


def test_backbone_options_of_another_backbone_are_named(tmp_path):
    args = ["fit", *TINY, f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="backbone 'mlp' has no option.*'hiden_sizes'.*did you mean 'hidden_sizes'"):
        run_cli([*args, "--model.backbone_kwargs={hiden_sizes: [8]}"])
    with pytest.raises(ConfigError, match="timm:resnet18 has no option 'hidden_sizes'.*its options: .*layers"):
        run_cli([*args, "--model.backbone=timm:resnet18", "--model.backbone_kwargs={hidden_sizes: [8]}"])


def test_pretrained_weights_offline_is_one_clear_error(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    from clframe.models.factory import create_backbone

    with pytest.raises(ConfigError, match="checkpoint_path") as err:
        create_backbone("timm:resnet18", (3, 8, 8), pretrained=True)
    assert "could not be loaded (OSError" in str(err.value)


# ---------------------------------------------------------------------------------------------- console
def test_strategy_names_in_any_case():
    assert canonical_strategy_args(["fit", "--model=DERPP", "--model", "icarl"]) == \
        ["fit", "--model=DERpp", "--model", "ICaRL"]
    assert canonical_strategy_args(["--model=my.module.Class"]) == ["--model=my.module.Class"]


def test_option_values_in_any_case_and_suggestions(capsys):
    with pytest.raises(SystemExit) as stop:  # --print_config exits after parsing
        run_cli(["fit", "--print_config", "--data.scenario=Task", "--model=er", "--model.buffer_policy=Class_Balanced"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert "scenario: task" in out and "buffer_policy: class_balanced" in out
    with pytest.raises(SystemExit):
        run_cli(["fit", "--print_config", "--model=DERP"])
    assert "did you mean 'DERpp'?" in capsys.readouterr().err


def test_tips_and_repeated_checkpoint_warnings_are_silenced(tmp_path, capsys, caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _short_run(tmp_path, False, every_step=True)  # two tasks: the folder this run filled is not reported
        assert not [w for w in caught if "exists and is not empty" in str(w.message)]
        _short_run(tmp_path, False, every_step=True)  # a folder with files from before: that is said once
        assert len([w for w in caught if "exists and is not empty" in str(w.message)]) == 1
    assert "💡" not in capsys.readouterr().out + caplog.text


def test_a_wandb_run_has_its_own_folder_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    try:
        full = _short_run(tmp_path, WandbLogger(save_dir=str(tmp_path), offline=True, project="p"), every_step=True)
        folder = Path(full.log_dir)
        wandb.finish()
        mid = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))[3]
        resumed = _short_run(tmp_path, WandbLogger(save_dir=str(tmp_path), offline=True, project="p"), ckpt_path=mid)
    finally:
        wandb.finish()
    assert folder.parent == tmp_path / "p" and (folder / "results.json").is_file()
    assert resumed.log_dir == str(folder)  # the same wandb run id, the same folder
    assert [p.name for p in (tmp_path / "p").iterdir()] == [folder.name]


def test_barebones_mode_runs_a_stream(tmp_path):
    """Lightning's ``barebones=True`` refuses a logger and a progress bar: ContinualTrainer adds neither then."""
    trainer = ContinualTrainer(barebones=True, steps_per_task=2, default_root_dir=tmp_path, accelerator="cpu")
    assert trainer.loggers == [] and trainer.progress_bar_callback is None
    trainer.fit(ER(buffer_size=20), datamodule=ContinualDataModule(n_tasks=2, class_order=list(range(4)), batch_size=16))
    assert len(trainer.accuracy_matrix) == 2 and (tmp_path / "results.json").is_file()


def test_trainer_test_and_validate_return_the_accuracies_like_any_lightning_module(tmp_path):
    """Called by the user after a stream, ``trainer.test`` / ``trainer.validate`` return (and log) the per-task
    accuracies and their mean over the seen tasks, as Lightning users expect from these calls."""
    dm = ContinualDataModule(n_tasks=2, class_order=list(range(4)), batch_size=16, val_fraction=0.2)
    trainer = ContinualTrainer(steps_per_task=3, default_root_dir=tmp_path, **QUIET_TRAINER)
    model = ER(buffer_size=20)
    trainer.fit(model, datamodule=dm)
    (tested,) = trainer.test(model, datamodule=dm, verbose=False)
    assert set(tested) == {"test/acc_task_0", "test/acc_task_1", "test/avg_acc_seen"}
    assert [tested["test/acc_task_0"], tested["test/acc_task_1"]] == pytest.approx(trainer.accuracy_matrix[-1])
    (validated,) = trainer.validate(model, datamodule=dm, verbose=False)
    assert {"val/acc_task_0", "val/acc_task_1", "val/avg_acc_seen"} <= set(validated)
