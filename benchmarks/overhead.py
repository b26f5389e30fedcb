"""Overhead of clframe against a plain PyTorch loop and against Avalanche (issue #9).

    CLFRAME_DATA=/path/to/data python benchmarks/overhead.py                       # Split-MNIST MLP
    CLFRAME_DATA=/path/to/data python benchmarks/overhead.py --benchmark cifar10   # Split-CIFAR-10 small CNN
    CLFRAME_DATA=/path/to/data python benchmarks/overhead.py --profile             # + cProfile of one clframe run
    CLFRAME_DATA=/path/to/data python benchmarks/overhead.py --benchmark pmnist    # per-task cost: 5, 10, 20 tasks

One experiment, run three ways in one process, repeats interleaved (one warm-up round discarded;
the order alternates plain, clframe, Avalanche / Avalanche, clframe, plain, so slow drifts of a
shared machine's load hit every side alike); medians and quartiles of the wall time of each whole
run are reported, plus the final average accuracy of each side. Every run's CPU time (``time.process_time``)
is recorded beside its wall time: with one thread it is what the run itself cost, so its ratios stay
meaningful on a machine that other jobs keep busy, where wall times swing by tens of per cent.

The experiment: ER, class-incremental, 5 tasks of 2 classes (natural order), batch 128 new + 128
replayed, replay memory of 500 samples, 1 epoch per task, plain SGD (lr ``--lr``), unmasked 10-way
head, identical initial weights on all three sides, and after every task a test of every seen task
on its whole test set (batch 256). ``mnist``: MLP 784-400-400-10 on real MNIST (inputs scaled to
[0, 1]). ``cifar10``: a 3-conv CNN on the CIFAR-10 JPEG copy, ``--cifar-per-class`` training
images per class (so 1 epoch is a small number of steps), inputs normalised per channel.

Round r seeds the buffers with r (plain and clframe: the same draws) and Avalanche's global RNG with
r, so the accuracies' spread over the rounds shows the seed noise.

* plain: a hand-written loop over the same uint8 tensors, no framework: per-task tensors, one
  gather per batch, a vectorised reservoir buffer (algorithm R, one ``rand`` per batch and a
  scatter to keep the last write of a slot), ``torch.inference_mode`` evaluation. It reproduces
  clframe's computation exactly (same epoch orders, same buffer draws), so its accuracies must
  equal clframe's up to floating-point summation order: that checks both sides do the same work.
* clframe: ``ContinualTrainer`` + ``ER`` as a user runs it: progress bar and checkpointing off,
  the default logger (a ``CSVLogger``, Lightning's ``log_every_n_steps=50``), Lightning's other
  defaults (model summary on), ``mask_unseen_classes=False`` (the other two sides do not mask).
* Avalanche: ``Naive`` + ``ReplayPlugin(mem_size=500, batch_size=128, batch_size_mem=128)`` and an
  ``EvaluationPlugin`` with experience accuracy only and no loggers. Its semantics differ where the
  library gives no choice: the memory (``ExperienceBalancedBuffer``) is filled at the end of each
  experience, not during it, so the first task trains on 128-sample batches without replay (about
  10 % fewer forwarded samples in all; counted and reported), and the memory batches are consecutive
  shuffled passes over the 500 samples (the last batch of a pass holds 116) rather than a fresh
  draw every step.

``pmnist`` (how the cost grows with the stream): the same ER on Permuted-MNIST, domain-incremental (one
shared 10-way head), ``--pmnist-train-per-class`` training and ``--pmnist-test-per-class`` test images per
class and task, for streams of 5, 10 and 20 tasks, plain and clframe only, every stream length in every
round. A test of all seen tasks after each task makes the evaluation work grow as T(T+1)/2 on both sides;
a framework cost per seen task evaluated would make the clframe / plain ratio grow with T. From the three
lengths, clframe's extra time is fitted exactly as ``run + task * T + seen * T(T+1)/2``.

Data preparation (reading MNIST, decoding the JPEGs, building the stream and Avalanche's benchmark
from the same tensors) happens once, before timing; each timed run builds its model, optimizer,
trainer or strategy and runs the whole stream. ``--threads`` torch threads (default 1).
Writes ``benchmarks/results/overhead_<benchmark>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

_THREADS = "1"
for _i, _a in enumerate(sys.argv):  # OpenMP reads its thread count at import time
    if _a.startswith("--threads"):
        _THREADS = _a.split("=", 1)[1] if "=" in _a else sys.argv[_i + 1]
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _THREADS

import contextlib  # noqa: E402
import copy  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pstats  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import median, quantiles  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402

for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from common import machine  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from clframe.data.datamodule import ContinualDataModule  # noqa: E402
from clframe.data.samplers import epoch_seed  # noqa: E402
from clframe.data.stream import TaskStream  # noqa: E402
from clframe.models.factory import create_backbone  # noqa: E402
from clframe.strategies import ER  # noqa: E402
from clframe.trainer import ContinualTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIDES = ("plain", "clframe", "avalanche")


# ============================================================================ the experiment
class SmallCNN(nn.Module):
    """3 conv blocks (16-32-64 channels, 3x3, ReLU, 2x2 max-pool) then flatten: 1,024 features for 32x32 RGB."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for out in (16, 32, 64):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.num_features = 64 * 4 * 4

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PlainNet(nn.Module):
    """Backbone + head with clframe's on-device preprocessing (uint8 -> [0, 1] -> per-channel normalised,
    in place on the fresh float copy); used by the plain loop and by Avalanche."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.normalize = any(m != 0.0 for m in mean) or any(s != 1.0 for s in std)
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float().div_(255.0)
        if self.normalize:
            x = x.sub_(self.mean).div_(self.std)
        return self.head(self.backbone(x))


@dataclass
class Experiment:
    """Everything the three sides share: the stream, its per-task tensors and the initial weights."""

    name: str
    stream: TaskStream
    train: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]
    backbone: nn.Module
    head: nn.Linear
    lr: float
    batch_size: int = 128
    replay_batch_size: int = 128
    buffer_size: int = 500
    eval_batch_size: int = 256
    scenario: str = "class"

    def fresh_net(self) -> PlainNet:
        return PlainNet(copy.deepcopy(self.backbone), copy.deepcopy(self.head), self.stream.mean, self.stream.std)


def build_experiment(name: str, lr: float, cifar_per_class: int) -> Experiment:
    torch.manual_seed(0)
    if name == "mnist":
        dm = ContinualDataModule(source="mnist", n_tasks=5, normalize=False, seed=0)
        backbone = create_backbone("mlp", (1, 28, 28), hidden_sizes=[400, 400], init="default")
    elif name == "cifar10":
        with contextlib.redirect_stderr(io.StringIO()):  # the "lossy JPEG copy" notice
            dm = ContinualDataModule(source="cifar10", n_tasks=5, seed=0, train_samples_per_class=cifar_per_class)
            dm.setup()
        backbone = SmallCNN(3)
    else:
        raise SystemExit(f"unknown benchmark {name!r}")
    stream = dm.stream

    def tensors(ds) -> tuple[Tensor, Tensor]:
        x, y, _ = ds.__getitems__(list(range(len(ds))))
        return x.contiguous(), y.contiguous()

    return Experiment(name, stream, [tensors(t.train) for t in stream.tasks], [tensors(t.test) for t in stream.tasks],
                      backbone, nn.Linear(backbone.num_features, stream.num_classes), lr)


def build_pmnist(n_tasks: int, lr: float, train_per_class: int, test_per_class: int) -> Experiment:
    """Permuted-MNIST, domain-incremental, ``n_tasks`` permutations; the same MLP initialisation for every length."""
    dm = ContinualDataModule(source="mnist", scenario="domain", tasks="permutation", n_tasks=n_tasks, normalize=False,
                             seed=0, train_samples_per_class=train_per_class, test_samples_per_class=test_per_class)
    stream = dm.stream
    torch.manual_seed(0)
    backbone = create_backbone("mlp", (1, 28, 28), hidden_sizes=[400, 400], init="default")

    def tensors(ds) -> tuple[Tensor, Tensor]:
        x, y, _ = ds.__getitems__(list(range(len(ds))))
        return x.contiguous(), y.contiguous()

    return Experiment(f"pmnist{n_tasks}", stream, [tensors(t.train) for t in stream.tasks],
                      [tensors(t.test) for t in stream.tasks], backbone,
                      nn.Linear(backbone.num_features, stream.num_classes), lr, scenario="domain")


# ============================================================================ plain PyTorch
class PlainReservoir:
    """Vitter's algorithm R, vectorised per batch: uint8 inputs and labels in preallocated tensors."""

    def __init__(self, capacity: int, sample_shape: tuple[int, ...], seed: int) -> None:
        self.capacity, self.seen = capacity, 0
        self.x = torch.zeros((capacity, *sample_shape), dtype=torch.uint8)
        self.y = torch.zeros(capacity, dtype=torch.long)
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        idx = torch.randperm(min(self.seen, self.capacity), generator=self.gen)[:n]
        return self.x[idx], self.y[idx]

    def add(self, x: Tensor, y: Tensor) -> None:
        n = len(y)
        pos = torch.arange(self.seen, self.seen + n, dtype=torch.float64)
        draw = torch.floor(torch.rand(n, generator=self.gen, dtype=torch.float64) * (pos + 1)).long()
        slots = torch.where(pos < self.capacity, pos.long(), draw)
        rows = (slots < self.capacity).nonzero().flatten()
        slots = slots[rows]
        # a slot drawn twice in one batch keeps the later sample, as a sequential loop would
        last = torch.full((self.capacity,), -1, dtype=torch.long).scatter_reduce_(0, slots, rows, "amax")
        keep = last[slots] == rows
        self.x[slots[keep]] = x[rows[keep]]
        self.y[slots[keep]] = y[rows[keep]]
        self.seen += n


