"""View-batch model (Kang et al., CVPR 2025) at equal steps: ER baseline vs R = 4 vs R = 4 + SSL.

Each run is one ``clframe fit --config configs/<benchmark>/er_vb*.yaml --seed_everything=S`` (see
``benchmarks/common.py``); two runs at a time, one thread each. Results (one entry per benchmark,
variant and seed, with the command that made it) are merged into ``benchmarks/results/view_batch.json``
and the table is written to ``benchmarks/results/view_batch_table.md`` (the protocol and discussion live
in ``view_batch.md``).

    CLFRAME_DATA=/path/to/data python benchmarks/view_batch.py                       # MNIST + Fashion-MNIST
    python benchmarks/view_batch.py --benchmarks split_cifar10 --seeds 0              # the small-net CIFAR-10 rows
    python benchmarks/view_batch.py --benchmarks split_fashion_mnist --variants er_vb_baseline er_vb --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, mean_sd, run_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = ("split_mnist", "split_fashion_mnist", "split_cifar10")
VARIANTS = ("er_vb_baseline", "er_vb", "er_vb_ssl")
LABELS = {"er_vb_baseline": "ER (R = 1)", "er_vb": "ER + VB replay (R = 4, noise)",
          "er_vb_ssl": "ER + VB replay + VB SSL (R = 4, noise, alpha 1)",
          "er_vb_ssl_affine": "ER + VB replay + SSL + strong aug (affine)",
          "icarl_vb_baseline": "iCaRL (R = 1)", "icarl_vb": "iCaRL + VB replay (R = 4, noise)",
          "icarl_vb_ssl": "iCaRL + VB replay + VB SSL (R = 4, noise, alpha 1)"}
CIFAR_LABELS = {"er_vb_baseline": "ER (R = 1, crop/flip)", "er_vb": "ER + VB replay (R = 4, crop/flip views)",
                "er_vb_ssl": "ER + VB replay + VB SSL (R = 4, crop/flip views, alpha 1)"}


def steps_of(log_dir: str) -> int:
    """The run's last global step (from its metrics.csv): equal steps is the point of the comparison."""
    with open(Path(log_dir) / "metrics.csv") as f:
        return max(int(row["step"]) for row in csv.DictReader(f) if row.get("step"))


def one(bench: str, variant: str, seed: int) -> dict:
    config = ROOT / "configs" / bench / f"{variant}.yaml"
    with tempfile.TemporaryDirectory(prefix="vb_") as out:
        result = run_config(config, seed, Path(out))
        result["steps"] = steps_of(result["log_dir"])
    command = (f"clframe fit --config configs/{bench}/{variant}.yaml --seed_everything={seed} "
               "--trainer.enable_progress_bar=false --trainer.enable_checkpointing=false")
    m = result["metrics"]
    print(f"{bench} {variant} seed {seed}: acc {100 * m['final/avg_acc']:.2f} forgetting "
          f"{100 * m['final/avg_forgetting']:.2f} steps {result['steps']} ({result['seconds']:.0f} s)", flush=True)
    return {"benchmark": bench, "variant": variant, "seed": seed, "command": command, "seconds": result["seconds"],
            "steps": result["steps"], "metrics": m, "accuracy_matrix": result["accuracy_matrix"]}


def load() -> list[dict]:
    path = RESULTS / "view_batch.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def save(runs: list[dict]) -> None:
    """Merge with what is on disk (another invocation may have written since this one started)."""
    def key(r: dict) -> tuple:
        return r["benchmark"], r["variant"], r["seed"]

    merged = {key(r): r for r in load()} | {key(r): r for r in runs}
    runs = sorted(merged.values(), key=key)
    (RESULTS / "view_batch.json").write_text(json.dumps({"runs": runs}, indent=1))
    (RESULTS / "view_batch_table.md").write_text(table(runs))


def table(runs: list[dict]) -> str:
    lines = ["| benchmark | variant | seeds | final avg acc (%) ↑ | avg forgetting ↓ | steps | s / run |",
             "|---|---|---|---|---|---|---|"]
    for bench in BENCHMARKS:
        for variant in LABELS:
            rs = [r for r in runs if r["benchmark"] == bench and r["variant"] == variant]
            if not rs:
                continue
            acc = [r["metrics"]["final/avg_acc"] for r in rs]
            fgt = [r["metrics"]["final/avg_forgetting"] for r in rs]
            steps = sorted({r["steps"] for r in rs})
            secs = statistics.mean(r["seconds"] for r in rs)
            label = (CIFAR_LABELS if bench == "split_cifar10" else LABELS)[variant]
            lines.append(f"| {bench} | {label} (`{variant}.yaml`) | {','.join(str(r['seed']) for r in rs)} "
                         f"| {mean_sd(acc)} | {mean_sd(fgt)} | {'/'.join(map(str, steps))} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS[:2]), choices=BENCHMARKS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(LABELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(b, v, s) for b in args.benchmarks for s in args.seeds for v in args.variants]
    runs = load()
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda j: one(*j), jobs):
            runs = [r for r in runs if (r["benchmark"], r["variant"], r["seed"]) !=
                    (result["benchmark"], result["variant"], result["seed"])] + [result]
            save(runs)
    print(table(runs))


if __name__ == "__main__":
    main()
