"""Micro-benchmarks of clframe's replay buffer: insert and sample cost against a training step, and peak memory.

    nice -n -10 python benchmarks/buffer_micro.py --baseline c5c2dca --rounds 15   # about 5 minutes on 2 shared CPU cores

For buffers holding 500, 5,000 and 50,000 MNIST-shaped samples (uint8 1x28x28, int64 label and task
id), both policies: the time of ``add(B)`` (stream position just past the capacity, so the reservoir
accepts about as many samples as it ever does once full; and at ten times the capacity seen) and of
``sample(B)``, as the median of interleaved blocks (and the minimum), next to the time of one training
step of an MLP on ``B`` new + ``B`` replayed samples (forward, backward, SGD), so each cost is also a
share of a step (of the medians, and of the minima). Times are the thread's CPU time
(``time.thread_time``), not wall time: on a shared machine a process waits for a core for whole
scheduler slices, which would inflate the long MLP step far more than the short buffer calls. Two settings: ``B = 128`` with the MLP 784-400-400-10 of ``benchmarks/overhead.py``,
and ``B = 10`` with the MLP 784-100-100-10 of the ER Split-MNIST config (``configs/split_mnist/er.yaml``).
``--baseline REF`` also times the ``ReplayBuffer`` of git revision ``REF`` (loaded from
``git show REF:clframe/strategies/replay/buffer.py``) in the same rounds, so before and after are
ratios measured side by side. Memory: in a fresh process per buffer, the peak resident memory
(``VmHWM``, reset through ``/proc/self/clear_refs``) while the buffer is created, filled and used for
100 insert + sample steps, against the bytes its tensors hold. Random data stands in for MNIST (the
cost does not depend on the pixel values); every batch holds labels of all 10 classes (``B = 10``:
random labels), the worst case for the class-balanced policy (a Split-MNIST batch holds 2).
``--threads`` torch threads (default 1). Writes ``benchmarks/results/buffer_micro.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clframe.strategies.replay.buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CAPACITIES = (500, 5_000, 50_000)
POLICIES = ("reservoir", "class_balanced")
SETTINGS = {128: (400, 400), 10: (100, 100)}  # batch size -> hidden sizes of the MLP it is compared with
BATCH = 128
SHAPE = (1, 28, 28)


def batch(gen: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random MNIST-shaped batch: uint8 images, labels 0..9 (each of them present when n >= 10), task id 0."""
    x = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    if n >= 10:
        y[:10] = torch.arange(10)
    return x, y, torch.zeros(n, dtype=torch.long)


