"""Every script in examples/ runs, as a user would start it (a fresh process, tiny settings)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_subclassing_a_strategy_example(tmp_path):
    out = _run("custom_replay.py", "--epochs", "1", "--tasks", "2", cwd=tmp_path)
    scores = dict(re.findall(r"^(\w+): final average accuracy ([\d.]+)%", out, flags=re.M))
    assert set(scores) == {"ER", "BalancedReplayER"}
    assert all(40.0 < float(v) <= 100.0 for v in scores.values())
    assert "BalancedReplayER on split_digits" in out  # the subclass really ran, through the trainer


def test_python_api_example_trains_checkpoints_and_resumes(tmp_path):
    out = _run("python_api.py", "--steps", "10", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert "final average accuracy" in out and "min-ACC" in out
    assert "after the restart" in out  # the script itself asserts the restored row equals the original
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "run" / "api" / "version_0" / "results.json").exists()
