"""Prompt-based class-incremental learning at small scale: L2P, DualPrompt, CODA-Prompt, OnePrompt, OVOR and two
frozen-feature baselines (linear probe, nearest class mean) on Split-CIFAR-10 with a frozen small ViT.

A **small-scale substitute** for the papers' ViT-B/16 (ImageNet-21k) experiments: the backbone is the
small ViT (32 px, patch 4, D = 192, 6 blocks) that ``benchmarks/pretrain_backbone.py`` pretrains on the
offline Tiny-ImageNet subset; the methods use the miniature sizes of ``configs/prompt/*_tiny_cifar10.yaml``.

Runs each config through clframe's CLI (``run_cli(["fit", "--config", ...])``, the code path of the
``clframe`` command) with the reductions below (the CPU budget), in ``--jobs`` worker processes of one
thread each; every worker decodes CIFAR-10 once and serves it to its runs (a cached ``register_source``),
because decoding the 60k JPEGs costs more than a reduced run. It collects ``results.json`` (final average accuracy, max-based average forgetting, accuracy matrix)
and, from each run's ``metrics.csv``, DualPrompt's prompt-selection (task-id) accuracy and OVOR's logged
energies; then measures each method's trainable parameters and inference cost (ViT forward passes per
image, and ms/image at batch 256 on one CPU thread) on the built model.

    CLFRAME_DATA=/path/to/data nice -n 10 python benchmarks/prompt.py --seeds 0 1 2 --jobs 2

The recorded run (benchmarks/RESULTS.md) used a GPU and larger sizes: ``--jobs 8 --train-per-class 2000
--test-per-class 1000 --batch-size 64 --no-cost``, then ``--seeds`` (no seed: the cost measurement alone,
on the CPU).

Reductions (defaults): ``--train-per-class 300`` training images per class (of 5,000),
``--test-per-class 100`` (of 1,000), ``--epochs 5`` per task (the configs' value; NCM always 1: it only
averages features), ``--batch-size 32`` for every method (configs: 128, DualPrompt 24), so that each task
still gets about 19 optimiser steps per epoch; class order shuffled per seed (``data.shuffle_classes``, as
in the papers).
Results to ``benchmarks/results/prompt.{json,md}`` (reruns of a config and seed replace their entry).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per run
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (config stem, label, the paper figure this row stands in for, from the methods' papers;
#  all [unverified recollection] there, CIFAR-100 10 tasks, ViT-B/16)
METHODS = [
    ("l2p", "L2P", "83.83 (L2P paper) / 82.50 (L2P++, CODA-P paper)"),
    ("dualprompt", "DualPrompt", "86.51 (DualPrompt paper) / 83.05 (CODA-P paper)"),
    ("coda_prompt", "CODA-Prompt", "86.25 (CODA-P paper)"),
    ("oneprompt", "OnePrompt", "≈ 1–2 below OVOR (OVOR paper)"),
    ("ovor", "OVOR (OnePrompt + VOR)", "≈ 86–87 (OVOR paper)"),
    ("linear_probe", "Linear probe (frozen [CLS] + masked head)", "—"),
    ("ncm", "Nearest class mean (frozen [CLS], cosine)", "—"),
]
RESULTS_JSON = ROOT / "benchmarks/results/prompt.json"


def log_values(log_dir: Path) -> dict:
    """DualPrompt's last task-id accuracy and OVOR's mean logged energies, from the run's metrics.csv."""
    files = sorted(log_dir.rglob("metrics.csv"), key=lambda f: f.stat().st_mtime)[-1:]  # this run's, not a rerun's
    out: dict = {}
    if not files:
        return out
    cols: dict[str, list[float]] = {}
    for f in files:
        with open(f) as fh:
            for row in csv.DictReader(fh):
                for k, v in row.items():
                    if v not in ("", None):
                        cols.setdefault(k, []).append(float(v))
    if cols.get("eval/task_id_acc"):
        out["task_id_acc_final"] = cols["eval/task_id_acc"][-1]
    for k in ("train/vor_energy_id", "train/vor_energy_ood", "train/vor_loss"):
        if cols.get(k):
            vals = cols[k]
            out[k.split("/")[1] + "_mean"] = statistics.mean(vals)
            out[k.split("/")[1] + "_min_max"] = [min(vals), max(vals)]
    return out


def worker_init() -> None:
    """One thread; CIFAR-10 decoded once per worker and served to every run of this worker."""
    import torch

    from clframe.data.sources import load_source, register_source

    torch.set_num_threads(1)
    data = load_source("cifar10")

    def cached(root: Path, download: bool):
        return data

    register_source("cifar10", cached)


def run_one(job: tuple[str, int, argparse.Namespace]) -> dict:
    from clframe.cli import run_cli

    config, seed, args = job
    epochs = 1 if config == "ncm" else args.epochs
    overrides = [f"--trainer.epochs_per_task={epochs}", f"--data.train_samples_per_class={args.train_per_class}",
                 f"--data.test_samples_per_class={args.test_per_class}", "--data.shuffle_classes=true",
                 f"--data.batch_size={args.batch_size}", "--trainer.log_every_n_steps=5", *args.extra]
    out = args.out / config / f"seed{seed}"
    argv = ["fit", "--config", str(ROOT / "configs/prompt" / f"{config}_tiny_cifar10.yaml"), f"--seed_everything={seed}",
            f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false", "--trainer.logger=CSVLogger",
            f"--trainer.logger.init_args.save_dir={out}", *overrides]
    start = time.time()
    try:
        cli = run_cli(argv)
    except Exception:  # keep the other runs going; the failure is recorded
        print(f"{config} seed {seed} FAILED:\n{traceback.format_exc()[-3000:]}", flush=True)
        return {"config": config, "seed": seed, "failed": traceback.format_exc()[-2000:]}
    r = cli.trainer.continual_results
    row = {"config": config, "seed": seed, "seconds": time.time() - start, "epochs_per_task": epochs,
           "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
           "batch_size": args.batch_size, **r["metrics"],
           "accuracy_matrix": [[None if a != a else a for a in row] for row in r["accuracy_matrix"]],
           **log_values(out)}
    print(f"{config} seed {seed}: final avg acc {100 * row['final/avg_acc']:.2f}, "
          f"forgetting {100 * row['final/avg_forgetting']:.2f} ({row['seconds']:.0f}s) {log_values(out)}", flush=True)
    return row


