"""Run a suite: every (run, seed) as its own ``clframe fit`` process, N at a time, resumable.

Each job writes to ``<out>/<label>/seed<k>/`` (Lightning logs, ``checkpoints/last.ckpt``, ``stdout.log``,
``stderr.log``, ``bench.json``). A job is finished when a ``results.json`` exists there (the trainer writes
it atomically at the end of the stream), so a rerun skips it; a job with a ``last.ckpt`` but no results
was interrupted and is resumed from that checkpoint (``--ckpt_path``), which continues the stream exactly.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from clframe.bench.suite import Run, Suite, SuiteError

CHECKPOINT = "checkpoints/last.ckpt"
FIT_PROGRAM = [sys.executable, "-m", "clframe.cli"]  # what runs a job (the same interpreter as bench)


@dataclass
class Job:
    run: Run
    seed: int
    dir: Path
    index: int

    @property
    def name(self) -> str:
        return f"{self.run.label} seed {self.seed}"


def results_file(run_dir: Path) -> Path | None:
    """The newest ``results.json`` of a run folder (a resumed run logs to a new version folder), or None."""
    found = [p for p in run_dir.glob("**/results.json") if "checkpoints" not in p.parts]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resume_checkpoint(run_dir: Path) -> Path | None:
    ckpt = run_dir / CHECKPOINT
    return ckpt if ckpt.is_file() else None


def fit_args(suite: Suite, job: Job, ckpt: Path | None) -> list[str]:
    """The ``clframe fit`` arguments of one job: config, suite and run overrides, seed, its folder, checkpoints."""
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(job.dir / "checkpoints"), "save_last": True, "save_top_k": 0}}
    args = ["fit", "--config", str(suite.config_path(job.run)), *suite.overrides, *job.run.overrides,
            f"--seed_everything={job.seed}", f"--trainer.default_root_dir={job.dir}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true",
            f"--trainer.callbacks+={json.dumps(checkpoint, separators=(',', ':'))}"]
    return [*args, f"--ckpt_path={ckpt}"] if ckpt is not None else args


def make_jobs(suite: Suite, only: list[int] | None = None) -> list[Job]:
    jobs = [Job(run, seed, suite.run_dir(run, seed), i) for i, (run, seed) in enumerate(suite.jobs())]
    if only:
        bad = [i for i in only if not 0 <= i < len(jobs)]
        if bad:
            raise SuiteError(f"--index {bad[0]} is out of range: the suite has {len(jobs)} jobs (0..{len(jobs) - 1})")
        jobs = [jobs[i] for i in only]
    return jobs


def error_paragraph(stderr_file: Path, lines: int = 12) -> str:
    """The tail of a failed run's stderr: its last non-empty lines (the exception or clframe's error line)."""
    try:
        text = stderr_file.read_text(errors="replace")
    except OSError:
        return "(no stderr)"
    tail = [line for line in text.rstrip().splitlines() if line.strip()][-lines:]
    return "\n".join(tail) or "(stderr is empty)"


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _die_with_parent() -> None:
    """Children end when the bench process ends, even when it is killed (Linux); elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Progress:
    """One line: done / running / failed / waiting, and the time left from the mean duration so far."""

    def __init__(self, total: int, skipped: int, slots: int, out: TextIO) -> None:
        self.total, self.done, self.failed, self.slots, self.out = total, skipped, 0, slots, out
        self.durations: list[float] = []
        self.running = 0
        self.started = time.time()
        self.last_print = 0.0

    def line(self) -> str:
        left = self.total - self.done - self.failed
        eta = "?"
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            eta = "~" + _fmt_time(mean * left / max(1, min(self.slots, left)))
        return (f"[bench] {self.done}/{self.total} done, {self.running} running, {self.failed} failed, "
                f"{left - self.running} waiting; {_fmt_time(time.time() - self.started)} elapsed, {eta} left")

    def show(self, force: bool = True) -> None:
        if force or time.time() - self.last_print > 60:
            print(self.line(), file=self.out, flush=True)
            self.last_print = time.time()


def _write_status(job: Job, **status: object) -> None:
    """Update the job's ``bench.json`` (the command and checkpoint of its last start stay beside its outcome)."""
    path = job.dir / "bench.json"
    try:
        old = json.loads(path.read_text()) if "command" not in status else {}
    except (OSError, json.JSONDecodeError):
        old = {}
    path.write_text(json.dumps({**old, "label": job.run.label, "seed": job.seed, **status}, indent=1))


