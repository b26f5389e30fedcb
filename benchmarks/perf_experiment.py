"""The experiment of ``perf.py overhead`` and the three sides that run it: a plain PyTorch loop, clframe and
Avalanche (the method is in ``OVERHEAD_DOC``, ``perf_overhead.py``)."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from perf_avalanche import make_avalanche_counter
from timing import quiet
from torch import Tensor, nn
from torch.nn import functional as F

from clframe.data.datamodule import ContinualDataModule
from clframe.data.samplers import epoch_seed
from clframe.data.stream import TaskStream
from clframe.models.factory import create_backbone
from clframe.strategies import ER
from clframe.trainer import ContinualTrainer


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


def tensors(ds) -> tuple[Tensor, Tensor]:
    """A task dataset's whole inputs and labels."""
    x, y, _ = ds.__getitems__(list(range(len(ds))))
    return x.contiguous(), y.contiguous()


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

    return Experiment(name, stream, [tensors(t.train) for t in stream.tasks], [tensors(t.test) for t in stream.tasks],
                      backbone, nn.Linear(backbone.num_features, stream.num_classes), lr)


def build_pmnist(n_tasks: int, lr: float, train_per_class: int, test_per_class: int) -> Experiment:
    """Permuted-MNIST, domain-incremental, ``n_tasks`` permutations; the same MLP initialisation for every length."""
    dm = ContinualDataModule(source="mnist", scenario="domain", tasks="permutation", n_tasks=n_tasks, normalize=False,
                             seed=0, train_samples_per_class=train_per_class, test_samples_per_class=test_per_class)
    stream = dm.stream
    torch.manual_seed(0)
    backbone = create_backbone("mlp", (1, 28, 28), hidden_sizes=[400, 400], init="default")

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
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

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
            x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)  # faster than x_all[idx]
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


def run_avalanche(exp: Experiment, _root: str, seed: int = 0, bm=None) -> dict[str, Any]:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

    torch.manual_seed(seed)  # Avalanche's shuffles and memory selection draw from the global RNG

    net = exp.fresh_net()
    counter = make_avalanche_counter()
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
