"""What a user sees: ``clframe --help`` lists what exists, config errors name the key and the
allowed values, the progress bar shows the task, and the run ends with a readable summary."""

from __future__ import annotations

import math

import lightning as L
import pytest

from clframe import catalog
from clframe.callbacks.progress import TaskRichProgressBar, TaskTQDMProgressBar, task_description
from clframe.cli import explain_parser_error, run_cli
from clframe.data.datamodule import ContinualDataModule
from clframe.metrics.summary import format_results
from clframe.strategies import ER
from clframe.trainer import ContinualTrainer
from tests.conftest import QUIET_TRAINER


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(args)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_help_lists_every_strategy_source_scenario_and_benchmark(capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    names = list(catalog.strategies())
    assert {"ER", "DER", "DERpp", "EWC", "LwF", "SupSup", "HyperInterval", "GeRe"} <= set(names)
    for name in names:
        assert f"\n  {name} " in out, name
    for source in catalog.source_names():
        assert source in out
    assert "class-incremental" in out and "domain-incremental" in out
    assert "split_mnist" in out and "permuted_mnist" in out  # the repo's benchmark configs
    assert "Train on every task of the stream" in out  # fit's own description


def test_a_wrong_choice_names_the_key_and_the_allowed_values(capsys):
    err = _cli_error(["fit", "--data.scenario=klass"], capsys)
    assert err == "error: data.scenario: 'klass' is not allowed (did you mean 'class'?); choose one of: class, task, domain"


def test_an_unknown_strategy_lists_the_strategies(capsys):
    err = _cli_error(["fit", "--model=ERR"], capsys)
    assert "model: unknown strategy 'ERR' (did you mean 'ER'?)" in err
    assert all(name in err for name in ("DERpp", "EWC", "HyperInterval"))


def test_an_unknown_strategy_option_suggests_the_right_one(capsys):
    err = _cli_error(["fit", "--model.bufer_size=3"], capsys)
    assert "model.init_args.bufer_size" in err and "did you mean 'buffer_size'?" in err
    assert "lr" in err.split("its options:")[1]  # inherited options are listed too


def test_an_unknown_key_in_a_config_file_suggests_the_right_one(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  epocs_per_task: 3\n")
    err = _cli_error(["fit", "--config", str(config)], capsys)
    assert "'trainer.epocs_per_task'" in err and "did you mean 'trainer.epochs_per_task'?" in err


def test_a_wrong_type_names_the_key(capsys):
    assert _cli_error(["fit", "--trainer.epochs_per_task=abc"], capsys) == \
        "error: trainer.epochs_per_task: expected int, got 'abc'"
    err = _cli_error(["fit", "--model.lr=abc"], capsys)
    assert err.startswith("error: model.init_args.lr (clframe.strategies.ER):") and "abc" in err


def test_unknown_error_shapes_pass_through_unchanged():
    assert explain_parser_error("something jsonargparse says") == "something jsonargparse says"


class _Descriptions(L.Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(task_description(trainer))


def test_the_progress_bar_counts_tasks_and_epochs_within_the_task(tmp_path):
    spy = _Descriptions()
    trainer = ContinualTrainer(epochs_per_task=2, default_root_dir=tmp_path, logger=False, callbacks=[spy],
                               enable_checkpointing=False, enable_model_summary=False)
    assert isinstance(trainer.progress_bar_callback, TaskRichProgressBar | TaskTQDMProgressBar)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=64, train_samples_per_class=20,
                               test_samples_per_class=5)
    trainer.fit(ER(backbone="mlp", backbone_kwargs={"hidden_sizes": [16]}, buffer_size=20), datamodule=data)
    assert spy.seen == ["Task 1/2 · epoch 1/2", "Task 1/2 · epoch 2/2", "Task 2/2 · epoch 1/2", "Task 2/2 · epoch 2/2"]


def test_a_progress_bar_the_user_chose_is_kept(tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    mine = TQDMProgressBar(refresh_rate=5)
    trainer = ContinualTrainer(default_root_dir=tmp_path, logger=False, callbacks=[mine])
    assert trainer.progress_bar_callback is mine
    assert ContinualTrainer(logger=False, **QUIET_TRAINER).progress_bar_callback is None


def test_the_summary_is_a_table_with_readable_names_and_units():
    results = {"accuracy_matrix": [[0.9, math.nan], [0.8, 0.95]], "seed": 3,
               "stream": {"name": "split_mnist", "scenario": "class", "tasks": 2},
               "metrics": {"final/avg_acc": 0.875, "final/bwt": -0.1, "stability/gap_recovery_steps_task1": 40.0,
                           "stability/gap_depth": 0.2, "custom/steps_to_recover": 12.0}}
    text = format_results(results, "ER")
    assert "== ER on split_mnist (class-incremental, 2 tasks, seed 3) ==" in text
    lines = text.splitlines()
    assert any(line.split() == ["average", "accuracy", "(ACC)", "87.50", "%", "final/avg_acc"] for line in lines)
    assert any(line.split() == ["backward", "transfer", "(BWT)", "-10.00", "%", "final/bwt"] for line in lines)
    assert any(line.split() == ["custom/steps_to_recover", "12", "custom/steps_to_recover"] for line in lines)
    assert "_task1" not in text  # per-task entries stay in the logs
    assert "  -   " in text  # the not-yet-evaluated cell
