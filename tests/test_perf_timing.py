"""The shared timing machinery of benchmarks/perf.py (benchmarks/timing.py), and the documented commands
naming scripts and harness subcommands that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import timing  # noqa: E402

from tests.conftest import requires_data  # noqa: E402

REPLACED = {f"benchmarks/{name}.py" for name in ("overhead", "continual_eval_overhead", "buffer_micro",
                                                 "ewc_fisher_speed", "startup_time", "prompt_cost", "data_cache")}


def test_alternating_reverses_every_other_round() -> None:
    assert list(timing.alternating(["a", "b", "c"], 2)) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a")]


def test_interleaved_discards_warmup_and_ratio_pairs_rounds() -> None:
    ticks = iter(range(100))
    times = timing.interleaved({"x": lambda: None, "y": lambda: None}, repeats=3, warmup=1,
                               timer=lambda: float(next(ticks)))
    assert times == {"x": [1.0] * 3, "y": [1.0] * 3}
    r = timing.ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert r["of_medians"] == 2.0 and r["paired_median"] == 2.0 and r["paired_min_max"] == (2.0, 3.0)
    assert timing.quartiles([1.0]) == (1.0, 1.0)


def test_clock_and_write_results(tmp_path: Path) -> None:
    with timing.clock() as t:
        sum(range(1000))
    assert t["wall"] >= 0 and t["cpu"] >= 0
    timing.write_results(tmp_path / "sub" / "out", "# md\n", {"a": 1})
    assert (tmp_path / "sub" / "out.md").read_text() == "# md\n"
    assert (tmp_path / "sub" / "out.json").read_text() == '{\n "a": 1\n}\n'


def test_set_threads_reads_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert timing.set_threads(["perf.py", "overhead"]) == "1"
    assert timing.set_threads(["perf.py", "overhead", "--threads", "2"]) == "2"
    assert timing.set_threads(["perf.py", "overhead", "--threads=3"]) == "3"


def test_documented_timing_commands_exist() -> None:
    """Every ``python benchmarks/X.py`` in the docs names a file (none of the scripts perf.py replaced), and every
    ``perf.py SUB`` they name is a subcommand."""
    subcommands = set(re.findall(r'command\("([a-z-]+)"', (ROOT / "benchmarks" / "perf.py").read_text()))
    assert subcommands == {"overhead", "continual-eval", "buffer", "ewc-fisher", "startup", "prompt-cost", "data-cache"}
    docs = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").rglob("*.md")),
            *sorted((ROOT / "benchmarks" / "suites").glob("*.yaml"))]
    for doc in docs:
        text = doc.read_text()
        for script in re.findall(r"python (benchmarks/[\w/]+\.py)", text):
            assert script not in REPLACED and (ROOT / script).is_file(), f"{doc.name} names {script}"
        for sub in re.findall(r"benchmarks/perf\.py ([\w-]+)", text):
            assert sub in subcommands, f"{doc.name} names perf.py {sub}"


def test_perf_imports_every_subcommand_module_and_reexports_the_experiment() -> None:
    """perf.py is a dispatcher over ``perf_<subcommand>.py``: importing it imports every subcommand's module, and
    the overhead experiment's pieces stay reachable as ``perf.<name>`` (scripts use ``perf.run_clframe`` etc.)."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import perf; "
            "print(sorted(perf.parser()._subparsers._group_actions[0].choices)); "
            "print(all(callable(getattr(perf, n)) for n in perf.__all__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split("\n")
    assert out[0] == str(sorted(["overhead", "continual-eval", "buffer", "ewc-fisher", "startup", "prompt-cost",
                                 "data-cache"]))
    assert out[1] == "True"


@requires_data
def test_the_overhead_sides_do_the_same_computation(tmp_path: Path) -> None:
    """The plain loop, the bare-Lightning program and clframe give one accuracy matrix on a tiny stream: the
    overhead benchmark compares the same work done three ways."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import perf, perf_bare_lightning as b; "
            "exp = perf.build_pmnist(2, 0.1, 4, 3); "
            f"rows = [f(exp, {str(tmp_path)!r}, 1)['accuracy_matrix'] for f in (perf.run_plain, b.run_bare_lightning, "
            "perf.run_clframe)]; "
            "print(max(abs(a - c) for m in rows[1:] for r0, r in zip(rows[0], m) for a, c in zip(r0, r)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip().split("\n")
    assert float(out[-1]) < 1e-6
