"""``perf.py buffer``: the replay buffer's insert and sample cost against a training step, and its peak memory
(method in ``BUFFER_DOC``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch
from timing import RESULTS, ROOT, command_line, interleaved, module_at, write_results
from torch import nn
from torch.nn import functional as F

from clframe.strategies.replay.buffer import ReplayBuffer

BUFFER_DOC = """Micro-benchmarks of clframe's replay buffer: insert and sample cost against a training step, and peak memory.

    nice -n -10 python benchmarks/perf.py buffer --baseline c5c2dca --rounds 15   # about 5 minutes on 2 shared CPU cores

For buffers holding 500, 5,000 and 50,000 MNIST-shaped samples (uint8 1x28x28, int64 label and task
id), both policies: the time of ``add(B)`` (stream position just past the capacity, so the reservoir
accepts about as many samples as it ever does once full; and at ten times the capacity seen) and of
``sample(B)``, as the median of interleaved blocks (and the minimum), next to the time of one training
step of an MLP on ``B`` new + ``B`` replayed samples (forward, backward, SGD), so each cost is also a
share of a step (of the medians, and of the minima). Times are the thread's CPU time
(``time.thread_time``), not wall time: on a shared machine a process waits for a core for whole
scheduler slices, which would inflate the long MLP step far more than the short buffer calls. Two settings: ``B = 128`` with the MLP 784-400-400-10 of ``perf.py overhead``,
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

CAPACITIES = (500, 5_000, 50_000)
POLICIES = ("reservoir", "class_balanced")
SETTINGS = {128: (400, 400), 10: (100, 100)}  # batch size -> hidden sizes of the MLP it is compared with
BATCH = 128
SHAPE = (1, 28, 28)
PERF = str(Path(__file__).with_name("perf.py"))  # the entry point, which runs the memory child


def batch(gen: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random MNIST-shaped batch: uint8 images, labels 0..9 (each of them present when n >= 10), task id 0."""
    x = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    if n >= 10:
        y[:10] = torch.arange(10)
    return x, y, torch.zeros(n, dtype=torch.long)


def filled(cls: type, capacity: int, policy: str) -> ReplayBuffer:
    """A buffer that has seen just over ``capacity`` samples (full for both policies)."""
    gen = torch.Generator().manual_seed(0)
    buf = cls(capacity, policy, seed=0)
    while len(buf) < capacity or int(buf.num_seen) < capacity:
        buf.add(*batch(gen, 1000))
    return buf


def timed_block(fn: Callable[[], Any], number: int) -> Callable[[], None]:
    """``number`` calls of ``fn`` as one timed block."""
    def block() -> None:
        for _ in range(number):
            fn()
    return block


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
    impls = {"after": ReplayBuffer,
             **({"before": module_at(baseline, "clframe/strategies/replay/buffer.py").ReplayBuffer} if baseline else {})}
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
    # This thread's CPU time (all work runs on it with one torch thread): waiting for a core is not counted.
    number = {}
    for k, fn in fns.items():  # warm-up, and calls per block: about 10 ms of work (3 to 50 calls)
        one = interleaved({k: timed_block(fn, 3)}, 1, 0, time.thread_time)[k][0] / 3
        number[k] = max(3, min(50, int(0.01 / max(one, 1e-6))))
    times = interleaved({k: timed_block(fn, number[k]) for k, fn in fns.items()}, rounds, 0, time.thread_time)
    return {k: {"median_us": 1e6 * median(v) / number[k], "min_us": 1e6 * min(v) / number[k]} for k, v in times.items()}


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
            proc = subprocess.run([sys.executable, PERF, "buffer", "--memory-child", str(cap), policy, "--threads", str(threads)],
                                  capture_output=True, text=True, env=env, check=True, cwd=ROOT)
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def buffer_report(speed: dict, memory: list[dict], command: str, threads: int, total: float) -> str:
    impls = [i for i in ("before", "after") if f"sample/{i}/reservoir/500/10" in speed]
    lines = ["# Replay buffer micro-benchmarks\n",
             f"Produced by `benchmarks/perf.py buffer` (method in its section docstring). Command:\n\n```bash\n{command}\n```\n",
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


def cmd_buffer(args: argparse.Namespace) -> None:
    if args.memory_child:
        print(json.dumps(memory_child(int(args.memory_child[0]), args.memory_child[1])))
        return
    start, command = time.perf_counter(), command_line(data=False)
    speed = measure_speed(args.rounds, args.baseline)
    memory = [] if args.skip_memory else measure_memory(args.threads)
    total = time.perf_counter() - start
    report = buffer_report(speed, memory, command, args.threads, total)
    write_results(Path(args.out) if args.out else RESULTS / "buffer_micro", report,
                  {"command": command, "threads": args.threads, "total_s": total, "speed": speed, "memory": memory})
    print(report)