@torch.inference_mode()
def plain_eval(net: nn.Module, exp: Experiment, upto: int) -> list[float]:
    net.eval()
    accs = []
    for x, y in exp.test[: upto + 1]:
        correct = torch.zeros((), dtype=torch.long)
        for lo in range(0, len(y), exp.eval_batch_size):
            correct += (net(x[lo:lo + exp.eval_batch_size]).argmax(1) == y[lo:lo + exp.eval_batch_size]).sum()
        accs.append(int(correct) / len(y))
    net.train()
    return accs


def run_plain(exp: Experiment, _root: str, seed: int = 0) -> dict[str, Any]:
    net = exp.fresh_net()
    buf = PlainReservoir(exp.buffer_size, tuple(exp.train[0][0].shape[1:]), seed)
    steps = samples = 0
    rows = []
    for task_id, (x_all, y_all) in enumerate(exp.train):
        opt = torch.optim.SGD(net.parameters(), lr=exp.lr)  # rebuilt per task, as clframe does
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(epoch_seed(exp.stream.seed, task_id)))
        for lo in range(0, len(order), exp.batch_size):
            idx = order[lo:lo + exp.batch_size]
            x, y = x_all[idx], y_all[idx]
            if buf.seen:
                rx, ry = buf.sample(exp.replay_batch_size)
                x_in, y_in = torch.cat([x, rx]), torch.cat([y, ry])
            else:
                x_in, y_in = x, y
            loss = F.cross_entropy(net(x_in), y_in)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            buf.add(x, y)
            steps, samples = steps + 1, samples + len(y_in)
        rows.append(plain_eval(net, exp, task_id))
    return {"accuracy_matrix": rows, "steps": steps, "samples": samples}


