"""The CPU timing harness: one subcommand per measurement; the method of each is in its section's docstring
(``python benchmarks/perf.py SUBCOMMAND --help`` prints it). Timings share the machinery of ``timing.py``.

    CLFRAME_DATA=/path/to/data python benchmarks/perf.py overhead --repeats 5            # overhead_mnist.*
    CLFRAME_DATA=/path/to/data python benchmarks/perf.py continual-eval                  # continual_eval_overhead.*
    nice -n -10 python benchmarks/perf.py buffer --baseline c5c2dca --rounds 15           # buffer_micro.*
    CLFRAME_DATA=/path/to/data python benchmarks/perf.py ewc-fisher                      # ewc_fisher_speed.json
    python benchmarks/perf.py startup --baseline /path/to/old/checkout --repeats 7
    python benchmarks/perf.py prompt-cost l2p ovor
    CLFRAME_DATA=/path/to/data python benchmarks/perf.py data-cache --repeats 3          # data_cache.json

Results stored before this harness name the separate scripts it replaced, with the same options and output
files: overhead.py (overhead), continual_eval_overhead.py (continual-eval), buffer_micro.py (buffer),
ewc_fisher_speed.py (ewc-fisher), startup_time.py (startup), prompt_cost.py (prompt-cost), data_cache.py
(data-cache).
"""

from __future__ import annotations

import sys

from timing import set_threads  # benchmarks/ is on sys.path when a script runs

_THREADS = set_threads(sys.argv)  # before torch: OpenMP reads its thread count at import time

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore")

import lightning  # noqa: E402, F401  (imported here, before its loggers are quieted)

for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)  # after the import, which sets them to INFO

# One module per subcommand (perf_<subcommand>.py); the overhead experiment's pieces are re-exported here so
# that `import perf; perf.run_clframe(...)` keeps working.
from perf_avalanche import make_avalanche_counter  # noqa: E402
from perf_buffer import BUFFER_DOC, cmd_buffer  # noqa: E402
from perf_continual_eval import CONTINUAL_EVAL_DOC, cmd_continual_eval  # noqa: E402
from perf_data_cache import DATA_CACHE_DOC, cmd_data_cache  # noqa: E402
from perf_ewc_fisher import EWC_FISHER_DOC, cmd_ewc_fisher  # noqa: E402
from perf_experiment import (  # noqa: E402
    Experiment,
    PlainNet,
    PlainReservoir,
    SmallCNN,
    avalanche_benchmark,
    build_experiment,
    build_pmnist,
    plain_eval,
    run_avalanche,
    run_clframe,
    run_plain,
    tensors,
)
from perf_overhead import (  # noqa: E402
    OVERHEAD_DOC,
    clframe_breakdown,
    cmd_overhead,
    dispatch_ablation,
    final_avg,
    measure,
    measure_scaling,
    profile_clframe,
    stopwatches,
    summarize,
)
from perf_prompt_cost import METHODS, PROMPT_COST_DOC, cmd_prompt_cost  # noqa: E402
from perf_startup import STARTUP_DOC, cmd_startup  # noqa: E402

from clframe.data.samplers import epoch_seed  # noqa: E402

__all__ = ["Experiment", "PlainNet", "PlainReservoir", "SmallCNN", "avalanche_benchmark", "build_experiment",
           "build_pmnist", "clframe_breakdown", "dispatch_ablation", "epoch_seed", "final_avg",
           "make_avalanche_counter", "measure", "measure_scaling", "plain_eval", "profile_clframe", "run_avalanche",
           "run_clframe", "run_plain", "stopwatches", "summarize", "tensors"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, doc: str, fn: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=doc.split("\n")[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--threads", type=int, default=int(_THREADS), help="torch (and OpenMP) threads")
        p.set_defaults(run=fn)
        return p

    p = command("overhead", OVERHEAD_DOC, cmd_overhead)
    p.add_argument("--benchmark", choices=("mnist", "cifar10", "pmnist"), default="mnist")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: mnist, pmnist 5, cifar10 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: mnist 0.1, cifar10 0.05)")
    p.add_argument("--cifar-per-class", type=int, default=1280,
                   help="CIFAR-10 training images per class (1280: 20 steps of 128 per task)")
    p.add_argument("--pmnist-train-per-class", type=int, default=200, help="pmnist: training images per class and task")
    p.add_argument("--pmnist-test-per-class", type=int, default=100, help="pmnist: test images per class and task")
    p.add_argument("--profile", action="store_true", help="also cProfile one clframe run")
    p.add_argument("--dispatch-ablation", action="store_true",
                   help="only: each Lightning-dispatch saving switched off alone (tiny MLP, CPU time)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/overhead_<benchmark>)")

    p = command("continual-eval", CONTINUAL_EVAL_DOC, cmd_continual_eval)
    p.add_argument("--reps", type=int, default=5, help="runs of each part-2 variant (medians are reported)")
    p.add_argument("--quick", action="store_true", help="fewer part-1 repeats (a smoke test)")
    p.add_argument("--skip-part1", action="store_true", help="only the whole-run comparison")
    p.add_argument("--skip-part2", action="store_true", help="only the single-evaluation timings")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/continual_eval_overhead)")

    p = command("buffer", BUFFER_DOC, cmd_buffer)
    p.add_argument("--rounds", type=int, default=11, help="interleaved timing blocks per entry")
    p.add_argument("--baseline", metavar="REF", help="git revision whose ReplayBuffer is timed alongside (before/after)")
    p.add_argument("--skip-memory", action="store_true", help="timings only")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/buffer_micro)")
    p.add_argument("--memory-child", nargs=2, metavar=("CAPACITY", "POLICY"), help=argparse.SUPPRESS)

    p = command("ewc-fisher", EWC_FISHER_DOC, cmd_ewc_fisher)
    p.add_argument("--per-sample-samples", type=int, default=1280)
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/ewc_fisher_speed)")

    p = command("startup", STARTUP_DOC, cmd_startup)
    p.add_argument("--baseline", type=Path, required=True, help="a checkout of the tree to compare against")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, default=None, help="also write every run here")

    p = command("data-cache", DATA_CACHE_DOC, cmd_data_cache)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/data_cache)")

    p = command("prompt-cost", PROMPT_COST_DOC, cmd_prompt_cost)
    p.add_argument("configs", nargs="*", default=list(METHODS), help="config stems (default: all)")
    return ap


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    args.run(args)


if __name__ == "__main__":
    main()
