"""The GPU throughput harness (benchmarks/gpu_throughput.py) runs end to end on a CPU, on synthetic data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def test_harness_smoke_run_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_throughput", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    threads = torch.get_num_threads()
    try:
        harness.main(["--device", "cpu", "--steps", "2", "--warmup", "1", "--tasks", "1", "--rounds", "1",
                      "--synthetic", "16", "--nf", "2", "--workers", "1", "--out", str(tmp_path / "smoke")])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "smoke.json").read_text())
    assert set(record["rounds"]) == {f"{s}:{side}" for s in harness.STRATEGIES for side in harness.SIDES}
    assert all(len(v) == 1 and v[0] > 0 for v in record["rounds"].values())
    assert set(record["ratios"]) == {"er", "derpp"}
    assert "clframe / plain_device" in (tmp_path / "smoke.md").read_text()