# ============================================================================ clframe
def run_clframe(exp: Experiment, root: str, seed: int = 0) -> dict[str, Any]:
    dm = ContinualDataModule.from_stream(exp.stream, batch_size=exp.batch_size, eval_batch_size=exp.eval_batch_size)
    net = exp.fresh_net()
    model = ER(backbone=net.backbone, num_classes=exp.stream.num_classes, input_shape=exp.stream.input_shape,
               scenario=exp.scenario, optimizer="sgd", lr=exp.lr, buffer_size=exp.buffer_size,
               replay_batch_size=exp.replay_batch_size, buffer_seed=seed, mask_unseen_classes=False)
    model.head.load_state_dict(net.head.state_dict())
    trainer = ContinualTrainer(epochs_per_task=1, accelerator="cpu", devices=1, enable_progress_bar=False,
                               enable_checkpointing=False, default_root_dir=root)
    with quiet():
        trainer.fit(model, datamodule=dm)
    return {"accuracy_matrix": trainer.accuracy_matrix, "steps": trainer.global_step,
            # every step but the first replays a full batch (the first batch alone fills 128 slots)
            "samples": sum(len(y) for _, y in exp.train) + (trainer.global_step - 1) * exp.replay_batch_size,
            "loggers": [type(lg).__name__ for lg in trainer.loggers],
            "log_every_n_steps": trainer.log_every_n_steps}


# ============================================================================ Avalanche
def avalanche_benchmark(exp: Experiment):
    from avalanche.benchmarks import tensors_benchmark

    return tensors_benchmark(train_tensors=[list(t) for t in exp.train], test_tensors=[list(t) for t in exp.test],
                             task_labels=[0] * len(exp.train))


def make_counter():
    from avalanche.core import SupervisedPlugin

    class Counter(SupervisedPlugin):
        """Counts training iterations and forwarded training samples."""

        def __init__(self) -> None:
            super().__init__()
            self.iters = self.samples = 0

        def after_training_iteration(self, strategy, **kwargs) -> None:
            self.iters += 1
            self.samples += len(strategy.mb_y)

    return Counter()


