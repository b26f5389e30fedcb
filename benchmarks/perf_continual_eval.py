"""``perf.py continual-eval``: the overhead of clframe's per-iteration continual evaluation (method in
``CONTINUAL_EVAL_DOC``; measurements in ``perf_continual_eval_runs.py``, report in
``perf_continual_eval_report.py``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from perf_continual_eval_report import ce_write_report
from perf_continual_eval_runs import part1, part2, summarize_part2
from timing import RESULTS, command_line, machine, write_results

CONTINUAL_EVAL_DOC = """Overhead of clframe's per-iteration continual evaluation (the stability-gap protocol).

    CLFRAME_DATA=/path/to/data python benchmarks/perf.py continual-eval

Writes ``benchmarks/results/continual_eval_overhead.md`` (tables, command, machine) and
``benchmarks/results/continual_eval_overhead.json`` (every raw timing). One thread (torch and
OpenMP), so the numbers do not depend on how busy the other core is; every comparison is a ratio
of numbers measured in this one process, interleaved repeat by repeat.

Part 1, one evaluation against the bare forward passes it has to do:
  ``ContinualEvaluation.evaluate(trainer, module)`` is timed against
  ``with torch.no_grad(): for chunk in chunks: module(x_chunk, t_chunk)`` over the callback's own
  pre-collated subset tensors, the same chunks (``eval_batch_size``: the callback's default, read
  from its signature, and 4096 for comparison) and the same module (ER of
  ``configs/split_mnist/er_stability_gap.yaml``, MLP 784-400-400, after 3 training steps of every
  task, so every task is in scope). A third timing, "bare + metrics", adds the per-chunk metric
  work (argmax, cross-entropy, one ``index_add_``) to the bare loop without any of the callback's
  bookkeeping, to say where an overhead comes from. Several scales show the per-call fixed cost.
  The callback's counts are first checked against a ``bincount`` reference.

Part 2, a whole per-iteration-evaluated run against Avalanche:
  Split-MNIST class-incremental, 5 tasks of 2 classes (natural order), 1,000 training samples per
  class (the same samples on both sides), batch 128, 1 epoch per task (16 iterations per task, 80
  in all), plain fine-tuning (clframe ``Finetune``, Avalanche ``Naive``), identical initial
  weights, SGD lr 0.01 momentum 0.9 (momentum reset at every task on both sides). Evaluation: the
  seen tasks after every iteration on the identical 1,000-sample test subset of each task (the
  callback's seeded subsets, handed to Avalanche as tensors). Each framework runs with and without
  per-iteration evaluation; evaluation time = difference of the medians. Both frameworks'
  evaluations are also timed directly (clframe: around ``evaluate``; Avalanche: ``before_eval`` to
  ``after_eval`` of a counting plugin), and the evaluations are counted. Forward hooks measure the
  time spent inside the model's ``forward`` during those evaluations, so the time outside it (the
  framework's own overhead) is reported too. Part 2b repeats the comparison with a linear model,
  whose forward is almost free, so evaluation time is mostly framework overhead (as on a GPU).

Takes about 4-5 minutes on 2 shared CPU cores (``--reps`` sets the runs per part-2 variant).
"""


def cmd_continual_eval(args: argparse.Namespace) -> None:
    start, command, mach = time.perf_counter(), command_line(), machine()
    p1, extra = ([], {}) if args.skip_part1 else part1(args.quick)
    parts2 = []
    if not args.skip_part2:
        for hidden, nometrics, tag in (((400, 400), True, "mlp"), ((), False, "linear")):
            p2 = part2(args.reps, hidden, nometrics, tag)
            parts2.append((p2, summarize_part2(p2)))
    total = time.perf_counter() - start
    stem = Path(args.out) if args.out else RESULTS / "continual_eval_overhead"
    write_results(stem, ce_write_report(command, mach, p1, extra, parts2, total),
                  {"command": command, "machine": mach, "total_s": total, "part1": p1, "checks": extra,
                   "part2": [{**p2, "summary": s2} for p2, s2 in parts2]})
    print(f"wrote {stem}.md ({total:.0f} s)")
