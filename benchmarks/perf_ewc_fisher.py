"""``perf.py ewc-fisher``: EWC's closed-form Fisher against per-sample gradients (method in ``EWC_FISHER_DOC``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from timing import RESULTS, clock, machine, write_results

from clframe import EWC
from clframe.data.datamodule import ContinualDataModule
from clframe.data.stream import passthrough_collate

EWC_FISHER_DOC = """EWC's Fisher on one Split-MNIST task: the closed form for linear layers against per-sample gradients,
and both against one training epoch of the same task.

    CLFRAME_DATA=/path/to/data python benchmarks/perf.py ewc-fisher
    CLFRAME_DATA=/path/to/data python benchmarks/perf.py ewc-fisher --per-sample-samples 12000   # full slow path

Setting: ``configs/split_mnist/ewc.yaml`` (MLP 784-100-100-10, Xavier, SGD lr 0.03, batch 10), task 0
(digits 0 and 1, about 12.7k training samples), one thread. The training epoch is a plain loop over the
task (``training_loss``, backward, SGD step) without Lightning's per-step bookkeeping. The per-sample path
runs on the first ``--per-sample-samples`` samples and is scaled to the whole task (it is linear in the
sample count); the closed form runs on the whole task and is checked against the per-sample path on the
shared samples. Results: ``benchmarks/results/ewc_fisher_speed.json``.
"""

def model_for(stream, method: str) -> EWC:
    L.seed_everything(0, verbose=False)
    model = EWC(backbone="mlp", backbone_kwargs={"hidden_sizes": [100, 100], "init": "xavier"}, lr=0.03,
                fisher_method=method)
    model.bind_stream(stream)
    return model


def train_one_epoch(model: EWC, task, batch_size: int) -> float:
    loader = torch.utils.data.DataLoader(task.train, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), collate_fn=passthrough_collate)
    optimizer = model.configure_optimizers()
    model.train()
    start = time.perf_counter()
    for batch in loader:
        optimizer.zero_grad()
        model.training_loss(batch).backward()
        optimizer.step()
    return time.perf_counter() - start


def cmd_ewc_fisher(args: argparse.Namespace) -> None:
    stream = ContinualDataModule(source="mnist", n_tasks=5, batch_size=10, normalize=False).stream
    task = stream[0]
    n = len(task.train)
    model = model_for(stream, "closed_form")
    epoch_s = train_one_epoch(model, task, batch_size=10)
    with clock() as fast:
        model.fisher_diagonal(task)
    m = min(args.per_sample_samples, n)
    shared = type(task)(id=task.id, classes=task.classes, train=task.train.subset(torch.arange(m)), test=task.test)
    model.hparams.fisher_method = "per_sample"
    with clock() as slow:
        slow_sub = model.fisher_diagonal(shared)
    fast_s, slow_s = fast["wall"], slow["wall"] * n / m
    model.hparams.fisher_method = "closed_form"
    fast_sub = model.fisher_diagonal(shared)
    result = {"task_samples": n, "train_epoch_s": round(epoch_s, 2), "fisher_closed_form_s": round(fast_s, 2),
              "fisher_per_sample_s": round(slow_s, 1), "per_sample_measured_on": m,
              "speed_up": round(slow_s / fast_s, 1), "closed_form_vs_epoch": round(fast_s / epoch_s, 3),
              "max_abs_difference_on_shared_samples": float((fast_sub - slow_sub).abs().max()),
              "fisher_max": float(fast_sub.max()), "machine": machine()}
    write_results(Path(args.out) if args.out else RESULTS / "ewc_fisher_speed", data=result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
