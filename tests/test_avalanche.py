"""Avalanche interop (clframe.data.avalanche): Avalanche benchmarks built from small tensors become
clframe task streams with the same tasks, classes and samples; clframe strategies train on them
through ContinualDataModule and ContinualTrainer; and the accuracy matrix clframe records equals the
accuracies Avalanche's own evaluation loop and metrics compute for the same model and test stream.
No downloads: every benchmark here is made of random tensors."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from clframe import ER, ContinualDataModule, ContinualTrainer, Finetune
from clframe.callbacks.base import ContinualCallback
from clframe.data.avalanche import AvalancheInteropError, as_avalanche_model, from_avalanche
from clframe.data.stream import Task
from clframe.errors import ClframeError
from tests.conftest import QUIET_TRAINER

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Avalanche warns about optional solvers and loggers on import
    from avalanche.benchmarks import (
        class_incremental_benchmark,
        nc_benchmark,
        ni_benchmark,
        tensors_benchmark,
    )
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

N_CLASSES, DIM, TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 8, 20, 10
CLASS_ORDER = [4, 1, 5, 0, 3, 2]
EVAL_BATCH = 32  # clframe's and Avalanche's evaluation batches are the same batches


class LabeledTensors(TensorDataset):
    """(x, y) tensors with the ``targets`` attribute Avalanche's generators read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y


