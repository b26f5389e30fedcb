"""Reproduce the stability gap (De Lange et al., ICLR 2023) with per-iteration continual evaluation.

    CLFRAME_DATA=/path/to/data python benchmarks/stability_gap.py --seeds 0 1 2 --jobs 2

Runs ``configs/split_mnist/er_stability_gap.yaml`` (the paper's Split-MNIST ER protocol: memory filled
at task ends, unmasked head), ``configs/rotated_mnist/er_stability_gap.yaml`` and
``configs/rotated_mnist/joint_stability_gap.yaml`` (incremental joint training), two-domain
Rotated-MNIST runs with a growing rotation (the gap against task dissimilarity), the Split-MNIST run
evaluated only at epoch ends (the coarse evaluation that hides the gap; read off the same runs'
per-iteration curves, since training is identical), the same protocol with
clframe's other ER semantics (memory filled every step, unseen classes masked), and the small
digits check ``configs/digits/er_stability_gap.yaml`` in both semantics; writes a table and the
plots of seed 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_config  # noqa: E402

from clframe.metrics.stability import summarize_curves  # noqa: E402

ONLINE_MASKED = ["--model.buffer_update=online", "--model.mask_unseen_classes=true"]  # clframe's ER defaults
RUNS = {
    "split_mnist_er": ("configs/split_mnist/er_stability_gap.yaml", []),
    "rotated_mnist_er": ("configs/rotated_mnist/er_stability_gap.yaml", []),
    # Task dissimilarity (the paper's Table 2 trend): two domains, the second rotated by a growing angle.
    **{f"rotated_mnist_er_0_{a}": ("configs/rotated_mnist/er_stability_gap.yaml",
                                   [f"--data.angles=[0,{a}]", "--data.n_tasks=2"]) for a in (20, 40, 80, 120, 160)},
    "rotated_mnist_joint": ("configs/rotated_mnist/joint_stability_gap.yaml", []),
    "digits_er": ("configs/digits/er_stability_gap.yaml", []),
    "digits_er_online_masked": ("configs/digits/er_stability_gap.yaml", ONLINE_MASKED),
    "split_mnist_er_online_masked": ("configs/split_mnist/er_stability_gap.yaml", ONLINE_MASKED),
}
# Rows read off the per-iteration curves of another run: (source run, epochs per task of its config).
DERIVED = {"split_mnist_er_epoch_end_eval": ("split_mnist_er", 10)}
SHOWN = ["final/avg_acc", "final/avg_forgetting", "stability/min_acc", "stability/wc_acc", "stability/wf10",
         "stability/wp10", "stability/wf100", "stability/gap_depth"]


def epoch_end_metrics(curves: Path, epochs_per_task: int) -> dict[str, float]:
    """The stability metrics of a run had it been evaluated only before training and at epoch ends.

    Reads the run's per-iteration ``continual_eval.csv`` and keeps the evaluations at step 0 and at the
    last step of every epoch (each task's steps split evenly into ``epochs_per_task`` epochs).
    """
    with open(curves) as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows])
    trained = np.array([int(r["trained_task"]) for r in rows])
    n_tasks = int(trained.max()) + 1
    acc = np.array([[float(r[f"acc_task_{j}"]) if r[f"acc_task_{j}"] else np.nan for j in range(n_tasks)]
                    for r in rows])
    task_ends = [int(steps[trained == k].max()) for k in range(n_tasks)]
    keep, start = {0}, 0
    for end in task_ends:
        per_epoch = (end - start) // epochs_per_task
        keep |= {start + per_epoch * e for e in range(1, epochs_per_task + 1)}
        start = end
    rows_kept = np.isin(steps, sorted(keep))
    return summarize_curves(steps[rows_kept], acc[rows_kept], task_ends)


def derived_results(out: Path, seeds: list[int], kept: list[dict]) -> list[dict]:
    """The ``DERIVED`` rows whose source run has curves for every seed under ``out``."""
    results = []
    for name, (source, epochs) in DERIVED.items():
        for seed in seeds:
            found = sorted((out / source / f"seed{seed}").rglob("continual_eval.csv"), key=lambda p: p.stat().st_mtime)
            base = next((r for r in kept if r["run"] == source and r["seed"] == seed), None)
            if found and base is not None:
                metrics = {**base["metrics"], **epoch_end_metrics(found[-1], epochs)}
                results.append({"run": name, "seed": seed, "seconds": 0.0, "metrics": metrics,
                                "accuracy_matrix": base["accuracy_matrix"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench_stability_gap")
    args = parser.parse_args()
    jobs = [(name, seed) for name in args.runs for seed in args.seeds]

    def one(job):
        name, seed = job
        config, overrides = RUNS[name]
        return {"run": name, **run_config(ROOT / config, seed, args.out / name / f"seed{seed}", *overrides)}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    res_dir = ROOT / "benchmarks/results"
    res_dir.mkdir(exist_ok=True)
    for r in results:  # plots of the lowest seed of each run
        if r["seed"] == min(args.seeds):
            for png in ("stability_gap.png", "accuracy_matrix.png"):
                if (Path(r["log_dir"]) / png).exists():
                    shutil.copy(Path(r["log_dir"]) / png, res_dir / f"{r['run']}_{png}")
    # Merge with earlier results of other runs, so runs can be (re)done one at a time.
    store = res_dir / "stability_gap.json"
    kept = [r for r in (json.loads(store.read_text()) if store.exists() else []) if r["run"] not in args.runs]
    results = kept + [{k: r[k] for k in ("run", "seed", "seconds", "metrics", "accuracy_matrix")} for r in results]
    derived = derived_results(args.out, args.seeds, results)
    results = [r for r in results if r["run"] not in {d["run"] for d in derived}] + derived
    store.write_text(json.dumps(results, indent=1))
    lines = ["| run | " + " | ".join(SHOWN) + " | s/run |", "|---" * (len(SHOWN) + 2) + "|"]
    for name in [*RUNS, *DERIVED]:
        rs = [r for r in results if r["run"] == name]
        if not rs:
            continue
        cells = []
        for key in SHOWN:
            vals = [100 * r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
            cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.1f}"
                         if vals else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    table = "\n".join(lines)
    (res_dir / "stability_gap.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
