"""Micro-benchmarks of clframe's replay buffer (issue #9): insert and sample cost, and peak memory.

    python benchmarks/buffer_micro.py            # about 2 minutes on 2 shared CPU cores

For buffers holding 500, 5,000 and 50,000 MNIST-shaped samples (uint8 1x28x28, int64 label and task
id), both policies: the time of ``add`` (a batch of 128, stream position just past the capacity, so
the reservoir accepts about as many samples as it ever does once full) and of ``sample(128)``, as the
median of interleaved blocks (and the minimum), next to the time of one training step of the MLP of
``benchmarks/overhead.py`` (784-400-400-10, 128 new + 128 replayed samples, forward, backward, SGD),
so each cost is also given as a share of a step. Memory: in a fresh process per buffer, the peak
resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) while the buffer is created,
filled and used for 100 insert + sample steps, against the bytes its tensors hold. Random data stands
in for MNIST (the cost does not depend on the pixel values); every batch holds labels of all 10
classes, the worst case for the class-balanced policy, which loops over the classes of a batch (a
Split-MNIST batch holds 2). ``--threads`` torch threads (default 1).
Writes ``benchmarks/results/buffer_micro.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
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
BATCH = 128
SHAPE = (1, 28, 28)


def batch(gen: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random MNIST-shaped batch: uint8 images, labels 0..9, task id 0."""
    x = torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=gen)
    return x, torch.randint(0, 10, (n,), generator=gen), torch.zeros(n, dtype=torch.long)


def filled(capacity: int, policy: str) -> ReplayBuffer:
    """A buffer that has seen just over ``capacity`` samples (full for both policies)."""
    gen = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(capacity, policy, seed=0)
    while len(buf) < capacity or int(buf.num_seen) < capacity:
        buf.add(*batch(gen))
    return buf


def timed_block(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def mlp_step_fn():
    """One training step of the overhead benchmark's MLP on 256 samples (plain PyTorch)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x, y, _ = batch(gen, 2 * BATCH)

    def step() -> None:
        loss = F.cross_entropy(net(x.float().div_(255.0)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure_speed(rounds: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    x, y, t = batch(gen)
    fns = {"mlp_step": mlp_step_fn()}
    for cap in CAPACITIES:
        for policy in POLICIES:
            buf = filled(cap, policy)
            fns[f"add/{policy}/{cap}"] = lambda buf=buf: buf.add(x, y, t)
            late = filled(cap, policy)  # ten times the capacity seen: the reservoir accepts 1 in 10
            late.num_seen.fill_(10 * cap)
            if policy == "class_balanced":
                late.class_seen.mul_(10)
            fns[f"add_late/{policy}/{cap}"] = lambda buf=late: buf.add(x, y, t)
            fns[f"sample/{policy}/{cap}"] = lambda buf=buf: buf.sample(BATCH)
    for fn in fns.values():  # warm-up
        timed_block(fn, 5)
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):  # interleaved blocks, order alternating, so load drifts hit every entry alike
        for k in keys if r % 2 == 0 else keys[::-1]:
            times[k].append(timed_block(fns[k], 5 if k == "mlp_step" else 20))
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
    step = speed["mlp_step"]["median_us"]
    lines = ["# Replay buffer micro-benchmarks\n",
             f"Produced by `benchmarks/buffer_micro.py` (method in its docstring). Command:\n\n```bash\n{command}\n```\n",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs shared with other "
             f"jobs, no GPU; torch {torch.__version__}, {threads} torch thread(s). Whole script {total:.0f} s.\n",
             f"One training step of the MLP 784-400-400-10 on 128 + 128 samples (plain PyTorch): **{step / 1e3:.2f} ms** "
             f"(median; min {speed['mlp_step']['min_us'] / 1e3:.2f} ms).\n",
             "| policy | stored samples | add(128) just full: median (min) us | add(128) at 10x capacity seen | "
             "sample(128): median (min) us | add + sample per step (just full) | share of one MLP step |",
             "|---|---|---|---|---|---|---|"]
    for policy in POLICIES:
        for cap in CAPACITIES:
            a, s = speed[f"add/{policy}/{cap}"], speed[f"sample/{policy}/{cap}"]
            late = speed[f"add_late/{policy}/{cap}"]
            both = a["median_us"] + s["median_us"]
            lines.append(f"| {policy} | {cap:,} | {a['median_us']:.0f} ({a['min_us']:.0f}) | {late['median_us']:.0f} "
                         f"({late['min_us']:.0f}) | {s['median_us']:.0f} "
                         f"({s['min_us']:.0f}) | {both:.0f} us | {100 * both / step:.1f} % |")
    lines += ["", "Memory (fresh process per buffer; peak resident memory while creating, filling and using it, "
              "over the process's resident memory just before):", "",
              "| policy | stored samples | bytes in the buffer's tensors | x + y + t payload (800 B per sample) | "
              "peak resident increase | peak / stored |", "|---|---|---|---|---|---|"]
    for m in memory:
        lines.append(f"| {m['policy']} | {m['capacity']:,} | {m['stored_bytes'] / 2**20:.2f} MiB | "
                     f"{m['payload_bytes'] / 2**20:.2f} MiB | {m['peak_over_baseline_bytes'] / 2**20:.2f} MiB | "
                     f"{m['peak_over_baseline_bytes'] / m['stored_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing blocks per entry")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-child", nargs=2, metavar=("CAPACITY", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(int(args.memory_child[0]), args.memory_child[1])))
        return
    start = time.perf_counter()
    command = ("nice -n -10 " if os.nice(0) < 0 else "") + "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/buffer_micro.py", *sys.argv[1:]])
    speed = measure_speed(args.rounds)
    memory = measure_memory(args.threads)
    total = time.perf_counter() - start
    report = write_report(speed, memory, command, args.threads, total)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "buffer_micro.md").write_text(report)
    (RESULTS / "buffer_micro.json").write_text(json.dumps({"command": command, "threads": args.threads, "total_s": total,
                                                          "speed": speed, "memory": memory}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