def baseline_class(ref: str) -> type:
    """``ReplayBuffer`` as it was at git revision ``ref``."""
    src = subprocess.run(["git", "show", f"{ref}:clframe/strategies/replay/buffer.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "buffer_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("buffer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ReplayBuffer


def filled(cls: type, capacity: int, policy: str) -> ReplayBuffer:
    """A buffer that has seen just over ``capacity`` samples (full for both policies)."""
    gen = torch.Generator().manual_seed(0)
    buf = cls(capacity, policy, seed=0)
    while len(buf) < capacity or int(buf.num_seen) < capacity:
        buf.add(*batch(gen, 1000))
    return buf


def timed_block(fn: Callable[[], Any], number: int) -> float:
    """Seconds of this thread's CPU time per call (all work runs on it with one torch thread), so time
    spent waiting for a core on a shared machine is not counted."""
    t0 = time.thread_time()
    for _ in range(number):
        fn()
    return (time.thread_time() - t0) / number


def mlp_step_fn(n: int, hidden: tuple[int, int]) -> Callable[[], None]:
    """One training step of an MLP 784-h-h-10 on ``2 n`` samples (plain PyTorch)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                        nn.Linear(hidden[1], 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y, _ = batch(gen, 2 * n)

    def step() -> None:
        loss = F.cross_entropy(net(x.float().div_(255.0)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure_speed(rounds: int, baseline: str | None) -> dict[str, Any]:
    impls = {"after": ReplayBuffer, **({"before": baseline_class(baseline)} if baseline else {})}
    gen = torch.Generator().manual_seed(2)
    fns: dict[str, Callable[[], Any]] = {}
    for b, hidden in SETTINGS.items():
        fns[f"mlp_step/{b}"] = mlp_step_fn(b, hidden)
    for impl, cls in impls.items():
        for cap in CAPACITIES:
            for policy in POLICIES:
                buf = filled(cls, cap, policy)
                late = filled(cls, cap, policy)  # ten times the capacity seen: the reservoir accepts 1 in 10
                late.num_seen.fill_(10 * cap)
                if policy == "class_balanced":
                    late.class_seen.mul_(10)
                for b in SETTINGS:
                    x, y, t = batch(gen, b)
                    key = f"{impl}/{policy}/{cap}/{b}"
                    fns[f"add/{key}"] = lambda buf=buf, x=x, y=y, t=t: buf.add(x, y, t)
                    fns[f"add_late/{key}"] = lambda buf=late, x=x, y=y, t=t: buf.add(x, y, t)
                    fns[f"sample/{key}"] = lambda buf=buf, b=b: buf.sample(b)
    number = {}
    for k, fn in fns.items():  # warm-up, and calls per block: about 10 ms of work (3 to 50 calls)
        one = timed_block(fn, 3)
        number[k] = max(3, min(50, int(0.01 / max(one, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):  # interleaved blocks, order alternating, so load drifts hit every entry alike
        for k in keys if r % 2 == 0 else keys[::-1]:
            times[k].append(timed_block(fns[k], number[k]))
    return {k: {"median_us": 1e6 * median(v), "min_us": 1e6 * min(v)} for k, v in times.items()}


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(capacity: int, policy: str) -> dict[str, Any]:
    """Run in a fresh process: peak resident memory of creating, filling and using one buffer."""
    gen = torch.Generator().manual_seed(0)
    data = [batch(gen) for _ in range(8)]
    probe = ReplayBuffer(20, policy)  # touch every code path once, so lazy imports are not counted
    probe.add(*data[0])
    probe.sample(2)
    del probe
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    buf = ReplayBuffer(capacity, policy, seed=0)
    i = 0
    while len(buf) < capacity or int(buf.num_seen) < capacity:
        buf.add(*data[i % len(data)])
        i += 1
    for j in range(100):
        buf.add(*data[j % len(data)])
        buf.sample(BATCH)
    peak, now = rss_kib("VmHWM"), rss_kib("VmRSS")
    stored = sum(b.numel() * b.element_size() for b in buf.buffers())
    if buf._slots is not None:  # the class-balanced bookkeeping (host tensors in the extra state)
        stored += sum(v.numel() * v.element_size() for v in buf._slots.state().values() if isinstance(v, torch.Tensor))
    return {"capacity": capacity, "policy": policy, "stored_bytes": stored,
            "payload_bytes": capacity * (784 + 8 + 8), "peak_over_baseline_bytes": 1024 * (peak - base),
            "resident_after_bytes": 1024 * (now - base)}


def measure_memory(threads: int) -> list[dict[str, Any]]:
    out = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for cap in CAPACITIES:
        for policy in POLICIES:
            proc = subprocess.run([sys.executable, __file__, "--memory-child", str(cap), policy, "--threads", str(threads)],
                                  capture_output=True, text=True, env=env, check=True, cwd=ROOT)
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def write_report(speed: dict, memory: list[dict], command: str, threads: int, total: float) -> str:
    impls = [i for i in ("before", "after") if f"sample/{i}/reservoir/500/10" in speed]
    lines = ["# Replay buffer micro-benchmarks\n",
             f"Produced by `benchmarks/buffer_micro.py` (method in its docstring). Command:\n\n```bash\n{command}\n```\n",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs shared with other "
             f"jobs, no GPU; torch {torch.__version__}, {threads} torch thread(s). Whole script {total:.0f} s.\n"]
    for b, hidden in SETTINGS.items():
        step = speed[f"mlp_step/{b}"]
        lines += [f"## B = {b}: one training step of the MLP 784-{hidden[0]}-{hidden[1]}-10 on {b} + {b} samples "
                  f"(plain PyTorch): **{step['median_us'] / 1e3:.3f} ms** (median; min {step['min_us'] / 1e3:.3f} ms)\n",
                  f"| version | policy | stored samples | add({b}) just full: median (min) us | add({b}) at 10x capacity seen | "
                  f"sample({b}): median (min) us | add + sample per step (just full) | share of one MLP step: "
                  "medians (minima) |",
                  "|---|---|---|---|---|---|---|---|"]
        for policy in POLICIES:
            for cap in CAPACITIES:
                for impl in impls:
                    key = f"{impl}/{policy}/{cap}/{b}"
                    a, smp, late = speed[f"add/{key}"], speed[f"sample/{key}"], speed[f"add_late/{key}"]
                    both = a["median_us"] + smp["median_us"]
                    both_min = a["min_us"] + smp["min_us"]
                    lines.append(f"| {impl} | {policy} | {cap:,} | {a['median_us']:.0f} ({a['min_us']:.0f}) | "
                                 f"{late['median_us']:.0f} ({late['min_us']:.0f}) | {smp['median_us']:.0f} "
                                 f"({smp['min_us']:.0f}) | {both:.0f} us | {100 * both / step['median_us']:.1f} % "
                                 f"({100 * both_min / step['min_us']:.1f} %) |")
        lines.append("")
    lines += ["Memory of the current version (fresh process per buffer; peak resident memory while creating, filling "
              "and using it, over the process's resident memory just before):", "",
              "| policy | stored samples | bytes in the buffer's tensors | x + y + t payload (800 B per sample) | "
              "peak resident increase | peak / stored |", "|---|---|---|---|---|---|"]
    for m in memory:
        lines.append(f"| {m['policy']} | {m['capacity']:,} | {m['stored_bytes'] / 2**20:.2f} MiB | "
                     f"{m['payload_bytes'] / 2**20:.2f} MiB | {m['peak_over_baseline_bytes'] / 2**20:.2f} MiB | "
                     f"{m['peak_over_baseline_bytes'] / m['stored_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11, help="interleaved timing blocks per entry")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", metavar="REF", help="git revision whose ReplayBuffer is timed alongside (before/after)")
    ap.add_argument("--skip-memory", action="store_true", help="timings only")
    ap.add_argument("--memory-child", nargs=2, metavar=("CAPACITY", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(int(args.memory_child[0]), args.memory_child[1])))
        return
    start = time.perf_counter()
    command = ("nice -n -10 " if os.nice(0) < 0 else "") + "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/buffer_micro.py", *sys.argv[1:]])
    speed = measure_speed(args.rounds, args.baseline)
    memory = [] if args.skip_memory else measure_memory(args.threads)
    total = time.perf_counter() - start
    report = write_report(speed, memory, command, args.threads, total)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "buffer_micro.md").write_text(report)
    (RESULTS / "buffer_micro.json").write_text(json.dumps({"command": command, "threads": args.threads, "total_s": total,
                                                          "speed": speed, "memory": memory}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
