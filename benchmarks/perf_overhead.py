"""``perf.py overhead``: clframe against a plain PyTorch loop and against Avalanche; the measurement, the
per-task cost (pmnist), the Lightning-dispatch ablation, the profile and the report (method in
``OVERHEAD_DOC``)."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import lightning as L
import torch
from perf_bare_lightning import run_bare_lightning
from perf_experiment import (
    Experiment,
    avalanche_benchmark,
    build_experiment,
    build_pmnist,
    run_avalanche,
    run_clframe,
    run_plain,
)
from timing import RESULTS, ROOT, alternating, clock, command_line, machine, quartiles, ratio, write_results
from torch import nn

from clframe.models.factory import create_backbone
from clframe.strategies import ER
from clframe.trainer import ContinualTrainer

OVERHEAD_DOC = """Overhead of clframe against a plain PyTorch loop and against Avalanche (issue #9).

    CLFRAME_DATA=/path/to/data python benchmarks/perf.py overhead                       # Split-MNIST MLP
    CLFRAME_DATA=/path/to/data python benchmarks/perf.py overhead --benchmark cifar10   # Split-CIFAR-10 small CNN
    CLFRAME_DATA=/path/to/data python benchmarks/perf.py overhead --profile             # + cProfile of one clframe run
    CLFRAME_DATA=/path/to/data python benchmarks/perf.py overhead --benchmark pmnist    # per-task cost: 5, 10, 20 tasks

One experiment, run four ways in one process, repeats interleaved (one warm-up round discarded;
the order alternates plain, bare Lightning, clframe, Avalanche and back, so slow drifts of a
shared machine's load hit every side alike); medians and quartiles of the wall time of each whole
run are reported, plus the final average accuracy of each side. Every run's CPU time (``time.process_time``)
is recorded beside its wall time: with one thread it is what the run itself cost, so its ratios stay
meaningful on a machine that other jobs keep busy, where wall times swing by tens of per cent.

The experiment: ER, class-incremental, 5 tasks of 2 classes (natural order), batch 128 new + 128
replayed, replay memory of 500 samples, 1 epoch per task, plain SGD (lr ``--lr``), unmasked 10-way
head, identical initial weights on every side, and after every task a test of every seen task
on its whole test set (batch 256). ``mnist``: MLP 784-400-400-10 on real MNIST (inputs scaled to
[0, 1]). ``cifar10``: a 3-conv CNN on the CIFAR-10 JPEG copy, ``--cifar-per-class`` training
images per class (so 1 epoch is a small number of steps), inputs normalised per channel.

Round r seeds the buffers with r (plain and clframe: the same draws) and Avalanche's global RNG with
r, so the accuracies' spread over the rounds shows the seed noise.

* plain: a hand-written loop over the same uint8 tensors, no framework: per-task tensors, one
  gather per batch, a vectorised reservoir buffer (algorithm R, one ``rand`` per batch and a
  scatter to keep the last write of a slot), ``torch.inference_mode`` evaluation. It reproduces
  clframe's computation exactly (same epoch orders, same buffer draws), so its accuracies must
  equal clframe's up to floating-point summation order: that checks both sides do the same work.
* bare Lightning: the plain loop as a minimal Lightning program (a ``LightningModule`` with the plain
  loop's network and buffer, a ``Trainer`` per task, ``trainer.test`` on one loader per seen task;
  ``perf_bare_lightning.py``): the same computation, so the same accuracies; what it adds over the
  plain loop is Lightning's own loops, the floor of any Lightning-native library.
* clframe: ``ContinualTrainer`` + ``ER`` as a user runs it: progress bar and checkpointing off,
  the default logger (a ``CSVLogger``, Lightning's ``log_every_n_steps=50``), Lightning's other
  defaults (model summary on), ``mask_unseen_classes=False`` (the other sides do not mask).
* Avalanche: ``Naive`` + ``ReplayPlugin(mem_size=500, batch_size=128, batch_size_mem=128)`` and an
  ``EvaluationPlugin`` with experience accuracy only and no loggers. Its semantics differ where the
  library gives no choice: the memory (``ExperienceBalancedBuffer``) is filled at the end of each
  experience, not during it, so the first task trains on 128-sample batches without replay (about
  10 % fewer forwarded samples in all; counted and reported), and the memory batches are consecutive
  shuffled passes over the 500 samples (the last batch of a pass holds 116) rather than a fresh
  draw every step.

``pmnist`` (how the cost grows with the stream): the same ER on Permuted-MNIST, domain-incremental (one
shared 10-way head), ``--pmnist-train-per-class`` training and ``--pmnist-test-per-class`` test images per
class and task, for streams of 5, 10 and 20 tasks, plain and clframe only, every stream length in every
round. A test of all seen tasks after each task makes the evaluation work grow as T(T+1)/2 on both sides;
a framework cost per seen task evaluated would make the clframe / plain ratio grow with T. From the three
lengths, clframe's extra time is fitted exactly as ``run + task * T + seen * T(T+1)/2``.

Data preparation (reading MNIST, decoding the JPEGs, building the stream and Avalanche's benchmark
from the same tensors) happens once, before timing; each timed run builds its model, optimizer,
trainer or strategy and runs the whole stream. ``--threads`` torch threads (default 1).
Writes ``benchmarks/results/overhead_<benchmark>.json`` and ``.md``.
"""

SIDES = ("plain", "lightning", "clframe", "avalanche")
SIDE_NAMES = {"plain": "plain PyTorch", "lightning": "bare Lightning", "clframe": "clframe", "avalanche": "Avalanche 0.6"}
_THREADS = os.environ.get("OMP_NUM_THREADS")  # OpenMP/MKL threads: set by perf.py before torch was imported


# ============================================================================ measurement
def final_avg(rows: list[list[float]]) -> float:
    last = [a for a in rows[-1] if a == a]
    return sum(last) / len(last)



def measure(exp: Experiment, repeats: int, warmup: int, raw_file: Path) -> dict[str, Any]:
    bm = avalanche_benchmark(exp)
    fns: dict[str, Callable[..., dict]] = {"plain": run_plain, "lightning": run_bare_lightning, "clframe": run_clframe,
                                           "avalanche": lambda e, root, seed: run_avalanche(e, root, seed, bm)}
    runs: dict[str, list[dict]] = {k: [] for k in SIDES}
    for r, side in alternating(list(SIDES), warmup + repeats):
        with tempfile.TemporaryDirectory() as root, clock() as t:
            out = fns[side](exp, root, r)  # round r: buffer seed r (plain, clframe), global seed r (Avalanche)
        wall, cpu = t["wall"], t["cpu"]
        out = {"wall_s": wall, "cpu_s": cpu, "final_avg_acc": final_avg(out["accuracy_matrix"]), **out}
        tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
        print(f"  [{tag}] {side:9s} {wall:7.2f} s (CPU {cpu:6.2f} s)  final avg acc {100 * out['final_avg_acc']:.2f} %  "
              f"steps {out['steps']}  load {os.getloadavg()[0]:.2f}", flush=True)
        if r >= warmup:
            runs[side].append(out)
    raw_file.parent.mkdir(parents=True, exist_ok=True)
    raw_file.write_text(json.dumps(runs))  # kept until the summary is written
    summary = summarize(runs)
    raw_file.unlink()
    return summary


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    walls = {k: [r["wall_s"] for r in v] for k, v in runs.items()}
    s: dict[str, Any] = {"runs": runs, "median_s": {k: median(v) for k, v in walls.items()},
                         "quartiles_s": {k: quartiles(v) for k, v in walls.items()},
                         "min_max_s": {k: (min(v), max(v)) for k, v in walls.items()}}
    cpus = {k: [r["cpu_s"] for r in v] for k, v in runs.items()}
    s["median_cpu_s"] = {k: median(v) for k, v in cpus.items()}
    for a, b in (("clframe", "plain"), ("clframe", "avalanche"), ("avalanche", "plain"), ("lightning", "plain"),
                 ("clframe", "lightning")):
        if a not in runs or b not in runs:
            continue
        s[f"ratio_{a}_over_{b}"], s[f"cpu_ratio_{a}_over_{b}"] = ratio(walls[a], walls[b]), ratio(cpus[a], cpus[b])
    accs = {k: [r["final_avg_acc"] for r in v] for k, v in runs.items()}
    s["final_avg_acc"] = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in accs.items()}
    s["max_abs_diff_plain_vs_clframe_matrix"] = max(  # same round, same seed: the same computation
        abs(a - b) for p, c in zip(runs["plain"], runs["clframe"], strict=True)
        for rp, rc in zip(p["accuracy_matrix"], c["accuracy_matrix"], strict=True) for a, b in zip(rp, rc, strict=False))  # rc: NaN-padded
    if "lightning" in runs:  # the bare-Lightning side repeats the plain loop's computation too
        s["max_abs_diff_plain_vs_lightning_matrix"] = max(
            abs(a - b) for p, c in zip(runs["plain"], runs["lightning"], strict=True)
            for rp, rc in zip(p["accuracy_matrix"], c["accuracy_matrix"], strict=True) for a, b in zip(rp, rc, strict=True))
    s["steps"] = {k: v[0]["steps"] for k, v in runs.items()}
    s["samples"] = {k: v[0]["samples"] for k, v in runs.items()}
    s["per_step_overhead_ms_clframe_minus_plain"] = 1e3 * (s["median_s"]["clframe"] - s["median_s"]["plain"]) / \
        s["steps"]["clframe"]
    return s


# ============================================================================ per-task cost (pmnist)
PMNIST_TASKS = (5, 10, 20)


def measure_scaling(exps: list[Experiment], repeats: int, warmup: int) -> dict[str, Any]:
    """Plain and clframe on every stream length in every round (orders alternating), as ``measure`` does."""
    runs: dict[str, dict[str, list[dict]]] = {e.name: {"plain": [], "clframe": []} for e in exps}
    for r, (exp, side) in alternating([(e, sd) for e in exps for sd in ("plain", "clframe")], warmup + repeats):
        fn = run_plain if side == "plain" else run_clframe
        with tempfile.TemporaryDirectory() as root, clock() as t:
            out = fn(exp, root, r)
        wall, cpu = t["wall"], t["cpu"]
        tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
        print(f"  [{tag}] {exp.name:8s} {side:8s} {wall:6.2f} s (CPU {cpu:6.2f} s)  final avg acc "
              f"{100 * final_avg(out['accuracy_matrix']):.2f} %  load {os.getloadavg()[0]:.2f}", flush=True)
        if r >= warmup:
            runs[exp.name][side].append({"wall_s": wall, "cpu_s": cpu, "steps": out["steps"],
                                         "accuracy_matrix": out["accuracy_matrix"]})
    per_t: dict[str, Any] = {}
    for exp in exps:
        sides = runs[exp.name]
        entry: dict[str, Any] = {"tasks": len(exp.train), "steps": sides["clframe"][0]["steps"]}
        for unit in ("wall_s", "cpu_s"):
            p, c = ([r[unit] for r in sides[k]] for k in ("plain", "clframe"))
            rt = ratio(c, p)
            entry[unit] = {"plain": median(p), "clframe": median(c), "ratio_of_medians": rt["of_medians"],
                           "ratio_paired_median": rt["paired_median"], "ratio_paired_min_max": rt["paired_min_max"],
                           "extra_s": median(c) - median(p)}
        entry["max_abs_diff_plain_vs_clframe_matrix"] = max(
            abs(a - b) for pr, cr in zip(sides["plain"], sides["clframe"], strict=True)
            for rp, rc in zip(pr["accuracy_matrix"], cr["accuracy_matrix"], strict=True) for a, b in zip(rp, rc, strict=False))
        per_t[exp.name] = entry
    fit = {}
    for unit in ("wall_s", "cpu_s"):  # extra(T) = run + task * T + seen * T(T+1)/2, exact through three lengths
        ts = [per_t[e.name]["tasks"] for e in exps]
        a = torch.tensor([[1.0, t, t * (t + 1) / 2] for t in ts], dtype=torch.float64)
        b = torch.tensor([per_t[e.name][unit]["extra_s"] for e in exps], dtype=torch.float64)
        run_s, task_s, seen_s = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.flatten().tolist()
        fit[unit] = {"per_run_ms": 1e3 * run_s, "per_task_ms": 1e3 * task_s, "per_seen_task_ms": 1e3 * seen_s}
    return {"runs": runs, "per_length": per_t, "extra_fit": fit}


def write_scaling_report(exps: list[Experiment], s: dict, mach: dict, command: str, args: argparse.Namespace,
                         total_s: float) -> str:
    lines: list[str] = []
    w = lines.append
    w("# Per-task cost: Permuted-MNIST with 5, 10 and 20 tasks, plain loop and clframe\n")
    w(f"Produced by `benchmarks/perf.py overhead --benchmark pmnist` (method in its section docstring). Command:\n\n```bash\n"
      f"{command}\n```\n")
    w(f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs shared with other jobs, no GPU; torch threads "
      f"{mach['torch_threads']}; Python {mach['python']}, torch {mach['torch']}, lightning {mach['lightning']}. Load "
      f"average at start {mach['loadavg_at_start'][0]:.2f}. {args.repeats} interleaved rounds after {args.warmup} "
      f"warm-up round(s); whole script {total_s:.0f} s.\n")
    e0 = exps[0]
    w(f"Experiment: ER (memory {e0.buffer_size}, batch {e0.batch_size} + {e0.replay_batch_size} replayed), MLP "
      f"784-400-400-10, domain-incremental Permuted-MNIST, {len(e0.train[0][1])} training and {len(e0.test[0][1])} "
      "test images per task, 1 epoch per task, a test of every seen task after every task (batch 256).\n")
    w("| tasks | steps | plain CPU (s) | clframe CPU (s) | **clframe / plain, CPU** (per-round range) | "
      "plain wall (s) | clframe wall (s) | clframe / plain, wall (per-round range) |")
    w("|---|---|---|---|---|---|---|---|")
    for e in exps:
        t = s["per_length"][e.name]
        c, wl = t["cpu_s"], t["wall_s"]
        w(f"| {t['tasks']} | {t['steps']} | {c['plain']:.2f} | {c['clframe']:.2f} | **{c['ratio_paired_median']:.3f}** "
          f"({c['ratio_paired_min_max'][0]:.3f}-{c['ratio_paired_min_max'][1]:.3f}) | {wl['plain']:.2f} | "
          f"{wl['clframe']:.2f} | {wl['ratio_paired_median']:.3f} ({wl['ratio_paired_min_max'][0]:.3f}-"
          f"{wl['ratio_paired_min_max'][1]:.3f}) |")
    w("")
    for unit, label in (("cpu_s", "CPU time"), ("wall_s", "wall time")):
        f = s["extra_fit"][unit]
        w(f"clframe's extra {label} fitted as run + task·T + seen·T(T+1)/2: {f['per_run_ms']:.0f} ms per run, "
          f"{f['per_task_ms']:.1f} ms per task, {f['per_seen_task_ms']:.2f} ms per seen task evaluated.")
    diffs = [s["per_length"][e.name]["max_abs_diff_plain_vs_clframe_matrix"] for e in exps]
    w(f"\nAccuracy matrices of plain and clframe differ by at most {max(diffs):.2e} (same computation).")
    return "\n".join(lines) + "\n"


# ============================================================================ dispatch ablation
def dispatch_ablation(repeats: int) -> str:
    """Each of clframe's Lightning-dispatch savings switched off alone (and all four together), Split-MNIST ER
    with a tiny MLP (784-16-10) so the framework's cost dominates; CPU time per run, rounds interleaved."""
    from lightning.pytorch.profilers import PassThroughProfiler

    import clframe.trainer as ct
    from clframe.strategies.base import ContinualModule

    exp = build_experiment("mnist", 0.1, 0)
    torch.manual_seed(0)
    exp.backbone = create_backbone("mlp", (1, 28, 28), hidden_sizes=[16], init="default")
    exp.head = nn.Linear(exp.backbone.num_features, exp.stream.num_classes)
    saved = (ct.PassThrough, ct.skipping_noop_hooks, ContinualModule.__dict__["__setattr__"],
             ct.ContinualTrainer._first_run_done)

    def restore() -> None:
        ct.PassThrough, ct.skipping_noop_hooks = saved[0], saved[1]
        ContinualModule.__setattr__, ct.ContinualTrainer._first_run_done = saved[2], saved[3]

    def off(*names: str) -> Callable[[], None]:
        def apply() -> None:
            if "profiler" in names:
                ct.PassThrough = PassThroughProfiler
            if "hooks" in names:
                ct.skipping_noop_hooks = lambda *a: contextlib.nullcontext()
            if "setattr" in names:
                ContinualModule.__setattr__ = L.LightningModule.__setattr__
            if "once" in names:
                ct.ContinualTrainer._first_run_done = lambda *a: None
        return apply

    variants: dict[str, Callable[[], None] | None] = {
        "all on": off(), "Lightning's PassThroughProfiler": off("profiler"), "no hook shadowing": off("hooks"),
        "nn.Module.__setattr__ for _current_fx_name": off("setattr"), "summary and hparams every run": off("once"),
        "all four off": off("profiler", "hooks", "setattr", "once"), "plain loop": None}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r, name in alternating(list(variants), repeats + 1):
        restore()
        with tempfile.TemporaryDirectory() as root:
            apply = variants[name]
            if apply is not None:
                apply()
            with clock() as t:
                (run_plain if apply is None else run_clframe)(exp, root)
            if r:
                cpu[name].append(t["cpu"])
    restore()
    base = median(cpu["all on"])
    lines = ["| variant | CPU s per run (median) | vs all on, ms per step | rounds |", "|---|---|---|---|"]
    for name, v in cpu.items():
        lines.append(f"| {name} | {median(v):.3f} | {1e3 * (median(v) - base) / 471:+.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v)} |")
    return "\n".join(lines) + "\n"


# ============================================================================ profile
@contextlib.contextmanager
def stopwatches(targets: dict[str, tuple[Any, str]]):
    """Wrap each ``(owner, attribute)`` callable with a stopwatch; yields the dict of accumulated seconds."""
    acc = dict.fromkeys(targets, 0.0)
    saved = []
    for label, (owner, name) in targets.items():
        fn = owner.__dict__[name]

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t0

        saved.append((owner, name, fn))
        setattr(owner, name, timed)
    try:
        yield acc
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def clframe_breakdown(exp: Experiment, repeats: int) -> dict[str, Any]:
    """Per-step time of each part of a clframe run (stopwatches around the library's functions; median of
    ``repeats`` runs, each followed by a plain run for the same-moment comparison)."""
    import torch.optim.sgd as sgd_module

    from clframe.data.stream import TaskDataset
    from clframe.strategies.base import ContinualModule
    from clframe.strategies.replay.buffer import ReplayBuffer
    from clframe.strategies.replay.er import ReplayModule

    targets = {
        "whole run": (ContinualTrainer, "fit"),
        "evaluation after each task (trainer.test)": (ContinualTrainer, "evaluate_seen_tasks"),
        "  of which test forwards + counts (_eval_step)": (ContinualModule, "_eval_step"),
        "training_step (ER)": (ReplayModule, "training_step"),
        "  training_loss (forward + cross-entropy)": (ER, "training_loss"),
        "    replay draw (buffer.sample)": (ReplayBuffer, "sample"),
        "  buffer insert (buffer.add)": (ReplayBuffer, "add"),
        "  self.log": (L.LightningModule, "log"),
        "backward": (L.LightningModule, "backward"),
        "optimizer update (SGD)": (sgd_module, "sgd"),
        "zero_grad": (torch.optim.Optimizer, "zero_grad"),
        "batch gather (TaskDataset.__getitems__, train + test)": (TaskDataset, "__getitems__"),
    }
    runs, plain = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as root, stopwatches(targets) as acc:
            res = run_clframe(exp, root)
        runs.append(dict(acc))
        t0 = time.perf_counter()
        run_plain(exp, "")
        plain.append(time.perf_counter() - t0)
    steps = res["steps"]
    per_step = {k: 1e3 * median(r[k] for r in runs) / steps for k in targets}
    top = ("evaluation after each task (trainer.test)", "training_step (ER)", "backward", "optimizer update (SGD)",
           "zero_grad")
    per_step["Lightning loop, hooks, data loader, per-task fit/test setup (the rest)"] = \
        per_step["whole run"] - sum(per_step[k] for k in top) - per_step[
            "batch gather (TaskDataset.__getitems__, train + test)"]
    return {"steps": steps, "ms_per_step": per_step, "plain_ms_per_step": 1e3 * median(plain) / steps}


def profile_clframe(exp: Experiment, out: Path) -> dict[str, Any]:
    """cProfile of one clframe run (after a warm-up run): where the framework's time goes."""
    with tempfile.TemporaryDirectory() as root:
        run_clframe(exp, root)
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        prof.enable()
        res = run_clframe(exp, root)
        prof.disable()
        wall = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(70)
    out.write_text(f"# cProfile of one clframe run ({exp.name}, {res['steps']} steps, {wall:.2f} s under the "
                   f"profiler)\n\n{buf.getvalue()}")
    return {"wall_s_under_profiler": wall, "steps": res["steps"], "file": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)}


# ============================================================================ report
def write_report(exp: Experiment, s: dict, mach: dict, command: str, args: argparse.Namespace, total_s: float) -> str:
    lines: list[str] = []
    w = lines.append
    title = {"mnist": "Split-MNIST, MLP 784-400-400-10", "cifar10": "Split-CIFAR-10 (JPEG q75), small CNN"}[exp.name]
    w(f"# Overhead against a plain loop and Avalanche: {title}\n")
    w(f"Produced by `benchmarks/perf.py overhead` (method in its section docstring). Command:\n\n```bash\n{command}\n```\n")
    w(f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs shared with other jobs, no GPU; torch threads "
      f"{mach['torch_threads']} (OpenMP/MKL {_THREADS}), niceness {mach['niceness']}; Python {mach['python']}, torch "
      f"{mach['torch']}, lightning {mach['lightning']}, avalanche-lib {mach['avalanche']}. Load average at start "
      f"{mach['loadavg_at_start'][0]:.2f}. {args.repeats} interleaved repeats after {args.warmup} warm-up round(s); "
      f"whole script {total_s:.0f} s.\n")
    n_train = sum(len(y) for _, y in exp.train)
    w(f"Experiment: ER, 5 tasks x 2 classes, {n_train:,} training samples in all, batch {exp.batch_size} + "
      f"{exp.replay_batch_size} replayed, memory {exp.buffer_size}, 1 epoch per task, SGD lr {exp.lr}, test of all "
      "seen tasks after every task (whole test sets, batch 256). clframe loggers: "
      f"{', '.join(s['runs']['clframe'][0]['loggers'])} (log_every_n_steps="
      f"{s['runs']['clframe'][0]['log_every_n_steps']}), progress bar and checkpointing off.\n")
    w("| | " + " | ".join(SIDE_NAMES[k] for k in SIDES) + " |")
    w("|---|" + "---|" * len(SIDES))
    med, q, mm = s["median_s"], s["quartiles_s"], s["min_max_s"]
    w("| wall time per run, median (s) | " + " | ".join(f"**{med[k]:.2f}**" for k in SIDES) + " |")
    w("| quartiles (s) | " + " | ".join(f"{q[k][0]:.2f} - {q[k][1]:.2f}" for k in SIDES) + " |")
    w("| min - max (s) | " + " | ".join(f"{mm[k][0]:.2f} - {mm[k][1]:.2f}" for k in SIDES) + " |")
    w("| CPU time per run, median (s) | " + " | ".join(f"{s['median_cpu_s'][k]:.2f}" for k in SIDES) + " |")
    w("| training steps | " + " | ".join(str(s["steps"][k]) for k in SIDES) + " |")
    w("| training samples forwarded | " + " | ".join(f"{s['samples'][k]:,}" for k in SIDES) + " |")
    acc = s["final_avg_acc"]
    w("| final average accuracy (%), mean [min, max] | " + " | ".join(
        f"{100 * acc[k]['mean']:.2f} [{100 * acc[k]['min']:.2f}, {100 * acc[k]['max']:.2f}]" for k in SIDES) + " |")
    w("")
    cp, ca = s["ratio_clframe_over_plain"], s["ratio_clframe_over_avalanche"]
    w("| ratio | of the medians | median of per-round ratios | per-round min - max |")
    w("|---|---|---|---|")
    for label, r in (("clframe / plain", cp), ("clframe / Avalanche", ca), ("Avalanche / plain", s["ratio_avalanche_over_plain"]),
                     ("clframe / plain, CPU time", s["cpu_ratio_clframe_over_plain"]),
                     ("clframe / Avalanche, CPU time", s["cpu_ratio_clframe_over_avalanche"]),
                     ("Avalanche / plain, CPU time", s["cpu_ratio_avalanche_over_plain"]),
                     ("bare Lightning / plain, CPU time", s["cpu_ratio_lightning_over_plain"]),
                     ("clframe / bare Lightning, CPU time", s["cpu_ratio_clframe_over_lightning"])):
        w(f"| {label} | **{r['of_medians']:.3f}** | {r['paired_median']:.3f} | "
          f"{r['paired_min_max'][0]:.3f} - {r['paired_min_max'][1]:.3f} |")
    w("")
    w(f"clframe minus plain, per training step: {s['per_step_overhead_ms_clframe_minus_plain']:.2f} ms "
      f"(plain: {1e3 * med['plain'] / s['steps']['plain']:.2f} ms per step, evaluation included). "
      f"Accuracy matrices of plain and clframe differ by at most {s['max_abs_diff_plain_vs_clframe_matrix']:.2e} "
      "(same computation; floating-point summation order only); those of plain and bare Lightning by at most "
      f"{s['max_abs_diff_plain_vs_lightning_matrix']:.2e}.")
    if "breakdown" in s:
        b = s["breakdown"]
        w(f"\nWhere a clframe run's time goes, per training step ({b['steps']} steps; stopwatches around the "
          "library's functions, median of "
          f"{len(s['runs']['plain']) and max(3, args.repeats // 2)} runs; the plain loop took "
          f"{b['plain_ms_per_step']:.2f} ms per step, evaluation included, in the same rounds):\n")
        w("| part | ms per step |")
        w("|---|---|")
        for k, v in b["ms_per_step"].items():
            w(f"| {k} | {v:.3f} |")
    if "profile" in s:
        w(f"\ncProfile of one clframe run: `{s['profile']['file']}`.")
    return "\n".join(lines) + "\n"


def cmd_overhead(args: argparse.Namespace) -> None:
    args.repeats = args.repeats or (5 if args.benchmark in ("mnist", "pmnist") else 3)
    start, command, mach = time.perf_counter(), command_line(), machine()
    if args.dispatch_ablation:
        table = dispatch_ablation(args.repeats)
        write_results((Path(args.out) if args.out else RESULTS / "overhead_dispatch"),
                      f"# Lightning-dispatch savings, one at a time\n\nCommand:\n\n```bash\n{command}\n```\n\n"
                      f"{dispatch_ablation.__doc__.split(chr(10))[0]} ... (see its docstring). Machine: {mach['cpu']}, "
                      f"load average at start {mach['loadavg_at_start'][0]:.2f}.\n\n{table}")
        print(table)
        return
    if args.benchmark == "pmnist":
        exps = [build_pmnist(t, args.lr or 0.1, args.pmnist_train_per_class, args.pmnist_test_per_class)
                for t in PMNIST_TASKS]
        s = measure_scaling(exps, args.repeats, args.warmup)
        report = write_scaling_report(exps, s, mach, command, args, time.perf_counter() - start)
        write_results(Path(args.out) if args.out else RESULTS / "overhead_pmnist", report,
                      {"command": command, "machine": mach, "args": options(args), **s})
        print(report)
        return
    exp = build_experiment(args.benchmark, args.lr or (0.1 if args.benchmark == "mnist" else 0.05), args.cifar_per_class)
    print(f"{args.benchmark}: {sum(len(y) for _, y in exp.train)} training samples, {torch.get_num_threads()} "
          f"torch thread(s)", flush=True)
    stem = Path(args.out) if args.out else RESULTS / f"overhead_{args.benchmark}"
    s = measure(exp, args.repeats, args.warmup, stem.with_suffix(".raw.json"))
    if args.profile:
        s["profile"] = profile_clframe(exp, stem.with_name(stem.name + "_profile.txt"))
        s["breakdown"] = clframe_breakdown(exp, max(3, args.repeats // 2))
    total = time.perf_counter() - start
    report = write_report(exp, s, mach, command, args, total)
    write_results(stem, report, {"command": command, "machine": mach, "args": options(args), "total_s": total, **s})
    print(report)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The command's options as recorded beside its results."""
    return {k: v for k, v in vars(args).items() if k != "run"}
