"""``clframe bench | report | compare``: suites as data, the resumable runner, the aggregated table.

The default tests replace ``clframe fit`` by a tiny stand-in program (no torch import), so they check the
runner's scheduling, failure reporting and the report's arithmetic in seconds; the ``slow`` tests run real
``clframe fit`` processes on the embedded digits data (2 methods x 2 seeds, a killed and resumed suite).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from clframe.bench import runner
from clframe.bench.cli import main as bench_main
from clframe.bench.compare import compare
from clframe.bench.report import collect, folder_suite, write_report
from clframe.bench.suite import SuiteError, load_suite, suite_from_dict

ROOT = Path(__file__).resolve().parents[1]

# Stands in for `python -m clframe.cli fit ...`: writes a results.json whose accuracy depends on the seed
# and on --model.lr, records when it ran, and fails when asked to (--model.fail=true).
FAKE_FIT = textwrap.dedent('''
    import json, sys, time, pathlib
    args = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
    out = pathlib.Path(args["trainer.default_root_dir"])
    seed, lr = int(args["seed_everything"]), float(args.get("model.lr", "0.1"))
    live = out.parent.parent / "live"  # one marker per running job: how many run at once
    live.mkdir(exist_ok=True)
    (live / str(seed * 1000 + int(lr * 100))).touch()
    peak, until = 0, time.time() + 1.5
    while time.time() < until and peak < 2:
        peak = max(peak, len(list(live.iterdir())))
        time.sleep(0.05)
    time.sleep(0.2)
    peak = max(peak, len(list(live.iterdir())))
    if args.get("model.fail") == "true":
        (live / str(seed * 1000 + int(lr * 100))).unlink()
        print("Traceback (most recent call last):\\n  ...\\nValueError: model.fail: this run was told to fail",
              file=sys.stderr)
        sys.exit(1)
    log = out / "lightning_logs" / "version_0"
    log.mkdir(parents=True, exist_ok=True)
    acc = lr + 0.01 * seed * seed
    (log / "results.json").write_text(json.dumps({"seed": seed, "metrics": {"final/avg_acc": acc,
        "final/avg_forgetting": 0.5 - acc / 2}, "accuracy_matrix": [[0.9, None], [acc, acc]]}))
    (log / "config.yaml").write_text(f"seed_everything: {seed}\\nmodel:\\n  init_args:\\n    lr: {lr}\\n")
    (log / "continual_eval.csv").write_text("step,trained_task,acc_task_0,acc_task_1\\n0,0,0.1,\\n5,0,0.9,\\n"
                                            f"6,1,{0.2 + seed / 10},0.3\\n10,1,0.8,{acc}\\n")
    (out / "peak.json").write_text(json.dumps(peak))
    (live / str(seed * 1000 + int(lr * 100))).unlink()
''')


@pytest.fixture
def fake_fit(tmp_path, monkeypatch):
    script = tmp_path / "fake_fit.py"
    script.write_text(FAKE_FIT)
    monkeypatch.setattr(runner, "FIT_PROGRAM", [sys.executable, str(script)])
    (tmp_path / "cfg.yaml").write_text("seed_everything: 0\n")
    return tmp_path


def _suite_file(folder: Path, **extra) -> Path:
    raw = {"name": "toy", "out": str(folder / "runs"), "seeds": [0, 1, 2],
           "runs": [{"grid": {"method": [{"name": "a", "lr": 0.5}, {"name": "b", "lr": 0.7}]},
                     "label": "{method}", "row": "method {method}", "config": str(folder / "cfg.yaml"),
                     "overrides": ["--model.lr={method.lr}"]}],
           "reference": {"source": "a paper", "tolerance": 1.0, "values": {"method a": 50.0, "method b": "75 ± 1"}},
           **extra}
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ suite files
def test_grid_expands_with_named_choices_and_formats_every_field(tmp_path):
    suite = suite_from_dict({"seeds": [0, 1], "overrides": ["--trainer.steps_per_task=5"], "runs": [
        {"label": "ft", "config": "c/finetune.yaml"},
        {"grid": {"method": [{"name": "er", "title": "ER"}, {"name": "der", "title": "DER"}], "buffer": [200, 500]},
         "label": "{method}_{buffer}", "config": "c/{method}.yaml", "row": "{method.title}, buffer {buffer}",
         "column": "class", "overrides": ["--model.buffer_size={buffer}"], "seeds": [3]}]})
    assert [r.label for r in suite.runs] == ["ft", "er_200", "er_500", "der_200", "der_500"]
    der = suite.runs[3]
    assert (der.config, der.row, der.column, der.overrides, der.seeds) == \
        ("c/der.yaml", "DER, buffer 200", "class", ("--model.buffer_size=200",), (3,))
    assert len(suite.jobs()) == 2 + 4 and suite.run_dir(der, 3) == Path("runs/bench/suite/der_200/seed3")


@pytest.mark.parametrize("raw, words", [
    ({"runs": [{"label": "a", "config": "x.yaml", "overides": []}]}, "overides"),
    ({"runs": [{"label": "a", "config": "x"}, {"label": "a", "config": "y"}]}, "repeated: a"),
    ({"runs": [{"label": "a/b", "config": "x"}]}, "folder name"),
    ({"seeds": "0,1", "runs": [{"label": "a", "config": "x"}]}, "seeds"),
    ({"runs": [{"grid": {"m": []}, "label": "{m}", "config": "x"}]}, "non-empty lists"),
    ({"runs": [{"grid": {"m": [1]}, "label": "{n}", "config": "x"}]}, "grid names: m"),
    ({"runs": [{"label": "a", "config": "x", "overrides": ["model.lr=1"]}]}, "--key=value"),
    ({"runs": [{"label": "a", "config": "x"}], "reference": {"values": {"a": "about 3"}}}, "mean ± sd"),
    ({"runs": []}, "non-empty list"),
    ({"runs": [{"label": "a", "config": "x", "column": "c"}], "differences": [{"a": "c", "b": "d"}]}, "column 'd'"),
    ({"runs": [{"label": "a", "config": "x"}], "metrics": [{"name": "m", "digits": -1}]}, "digits"),
    ({"runs": [{"label": "a", "config": "x"}], "differences": [{"a": "", "b": "", "metric": "z"}]}, "'z'"),
])
def test_bad_suites_are_refused_with_the_key(raw, words):
    with pytest.raises(SuiteError, match=None) as err:
        suite_from_dict(raw)
    assert words in str(err.value)


def test_a_bad_suite_file_ends_with_one_paragraph_and_status_2(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("runs: [{label: a, config: x.yaml, bogus: 1}]\n")
    assert bench_main(["bench", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clframe bench: error:") and "bogus" in err and "Traceback" not in err
    assert bench_main(["bench", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    (tmp_path / "t.yaml").write_text("runs: [{label: a, config: missing.yaml}]\n")
    assert bench_main(["bench", str(tmp_path / "t.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_every_shipped_suite_loads_and_its_configs_exist():
    for path in sorted((ROOT / "benchmarks/suites").glob("*.yaml")):
        suite = load_suite(path)
        assert suite.jobs(), path
        lacking = [r.config for r in suite.runs if not suite.config_path(r).is_file()]
        assert not lacking, f"{path.name}: {lacking}"


# ------------------------------------------------------------------------------------------ the runner
def test_runner_runs_jobs_in_parallel_reports_a_failure_and_goes_on(fake_fit, capsys):
    path = _suite_file(fake_fit)
    raw = yaml.safe_load(path.read_text())
    raw["runs"].append({"label": "broken", "config": str(fake_fit / "cfg.yaml"), "overrides": ["--model.fail=true"],
                        "seeds": [0]})
    path.write_text(yaml.safe_dump(raw))
    suite = load_suite(path)
    assert runner.run_suite(suite, jobs=2, poll=0.05) == 1
    err = capsys.readouterr().err
    assert "FAILED broken seed 0 (exit 1)" in err and "ValueError: model.fail: this run was told to fail" in err
    assert "6/7 done, 0 running, 1 failed" in err
    peaks = [json.loads((suite.run_dir(r, s) / "peak.json").read_text()) for r, s in suite.jobs() if r.label != "broken"]
    assert max(peaks) == 2  # two at a time, never more
    status = json.loads((suite.out / "broken/seed0/bench.json").read_text())
    assert status["status"] == "failed" and "told to fail" in status["error"]
    # A rerun skips the finished runs and retries only the failed one.
    assert runner.run_suite(suite, jobs=2, poll=0.05) == 1
    assert "6 finished already" in capsys.readouterr().err


def test_dry_run_and_print_commands_show_states_and_resume_flags(fake_fit, capsys):
    suite = load_suite(_suite_file(fake_fit))
    first = suite.run_dir(suite.runs[0], 0)
    (first / "checkpoints").mkdir(parents=True)
    (first / "checkpoints/last.ckpt").write_bytes(b"")
    assert bench_main(["bench", str(fake_fit / "suite.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# [0] a seed 0: resume" in out and f"--ckpt_path={first / 'checkpoints/last.ckpt'}" in out
    assert "# [1] a seed 1: new" in out
    assert bench_main(["bench", str(fake_fit / "suite.yaml"), "--print-commands", "--index", "4"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("clframe fit --config") and "--seed_everything=1" in line and "--model.lr=0.7" in line
    assert "save_last" in line and "/b/seed1" in line


def test_gpus_give_each_slot_one_device(fake_fit, monkeypatch):
    seen = []
    real = subprocess.Popen

    def spy(cmd, **kw):
        seen.append(kw["env"]["CUDA_VISIBLE_DEVICES"])
        return real(cmd, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    suite = load_suite(_suite_file(fake_fit, seeds=[0]))
    assert runner.run_suite(suite, gpus=["0", "1"], poll=0.05, out=open(os.devnull, "w")) == 0
    assert sorted(seen) == ["0", "1"]


# ------------------------------------------------------------------------------------------ the report
def test_report_mean_sd_equal_a_hand_computation_and_mark_the_reference(fake_fit):
    suite = load_suite(_suite_file(fake_fit))
    # Only seeds 0 and 1 of method b run: a partial suite reports what is there and lists the rest.
    assert runner.run_suite(suite, jobs=2, only=[0, 1, 2, 3, 4], poll=0.05, out=open(os.devnull, "w")) == 0
    report = write_report(suite)
    by_hand = {}
    for label in ("a", "b"):
        accs = [100 * json.loads(p.read_text())["metrics"]["final/avg_acc"]
                for p in sorted((suite.out / label).glob("seed*/lightning_logs/version_0/results.json"))]
        by_hand[label] = (statistics.mean(accs), statistics.stdev(accs), len(accs))
    rows = {line.split(" | ")[0].strip("| "): line for line in report.markdown.splitlines() if line.startswith("| method")}
    m, sd, n = by_hand["a"]
    assert f"{m:.2f} ± {sd:.2f} ({n})" in rows["method a"] and n == 3
    assert f"{m - 50:+.2f}" in rows["method a"] and "⚠" in rows["method a"]  # |diff| > tolerance 1.0
    m, sd, n = by_hand["b"]
    assert f"{m:.2f} ± {sd:.2f} (2)" in rows["method b"] and "75.00 ± 1.00" in rows["method b"]
    assert "Missing 1 run(s): b seed 2 (not run)" in report.markdown
    csv_rows = [line.split(",") for line in report.csv.splitlines()]
    a_acc = next(r for r in csv_rows if r[0] == "method a" and r[2] == "final/avg_acc")
    assert float(a_acc[4]) == pytest.approx(by_hand["a"][0]) and float(a_acc[5]) == pytest.approx(by_hand["a"][1])
    assert (suite.out / "report/avg_acc_per_task.png").stat().st_size > 1000
    assert (suite.out / "report/stability_gap.png").stat().st_size > 1000  # from the runs' continual_eval.csv
    records, missing = collect(suite)
    assert len(records) == 5 and [(r.label, s) for r, s, _ in missing] == [("b", 2)]


def test_report_of_a_folder_and_any_logged_metric(fake_fit, capsys):
    suite = load_suite(_suite_file(fake_fit))
    runner.run_suite(suite, jobs=2, poll=0.05, out=open(os.devnull, "w"))
    folder = folder_suite(suite.out, metrics=["final/avg_forgetting"])
    assert sorted(r.label for r in folder.runs) == ["a", "b"] and folder.runs[0].seeds == (0, 1, 2)
    assert bench_main(["report", str(suite.out), "--metric", "final/avg_forgetting", "--no-plots"]) == 0
    out = capsys.readouterr().out
    forg = [100 * (0.5 - (0.5 + 0.01 * s * s) / 2) for s in (0, 1, 2)]
    assert f"{statistics.mean(forg):.2f} ± {statistics.stdev(forg):.2f} (3)" in out


def _fake_run(folder: Path, acc: float, seconds: float, steps: int) -> None:
    """A finished run folder as ``clframe bench`` leaves it: bench.json, results.json and metrics.csv."""
    log = folder / "lightning_logs" / "version_0"
    log.mkdir(parents=True)
    (folder / "bench.json").write_text(json.dumps({"status": "done", "seconds": seconds}))
    (log / "results.json").write_text(json.dumps({"metrics": {"final/avg_acc": acc}, "accuracy_matrix": [[acc]]}))
    (log / "metrics.csv").write_text("epoch,step,train/loss\n0,4,1.0\n0," + f"{steps},0.5\n")


COLUMN_SUITE = {"seeds": [0, 1],
                "metrics": ["final/avg_acc", {"name": "run/seconds", "title": "s/run", "scale": 1, "digits": 0},
                            {"name": "run/steps", "title": "steps", "scale": 1, "digits": 0}],
                "runs": [{"grid": {"method": ["a", "b"], "scenario": ["x", "y"]}, "label": "{method}_{scenario}",
                          "config": "c.yaml", "row": "method {method}", "column": "{scenario}"}],
                "differences": [{"title": "y - x", "a": "y", "b": "x"}],
                "reference": {"source": "paper", "notes": {"method a": "expected: y above x"}}}


def test_report_shows_run_facts_per_metric_digits_differences_and_notes(tmp_path):
    suite = suite_from_dict({**COLUMN_SUITE, "out": str(tmp_path)})
    for run, seed in suite.jobs():
        acc = {"a_x": 0.5, "a_y": 0.6, "b_x": 0.7, "b_y": 0.65}[run.label] + 0.02 * seed
        _fake_run(suite.run_dir(run, seed), acc, seconds=100 + 10 * seed, steps=200)
    md = write_report(suite, plots=False).markdown
    head = next(line for line in md.splitlines() if line.startswith("| run"))
    assert head == ("| run | x: final/avg_acc | x: s/run | x: steps | y: final/avg_acc | y: s/run | y: steps | y - x "
                    "| published / expected |")
    row_a = next(line for line in md.splitlines() if line.startswith("| method a"))
    assert "51.00 ± 1.41 (2) | 105 ± 7 (2) | 200 ± 0 (2)" in row_a and "| +10.00 |" in row_a
    assert row_a.endswith("| expected: y above x |")
    row_b = next(line for line in md.splitlines() if line.startswith("| method b"))
    assert "| -5.00 |" in row_b and row_b.endswith("| – |")


def test_report_from_json_reads_the_results_file_of_an_earlier_script(tmp_path, capsys):
    suite_path = tmp_path / "s.yaml"
    suite_path.write_text(yaml.safe_dump({**COLUMN_SUITE, "out": str(tmp_path / "runs")}))
    legacy = [{"method": m, "scenario": sc, "seed": seed, "seconds": 60.0, "steps": 30,
               **({"metrics": {"final/avg_acc": acc}} if m == "a" else {"final/avg_acc": acc})}
              for m, sc, acc in [("a", "x", 0.5), ("a", "y", 0.6), ("b", "x", 0.7)] for seed in (0, 1)]
    (tmp_path / "old.jsonl").write_text("\n".join(json.dumps(o) for o in legacy) + "\n")
    (tmp_path / "old.json").write_text(json.dumps({"runs": legacy}))
    for name in ("old.jsonl", "old.json"):
        assert bench_main(["report", str(suite_path), "--from-json", str(tmp_path / name), "--key",
                           "{method}_{scenario}", "--no-plots"]) == 0
        out = capsys.readouterr().out
        assert "| method a | 50.00 ± 0.00 (2) | 60 ± 0 (2) | 30 ± 0 (2) | 60.00 ± 0.00 (2)" in out
        assert "| method b | 70.00 ± 0.00 (2) |" in out and "Missing 2 run(s): b_y seeds 0, 1 (not in old." in out
    assert bench_main(["report", str(suite_path), "--from-json", str(tmp_path / "old.json"), "--key", "{job}"]) == 2
    assert "no field for --key" in capsys.readouterr().err


STORED = [("stability_gap", "stability_gap.json", "{run}", "1"), ("hyperinterval", "hyperinterval.json", "{job}", "2"),
          ("supermask", "supermask.json", "{job}", "2"), ("supermask_density", "supermask.json", "{job}", "2"),
          ("view_batch", "view_batch.json", "{benchmark}_{variant}", "2"), ("prompt", "prompt.json", "{config}", "2"),
          ("intact", "intact.json", "{benchmark}_{config}", "2"), ("prompt_intact", "prompt_intact.json", "{config}", "2")]


@pytest.mark.parametrize("suite, stored, key, digits", STORED)
def test_results_tables_are_the_reports_of_the_stored_runs(suite, stored, key, digits, tmp_path, capsys):
    """benchmarks/RESULTS.md shows, row for row, what `clframe report --from-json` makes of the stored runs."""
    assert bench_main(["report", str(ROOT / f"benchmarks/suites/{suite}.yaml"), "--from-json",
                       str(ROOT / f"benchmarks/results/{stored}"), "--key", key, "--digits", digits,
                       "--report-dir", str(tmp_path), "--no-plots"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    results = (ROOT / "benchmarks/RESULTS.md").read_text().splitlines()
    assert len(table) > 2 and [line for line in table if line not in results] == []


def test_compare_shows_config_differences_metrics_and_matrices(fake_fit):
    suite = load_suite(_suite_file(fake_fit, seeds=[0]))
    runner.run_suite(suite, poll=0.05, out=open(os.devnull, "w"))
    text = compare([suite.out / "a/seed0", suite.out / "b/seed0"])
    assert "model.init_args.lr" in text and "0.5" in text and "0.7" in text
    assert "final/avg_acc" in text and "50.00" in text and "70.00" in text
    assert text.count("accuracy matrix") == 2
    with pytest.raises(SuiteError, match="no results.json"):
        compare([suite.out / "a/seed0", fake_fit / "cfg.yaml"])


# ------------------------------------------------------------------------------------------ real runs (slow)
DIGITS_SUITE = {"name": "digits", "seeds": [0, 1],
                "overrides": ["--trainer.epochs_per_task=2", "--data.batch_size=32", "--trainer.log_every_n_steps=1"],
                "runs": [{"grid": {"method": ["ER", "Finetune"]}, "label": "{method}",
                          "config": str(ROOT / "clframe/default_config.yaml"), "overrides": ["--model={method}"]}]}


def _digits_suite(folder: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "digits.yaml"
    path.write_text(yaml.safe_dump({**DIGITS_SUITE, "out": str(folder / "runs"), **extra}))
    return path


def _bench(suite: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "clframe.cli", "bench", str(suite), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _table(suite: Path) -> str:
    return "\n".join(line for line in write_report(load_suite(suite), plots=False).markdown.splitlines()
                     if line.startswith("| "))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 8 short `clframe fit` processes, two at a time
def test_digits_suite_runs_two_at_a_time_and_a_killed_suite_resumes_to_the_same_table(tmp_path):
    """2 methods x 2 seeds with --jobs 2, uninterrupted; then the same suite killed once a run has a
    checkpoint and rerun: the resumed runs finish with exactly the same table."""
    whole = _digits_suite(tmp_path / "whole")
    proc = _bench(whole, "--jobs", "2")
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err
    assert "4/4 done, 0 running, 0 failed" in err

    killed = _digits_suite(tmp_path / "killed")
    proc = _bench(killed, "--jobs", "2")
    out = tmp_path / "killed/runs"
    deadline = time.time() + 1200
    while not list(out.glob("*/seed*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the suite finished before any checkpoint was seen"
    proc.send_signal(signal.SIGKILL)  # the bench process dies at once; its runs die with it
    proc.wait()
    time.sleep(2)
    assert not list(out.glob("*/seed*/**/results.json")) or len(list(out.glob("*/seed*/**/results.json"))) < 4
    proc = _bench(killed, "--jobs", "2")
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err
    states = [json.loads(p.read_text()) for p in out.glob("*/seed*/bench.json")]
    assert all(s["status"] == "done" for s in states)
    assert any(s.get("resumed_from") for s in states), "no run was resumed from its checkpoint"
    assert _table(killed) == _table(whole)