def run_avalanche(exp: Experiment, _root: str, seed: int = 0, bm=None) -> dict[str, Any]:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

    torch.manual_seed(seed)  # Avalanche's shuffles and memory selection draw from the global RNG

    net = exp.fresh_net()
    counter = make_counter()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    replay = ReplayPlugin(mem_size=exp.buffer_size, batch_size=exp.batch_size, batch_size_mem=exp.replay_batch_size)
    strategy = Naive(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=exp.lr), train_mb_size=exp.batch_size,
                     train_epochs=1, eval_mb_size=exp.eval_batch_size, device="cpu", plugins=[replay, counter],
                     evaluator=evaluator)
    rows = []
    for t, experience in enumerate(bm.train_stream):
        with warnings.catch_warnings():  # Avalanche's own deprecation notices
            warnings.simplefilter("ignore")
            strategy.train(experience)
            strategy.eval(bm.test_stream[: t + 1])
        last = evaluator.get_last_metrics()
        rows.append([last[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(t + 1)])
    return {"accuracy_matrix": rows, "steps": counter.iters, "samples": counter.samples}


# ============================================================================ measurement
@contextlib.contextmanager
def quiet():
    """Lightning prints a few lines per task fit; keep the console readable."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def final_avg(rows: list[list[float]]) -> float:
    last = [a for a in rows[-1] if a == a]
    return sum(last) / len(last)


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def measure(exp: Experiment, repeats: int, warmup: int, raw_file: Path) -> dict[str, Any]:
    bm = avalanche_benchmark(exp)
    fns: dict[str, Callable[..., dict]] = {"plain": run_plain, "clframe": run_clframe,
                                           "avalanche": lambda e, root, seed: run_avalanche(e, root, seed, bm)}
    runs: dict[str, list[dict]] = {k: [] for k in SIDES}
    for r in range(warmup + repeats):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            with tempfile.TemporaryDirectory() as root:
                t0, c0 = time.perf_counter(), time.process_time()
                out = fns[side](exp, root, r)  # round r: buffer seed r (plain, clframe), global seed r (Avalanche)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out = {"wall_s": wall, "cpu_s": cpu, "final_avg_acc": final_avg(out["accuracy_matrix"]), **out}
            tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
            print(f"  [{tag}] {side:9s} {wall:7.2f} s (CPU {cpu:6.2f} s)  final avg acc {100 * out['final_avg_acc']:.2f} %  "
                  f"steps {out['steps']}  load {os.getloadavg()[0]:.2f}", flush=True)
            if r >= warmup:
                runs[side].append(out)
    raw_file.parent.mkdir(parents=True, exist_ok=True)
    raw_file.write_text(json.dumps(runs))  # kept until the summary is written
    summary = summarize(runs)
    raw_file.unlink()
    return summary


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    walls = {k: [r["wall_s"] for r in v] for k, v in runs.items()}
    s: dict[str, Any] = {"runs": runs, "median_s": {k: median(v) for k, v in walls.items()},
                         "quartiles_s": {k: quartiles(v) for k, v in walls.items()},
                         "min_max_s": {k: (min(v), max(v)) for k, v in walls.items()}}
    cpus = {k: [r["cpu_s"] for r in v] for k, v in runs.items()}
    s["median_cpu_s"] = {k: median(v) for k, v in cpus.items()}
    for a, b in (("clframe", "plain"), ("clframe", "avalanche"), ("avalanche", "plain")):
        if a not in runs or b not in runs:
            continue
        paired = [x / y for x, y in zip(walls[a], walls[b], strict=True)]  # same round: same machine load
        s[f"ratio_{a}_over_{b}"] = {"of_medians": median(walls[a]) / median(walls[b]), "paired_median": median(paired),
                                    "paired_min_max": (min(paired), max(paired))}
        paired = [x / y for x, y in zip(cpus[a], cpus[b], strict=True)]
        s[f"cpu_ratio_{a}_over_{b}"] = {"of_medians": median(cpus[a]) / median(cpus[b]),
                                        "paired_median": median(paired), "paired_min_max": (min(paired), max(paired))}
    accs = {k: [r["final_avg_acc"] for r in v] for k, v in runs.items()}
    s["final_avg_acc"] = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in accs.items()}
    s["max_abs_diff_plain_vs_clframe_matrix"] = max(  # same round, same seed: the same computation
        abs(a - b) for p, c in zip(runs["plain"], runs["clframe"], strict=True)
        for rp, rc in zip(p["accuracy_matrix"], c["accuracy_matrix"], strict=True) for a, b in zip(rp, rc, strict=False))  # rc: NaN-padded
    s["steps"] = {k: v[0]["steps"] for k, v in runs.items()}
    s["samples"] = {k: v[0]["samples"] for k, v in runs.items()}
    s["per_step_overhead_ms_clframe_minus_plain"] = 1e3 * (s["median_s"]["clframe"] - s["median_s"]["plain"]) / \
        s["steps"]["clframe"]
    return s


# ============================================================================ per-task cost (pmnist)
PMNIST_TASKS = (5, 10, 20)


def measure_scaling(exps: list[Experiment], repeats: int, warmup: int) -> dict[str, Any]:
    """Plain and clframe on every stream length in every round (orders alternating), as ``measure`` does."""
    runs: dict[str, dict[str, list[dict]]] = {e.name: {"plain": [], "clframe": []} for e in exps}
    for r in range(warmup + repeats):
        for exp in (exps if r % 2 == 0 else exps[::-1]):
            for side in (("plain", "clframe") if r % 2 == 0 else ("clframe", "plain")):
                fn = run_plain if side == "plain" else run_clframe
                with tempfile.TemporaryDirectory() as root:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = fn(exp, root, r)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
                print(f"  [{tag}] {exp.name:8s} {side:8s} {wall:6.2f} s (CPU {cpu:6.2f} s)  final avg acc "
                      f"{100 * final_avg(out['accuracy_matrix']):.2f} %  load {os.getloadavg()[0]:.2f}", flush=True)
                if r >= warmup:
                    runs[exp.name][side].append({"wall_s": wall, "cpu_s": cpu, "steps": out["steps"],
                                                 "accuracy_matrix": out["accuracy_matrix"]})
    per_t: dict[str, Any] = {}
    for exp in exps:
        sides = runs[exp.name]
        entry: dict[str, Any] = {"tasks": len(exp.train), "steps": sides["clframe"][0]["steps"]}
        for unit in ("wall_s", "cpu_s"):
            p, c = ([r[unit] for r in sides[k]] for k in ("plain", "clframe"))
            paired = [x / y for x, y in zip(c, p, strict=True)]
            entry[unit] = {"plain": median(p), "clframe": median(c), "ratio_of_medians": median(c) / median(p),
                           "ratio_paired_median": median(paired), "ratio_paired_min_max": (min(paired), max(paired)),
                           "extra_s": median(c) - median(p)}
        entry["max_abs_diff_plain_vs_clframe_matrix"] = max(
            abs(a - b) for pr, cr in zip(sides["plain"], sides["clframe"], strict=True)
            for rp, rc in zip(pr["accuracy_matrix"], cr["accuracy_matrix"], strict=True) for a, b in zip(rp, rc, strict=False))
        per_t[exp.name] = entry
    fit = {}
    for unit in ("wall_s", "cpu_s"):  # extra(T) = run + task * T + seen * T(T+1)/2, exact through three lengths
        ts = [per_t[e.name]["tasks"] for e in exps]
        a = torch.tensor([[1.0, t, t * (t + 1) / 2] for t in ts], dtype=torch.float64)
        b = torch.tensor([per_t[e.name][unit]["extra_s"] for e in exps], dtype=torch.float64)
        run_s, task_s, seen_s = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.flatten().tolist()
        fit[unit] = {"per_run_ms": 1e3 * run_s, "per_task_ms": 1e3 * task_s, "per_seen_task_ms": 1e3 * seen_s}
    return {"runs": runs, "per_length": per_t, "extra_fit": fit}


def write_scaling_report(exps: list[Experiment], s: dict, mach: dict, command: str, args: argparse.Namespace,
                         total_s: float) -> str:
    lines: list[str] = []
    w = lines.append
    w("# Per-task cost: Permuted-MNIST with 5, 10 and 20 tasks, plain loop and clframe\n")
    w(f"Produced by `benchmarks/overhead.py --benchmark pmnist` (method in its docstring). Command:\n\n```bash\n"
      f"{command}\n```\n")
    w(f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs shared with other jobs, no GPU; torch threads "
      f"{mach['torch_threads']}; Python {mach['python']}, torch {mach['torch']}, lightning {mach['lightning']}. Load "
      f"average at start {mach['loadavg_at_start'][0]:.2f}. {args.repeats} interleaved rounds after {args.warmup} "
      f"warm-up round(s); whole script {total_s:.0f} s.\n")
    e0 = exps[0]
    w(f"Experiment: ER (memory {e0.buffer_size}, batch {e0.batch_size} + {e0.replay_batch_size} replayed), MLP "
      f"784-400-400-10, domain-incremental Permuted-MNIST, {len(e0.train[0][1])} training and {len(e0.test[0][1])} "
      "test images per task, 1 epoch per task, a test of every seen task after every task (batch 256).\n")
    w("| tasks | steps | plain CPU (s) | clframe CPU (s) | **clframe / plain, CPU** (per-round range) | "
      "plain wall (s) | clframe wall (s) | clframe / plain, wall (per-round range) |")
    w("|---|---|---|---|---|---|---|---|")
    for e in exps:
        t = s["per_length"][e.name]
        c, wl = t["cpu_s"], t["wall_s"]
        w(f"| {t['tasks']} | {t['steps']} | {c['plain']:.2f} | {c['clframe']:.2f} | **{c['ratio_paired_median']:.3f}** "
          f"({c['ratio_paired_min_max'][0]:.3f}-{c['ratio_paired_min_max'][1]:.3f}) | {wl['plain']:.2f} | "
          f"{wl['clframe']:.2f} | {wl['ratio_paired_median']:.3f} ({wl['ratio_paired_min_max'][0]:.3f}-"
          f"{wl['ratio_paired_min_max'][1]:.3f}) |")
    w("")
    for unit, label in (("cpu_s", "CPU time"), ("wall_s", "wall time")):
        f = s["extra_fit"][unit]
        w(f"clframe's extra {label} fitted as run + task·T + seen·T(T+1)/2: {f['per_run_ms']:.0f} ms per run, "
          f"{f['per_task_ms']:.1f} ms per task, {f['per_seen_task_ms']:.2f} ms per seen task evaluated.")
    diffs = [s["per_length"][e.name]["max_abs_diff_plain_vs_clframe_matrix"] for e in exps]
    w(f"\nAccuracy matrices of plain and clframe differ by at most {max(diffs):.2e} (same computation).")
    return "\n".join(lines) + "\n"


# ============================================================================ dispatch ablation
def dispatch_ablation(repeats: int) -> str:
    """Each of clframe's Lightning-dispatch savings switched off alone (and all four together), Split-MNIST ER
    with a tiny MLP (784-16-10) so the framework's cost dominates; CPU time per run, rounds interleaved."""
    from lightning.pytorch.profilers import PassThroughProfiler

    import clframe.trainer as ct
    from clframe.strategies.base import ContinualModule

    exp = build_experiment("mnist", 0.1, 0)
    torch.manual_seed(0)
    exp.backbone = create_backbone("mlp", (1, 28, 28), hidden_sizes=[16], init="default")
    exp.head = nn.Linear(exp.backbone.num_features, exp.stream.num_classes)
    saved = (ct.PassThrough, ct.skipping_noop_hooks, ContinualModule.__dict__["__setattr__"],
             ct.ContinualTrainer._first_run_done)

    def restore() -> None:
        ct.PassThrough, ct.skipping_noop_hooks = saved[0], saved[1]
        ContinualModule.__setattr__, ct.ContinualTrainer._first_run_done = saved[2], saved[3]

    def off(*names: str) -> Callable[[], None]:
        def apply() -> None:
            if "profiler" in names:
                ct.PassThrough = PassThroughProfiler
            if "hooks" in names:
                ct.skipping_noop_hooks = lambda *a: contextlib.nullcontext()
            if "setattr" in names:
                ContinualModule.__setattr__ = L.LightningModule.__setattr__
            if "once" in names:
                ct.ContinualTrainer._first_run_done = lambda *a: None
        return apply

    variants: dict[str, Callable[[], None] | None] = {
        "all on": off(), "Lightning's PassThroughProfiler": off("profiler"), "no hook shadowing": off("hooks"),
        "nn.Module.__setattr__ for _current_fx_name": off("setattr"), "summary and hparams every run": off("once"),
        "all four off": off("profiler", "hooks", "setattr", "once"), "plain loop": None}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats + 1):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            restore()
            with tempfile.TemporaryDirectory() as root:
                apply = variants[name]
                if apply is not None:
                    apply()
                c0 = time.process_time()
                (run_plain if apply is None else run_clframe)(exp, root)
                if r:
                    cpu[name].append(time.process_time() - c0)
    restore()
    base = median(cpu["all on"])
    lines = ["| variant | CPU s per run (median) | vs all on, ms per step | rounds |", "|---|---|---|---|"]
    for name, v in cpu.items():
        lines.append(f"| {name} | {median(v):.3f} | {1e3 * (median(v) - base) / 471:+.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in v)} |")
    return "\n".join(lines) + "\n"


