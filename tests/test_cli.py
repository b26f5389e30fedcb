"""The clframe command, run through its Python entry with argument lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clframe.cli import DEFAULT_CONFIG, run_cli, with_default_config
from clframe.strategies import ER, EWC

REPO = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar=false", "--trainer.epochs_per_task=1"]


def test_fit_without_config_uses_the_embedded_default():
    assert with_default_config(["fit"]) == ["fit", "--config", str(DEFAULT_CONFIG)]
    assert with_default_config(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]


def test_default_experiment_runs_and_reports_the_matrix(tmp_path, capsys):
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", *FAST])
    assert isinstance(cli.model, ER)
    matrix = cli.trainer.accuracy_matrix
    assert len(matrix) == 5 and all(len(r) == 5 for r in matrix)
    out = capsys.readouterr().out
    assert "Accuracy matrix" in out and "average accuracy (ACC)" in out and "final/avg_acc" in out
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert results["accuracy_matrix"][-1] == pytest.approx(matrix[-1])
    assert 0.5 < results["metrics"]["final/avg_acc"] <= 1.0


def test_dotted_overrides_reach_the_model_and_data(tmp_path):
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", *FAST, "--model.buffer_size=37",
                   "--model.lr=0.02", "--data.n_tasks=2", "--data.batch_size=16"])
    assert cli.model.buffer.capacity == 37
    assert cli.model.hparams.lr == 0.02
    assert len(cli.datamodule.stream) == 2 and cli.datamodule.hparams.batch_size == 16
    assert len(cli.trainer.accuracy_matrix) == 2


def test_switching_the_strategy_class(tmp_path):
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", *FAST, "--model=EWC", "--model.ewc_lambda=5",
                   "--data.n_tasks=2"])
    assert isinstance(cli.model, EWC) and cli.model.hparams.ewc_lambda == 5


def test_omegaconf_interpolation_in_configs(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(DEFAULT_CONFIG.read_text() + "  eval_batch_size: ${data.batch_size}\n")
    cli = run_cli(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *FAST, "--data.n_tasks=2"])
    assert cli.datamodule.hparams.eval_batch_size == cli.datamodule.hparams.batch_size == 10


def test_the_stream_seed_follows_the_run_seed(tmp_path):
    args = ["fit", f"--trainer.default_root_dir={tmp_path}", *FAST, "--data.n_tasks=2", "--data.shuffle_classes=true"]
    first = run_cli([*args, "--seed_everything=1"]).datamodule
    second = run_cli([*args, "--seed_everything=2"]).datamodule
    assert first.seed == 1 and second.seed == 2
    assert first.stream.description["class_order"] != second.stream.description["class_order"]


def test_print_config_shows_the_resolved_experiment():
    proc = subprocess.run([sys.executable, "-m", "clframe.cli", "fit", "--print_config"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "class_path: clframe.strategies.ER" in proc.stdout and "buffer_size: 200" in proc.stdout


def test_a_config_key_that_does_not_exist_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clframe.cli", "fit", "--model.bufer_size=3"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "bufer_size" in proc.stderr


CLI_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                     if p.parent.name not in ("sweeps", "loggers"))  # sweeps: wandb's format, see test_sweeps


@pytest.mark.parametrize("config", CLI_CONFIGS)
def test_every_shipped_config_parses(config, capsys):
    """Parsed in-process (print_config exits before anything is built), so each config costs milliseconds."""
    with pytest.raises(SystemExit) as stop:
        run_cli(["fit", "--config", str(REPO / config), "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err
    assert "class_path:" in capsys.readouterr().out