def measure_cost(config: str, batch: int = 256, repeats: int = 5) -> dict:
    """Trainable parameters and inference cost of the model a config builds (after the last of 5 tasks)."""
    import torch

    from clframe.cli import ContinualCLI

    torch.set_num_threads(1)
    cli = ContinualCLI(args=["--config", str(ROOT / "configs/prompt" / f"{config}_tiny_cifar10.yaml")], run=False)
    model = cli.model
    model.num_tasks = 5  # before building: DualPrompt's E-pool and CODA-P's components are per task
    model._stream_tasks = 5  # what DualPrompt.bind_stream records
    model._build(10, (3, 32, 32), "class")
    model.class_task.copy_(torch.arange(10) // 2)
    model.current_task.fill_(4)
    model.eval()
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return {"config": config, **model.parameter_report(), "vit_passes_per_image": model.forward_passes_per_image,
            "ms_per_image": 1000 * statistics.median(times) / batch}


def fmt(vals: list[float]) -> str:
    if not vals:
        return "—"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.2f} ± {sd:.2f}"


def table(results: list[dict], costs: dict[str, dict]) -> str:
    lines = ["| Method | final avg acc (%) | forgetting (%) | seeds | trainable params | ViT passes / image | "
             "ms / image | s / run | published, CIFAR-100 ViT-B/16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config, label, published in METHODS:
        rs = sorted((r for r in results if r["config"] == config), key=lambda r: r["seed"])
        c = costs.get(config, {})
        if not rs and not c:
            continue
        acc = [100 * r["final/avg_acc"] for r in rs]
        forg = [100 * r["final/avg_forgetting"] for r in rs]
        secs = f"{statistics.mean(r['seconds'] for r in rs):.0f}" if rs else "—"
        params = f"{c['trainable']:,} ({c['prompt']:,} prompt)" if c else "—"
        passes = str(c.get("vit_passes_per_image", "—"))
        ms = f"{c['ms_per_image']:.3f}" if c else "—"
        lines.append(f"| {label} | {fmt(acc)} | {fmt(forg)} | {len(rs)} | {params} | {passes} | {ms} | {secs} | "
                     f"{published} |")
    extra = []
    for config in ("dualprompt",):
        ids = [100 * r["task_id_acc_final"] for r in results if r["config"] == config and "task_id_acc_final" in r]
        if ids:
            extra.append(f"- DualPrompt prompt-selection (task-id) accuracy after the last task: {fmt(ids)} %.")
    e_id = [r["vor_energy_id_mean"] for r in results if r["config"] == "ovor" and "vor_energy_id_mean" in r]
    e_ood = [r["vor_energy_ood_mean"] for r in results if r["config"] == "ovor" and "vor_energy_ood_mean" in r]
    if e_id:
        extra.append(f"- OVOR logged energies in its VOR epochs (mean over steps and seeds): ID {statistics.mean(e_id):.2f}, "
                     f"outliers {statistics.mean(e_ood):.2f}.")
    return "\n".join(lines + ([""] + extra if extra else []))


def merge_results(old: list[dict], new: list[dict]) -> list[dict]:
    fresh = {(r["config"], r["seed"]) for r in new}
    return [r for r in old if (r["config"], r["seed"]) not in fresh] + new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: only the cost measurement")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=[m[0] for m in METHODS])
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--results", default=str(RESULTS_JSON), help="results file (the .md goes next to it)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench_prompt")
    parser.add_argument("--no-cost", action="store_true", help="skip the parameter / timing measurement")
    parser.add_argument("--extra", action="append", default=[], help="a further clframe override for every run (repeat)")
    args = parser.parse_args()
    # seed-major order: with a time limit, every method gets its first seed before any gets a third
    jobs = [(c, s, args) for s in args.seeds for c in args.configs]
    results = []
    if jobs:
        with multiprocessing.get_context("fork").Pool(args.jobs, initializer=worker_init) as pool:
            for row in pool.imap_unordered(run_one, jobs):
                results.append(row)
                save(results, args, costs=None)  # partial results survive an interrupted invocation
    results = [r for r in results if "failed" not in r]
    costs = {}
    if not args.no_cost:
        for config in args.configs:
            costs[config] = measure_cost(config)
    print(save(results, args, costs))


def save(results: list[dict], args: argparse.Namespace, costs: dict | None) -> str:
    """Merge into the stored results (a rerun of a config and seed replaces its entry) and rebuild the table."""
    path = Path(args.results)
    stored = json.loads(path.read_text()) if path.exists() else {"runs": [], "cost": {}}
    runs = merge_results(stored["runs"], [r for r in results if "failed" not in r])
    all_costs = {**stored.get("cost", {}), **(costs or {})}
    path.parent.mkdir(exist_ok=True, parents=True)
    text = json.dumps({"runs": runs, "cost": all_costs}, indent=1)
    path.write_text(text.replace("NaN", "null"))
    md = table(runs, all_costs)
    path.with_suffix(".md").write_text(md + "\n")
    return md


if __name__ == "__main__":
    main()
