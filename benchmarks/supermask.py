"""Supermask measurements that need the trained model: SupSup's task inference under other settings and the
mask memory per task, for the runs of ``benchmarks/suites/supermask.yaml`` and ``supermask_density.yaml``.

The accuracy tables are the suites' reports (``clframe bench`` / ``clframe report``). This script trains the same
runs (each suite run's config and overrides) in its own process with one thread, in-process through
``clframe.cli.run_cli`` so the trained model is still at hand for what the accuracy matrix does not hold:
SupSup's task inference (per sample, random test batches, bisection, exhaustive) and the mask memory. It writes
``benchmarks/results/supermask.json`` (raw, with every run's metrics) and ``benchmarks/results/supermask_tables.md``:

    CLFRAME_DATA=/path/to/data python benchmarks/supermask.py --seeds 0 1 2 --jobs 2
Protocols, CPU-driven reductions and the published figures are in ``benchmarks/results/supermask.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clframe.bench.suite import load_suite

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Job:
    name: str
    config: str
    overrides: tuple[str, ...] = ()
    inference: dict[str, Any] = field(default_factory=dict)  # SupSup: test samples per task, random-batch size


# The jobs are the runs of the two supermask suites (config and overrides, so the measurements are of the
# same runs as their tables); SupSup's inference settings (test samples per task, random-batch size) are added here.
SUITES = ("benchmarks/suites/supermask.yaml", "benchmarks/suites/supermask_density.yaml")
INFERENCE = {"perm_supsup": {"samples": 1000, "batch": 8}, "rot_supsup": {"samples": 500, "batch": 128}}


def suite_jobs() -> list[Job]:
    jobs = []
    for path in SUITES:
        suite = load_suite(ROOT / path)
        jobs += [Job(run.label, str(suite.config_path(run).resolve().relative_to(ROOT)), (*suite.overrides, *run.overrides),
                     INFERENCE.get(run.label, {})) for run in suite.runs]
    return jobs


JOBS = suite_jobs()
BY_NAME = {job.name: job for job in JOBS}


def cli_args(job: Job, seed: int, out: Path) -> list[str]:
    return ["fit", "--config", str(ROOT / job.config), f"--seed_everything={seed}", *job.overrides,
            f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false"]


def command(job: Job) -> str:
    extra = " ".join(f"'{o}'" if " " in o else o for o in job.overrides)
    return f"clframe fit --config {job.config} --seed_everything=SEED {extra}".strip()


# ---------------------------------------------------------------------------------------------- SupSup inference


@torch.no_grad()
def inference_report(model: Any, stream: Any, samples: int, batch: int, draws: int = 30) -> dict[str, float]:
    """Task-inference accuracy of the final model (all tasks learned) under several settings.

    ``sample/*``: every test image on its own (1 image). ``batch{B}/*``: ``draws`` random batches of
    ``B`` test images of one task per task, as the reference's shuffled test loader gives them.
    """
    model.eval()
    gen = torch.Generator().manual_seed(0)
    xs, ts = [], []
    for task in stream:
        idx = torch.randperm(len(task.test), generator=gen)[:samples]
        x, _, t = task.test.__getitems__(idx.tolist())
        xs.append(x)
        ts.append(t)
    x, t = torch.cat(xs), torch.cat(ts)
    h = model.hparams
    saved = (h.task_inference, h.inference_objective, h.inference_scope, h.inference_samples)
    settings = [("oneshot", "entropy"), ("oneshot", "g"), ("binary", "entropy"), ("binary", "g"), ("exhaustive", "entropy")]
    report: dict[str, float] = {}
    try:
        for method, objective in settings:
            h.task_inference, h.inference_objective, h.inference_scope = method, objective, "sample"
            hits = torch.cat([model.infer_tasks(x[i: i + 256]) == t[i: i + 256] for i in range(0, len(t), 256)])
            report[f"sample/{method}-{objective}"] = float(hits.float().mean())
            if method == "exhaustive":
                continue
            h.inference_scope, h.inference_samples = "batch", batch
            correct = 0
            for task in range(len(stream)):
                idx = (t == task).nonzero().flatten()
                for _ in range(draws):
                    pick = idx[torch.randperm(len(idx), generator=gen)[:batch]]
                    correct += int(model.infer_tasks(x[pick])[0]) == task
            report[f"batch{batch}/{method}-{objective}"] = correct / (draws * len(stream))
    finally:
        h.task_inference, h.inference_objective, h.inference_scope, h.inference_samples = saved
    return report


# ---------------------------------------------------------------------------------------------- one run


def work(name: str, seed: int, out: Path) -> dict[str, Any]:
    """Train one job for one seed (in this process) and return its measurements."""
    from clframe.cli import run_cli
    from clframe.strategies import ExSSNeT, SupSup

    torch.set_num_threads(1)
    job = BY_NAME[name]
    start = time.time()
    cli = run_cli(cli_args(job, seed, out))
    train_seconds = time.time() - start
    model, trainer = cli.model, cli.trainer
    result: dict[str, Any] = {"job": name, "seed": seed, "seconds": train_seconds, **trainer.continual_results["metrics"],
                              "accuracy_matrix": trainer.accuracy_matrix, "mask": model.mask_storage()}
    if isinstance(model, SupSup) and model.hparams.infer_task_at_test:
        result["given_task_acc"] = model.given_task_accuracy
        result["inferred_mask_acc"] = model.inferred_mask_accuracy
        result["task_inference_acc"] = model.task_inference_accuracy
        result["inference"] = inference_report(model, cli.datamodule.stream, **job.inference)
    if isinstance(model, ExSSNeT):
        result["kkt_source"] = model.kkt_source.tolist()
    result["total_seconds"] = time.time() - start
    return result


def run_one(name: str, seed: int, out_root: Path, fresh: bool) -> dict[str, Any]:
    """Run one job and seed in a fresh process; a finished run's result is reused unless ``fresh``."""
    out = out_root / name / f"seed{seed}"
    result_file = out / "bench_result.json"
    if result_file.exists() and not fresh:
        print(f"reused: {name} seed {seed}", flush=True)
        return json.loads(result_file.read_text())
    cmd = [sys.executable, __file__, "--worker", name, "--seeds", str(seed), "--out", str(out_root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    print(f"done: {name} seed {seed}", flush=True)
    return json.loads(result_file.read_text())


# ---------------------------------------------------------------------------------------------- tables


def mean_sd(values: list[float], scale: float = 100.0) -> str:
    vals = [scale * v for v in values]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"


def tables(results: list[dict[str, Any]]) -> str:
    by_job: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_job.setdefault(r["job"], []).append(r)
    lines = ["## Commands (the suites' runs; accuracy tables: clframe report benchmarks/suites/supermask*.yaml)", ""]
    lines += [f"- {job.name}: `{command(job)}`" for job in JOBS if job.name in by_job]
    infer = ["", "## SupSup task inference on the final model (all tasks learned), accuracy %", ""]
    for name in ("perm_supsup", "rot_supsup"):
        rs = by_job.get(name)
        if not rs:
            continue
        keys = list(rs[0]["inference"])
        infer += [f"{name}: matrix (inferred ids, unshared labels) {mean_sd([r['final/avg_acc'] for r in rs])}; "
                  f"given-task accuracy {mean_sd([statistics.mean(r['given_task_acc']) for r in rs])}; "
                  f"inference accuracy during the run {mean_sd([statistics.mean(r['task_inference_acc']) for r in rs])}", "",
                  "| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
                  "| accuracy | " + " | ".join(mean_sd([r["inference"][k] for r in rs]) for k in keys) + " |", ""]
    memory = ["## Mask memory per task (bits; last seed)", "",
              "| job | maskable weights | packed (stored) | entropy bound | Huffman, WSN scheme | mean density | capacity used |",
              "|---|---|---|---|---|---|---|"]
    for job in JOBS:
        rs = by_job.get(job.name)
        if rs:
            m = rs[-1]["mask"]
            memory.append(f"| {job.name} | {m['weights']:.0f} | {m['bits_per_task']:.0f} ({m['bits_per_task'] / 8192:.1f} KiB) | "
                          f"{m['entropy_bits_per_task']:.0f} | {m.get('huffman_bits_per_task', float('nan')):.0f} | "
                          f"{m['density']:.3f} | {m['capacity']:.3f} |")
    return "\n".join(lines + infer + memory) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--only", nargs="+", default=[j.name for j in JOBS], choices=[j.name for j in JOBS])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench_supermask")
    parser.add_argument("--fresh", action="store_true", help="re-run jobs that already have a result under --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out = args.out / args.worker / f"seed{args.seeds[0]}"
        result = work(args.worker, args.seeds[0], out)
        (out / "bench_result.json").write_text(json.dumps(result, indent=1))
        return
    runs = [(name, seed) for name in args.only for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda r: run_one(*r, args.out, args.fresh), runs))
    target = ROOT / "benchmarks/results"
    target.mkdir(exist_ok=True)
    raw = target / "supermask.json"
    previous = json.loads(raw.read_text()) if raw.exists() else []
    keep = [r for r in previous if (r["job"], r["seed"]) not in set(runs)]
    merged = sorted(keep + results, key=lambda r: (r["job"], r["seed"]))
    raw.write_text(json.dumps(merged, indent=1))
    (target / "supermask_tables.md").write_text(tables(merged))
    print(tables(merged))


if __name__ == "__main__":
    main()
