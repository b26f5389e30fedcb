"""``clframe bench | report | compare``: run a suite of methods x seeds, tabulate it, compare runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clframe.errors import ClframeError

COMMANDS = ("bench", "report", "compare")


def _gpus(value: str) -> list[str]:
    if value == "auto":
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    return [v for v in value.split(",") if v]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clframe", description="Suites of runs: run them, tabulate them, compare them.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run every (run, seed) of a suite, N at a time; a rerun resumes",
                       description="Run a suite: each (run, seed) is one `clframe fit` in <out>/<label>/seed<k>/. "
                                   "Finished runs are skipped, interrupted ones resume from their last.ckpt.")
    b.add_argument("suite", type=Path)
    b.add_argument("--jobs", "-j", type=int, default=1, help="runs at once (threads are split between them)")
    b.add_argument("--gpus", type=_gpus, default=None,
                   help="comma-separated device ids (or 'auto'): one run per device via CUDA_VISIBLE_DEVICES")
    b.add_argument("--out", type=Path, default=None, help="folder of the runs (default: the suite's 'out')")
    b.add_argument("--index", type=int, action="append", default=None,
                   help="run only job I (repeatable); for job arrays: --index $SLURM_ARRAY_TASK_ID")
    b.add_argument("--dry-run", action="store_true", help="print each job's state and command, run nothing")
    b.add_argument("--print-commands", action="store_true",
                   help="print one `clframe fit` command per job (all jobs, for a scheduler), run nothing")
    b.add_argument("--report", action="store_true", help="write the report when the suite is done")
    r = sub.add_parser("report", help="tables (Markdown, CSV) and plots of a suite's finished runs",
                       description="Aggregate finished runs: mean ± sd and n per cell, reference and difference, plots.")
    r.add_argument("source", type=Path, help="a suite YAML, or a folder of runs (each with a results.json)")
    r.add_argument("--out", type=Path, default=None, help="runs folder of the suite (default: the suite's 'out')")
    r.add_argument("--metric", action="append", default=None, help="logged metric(s) to tabulate (repeatable)")
    r.add_argument("--report-dir", type=Path, default=None, help="where to write (default: <out>/report)")
    r.add_argument("--digits", type=int, default=2)
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--from-json", type=Path, default=None,
                   help="read the runs from a results file of earlier scripts (JSON list or JSON lines, one object "
                        "per run and seed) instead of the suite's run folders")
    r.add_argument("--key", default="{label}",
                   help="with --from-json: which suite label an object belongs to, a format over its fields "
                        "(e.g. '{benchmark}_{variant}')")
    c = sub.add_parser("compare", help="two or more runs side by side: config differences, metrics, matrices")
    c.add_argument("runs", type=Path, nargs="+")
    c.add_argument("--metric", action="append", default=None, help="only these metrics (default: all)")
    return p


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    try:
        return _dispatch(args)
    except ClframeError as err:
        print(f"clframe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    from clframe.bench.suite import load_suite

    if args.command == "bench":
        from clframe.bench import runner

        suite = load_suite(args.suite)
        if args.out is not None:
            suite.out = args.out
        if args.print_commands:
            for job in runner.make_jobs(suite, args.index):
                print(runner.command_line(suite, job))
            return 0
        code = runner.run_suite(suite, jobs=args.jobs, gpus=args.gpus, only=args.index, dry_run=args.dry_run)
        if args.report and not args.dry_run:
            from clframe.bench.report import write_report

            print(write_report(suite).markdown)
        return code
    if args.command == "report":
        from clframe.bench.report import write_report

        if args.source.is_dir():
            from clframe.bench.report import folder_suite

            if args.from_json is not None:
                raise ClframeError("--from-json needs a suite file (its labels name the rows), not a folder of runs")

            suite = folder_suite(args.source)
        else:
            suite = load_suite(args.source)
            if args.out is not None:
                suite.out = args.out
        report = write_report(suite, metrics=args.metric, out=args.report_dir, digits=args.digits,
                              plots=not args.no_plots, from_json=args.from_json, key=args.key)
        print(report.markdown)
        print(f"\n[report] written: {', '.join(str(p) for p in report.files)}", file=sys.stderr)
        return 0
    from clframe.bench.compare import compare

    print(compare(args.runs, metrics=args.metric))
    return 0
