"""Run a wandb sweep file locally and offline, without a wandb server or account.

    python examples/run_sweep.py configs/sweeps/gere.yaml --runs 4
    python examples/run_sweep.py configs/sweeps/er.yaml --runs 8 -- --trainer.steps_per_task=50

Each run's parameters are drawn from the sweep file's distributions (random search, seeded), turned
into the same ``--name=value`` flags ``wandb agent`` sends (``clframe.sweeps``), and run through
clframe's CLI in this process. Arguments after ``--`` are appended to every run (shorten runs,
switch data). Runs log to offline wandb runs under ``--save-dir`` (``wandb sync`` uploads them
later); the metric the sweep optimises is printed per run, and all runs go to
``<save-dir>/sweep_results.json``. Run it from the repository root: sweep commands name their base
config by a relative path, as they do for the real agent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from clframe.sweeps import expand, load_sweep


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the overrides after ``--`` that go to every run."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a wandb sweep file, e.g. configs/sweeps/gere.yaml")
    parser.add_argument("--runs", type=int, default=4, help="how many sampled runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameter sampling")
    parser.add_argument("--save-dir", type=Path, default=Path("runs/local_sweep"),
                        help="where each run's wandb folder and results go (one sub-folder per run)")
    parser.add_argument("--online", action="store_true", help="let wandb sync runs as they go (needs a login)")
    return parser.parse_args(argv), extra


def run_sweep(sweep_path: Path, runs: int, seed: int, save_dir: Path, extra: list[str],
              online: bool = False) -> list[dict[str, Any]]:
    """Run ``runs`` sampled configurations of ``sweep_path`` one after another; return one record
    per run (its values, arguments and the sweep's metric)."""
    import wandb

    from clframe.cli import run_cli

    if not online:
        os.environ["WANDB_MODE"] = "offline"
    sweep = load_sweep(sweep_path)
    metric = sweep.get("metric", {}).get("name", "final/avg_acc")
    records = []
    for i, (values, args) in enumerate(expand(sweep, runs, seed=seed)):
        out = save_dir / f"run_{i}"
        run_args = [*args, f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                    f"--trainer.logger.init_args.offline={not online}", *extra]
        print(f"[{i + 1}/{runs}] clframe {' '.join(args)}", flush=True)
        try:
            cli = run_cli(run_args)
            value = cli.trainer.continual_results.get("metrics", {}).get(metric, math.nan)
        finally:
            wandb.finish()  # the next WandbLogger must start a new run, not reuse this one
        records.append({"run": i, "values": values, "args": args, metric: value})
        print(f"[{i + 1}/{runs}] {metric} = {value:.4f}  {values}", flush=True)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "sweep_results.json").write_text(json.dumps(records, indent=2))
    return records


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    records = run_sweep(args.sweep, args.runs, args.seed, args.save_dir, extra, online=args.online)
    metric = next(k for k in records[0] if k not in ("run", "values", "args")) if records else "metric"
    goal = load_sweep(args.sweep).get("metric", {}).get("goal", "maximize")
    ranked = sorted(records, key=lambda r: -r[metric] if goal == "maximize" else r[metric])
    print(f"\n{metric} ({goal}) over {len(records)} runs:")
    for r in ranked:
        print(f"  run {r['run']}: {r[metric]:.4f}  {' '.join(a for a in r['args'] if a.startswith('--') and '=' in a)}")
    return records


if __name__ == "__main__":
    main()
