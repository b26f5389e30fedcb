"""EWC's Fisher on one Split-MNIST task: the closed form for linear layers against per-sample gradients,
and both against one training epoch of the same task.

    CLFRAME_DATA=/path/to/data python benchmarks/ewc_fisher_speed.py
    CLFRAME_DATA=/path/to/data python benchmarks/ewc_fisher_speed.py --per-sample-samples 12000   # full slow path

Setting: ``configs/split_mnist/ewc.yaml`` (MLP 784-100-100-10, Xavier, SGD lr 0.03, batch 10), task 0
(digits 0 and 1, about 12.7k training samples), one thread. The training epoch is a plain loop over the
task (``training_loss``, backward, SGD step) without Lightning's per-step bookkeeping. The per-sample path
runs on the first ``--per-sample-samples`` samples and is scaled to the whole task (it is linear in the
sample count); the closed form runs on the whole task and is checked against the per-sample path on the
shared samples. Results: ``benchmarks/results/ewc_fisher_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine  # noqa: E402

from clframe import EWC, ContinualDataModule  # noqa: E402
from clframe.data.stream import passthrough_collate  # noqa: E402

RESULTS = ROOT / "benchmarks/results/ewc_fisher_speed.json"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-sample-samples", type=int, default=1280)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = ContinualDataModule(source="mnist", n_tasks=5, batch_size=10, normalize=False)
    stream = data.stream
    task = stream[0]
    n = len(task.train)

    model = model_for(stream, "closed_form")
    epoch_s = train_one_epoch(model, task, batch_size=10)

    start = time.perf_counter()
    model.fisher_diagonal(task)
    fast_s = time.perf_counter() - start

    m = min(args.per_sample_samples, n)
    sub = task.train.subset(torch.arange(m))
    shared = type(task)(id=task.id, classes=task.classes, train=sub, test=task.test)
    model.hparams.fisher_method = "per_sample"
    start = time.perf_counter()
    slow_sub = model.fisher_diagonal(shared)
    slow_s = (time.perf_counter() - start) * n / m
    model.hparams.fisher_method = "closed_form"
    fast_sub = model.fisher_diagonal(shared)
    max_diff = float((fast_sub - slow_sub).abs().max())

    result = {"task_samples": n, "train_epoch_s": round(epoch_s, 2), "fisher_closed_form_s": round(fast_s, 2),
              "fisher_per_sample_s": round(slow_s, 1), "per_sample_measured_on": m,
              "speed_up": round(slow_s / fast_s, 1), "closed_form_vs_epoch": round(fast_s / epoch_s, 3),
              "max_abs_difference_on_shared_samples": max_diff, "fisher_max": float(fast_sub.max()),
              "machine": machine()}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
