"""``perf.py startup``: startup time of ``import clframe`` and the ``clframe`` command against a baseline
checkout (method in ``STARTUP_DOC``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from timing import ROOT

STARTUP_DOC = """Startup time of ``import clframe`` and the ``clframe`` command, against a baseline checkout.

    python benchmarks/perf.py startup --baseline /path/to/old/checkout --repeats 7

Each round runs every command once for this tree and once for the baseline (PYTHONPATH picks the tree;
the order alternates between rounds, so a shared machine's load drifts hit both sides alike), plus
``import torch`` as the yardstick. Reported: median wall time and median CPU time (user + system) per
command, and the median of ``-X importtime``'s cumulative time of the ``clframe`` package. The command
is run as ``python -m <entry>``: ``clframe`` (this tree's console entry point, ``clframe.entry:main``)
or ``clframe.cli`` for a tree without ``clframe/__main__.py`` (its entry point was ``clframe.cli:main``).
"""

COMMANDS = {  # label -> argv after `python`; {entry} is the tree's console entry module
    "import torch": ["-c", "import torch"],
    "import clframe": ["-X", "importtime", "-c", "import clframe"],
    "clframe --help": ["-m", "{entry}", "--help"],
    "clframe fit --help": ["-m", "{entry}", "fit", "--help"],
    "clframe report --help": ["-m", "{entry}", "report", "--help"],
}


def _run(tree: Path, argv: list[str]) -> dict[str, float]:
    entry = "clframe" if (tree / "clframe" / "__main__.py").is_file() else "clframe.cli"
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *(a.format(entry=entry) for a in argv)], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} in {tree} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out = {"wall": wall, "cpu": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime}
    if m := re.search(r"^import time:\s+\d+ \|\s+(\d+) \| clframe$", proc.stderr, re.M):
        out["importtime"] = int(m.group(1)) / 1e6
    return out


def cmd_startup(args: argparse.Namespace) -> None:
    sides = {"baseline": args.baseline.resolve(), "this tree": ROOT}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {label: {s: [] for s in sides} for label in COMMANDS}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for label, argv in COMMANDS.items():
            for side in order:
                if label == "import torch" and side != order[0]:
                    continue  # the same for both trees: once per round
                runs[label][side].append(_run(sides[side], argv))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print("| command | baseline wall (s) | this tree wall (s) | baseline CPU (s) | this tree CPU (s) |")
    print("|---|---|---|---|---|")
    for label, by_side in runs.items():
        cells = [f"{median(v):.2f}" if (v := [run[key] for run in by_side[side]]) else ""
                 for key in ("wall", "cpu") for side in sides]
        print(f"| `{label}` | {' | '.join(cells)} |")
    for side in sides:
        if values := [run["importtime"] for run in runs["import clframe"][side] if "importtime" in run]:
            print(f"\n`-X importtime` cumulative for `clframe`, {side}: median {median(values):.3f} s")
