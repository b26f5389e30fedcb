"""The three-scenario comparison (van de Ven & Tolias): one benchmark in task-, domain- and class-incremental
form, seven methods, several seeds, each run exactly as ``clframe fit --config
configs/three_scenarios/<benchmark>_<scenario>/<method>.yaml --seed_everything=S`` plus the overrides given
here (fewer iterations for a CPU). Results go to a JSON-lines file (one line per run, so two workers can
share the job list); ``--report`` prints the Markdown table of final average accuracy, mean ± sd.

    python benchmarks/three_scenarios.py --benchmark split_mnist --steps 500 --seeds 0 1 2 --worker 0/2 &
    python benchmarks/three_scenarios.py --benchmark split_mnist --steps 500 --seeds 0 1 2 --worker 1/2 &
    python benchmarks/three_scenarios.py --benchmark split_mnist --steps 500 --report
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, mean_sd, run_config  # noqa: E402

SCENARIOS = ("task", "domain", "class")
METHODS = ("finetune", "joint", "er", "ewc", "ewc_online", "lwf", "si")
NAMES = {"finetune": "None (Finetune)", "joint": "Joint (offline)", "er": "ER", "ewc": "EWC",
         "ewc_online": "Online EWC", "lwf": "LwF", "si": "SI"}


def results_file(benchmark: str, steps: int | None, tag: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"three_scenarios_{benchmark}_{steps or 'full'}{tag}.jsonl"


def jobs(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """Seed-major order, so that an interrupted sweep leaves whole seeds behind."""
    return [(s, scen, m) for s in args.seeds for scen in args.scenarios for m in args.methods]


def done(path: Path) -> set[tuple[int, str, str]]:
    if not path.exists():
        return set()
    return {(r["seed"], r["scenario"], r["method"]) for r in map(json.loads, path.read_text().splitlines())}


def run_in_process(config: Path, seed: int, out: Path, *overrides: str) -> dict:
    """The same command line as :func:`common.run_config`, run in this process (no interpreter and Lightning
    start-up per run: on a loaded CPU that is a large share of a short run)."""
    import time

    import torch

    from clframe.cli import run_cli

    torch.set_num_threads(1)
    start = time.time()
    cli = run_cli(["fit", "--config", str(config), f"--seed_everything={seed}", f"--trainer.default_root_dir={out}",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", *overrides])
    return {"seed": seed, "seconds": time.time() - start, **cli.trainer.continual_results}


def run(args: argparse.Namespace) -> None:
    index, count = (int(x) for x in args.worker.split("/"))
    out = results_file(args.benchmark, args.steps, args.tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = [*([f"--trainer.steps_per_task={args.steps}"] if args.steps else []), "--trainer.logger=false",
                 *args.override]
    for k, (seed, scen, method) in enumerate(jobs(args)):
        if k % count != index or (seed, scen, method) in done(out):
            continue
        config = ROOT / "configs" / "three_scenarios" / f"{args.benchmark}_{scen}" / f"{method}.yaml"
        extra = list(overrides)
        if method.startswith("ewc") and args.fisher_samples:
            extra.append(f"--model.fisher_samples={args.fisher_samples}")
        with tempfile.TemporaryDirectory() as tmp:
            result = (run_in_process if args.in_process else run_config)(config, seed, Path(tmp), *extra)
        row = {"benchmark": args.benchmark, "scenario": scen, "method": method, "seed": seed,
               "steps_per_task": args.steps, "overrides": extra, "seconds": round(result["seconds"], 1),
               "avg_acc": result["metrics"]["final/avg_acc"], "accuracy_matrix": result["accuracy_matrix"]}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{scen:6s} {method:10s} seed {seed}: {100 * row['avg_acc']:.2f} % ({row['seconds']:.0f} s)", flush=True)


def report(args: argparse.Namespace) -> None:
    path = results_file(args.benchmark, args.steps, args.tag)
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    table = {}
    for r in rows:
        table.setdefault((r["method"], r["scenario"]), {})[r["seed"]] = r["avg_acc"]
    print(f"| method | {' | '.join(s + '-IL' for s in args.scenarios)} |")
    print("|---|" + "---|" * len(args.scenarios))
    for m in args.methods:
        cells = []
        for s in args.scenarios:
            accs = table.get((m, s), {})
            cells.append(f"{mean_sd(list(accs.values()))} (n={len(accs)})" if accs else "–")
        print(f"| {NAMES[m]} | {' | '.join(cells)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="split_mnist", choices=["split_mnist", "permuted_mnist"])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="iterations per task (default: the config's)")
    p.add_argument("--fisher-samples", type=int, default=None, help="cap EWC's Fisher estimate at this many samples")
    p.add_argument("--worker", default="0/1", help="i/n: run every n-th job starting at i (for parallel workers)")
    p.add_argument("--tag", default="", help="suffix of the results file, to keep variants apart")
    p.add_argument("--override", nargs="*", default=[], help="more --key=value options for every run")
    p.add_argument("--in-process", action="store_true", help="run every config in this process (faster on a busy CPU)")
    p.add_argument("--report", action="store_true", help="print the table from the results file and exit")
    args = p.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