def _record_finished(job: Job) -> None:
    """Mark a run whose ``results.json`` exists as done in its ``bench.json``."""
    try:
        status = json.loads((job.dir / "bench.json").read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        status = None
    if status != "done":
        _write_status(job, status="done")


def run_suite(suite: Suite, jobs: int = 1, gpus: list[str] | None = None, only: list[int] | None = None,
              dry_run: bool = False, out: TextIO | None = None, poll: float = 0.5) -> int:
    """Run every unfinished job of the suite, ``jobs`` at a time; return 0 when all finished, 1 otherwise.

    Threads are split between concurrent runs (``OMP_NUM_THREADS = cores // jobs``); with ``gpus`` each
    concurrent slot sees one device through ``CUDA_VISIBLE_DEVICES``.
    """
    out = out or sys.stderr
    todo = make_jobs(suite, only)
    missing = sorted({str(suite.config_path(j.run)) for j in todo if not suite.config_path(j.run).is_file()})
    if missing:
        raise SuiteError(f"suite {suite.name}: config file(s) not found: {', '.join(missing)} "
                         "(paths are read from the working directory or the suite's folder and its parents)")
    slots = max(1, len(gpus) if gpus and jobs <= 1 else jobs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // slots)
    pending = [j for j in todo if results_file(j.dir) is None]
    if dry_run:
        for job in todo:
            state = "finished" if job not in pending else ("resume" if resume_checkpoint(job.dir) else "new")
            print(f"# [{job.index}] {job.name}: {state}", file=sys.stdout)
            if job in pending:
                print(command_line(suite, job, resume_checkpoint(job.dir)), file=sys.stdout)
        return 0
    for job in todo:  # finished while an earlier bench was being killed: its bench.json may still say "running"
        if job not in pending:
            _record_finished(job)
    progress = Progress(len(todo), len(todo) - len(pending), slots, out)
    print(f"[bench] suite {suite.name}: {len(todo)} jobs, {len(todo) - len(pending)} finished already; "
          f"{slots} at a time, {threads} thread(s) each{', GPUs ' + ','.join(gpus) if gpus else ''}; out {suite.out}",
          file=out, flush=True)
    failures: list[tuple[Job, str]] = []
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}  # slot -> job
    stop = {"signal": None}

    def on_signal(signum: int, frame: object) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (pending or running) and stop["signal"] is None:
            for slot in range(slots):
                if slot not in running and pending:
                    job = pending.pop(0)
                    running[slot] = (job, _start(suite, job, threads, gpus[slot % len(gpus)] if gpus else None), time.time())
                    progress.running = len(running)
                    progress.show()
            time.sleep(poll)
            for slot, (job, proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                progress.running = len(running)
                seconds = time.time() - started
                if proc.returncode == 0 and results_file(job.dir) is not None:
                    progress.done += 1
                    progress.durations.append(seconds)
                    _write_status(job, status="done", seconds=round(seconds, 1))
                else:
                    progress.failed += 1
                    why = error_paragraph(job.dir / "stderr.log")
                    failures.append((job, why))
                    _write_status(job, status="failed", returncode=proc.returncode, error=why)
                    print(f"[bench] FAILED {job.name} (exit {proc.returncode}); end of {job.dir / 'stderr.log'}:\n"
                          + "\n".join("    " + line for line in why.splitlines()), file=out, flush=True)
                progress.show()
            progress.show(force=False)
    finally:
        for _job, proc, _ in running.values():  # interrupted: stop the runs; their last.ckpt resumes them
            if proc.poll() is None:
                proc.terminate()
        for _job, proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for s, handler in old.items():
            signal.signal(s, handler)
    if stop["signal"] is not None:
        progress.running = 0
        print(f"[bench] interrupted; rerun the same command to resume ({progress.line()})", file=out, flush=True)
        return 128 + int(stop["signal"])
    if failures:
        print(f"[bench] {len(failures)} failed: " + "; ".join(j.name for j, _ in failures), file=out, flush=True)
    return 1 if failures else 0


def _start(suite: Suite, job: Job, threads: int, gpu: str | None) -> subprocess.Popen:
    job.dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_checkpoint(job.dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    cmd = [*FIT_PROGRAM, *fit_args(suite, job, ckpt)]
    _write_status(job, status="running", resumed_from=str(ckpt) if ckpt else None, command=command_line(suite, job, ckpt))
    with open(job.dir / "stdout.log", "w") as so, open(job.dir / "stderr.log", "w") as se:
        return subprocess.Popen(cmd, stdout=so, stderr=se, env=env, preexec_fn=_die_with_parent)


def command_line(suite: Suite, job: Job, ckpt: Path | None = None) -> str:
    """The job as a shell command a user (or a scheduler) can run."""
    return shlex.join(["clframe", *fit_args(suite, job, ckpt)])
