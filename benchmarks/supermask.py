"""Supermask reproductions: SupSup, WSN and ExSSNeT on Split-, Permuted- and Rotated-MNIST.

One command runs every job for every seed, each in its own process with one thread, and writes
``benchmarks/results/supermask.json`` (raw) and ``benchmarks/results/supermask_tables.md``:

    CLFRAME_DATA=/path/to/data python benchmarks/supermask.py --seeds 0 1 2 --jobs 2

A job is exactly ``clframe fit --config configs/<config> --seed_everything=<seed> <overrides>`` (the
tables print that command), run in-process through ``clframe.cli.run_cli`` so the trained model is
still at hand for what the accuracy matrix does not hold: SupSup's task inference under other
settings (per sample, random test batches, bisection, exhaustive) and the mask memory per task.
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

ROOT = Path(__file__).resolve().parents[1]
DENSITIES = (0.02, 0.05, 0.1, 0.3)


@dataclass(frozen=True)
class Job:
    name: str
    config: str
    overrides: tuple[str, ...] = ()
    inference: dict[str, Any] = field(default_factory=dict)  # SupSup: test samples per task, random-batch size


# CPU budget (2 shared cores): WSN on Permuted-MNIST trains 1 epoch per task instead of 5, and the density
# sweep uses the first 5 of the 10 permutations; every other job runs its config unchanged.
JOBS = [
    Job("split_supsup", "split_mnist/supsup_til.yaml"),
    Job("split_exssnet", "split_mnist/exssnet_til.yaml"),
    Job("split_wsn", "split_mnist/wsn_til.yaml"),
    Job("perm_supsup", "permuted_mnist/supsup.yaml", (), {"samples": 1000, "batch": 8}),
    Job("perm_wsn", "permuted_mnist/wsn.yaml", ("--trainer.epochs_per_task=1",)),
    *[Job(f"perm_supsup_gg_d{d}", "permuted_mnist/supsup_gg.yaml", ("--data.n_tasks=5", f"--model.density={d}"))
      for d in DENSITIES],
    *[Job(f"perm_exssnet_d{d}", "permuted_mnist/exssnet.yaml", ("--data.n_tasks=5", f"--model.density={d}"))
      for d in DENSITIES],
    Job("rot_supsup", "rotated_mnist/supsup.yaml",
        ("--model.backbone_kwargs={hidden_sizes: [300, 100]}", "--data.test_samples_per_class=50"),
        {"samples": 500, "batch": 128}),
]
BY_NAME = {job.name: job for job in JOBS}


def cli_args(job: Job, seed: int, out: Path) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / job.config), f"--seed_everything={seed}", *job.overrides,
            f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false"]


def command(job: Job) -> str:
    extra = " ".join(f"'{o}'" if " " in o else o for o in job.overrides)
    return f"clframe fit --config configs/{job.config} --seed_everything=SEED {extra}".strip()


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
    lines = ["## Accuracy (final average over tasks, %, mean ± sd over seeds)", "",
             "| job | command | final avg acc | per seed | forgetting | learning acc | s/run |", "|---|---|---|---|---|---|---|"]
    for job in JOBS:
        rs = by_job.get(job.name)
        if not rs:
            continue
        accs = [r["final/avg_acc"] for r in rs]
        lines.append(f"| {job.name} | `{command(job)}` | {mean_sd(accs)} | {', '.join(f'{100 * a:.2f}' for a in accs)} | "
                     f"{mean_sd([r['final/avg_forgetting'] for r in rs])} | {mean_sd([r['final/learning_acc'] for r in rs])} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    sweep = ["", "## Accuracy vs density, Permuted-MNIST (5 tasks, task id given)", "",
             "| density | SupSup | ExSSNeT | ExSSNeT − SupSup |", "|---|---|---|---|"]
    for d in DENSITIES:
        sup, exs = by_job.get(f"perm_supsup_gg_d{d}"), by_job.get(f"perm_exssnet_d{d}")
        if sup and exs:
            gain = statistics.mean(r["final/avg_acc"] for r in exs) - statistics.mean(r["final/avg_acc"] for r in sup)
            sweep.append(f"| {d:.0%} | {mean_sd([r['final/avg_acc'] for r in sup])} | "
                         f"{mean_sd([r['final/avg_acc'] for r in exs])} | {100 * gain:+.2f} |")
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
    return "\n".join(lines + sweep + infer + memory) + "\n"


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
