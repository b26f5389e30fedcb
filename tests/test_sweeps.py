"""wandb sweeps and wandb logging, offline: the sweep files expand into the flags the agent sends,
every sampled value reaches the instantiated objects, and a run leaves its metric in the offline
run's summary (no network: WANDB_MODE=offline, every wandb folder under tmp_path)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.loggers import WandbLogger

from clframe.cli import ContinualCLI
from clframe.metrics.matrix import summarize_matrix
from clframe.sweeps import build_command, cli_args, command_args, expand, load_sweep, sample_value
from tests.helpers.wandb_offline import offline_runs

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
SAMPLES = 4
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"]


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    """No run may reach a server, and nothing may land in the repository."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(REPO)  # sweep commands name their base config relative to the repository root
    monkeypatch.setattr(sys, "argv", ["clframe"])  # LightningCLI(args=...) warns about pytest's own argv


def _into_tmp(tmp_path: Path) -> list[str]:
    return [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.offline=true"]


def instantiated(cli: ContinualCLI, name: str) -> Any:
    """The value a dotted sweep name ended up with in the built objects (not in the parsed config)."""
    group, _, key = name.partition(".")
    if group == "seed_everything":
        return torch.initial_seed()  # LightningCLI seeds the process before building anything
    if group == "model":
        return cli.model.hparams[key]
    if group == "data":
        return cli.datamodule.hparams[key]
    if group == "trainer":
        return getattr(cli.trainer, key)
    raise AssertionError(f"sweep parameter {name!r} is not model.*, data.*, trainer.* or seed_everything")


def parse_only(args: list[str]) -> ContinualCLI:
    """The CLI on ``fit ...`` arguments, building everything but running nothing."""
    assert args[0] == "fit"
    return ContinualCLI(args=[*args[1:], *_without_missing_backbone(args)], run=False)


def _without_missing_backbone(args: list[str]) -> list[str]:
    """The prompt sweeps' base configs load a small pretrained ViT that benchmarks/pretrain_backbone.py builds
    (not in the repository). Where it is absent, the same ViT is built with random weights: parsing and
    where each sampled value lands do not depend on the weights."""
    configs = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--config"]
    for config in configs:
        init = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("init_args") or {}
        checkpoint = init.get("checkpoint_path")
        if checkpoint and not (REPO / checkpoint).exists():
            return ["--model.checkpoint_path=null"]
    return []


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_a_runnable_wandb_sweep(path):
    sweep = load_sweep(path)
    assert sweep["method"] in ("random", "bayes", "grid")
    assert sweep["metric"]["goal"] in ("maximize", "minimize")
    command = [str(c) for c in sweep["command"]]
    assert command[:3] == ["${env}", "clframe", "fit"] and command[-1] == "${args}"
    configs = [command[i + 1] for i, c in enumerate(command) if c == "--config"]
    assert configs and all((REPO / c).is_file() for c in configs), configs
    assert "configs/loggers/wandb.yaml" in configs  # the run must log to wandb for the controller to see it
    rng = random.Random(0)
    for spec in sweep["parameters"].values():
        sample_value(spec, rng)  # every distribution is one we know how to expand


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_the_metric_is_one_the_trainer_logs(path):
    name = load_sweep(path)["metric"]["name"]
    logged = set(summarize_matrix([[0.9, math.nan], [0.8, 0.9]]))
    command = [str(c) for c in load_sweep(path)["command"]]
    if any(c.startswith("--data.val_fraction=") and float(c.split("=")[1]) > 0 for c in command):
        logged |= {k.replace("final/", "final/val_", 1) for k in logged}  # the validation matrix's summary
    if name.startswith("stability/"):  # logged only by ContinualEvaluation
        cli = parse_only(cli_args(build_command(load_sweep(path), {})))
        assert any(type(cb).__name__ == "ContinualEvaluation" for cb in cli.trainer.callbacks), name
    else:
        assert name in logged, f"{name} is never logged; the trainer logs {sorted(logged)}"


def test_flags_are_built_as_wandbs_agent_builds_them():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    values = {"model.lr": 5e-05, "model.online": False, "model.x": True, "model.buffer_size": 200,
              "model.replay_loss": "ce+tm", "seed_everything": 3, "model.loss_weight": 0.5}
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    ours = command_args(values)
    for macro in ("args", "args_no_hyphens", "args_no_boolean_flags", "args_no_equals", "args_json"):
        assert ours[macro] == theirs[macro], macro
    sweep = {"program": "train.py", "command": ["${env}", "${interpreter}", "${program}", "${args}", "${nope}"]}
    assert build_command(sweep, {"a": 1}) == ["/usr/bin/env", "python", "train.py", "--a=1"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sampled_value_reaches_the_built_objects(path, tmp_path):
    sweep = load_sweep(path)
    base_args = cli_args(build_command(sweep, {}))
    base_cli = parse_only([*base_args, *_into_tmp(tmp_path)])
    base = {name: instantiated(base_cli, name) for name in sweep["parameters"]}
    assert isinstance(base_cli.trainer.logger, WandbLogger)  # the second --config composed onto the first
    seen: dict[str, set[str]] = {name: set() for name in sweep["parameters"]}
    for values, args in expand(sweep, SAMPLES, seed=1):
        assert args[: len(base_args)] == base_args  # the sampled flags come after the base config
        cli = parse_only([*args, *_into_tmp(tmp_path)])
        for name, value in values.items():
            got = instantiated(cli, name)
            assert got == value and type(got) is type(value), f"{name}: sampled {value!r}, built with {got!r}"
            seen[name].add(repr(got))
    # The check above only means something if the sampled values differ from the config's own.
    for name, spec in sweep["parameters"].items():
        if "value" not in spec:
            assert seen[name] - {repr(base[name])}, f"{name}: every sample equals the base config's {base[name]!r}"


def test_ddp_ranks_rerun_the_agents_exact_command(monkeypatch):
    """Under DDP, Lightning starts ranks 1..N-1 by re-running this process's command line, so every
    rank parses the same sweep flags (no rank falls back to config defaults)."""
    from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd

    args = cli_args(build_command(load_sweep(SWEEPS[0]), {"model.lr": 0.05, "seed_everything": 1}))
    monkeypatch.setattr(sys, "argv", ["/usr/bin/clframe", *args])
    child = list(_basic_subprocess_cmd())
    assert child[-len(args):] == args


@pytest.mark.slow  # a whole clframe process with wandb offline: about a minute on a loaded 2-core machine
def test_a_sampled_sweep_run_puts_its_metric_in_the_offline_summary(tmp_path):
    """The agent's command for one sampled GeRe run, run as a process (short tasks, plus
    ContinualEvaluation for the plots), read back from the offline run file."""
    sweep = load_sweep(REPO / "configs" / "sweeps" / "gere.yaml")
    (values, _), = expand(sweep, 1, seed=3)
    command = build_command(sweep, values)
    assert command[:2] == ["/usr/bin/env", "clframe"]
    extra = [*_into_tmp(tmp_path), *QUIET, "--trainer.steps_per_task=5",
             "--trainer.callbacks+=clframe.callbacks.ContinualEvaluation", "--trainer.callbacks.every_n_steps=2",
             "--trainer.callbacks.samples_per_task=50"]
    proc = subprocess.run([sys.executable, "-m", "clframe.cli", *cli_args(command), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metric = sweep["metric"]["name"]
    (results,) = tmp_path.rglob("results.json")  # the wandb run's own folder: <save_dir>/<project>/<run id>
    expected = json.loads(results.read_text())
    (run,) = offline_runs(tmp_path)
    assert results.parent.name == run.path.name.rsplit("-", 1)[-1]
    assert run.summary[metric] == pytest.approx(expected["metrics"][metric])
    assert any(k.startswith("stability/") for k in run.summary)
    for name, value in values.items():  # the CLI config under the sweep's own names
        assert run.config[name] == value
    assert run.config["seed_everything"] == 0 and run.config["model.class_path"] == "clframe.strategies.GeRe"
    # Lightning's own hparams logging (model and data hparams, undotted) happens too
    assert run.config["lr"] == values["model.lr"] and run.config["batch_size"] == values["data.batch_size"]
    assert run.summary["continual_eval/plots"]["count"] == 2
    table = run.summary["accuracy_matrix"]
    assert table["_type"] == "table-file" and table["nrows"] == 2
    rows = json.loads((run.path / "files" / table["path"]).read_text())
    assert rows["columns"] == ["after_task", "task_0", "task_1"]
    assert rows["data"][1][1:] == pytest.approx(expected["accuracy_matrix"][1])
    assert rows["data"][0][2] is None  # task 1 not seen yet after task 0: an empty cell, not NaN
    assert len(list((run.path / "files" / "media" / "images").rglob("*.png"))) == 2  # the two plots


def test_the_local_sweep_example_runs_offline(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("run_sweep", REPO / "examples" / "run_sweep.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    records = example.main(["configs/sweeps/gere.yaml", "--runs", "2", "--seed", "5", "--save-dir", str(tmp_path),
                            "--", *QUIET, "--trainer.steps_per_task=3"])
    assert len(records) == 2 and records[0]["values"] != records[1]["values"]
    out = capsys.readouterr().out
    metric = "final/val_avg_acc"  # the sweep selects on held-out validation data
    for r in records:
        assert 0.0 <= r[metric] <= 1.0 and f"{metric} = {r[metric]:.4f}" in out
        (run,) = offline_runs(tmp_path / f"run_{r['run']}")
        assert run.summary[metric] == pytest.approx(r[metric])
    assert json.loads((tmp_path / "sweep_results.json").read_text())[1]["values"] == records[1]["values"]
