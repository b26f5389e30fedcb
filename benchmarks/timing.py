"""What every CPU timing of ``benchmarks/perf.py`` shares, written once: the thread count set before torch is
imported, the machine description, interleaved rounds with alternating order (so slow drifts of a shared
machine's load hit every side alike), wall and CPU clocks, medians and paired ratios, the command line that
reproduces a run, result files, and a module as it was at an older git revision (before/after timings)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import median, quantiles
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def set_threads(argv: list[str]) -> str:
    """OpenMP/MKL threads from ``--threads N`` in ``argv`` (default 1, whatever the environment says); OpenMP
    reads the count when torch is imported, so this runs first."""
    threads = "1"
    for i, a in enumerate(argv):
        if a.startswith("--threads"):
            threads = a.split("=", 1)[1] if "=" in a else argv[i + 1]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
    return threads


def machine() -> dict:
    """What a timing depends on: CPU model and count, threads, niceness, load, library versions."""
    import lightning
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import avalanche

        avalanche_version = avalanche.__version__
    except ImportError:
        avalanche_version = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "gpu_used": False, "niceness": os.nice(0), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "avalanche": avalanche_version, "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def command_line(data: bool = True) -> str:
    """The shell command that reproduces this run (the data path generic, ``nice`` when it ran reniced)."""
    return ("CLFRAME_DATA=/path/to/data " if data else "") + ("nice -n -10 " if os.nice(0) < 0 else "") + \
        "python " + " ".join(shlex.quote(a) for a in ["benchmarks/perf.py", *sys.argv[1:]])


def alternating(keys: list, rounds: int) -> Iterator[tuple[int, Any]]:
    """``(round, key)`` for every key in every round, the order reversed every other round."""
    for r in range(rounds):
        yield from ((r, k) for k in (keys if r % 2 == 0 else keys[::-1]))


@contextlib.contextmanager
def clock() -> Iterator[dict[str, float]]:
    """Wall and CPU seconds (``time.process_time``: with one thread, what the work itself cost) of the block."""
    t: dict[str, float] = {}
    w0, c0 = time.perf_counter(), time.process_time()
    yield t
    t["wall"], t["cpu"] = time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                timer: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved in alternating order, warm-up rounds discarded."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r, k in alternating(list(fns), warmup + repeats):
        t0 = timer()
        fns[k]()
        if r >= warmup:
            times[k].append(timer() - t0)
    return times


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def ratio(a: list[float], b: list[float]) -> dict[str, Any]:
    """a / b as the ratio of the medians and as the median and range of the per-round ratios (same round:
    same machine load)."""
    paired = [x / y for x, y in zip(a, b, strict=True)]
    return {"of_medians": median(a) / median(b), "paired_median": median(paired),
            "paired_min_max": (min(paired), max(paired))}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning prints a few lines per task fit; keep the console readable."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def write_results(stem: Path, md: str | None = None, data: dict | None = None) -> None:
    """``stem.md`` and ``stem.json`` (whichever is given) under a created folder."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if md is not None:
        stem.with_suffix(".md").write_text(md)
    if data is not None:
        stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float) + "\n")


def module_at(ref: str, path: str) -> ModuleType:
    """The module at ``path`` (relative to the repository) as it was at git revision ``ref``."""
    src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    name = Path(path).stem + "_baseline"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