# ============================================================================ profile
@contextlib.contextmanager
def stopwatches(targets: dict[str, tuple[Any, str]]):
    """Wrap each ``(owner, attribute)`` callable with a stopwatch; yields the dict of accumulated seconds."""
    acc = dict.fromkeys(targets, 0.0)
    saved = []
    for label, (owner, name) in targets.items():
        fn = owner.__dict__[name]

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t0

        saved.append((owner, name, fn))
        setattr(owner, name, timed)
    try:
        yield acc
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def clframe_breakdown(exp: Experiment, repeats: int) -> dict[str, Any]:
    """Per-step time of each part of a clframe run (stopwatches around the library's functions; median of
    ``repeats`` runs, each followed by a plain run for the same-moment comparison)."""
    import torch.optim.sgd as sgd_module

    from clframe.data.stream import TaskDataset
    from clframe.strategies.base import ContinualModule
    from clframe.strategies.replay.buffer import ReplayBuffer
    from clframe.strategies.replay.er import ReplayModule

    targets = {
        "whole run": (ContinualTrainer, "fit"),
        "evaluation after each task (trainer.test)": (ContinualTrainer, "evaluate_seen_tasks"),
        "  of which test forwards + counts (_eval_step)": (ContinualModule, "_eval_step"),
        "training_step (ER)": (ReplayModule, "training_step"),
        "  training_loss (forward + cross-entropy)": (ER, "training_loss"),
        "    replay draw (buffer.sample)": (ReplayBuffer, "sample"),
        "  buffer insert (buffer.add)": (ReplayBuffer, "add"),
        "  self.log": (L.LightningModule, "log"),
        "backward": (L.LightningModule, "backward"),
        "optimizer update (SGD)": (sgd_module, "sgd"),
        "zero_grad": (torch.optim.Optimizer, "zero_grad"),
        "batch gather (TaskDataset.__getitems__, train + test)": (TaskDataset, "__getitems__"),
    }
    runs, plain = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as root, stopwatches(targets) as acc:
            res = run_clframe(exp, root)
        runs.append(dict(acc))
        t0 = time.perf_counter()
        run_plain(exp, "")
        plain.append(time.perf_counter() - t0)
    steps = res["steps"]
    per_step = {k: 1e3 * median(r[k] for r in runs) / steps for k in targets}
    top = ("evaluation after each task (trainer.test)", "training_step (ER)", "backward", "optimizer update (SGD)",
           "zero_grad")
    per_step["Lightning loop, hooks, data loader, per-task fit/test setup (the rest)"] = \
        per_step["whole run"] - sum(per_step[k] for k in top) - per_step[
            "batch gather (TaskDataset.__getitems__, train + test)"]
    return {"steps": steps, "ms_per_step": per_step, "plain_ms_per_step": 1e3 * median(plain) / steps}