def blobs(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres: learnable in a few steps, not perfectly."""
    centres = torch.randn(N_CLASSES, DIM, generator=torch.Generator().manual_seed(123)) * 0.7
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N_CLASSES).repeat_interleave(per_class)
    return centres[y] + torch.randn(len(y), DIM, generator=g), y


def split_data() -> tuple[LabeledTensors, LabeledTensors]:
    return LabeledTensors(*blobs(TRAIN_PER_CLASS, 1)), LabeledTensors(*blobs(TEST_PER_CLASS, 2))


def nc(task_labels: bool) -> Any:
    """Split into 3 experiences of 2 classes in CLASS_ORDER; with task labels, ids restart in each task."""
    train, test = split_data()
    return nc_benchmark(train, test, n_experiences=3, task_labels=task_labels, fixed_class_order=CLASS_ORDER,
                        class_ids_from_zero_in_each_exp=task_labels)


def domain_benchmark() -> Any:
    """3 experiences over the same 6 classes, each a different shift of the inputs (no task labels)."""
    train, test = split_data()
    shift = [0.0, 2.0, -2.0]
    return tensors_benchmark(
        [[train.tensors[0] + s, train.tensors[1]] for s in shift],
        [[test.tensors[0] + s, test.tensors[1]] for s in shift], task_labels=[0, 0, 0])


# ---------------------------------------------------------------------------------------------- conversion
def assert_same_samples(stream: Any, bm: Any) -> None:
    """Every task serves exactly its experience's samples, in order, as (x, global y, task id)."""
    for i, (task, exp, test_exp) in enumerate(zip(stream.tasks, bm.train_stream, bm.test_stream, strict=True)):
        assert task.id == i and len(task.train) == len(exp.dataset) and len(task.test) == len(test_exp.dataset)
        x, y, t = task.train.__getitems__(list(range(len(task.train))))
        assert torch.equal(x, torch.stack([exp.dataset[k][0] for k in range(len(exp.dataset))]))
        assert torch.equal(t, torch.full_like(y, i))
        assert set(y.tolist()) == set(task.classes)
        assert torch.equal(task.train.targets, y)


@pytest.mark.parametrize("api", ["nc_benchmark", "class_incremental_benchmark"])
def test_class_incremental_benchmark_keeps_order_classes_and_sizes(api: str) -> None:
    if api == "nc_benchmark":
        bm = nc(task_labels=False)
    else:
        train, test = split_data()  # the newer API: experiences with class sets and no task labels
        bm = class_incremental_benchmark({"train": train, "test": test}, class_order=CLASS_ORDER, num_experiences=3)
    stream = from_avalanche(bm, seed=5)
    assert stream.scenario == "class" and len(stream) == 3 and stream.num_classes == N_CLASSES
    assert [sorted(t.classes) for t in stream.tasks] == [sorted(CLASS_ORDER[k:k + 2]) for k in (0, 2, 4)]
    assert [len(t.train) for t in stream.tasks] == [2 * TRAIN_PER_CLASS] * 3
    assert [len(t.test) for t in stream.tasks] == [2 * TEST_PER_CLASS] * 3
    assert stream.input_shape == (DIM,) and stream.mean == (0.0,) and stream.std == (1.0,) and stream.seed == 5
    assert stream.class_to_task() == [1, 0, 2, 2, 0, 1]  # class c -> the task that brings it
    assert_same_samples(stream, bm)
    if api == "nc_benchmark":
        assert stream.description["class_order"] == CLASS_ORDER


def test_task_incremental_benchmark_gets_one_global_id_per_task_and_class() -> None:
    bm = nc(task_labels=True)  # Avalanche labels restart at 0 in every experience
    stream = from_avalanche(bm)
    assert stream.scenario == "task" and stream.num_classes == N_CLASSES
    assert [t.classes for t in stream.tasks] == [(0, 1), (2, 3), (4, 5)]
    assert stream.description["avalanche_classes"] == [[0, 1]] * 3 and stream.description["task_labels"] == [0, 1, 2]
    for i, (task, exp) in enumerate(zip(stream.tasks, bm.test_stream, strict=True)):
        _, y, t = task.test.__getitems__(list(range(len(task.test))))
        local = torch.tensor([int(exp.dataset[k][1]) for k in range(len(exp.dataset))])
        assert torch.equal(y, local + 2 * i) and torch.equal(t, torch.full_like(y, i))


def test_domain_incremental_benchmarks() -> None:
    stream = from_avalanche(domain_benchmark())
    assert stream.scenario == "domain" and stream.num_classes == N_CLASSES
    assert all(t.classes == tuple(range(N_CLASSES)) for t in stream.tasks)
    x0, _, _ = stream.tasks[0].test[0]
    x1, _, _ = stream.tasks[1].test[0]
    assert torch.allclose(x1 - x0, torch.full_like(x0, 2.0))
    # ni_benchmark: instances split over experiences, one test experience shared by every task
    train, test = split_data()
    ni = from_avalanche(ni_benchmark(train, test, n_experiences=3, task_labels=False, seed=0))
    assert ni.scenario == "domain" and ni.description["shared_test"]
    assert [len(t.train) for t in ni.tasks] == [N_CLASSES * TRAIN_PER_CLASS // 3] * 3
    assert [len(t.test) for t in ni.tasks] == [N_CLASSES * TEST_PER_CLASS] * 3


def test_transform_groups_follow_avalanche() -> None:
    """Training reads Avalanche's ``train`` transforms, evaluation its ``eval`` ones (as Avalanche's
    strategies do); turning ``sample_transform`` off (iCaRL's herding) switches to ``eval``."""
    train, test = split_data()
    bm = nc_benchmark(train, test, n_experiences=3, task_labels=False, fixed_class_order=CLASS_ORDER,
                      train_transform=lambda x: x + 100.0, eval_transform=lambda x: x)
    task = from_avalanche(bm).tasks[0]
    plain = bm.train_stream[0].dataset.eval()[0][0]
    assert torch.equal(task.train[0][0], plain + 100.0) and task.train.sample_transform is not None
    assert torch.equal(task.test[0][0], bm.test_stream[0].dataset.eval()[0][0]) and task.test.sample_transform is None
    assert task.train.subset(torch.tensor([0, 1])).sample_transform is not None
    task.train.sample_transform = None
    assert torch.equal(task.train[0][0], plain)


def test_clear_errors() -> None:
    bm = nc(task_labels=False)
    with pytest.raises(AvalancheInteropError, match="one distinct task label per experience"):
        from_avalanche(bm, scenario="task")
    with pytest.raises(AvalancheInteropError, match="no 'valid' stream"):
        from_avalanche(bm, val_stream="valid")
    with pytest.raises(AvalancheInteropError, match="unknown scenario"):
        from_avalanche(bm, scenario="online")


def test_missing_avalanche_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "avalanche", None)  # what `import avalanche` sees when it is not installed
    with pytest.raises(ClframeError, match=re.escape('pip install "clframe[avalanche]"')):
        from_avalanche(object())


# ---------------------------------------------------------------------------------------------- training
class AvalancheEvaluation(ContinualCallback):
    """After clframe evaluates the seen tasks, evaluates the same model on the same test experiences
    with Avalanche: its ``Naive`` strategy's ``eval`` loop (its own data loaders and forward) and its
    ``accuracy_metrics(experience=True)``, i.e. Top1_Acc_Exp of every test experience."""

    def __init__(self, bm: Any, stream: Any) -> None:
        self.bm, self.stream = bm, stream
        self.rows: list[list[float]] = []

    def on_task_evaluated(self, trainer: Any, pl_module: Any, task: Task, accuracies: list[float]) -> None:
        model = as_avalanche_model(pl_module, self.stream)  # the clframe module's scenario-masked forward
        was_training = pl_module.training
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                             eval_mb_size=EVAL_BATCH, device="cpu",
                             evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
            results = strategy.eval(self.bm.test_stream[: task.id + 1])
        pl_module.train(was_training)
        row = [float("nan")] * len(self.stream)
        for key, value in results.items():
            match = re.fullmatch(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)", key)
            if match:
                row[int(match.group(1))] = float(value)
        self.rows.append(row)


def run(bm: Any, model: Any, tmp_path: Path) -> tuple[ContinualTrainer, AvalancheEvaluation]:
    torch.manual_seed(0)
    stream = from_avalanche(bm)
    data = ContinualDataModule.from_stream(stream, batch_size=10, eval_batch_size=EVAL_BATCH)
    probe = AvalancheEvaluation(bm, stream)
    trainer = ContinualTrainer(steps_per_task=15, callbacks=[probe], logger=False, default_root_dir=tmp_path,
                               accelerator="cpu", devices=1, **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    return trainer, probe


@pytest.mark.parametrize("case", ["class-ER", "task-Finetune", "domain-Finetune"])
def test_clframe_accuracy_matrix_equals_avalanche_metrics(case: str, tmp_path: Path) -> None:
    """R[i][j] recorded by ContinualTrainer == Avalanche's Top1_Acc_Exp of experience j after task i.

    Both score the same predictions: Avalanche calls the clframe module through
    ``as_avalanche_model``, i.e. with clframe's scenario masking (future classes hidden in the class-
    incremental stream; each sample restricted to its task's classes in the task-incremental one,
    where Avalanche's task labels pick the task and its local class ids are mapped to clframe's).
    """
    scenario, strategy = case.split("-")
    bm = {"class": lambda: nc(False), "task": lambda: nc(True), "domain": domain_benchmark}[scenario]()
    backbone = {"hidden_sizes": [16]}
    model = (ER(backbone_kwargs=backbone, buffer_size=30, replay_batch_size=10, lr=0.1) if strategy == "ER"
             else Finetune(backbone_kwargs=backbone, lr=0.1))
    trainer, probe = run(bm, model, tmp_path)
    clframe_rows = trainer.accuracy_matrix
    assert len(clframe_rows) == 3 and model.scenario == scenario
    assert torch.tensor(clframe_rows).nan_to_num(-1.0).allclose(torch.tensor(probe.rows).nan_to_num(-1.0),
                                                                atol=1e-6), (clframe_rows, probe.rows)
    seen = [a for i, row in enumerate(clframe_rows) for a in row[: i + 1]]
    assert all(0.0 <= a <= 1.0 for a in seen) and max(seen) > 0.5  # it learned something
    assert trainer.continual_results["stream"]["name"] == "avalanche_" + type(bm).__name__
