"""Reproduce the stability gap (De Lange et al., ICLR 2023) with per-iteration continual evaluation.

    CLFRAME_DATA=/path/to/data python benchmarks/stability_gap.py --seeds 0 1 2 --jobs 2

Runs ``configs/split_mnist/er_stability_gap.yaml`` (the paper's Split-MNIST ER protocol),
``configs/rotated_mnist/er_stability_gap.yaml`` and ``configs/rotated_mnist/joint_stability_gap.yaml``
(incremental joint training), plus the Split-MNIST run evaluated only at epoch ends (the coarse
evaluation that hides the gap), and writes a table and the plots of seed 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_config  # noqa: E402

RUNS = {
    "split_mnist_er": ("configs/split_mnist/er_stability_gap.yaml", []),
    "split_mnist_er_epoch_end_eval": ("configs/split_mnist/er_stability_gap.yaml",
                                      ["--trainer.callbacks.init_args.every_n_steps=100000"]),
    "rotated_mnist_er": ("configs/rotated_mnist/er_stability_gap.yaml", []),
    "rotated_mnist_joint": ("configs/rotated_mnist/joint_stability_gap.yaml", []),
}
SHOWN = ["final/avg_acc", "final/avg_forgetting", "stability/min_acc", "stability/wc_acc", "stability/wf10",
         "stability/wp10", "stability/wf100", "stability/gap_depth"]


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
    (res_dir / "stability_gap.json").write_text(json.dumps(
        [{k: r[k] for k in ("run", "seed", "seconds", "metrics", "accuracy_matrix")} for r in results], indent=1))
    lines = ["| run | " + " | ".join(SHOWN) + " | s/run |", "|---" * (len(SHOWN) + 2) + "|"]
    for name in args.runs:
        rs = [r for r in results if r["run"] == name]
        cells = []
        for key in SHOWN:
            vals = [100 * r["metrics"][key] for r in rs if key in r["metrics"]]
            cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.1f}"
                         if vals else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds'] for r in rs):.0f} |")
        first = min(rs, key=lambda r: r["seed"])
        for png in ("stability_gap.png", "accuracy_matrix.png"):
            src = Path(first["log_dir"]) / png
            if src.exists():
                shutil.copy(src, res_dir / f"{name}_{png}")
    table = "\n".join(lines)
    (res_dir / "stability_gap.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
