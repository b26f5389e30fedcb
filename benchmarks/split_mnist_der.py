"""Reproduce the DER paper's Split-MNIST (class-incremental) table with clframe: the baselines, ER, DER,
DER++ and iCaRL.

Runs every config of ``configs/split_mnist/`` for several seeds through the ``clframe`` command,
exactly as a user would, collects each run's ``results.json`` and writes a table next to the
published figures (Buzzega et al. 2020, Mammoth README; ../shared/docs/reference-results.md).

    CLFRAME_DATA=/path/to/data python benchmarks/split_mnist_der.py --seeds 0 1 2 --jobs 2
    CLFRAME_DATA=/path/to/data python benchmarks/split_mnist_der.py --configs der_200 der   # only these

New results are merged into ``benchmarks/results/split_mnist_der.json`` (a rerun of a config and seed
replaces its entry) and the table is rebuilt from all stored results, so running a few configs keeps
the other rows.

Each run: 5 tasks x 2 classes, MLP 100-100, SGD, batch 10, 1 epoch per task (about 6,000 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_config  # noqa: E402

# (config, label, published S-MNIST Class-IL accuracy from the DER paper's table)
RUNS = [
    ("finetune", "Finetune (SGD)", 19.60),
    ("joint", "Joint", 95.57),
    ("ewc", "oEWC", 20.46),
    ("lwf", "LwF", 19.62),
    ("er_200", "ER, buffer 200", 80.43),
    ("er", "ER, buffer 500", 86.12),
    ("der_200", "DER, buffer 200", 84.55),
    ("der", "DER, buffer 500", 90.54),
    ("derpp_200", "DER++, buffer 200", 85.61),
    ("derpp", "DER++, buffer 500", 91.00),
    ("icarl_200", "iCaRL, buffer 200", 70.51),
    ("icarl", "iCaRL, buffer 500", 70.10),
]
RESULTS_JSON = ROOT / "benchmarks/results/split_mnist_der.json"
RESULTS_MD = ROOT / "benchmarks/results/split_mnist_der.md"


def run_one(config: str, seed: int, out_root: Path) -> dict:
    r = run_config(ROOT / "configs/split_mnist" / f"{config}.yaml", seed, out_root / config / f"seed{seed}")
    return {"config": config, "seed": seed, "seconds": r["seconds"], **r["metrics"],
            "accuracy_matrix": r["accuracy_matrix"]}


def merge_results(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier results with this invocation's runs added; a rerun (same config and seed) replaces its entry."""
    fresh = {(r["config"], r["seed"]) for r in new}
    return [r for r in old if (r["config"], r["seed"]) not in fresh] + new


def table(results: list[dict]) -> str:
    """One row per config of RUNS that has results, in RUNS order."""
    lines = ["| Method | clframe final avg acc (%) | per seed | published (DER paper) | difference | forgetting (%) "
             "| s/run |", "|---|---|---|---|---|---|---|"]
    for config, label, published in RUNS:
        rs = sorted((r for r in results if r["config"] == config), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [100 * r["final/avg_acc"] for r in rs]
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        forg = statistics.mean(100 * r["final/avg_forgetting"] for r in rs)
        secs = statistics.mean(r["seconds"] for r in rs)
        lines.append(f"| {label} | {mean:.2f} ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in accs)} | {published:.2f} | "
                     f"{mean - published:+.2f} | {forg:.2f} | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=[r[0] for r in RUNS])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench_split_mnist")
    args = parser.parse_args()
    jobs = [(c, s) for c in args.configs for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(*job, args.out), jobs))
    # Merge into the stored results, so running a few configs keeps every other row of the table.
    old = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    results = merge_results(old, results)
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=1))
    text = table(results)
    RESULTS_MD.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
