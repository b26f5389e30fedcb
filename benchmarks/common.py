"""Shared helpers of the reproduction scripts: run one config through the ``clframe`` command, and describe
the machine a measurement ran on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_config(config: Path, seed: int, out: Path, *overrides: str) -> dict:
    """Run ``clframe fit --config config`` for one seed, exactly as a user would; return its results.json
    plus the wall time. One thread per run, so two runs share a 2-core machine without contention."""
    cmd = [sys.executable, "-m", "clframe.cli", "fit", "--config", str(config), f"--seed_everything={seed}",
           f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
           "--trainer.enable_checkpointing=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{config.name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    results_file = max(out.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(results_file.read_text())
    return {"seed": seed, "seconds": time.time() - start, "log_dir": str(results_file.parent), **result}


def machine() -> dict:
    """What a timing depends on: CPU model and count, threads, niceness, load, library versions."""
    import lightning
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import avalanche

        avalanche_version = avalanche.__version__
    except ImportError:
        avalanche_version = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "gpu_used": False, "niceness": os.nice(0), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "avalanche": avalanche_version, "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def mean_sd(values: list[float], scale: float = 100.0) -> str:
    """``mean ± sample sd`` of fractions, as percentages (sd 0 for a single value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.2f} ± {scale * sd:.2f}"
