"""Exact resume: a run killed with SIGKILL at a random step and restarted with ``--ckpt_path last``
ends with the same accuracy matrix and bit-identical final weights and strategy state."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "ER": ["--model=ER", "--model.buffer_size=60"],
    "EWC": ["--model=EWC", "--model.ewc_lambda=50"],
    "LwF": ["--model=LwF"],  # per-task state: the teacher snapshot taken at every task start
    # view-batch: the R-epoch sampler position, augmentation draws and the SSL term must all resume
    "ER-viewbatch": ["--model=ER", "--model.buffer_size=60", "--data.views_per_sample=2",
                     "--model.view_batch.noise=0.2", "--model.view_batch.ssl=true"],
    "iCaRL-viewbatch": ["--model=ICaRL", "--model.buffer_size=60", "--data.views_per_sample=2",
                        "--model.view_batch.noise=0.2", "--model.view_batch.ssl=true"],
}


def _fit(root: Path, ckpt_dir: Path, extra: list[str], *more: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clframe.cli", "fit", f"--trainer.default_root_dir={root}",
           "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true", "--trainer.epochs_per_task=2",
           "--data.n_tasks=5",
           "--data.batch_size=32", "--model.init_args.backbone_kwargs.dropout=0.2",  # exercises the global RNG
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           f"--trainer.callbacks.dirpath={ckpt_dir}", "--trainer.callbacks.every_n_train_steps=1",
           "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0", *extra, *more]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_env()})


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("HOME", "PYTHONPATH", "VIRTUAL_ENV", "PATH")}


def _results(root: Path) -> dict:
    return json.loads(max(root.rglob("results.json"), key=lambda p: p.stat().st_mtime).read_text())


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


SLOW = {"ER-viewbatch", "iCaRL-viewbatch"}  # three processes each; run with -m slow (CI runs both suites)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(STRATEGIES)])
def test_killed_run_resumes_exactly(tmp_path, name):
    extra = STRATEGIES[name]
    full = _fit(tmp_path / "full", tmp_path / "full_ckpt", extra)
    assert full.returncode == 0, full.stderr[-2000:]
    total_steps = _results(tmp_path / "full")["accuracy_matrix"] and torch.load(
        tmp_path / "full_ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]

    kill_at = random.Random(name).randint(3, total_steps - 3)  # a random step, reproducible per strategy
    killed = _fit(tmp_path / "killed", tmp_path / "ckpt", extra,
                  "--trainer.callbacks+=tests.helpers.kill.KillAtStep", f"--trainer.callbacks.step={kill_at}")
    assert killed.returncode == -9, f"expected SIGKILL at step {kill_at}: {killed.stderr[-2000:]}"
    assert not list((tmp_path / "killed").rglob("results.json"))

    resumed = _fit(tmp_path / "resumed", tmp_path / "ckpt", extra, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert _results(tmp_path / "resumed")["accuracy_matrix"] == _results(tmp_path / "full")["accuracy_matrix"]
    a, b = _state(tmp_path / "full_ckpt" / "last.ckpt"), _state(tmp_path / "ckpt" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming from step {kill_at}"


@pytest.mark.slow
def test_run_killed_at_a_task_start_resumes_exactly(tmp_path):
    """SIGKILL when task 2 starts (after task 1's end hooks and evaluation): the last checkpoint is task 1's
    last batch, and task 2 has more batches per epoch (9, 9, 10, 9, 9), so a resume that carried task 1's
    batch position over would cut task 2's first epoch short."""
    extra = STRATEGIES["ER"]
    full = _fit(tmp_path / "full", tmp_path / "full_ckpt", extra)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _fit(tmp_path / "killed", tmp_path / "ckpt", extra,
                  "--trainer.callbacks+=tests.helpers.kill.KillAtTaskStart", "--trainer.callbacks.task=2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _fit(tmp_path / "resumed", tmp_path / "ckpt", extra, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _results(tmp_path / "resumed")["accuracy_matrix"] == _results(tmp_path / "full")["accuracy_matrix"]
    full_ckpt = torch.load(tmp_path / "full_ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    resumed_ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed_ckpt["global_step"] == full_ckpt["global_step"]
    for key, value in full_ckpt["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed_ckpt["state_dict"][key]), key