def profile_clframe(exp: Experiment, out: Path) -> dict[str, Any]:
    """cProfile of one clframe run (after a warm-up run): where the framework's time goes."""
    with tempfile.TemporaryDirectory() as root:
        run_clframe(exp, root)
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        prof.enable()
        res = run_clframe(exp, root)
        prof.disable()
        wall = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(70)
    out.write_text(f"# cProfile of one clframe run ({exp.name}, {res['steps']} steps, {wall:.2f} s under the "
                   f"profiler)\n\n{buf.getvalue()}")
    return {"wall_s_under_profiler": wall, "steps": res["steps"], "file": str(out.relative_to(ROOT))}


# ============================================================================ report
def write_report(exp: Experiment, s: dict, mach: dict, command: str, args: argparse.Namespace, total_s: float) -> str:
    lines: list[str] = []
    w = lines.append
    title = {"mnist": "Split-MNIST, MLP 784-400-400-10", "cifar10": "Split-CIFAR-10 (JPEG q75), small CNN"}[exp.name]
    w(f"# Overhead against a plain loop and Avalanche: {title}\n")
    w(f"Produced by `benchmarks/overhead.py` (method in its docstring). Command:\n\n```bash\n{command}\n```\n")
    w(f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs shared with other jobs, no GPU; torch threads "
      f"{mach['torch_threads']} (OpenMP/MKL {_THREADS}), niceness {mach['niceness']}; Python {mach['python']}, torch "
      f"{mach['torch']}, lightning {mach['lightning']}, avalanche-lib {mach['avalanche']}. Load average at start "
      f"{mach['loadavg_at_start'][0]:.2f}. {args.repeats} interleaved repeats after {args.warmup} warm-up round(s); "
      f"whole script {total_s:.0f} s.\n")
    n_train = sum(len(y) for _, y in exp.train)
    w(f"Experiment: ER, 5 tasks x 2 classes, {n_train:,} training samples in all, batch {exp.batch_size} + "
      f"{exp.replay_batch_size} replayed, memory {exp.buffer_size}, 1 epoch per task, SGD lr {exp.lr}, test of all "
      "seen tasks after every task (whole test sets, batch 256). clframe loggers: "
      f"{', '.join(s['runs']['clframe'][0]['loggers'])} (log_every_n_steps="
      f"{s['runs']['clframe'][0]['log_every_n_steps']}), progress bar and checkpointing off.\n")
    w("| | plain PyTorch | clframe | Avalanche 0.6 |")
    w("|---|---|---|---|")
    med, q, mm = s["median_s"], s["quartiles_s"], s["min_max_s"]
    w("| wall time per run, median (s) | " + " | ".join(f"**{med[k]:.2f}**" for k in SIDES) + " |")
    w("| quartiles (s) | " + " | ".join(f"{q[k][0]:.2f} - {q[k][1]:.2f}" for k in SIDES) + " |")
    w("| min - max (s) | " + " | ".join(f"{mm[k][0]:.2f} - {mm[k][1]:.2f}" for k in SIDES) + " |")
    w("| CPU time per run, median (s) | " + " | ".join(f"{s['median_cpu_s'][k]:.2f}" for k in SIDES) + " |")
    w("| training steps | " + " | ".join(str(s["steps"][k]) for k in SIDES) + " |")
    w("| training samples forwarded | " + " | ".join(f"{s['samples'][k]:,}" for k in SIDES) + " |")
    acc = s["final_avg_acc"]
    w("| final average accuracy (%), mean [min, max] | " + " | ".join(
        f"{100 * acc[k]['mean']:.2f} [{100 * acc[k]['min']:.2f}, {100 * acc[k]['max']:.2f}]" for k in SIDES) + " |")
    w("")
    cp, ca = s["ratio_clframe_over_plain"], s["ratio_clframe_over_avalanche"]
    w("| ratio | of the medians | median of per-round ratios | per-round min - max |")
    w("|---|---|---|---|")
    for label, r in (("clframe / plain", cp), ("clframe / Avalanche", ca), ("Avalanche / plain", s["ratio_avalanche_over_plain"]),
                     ("clframe / plain, CPU time", s["cpu_ratio_clframe_over_plain"]),
                     ("clframe / Avalanche, CPU time", s["cpu_ratio_clframe_over_avalanche"]),
                     ("Avalanche / plain, CPU time", s["cpu_ratio_avalanche_over_plain"])):
        w(f"| {label} | **{r['of_medians']:.3f}** | {r['paired_median']:.3f} | "
          f"{r['paired_min_max'][0]:.3f} - {r['paired_min_max'][1]:.3f} |")
    w("")
    w(f"clframe minus plain, per training step: {s['per_step_overhead_ms_clframe_minus_plain']:.2f} ms "
      f"(plain: {1e3 * med['plain'] / s['steps']['plain']:.2f} ms per step, evaluation included). "
      f"Accuracy matrices of plain and clframe differ by at most {s['max_abs_diff_plain_vs_clframe_matrix']:.2e} "
      "(same computation; floating-point summation order only).")
    if "breakdown" in s:
        b = s["breakdown"]
        w(f"\nWhere a clframe run's time goes, per training step ({b['steps']} steps; stopwatches around the "
          "library's functions, median of "
          f"{len(s['runs']['plain']) and max(3, args.repeats // 2)} runs; the plain loop took "
          f"{b['plain_ms_per_step']:.2f} ms per step, evaluation included, in the same rounds):\n")
        w("| part | ms per step |")
        w("|---|---|")
        for k, v in b["ms_per_step"].items():
            w(f"| {k} | {v:.3f} |")
    if "profile" in s:
        w(f"\ncProfile of one clframe run: `{s['profile']['file']}`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", choices=("mnist", "cifar10", "pmnist"), default="mnist")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: mnist 5, cifar10 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch (and OpenMP) threads")
    ap.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: mnist 0.1, cifar10 0.05)")
    ap.add_argument("--cifar-per-class", type=int, default=1280,
                    help="CIFAR-10 training images per class (1280: 20 steps of 128 per task)")
    ap.add_argument("--pmnist-train-per-class", type=int, default=200, help="pmnist: training images per class and task")
    ap.add_argument("--pmnist-test-per-class", type=int, default=100, help="pmnist: test images per class and task")
    ap.add_argument("--profile", action="store_true", help="also cProfile one clframe run")
    ap.add_argument("--dispatch-ablation", action="store_true",
                    help="only: each Lightning-dispatch saving switched off alone (tiny MLP, CPU time)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/overhead_<benchmark>)")
    args = ap.parse_args()
    args.repeats = args.repeats or (5 if args.benchmark in ("mnist", "pmnist") else 3)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    start = time.perf_counter()
    command = "CLFRAME_DATA=/path/to/data " + ("nice -n -10 " if os.nice(0) < 0 else "") + \
        "python " + " ".join(shlex.quote(a) for a in ["benchmarks/overhead.py", *sys.argv[1:]])
    mach = machine()
    if args.dispatch_ablation:
        table = dispatch_ablation(args.repeats)
        out = (Path(args.out) if args.out else RESULTS / "overhead_dispatch").with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# Lightning-dispatch savings, one at a time\n\nCommand:\n\n```bash\n{command}\n```\n\n"
                       f"{dispatch_ablation.__doc__.split(chr(10))[0]} ... (see its docstring). Machine: {mach['cpu']}, "
                       f"load average at start {mach['loadavg_at_start'][0]:.2f}.\n\n{table}")
        print(table)
        return
    if args.benchmark == "pmnist":
        return main_pmnist(args, command, mach, start)
    lr = args.lr or (0.1 if args.benchmark == "mnist" else 0.05)
    exp = build_experiment(args.benchmark, lr, args.cifar_per_class)
    print(f"{args.benchmark}: {sum(len(y) for _, y in exp.train)} training samples, {torch.get_num_threads()} "
          f"torch thread(s)", flush=True)
    stem = Path(args.out) if args.out else RESULTS / f"overhead_{args.benchmark}"
    s = measure(exp, args.repeats, args.warmup, stem.with_suffix(".raw.json"))
    if args.profile:
        s["profile"] = profile_clframe(exp, stem.with_name(stem.name + "_profile.txt"))
        s["breakdown"] = clframe_breakdown(exp, max(3, args.repeats // 2))
    total = time.perf_counter() - start
    report = write_report(exp, s, mach, command, args, total)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(report)
    s["runs"] = {k: [{kk: vv for kk, vv in r.items()} for r in v] for k, v in s["runs"].items()}
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "machine": mach, "args": vars(args),
                                                     "total_s": total, **s}, indent=1))
    print(report)


def main_pmnist(args: argparse.Namespace, command: str, mach: dict, start: float) -> None:
    exps = [build_pmnist(t, args.lr or 0.1, args.pmnist_train_per_class, args.pmnist_test_per_class)
            for t in PMNIST_TASKS]
    s = measure_scaling(exps, args.repeats, args.warmup)
    report = write_scaling_report(exps, s, mach, command, args, time.perf_counter() - start)
    stem = Path(args.out) if args.out else RESULTS / "overhead_pmnist"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "machine": mach, "args": vars(args), **s},
                                                    indent=1))
    print(report)


if __name__ == "__main__":
    main()
