"""InTAct behavioural check (method card §5): fine-tuning vs InTAct vs InTAct without Var, domain-incremental.

Rotated-MNIST (0/20/40/60/80 degrees) and Permuted-MNIST (5 tasks), shared 10-way head, MLP
784-256-256-10 with leaky-ReLU, Adam 1e-3, batch 128, 2 epochs per task. Each run is exactly
``clframe fit --config configs/<benchmark>/<config>.yaml --seed_everything=<seed>`` (one process,
one thread; two at a time on a 2-core machine):

    CLFRAME_DATA=/path/to/data python benchmarks/intact.py --seeds 0 1 2 --jobs 2

Raw results are merged into ``benchmarks/results/intact.json`` (a rerun replaces its entries) and the
table ``benchmarks/results/intact.md`` is rebuilt from every stored entry.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import ROOT, mean_sd, run_config

RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = {"rotated_mnist": "Rotated-MNIST (5 angles)", "permuted_mnist": "Permuted-MNIST (5 tasks)"}
CONFIGS = {"finetune_intact_baseline": "fine-tuning", "intact": "InTAct", "intact_no_var": "InTAct without Var"}
METRICS = ("final/avg_acc", "final/bwt", "final/avg_forgetting", "final/learning_acc")


def run(bench: str, config: str, seed: int, out_root: Path) -> dict[str, Any]:
    path = ROOT / "configs" / bench / f"{config}.yaml"
    result = run_config(path, seed, out_root / bench / config / f"seed{seed}")
    print(f"{bench} {config} seed {seed}: {100 * result['metrics']['final/avg_acc']:.2f} % "
          f"in {result['seconds']:.0f} s", flush=True)
    return {"benchmark": bench, "config": config, "seed": seed, "seconds": result["seconds"],
            "matrix": result["accuracy_matrix"], **{k: result["metrics"][k] for k in METRICS}}


def collect(out_root: Path) -> list[dict[str, Any]]:
    """Entries for the runs that already finished under ``out_root`` (a benchmark stopped part-way)."""
    entries = []
    for bench in BENCHMARKS:
        for config in CONFIGS:
            for seed_dir in sorted((out_root / bench / config).glob("seed*")):
                files = list(seed_dir.rglob("results.json"))
                if not files:
                    continue
                result = json.loads(files[0].read_text())
                entries.append({"benchmark": bench, "config": config, "seed": int(seed_dir.name[4:]), "seconds": None,
                                "matrix": result["accuracy_matrix"], **{k: result["metrics"][k] for k in METRICS}})
    return entries


def table(entries: list[dict[str, Any]]) -> str:
    lines = ["# InTAct behavioural check (benchmarks/intact.py)", "",
             "Domain-incremental, shared 10-way head, MLP 784-256-256-10 (leaky-ReLU), Adam 1e-3, batch 128,",
             "2 epochs per task, 5 tasks; InTAct: lambda_var 0.01, lambda_int 1, lambda_feat 1, align on, boxes",
             "from the 5th/95th percentiles of the finished task's training activations. Mean ± std over seeds (%).",
             "Learning accuracy = accuracy on each task right after learning it (plasticity).", ""]
    for bench, title in BENCHMARKS.items():
        lines += [f"### {title}", "", "| method | seeds | final avg acc | BWT | forgetting | learning acc | s/run |",
                  "|---|---|---|---|---|---|---|"]
        for config, name in CONFIGS.items():
            rows = [e for e in entries if e["benchmark"] == bench and e["config"] == config]
            if not rows:
                continue
            cells = [mean_sd([r[k] for r in rows]) for k in METRICS]
            timed = [r["seconds"] for r in rows if r["seconds"] is not None]
            lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells)
                         + f" | {statistics.mean(timed):.0f} |" if timed else f"| {name} | {len(rows)} | "
                         + " | ".join(cells) + " | - |")
        lines += ["", f"Command per cell: `clframe fit --config configs/{bench}/<config>.yaml --seed_everything=<seed>` "
                  f"with <config> in {', '.join(CONFIGS)}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_intact")
    parser.add_argument("--collect", action="store_true", help="only gather the runs already finished under --out")
    args = parser.parse_args()
    jobs = [(b, c, s) for b in args.benchmarks for c in args.configs for s in args.seeds]
    if args.collect:
        fresh = collect(args.out)
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            fresh = list(pool.map(lambda job: run(*job, args.out), jobs))
    raw = RESULTS / "intact.json"
    stored = json.loads(raw.read_text()) if raw.exists() else []
    done = {(e["benchmark"], e["config"], e["seed"]) for e in fresh}
    merged = [e for e in stored if (e["benchmark"], e["config"], e["seed"]) not in done] + fresh
    raw.write_text(json.dumps(merged, indent=1))
    (RESULTS / "intact.md").write_text(table(merged))
    print(table(merged))


if __name__ == "__main__":
    main()
