"""End-to-end tests of the strategies on Split-Digits with ContinualTrainer: accuracy matrices,
scenario masking, strategy state (EWC Fisher, LwF teacher, ER buffer), the per-task training loop
(optimizers, global step, hook order), result files and checkpoints.

Each configuration runs once per module (cached) on the CPU; a run takes about a second.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from clframe import ER, EWC, ContinualDataModule, ContinualTrainer, Finetune, Joint, LwF
from clframe.callbacks import ContinualCallback
from clframe.data.stream import Task
from clframe.metrics import average_accuracy

BATCH_SIZE = 32


# ---------------------------------------------------------------------------------------------- recording callbacks


class Recorder(ContinualCallback):
    """Task and training hooks in call order, plus the optimizer and global step at each training start."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.optimizers: list[torch.optim.Optimizer] = []  # kept alive, so identity is meaningful
        self.steps_at_train_start: list[int] = []

    def on_task_start(self, trainer, pl_module, task: Task) -> None:
        self.events.append(("task_start", task.id))

    def on_train_start(self, trainer, pl_module) -> None:
        self.events.append(("train_start", int(pl_module.current_task)))
        self.optimizers.append(trainer.optimizers[0])
        self.steps_at_train_start.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.events.append(("train_end", int(pl_module.current_task)))

    def on_task_end(self, trainer, pl_module, task: Task) -> None:
        self.events.append(("task_end", task.id))

    def on_task_evaluated(self, trainer, pl_module, task: Task, accuracies: list[float]) -> None:
        self.events.append(("task_evaluated", task.id))


class EWCProbe(ContinualCallback):
    """EWC's state right after the Fisher of task 0 is computed, and its penalty around the anchor."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    @torch.no_grad()
    def on_task_evaluated(self, trainer, pl_module: EWC, task: Task, accuracies: list[float]) -> None:
        if task.id != 0:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        fisher = pl_module.ewc_fisher.detach().clone()
        info = {"fisher": fisher, "anchor": pl_module.ewc_anchor.detach().clone(),
                "n_params": sum(p.numel() for p in params), "flat": pl_module._flat_params().detach().clone(),
                "penalty_at_anchor": float(pl_module.penalty())}
        # perturb the single weight with the largest Fisher value: penalty = F_i * delta^2 exactly
        i, delta = int(fisher.argmax()), 0.5
        offset = 0
        for p in params:
            if i < offset + p.numel():
                flat = p.view(-1)
                flat[i - offset] += delta
                info["penalty_perturbed"] = float(pl_module.penalty())
                flat[i - offset] -= delta
                break
            offset += p.numel()
        info["expected_perturbed"] = float(fisher[i]) * delta**2
        info["penalty_restored"] = float(pl_module.penalty())
        self.info = info


class LwFProbe(ContinualCallback):
    """The LwF teacher at every task and training start."""

    def __init__(self) -> None:
        self.at_task_start: list[dict[str, Any]] = []
        self.at_train_start: list[dict[str, Any]] = []

    def on_task_start(self, trainer, pl_module: LwF, task: Task) -> None:
        teacher = pl_module.teacher
        entry: dict[str, Any] = {"task": task.id, "has_teacher": teacher is not None}
        if teacher is not None:
            entry["equals_student"] = all(
                torch.equal(a, b) for a, b in zip(
                    [*teacher["backbone"].parameters(), *teacher["head"].parameters()],
                    [*pl_module.backbone.parameters(), *pl_module.head.parameters()], strict=True)
            )
            student = {p.data_ptr() for n, p in pl_module.named_parameters() if not n.startswith("teacher.")}
            entry["shares_storage"] = any(p.data_ptr() in student for p in teacher.parameters())
        self.at_task_start.append(entry)

    def on_train_start(self, trainer, pl_module: LwF) -> None:
        teacher = pl_module.teacher
        entry: dict[str, Any] = {"task": int(pl_module.current_task), "student_training": pl_module.training}
        if teacher is not None:
            opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            entry.update(
                teacher_training=teacher.training or any(m.training for m in teacher.modules()),
                teacher_requires_grad=any(p.requires_grad for p in teacher.parameters()),
                teacher_in_optimizer=any(id(p) in opt_params for p in teacher.parameters()),
            )
        self.at_train_start.append(entry)


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    model: Any
    trainer: ContinualTrainer
    datamodule: ContinualDataModule
    recorder: Recorder
    epochs: int
    probes: list[ContinualCallback] = field(default_factory=list)

    @property
    def matrix(self) -> list[list[float]]:
        return self.trainer.accuracy_matrix


def run_stream(model: Any, root: Path, epochs: int = 1, scenario: str = "class", n_tasks: int = 5,
               probes: tuple[ContinualCallback, ...] = (), logger: Any = False, seed: int = 0) -> Run:
    dm = ContinualDataModule(source="digits", scenario=scenario, n_tasks=n_tasks, batch_size=BATCH_SIZE, seed=seed,
                             tasks="permutation" if scenario == "domain" else None)
    recorder = Recorder()
    trainer = ContinualTrainer(
        epochs_per_task=epochs, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        logger=logger, default_root_dir=root, callbacks=[recorder, *probes], accelerator="cpu", devices=1,
    )
    trainer.fit(model, datamodule=dm)
    return Run(model, trainer, dm, recorder, epochs, list(probes))


CONFIGS = {
    # name: (strategy, kwargs, epochs per task, scenario, tasks)
    "Finetune": (Finetune, dict(lr=0.05), 3, "class", 5),
    "Joint": (Joint, dict(lr=0.1), 1, "class", 5),
    "ER": (ER, dict(lr=0.05, buffer_size=200), 3, "class", 5),
    "EWC": (EWC, {}, 1, "class", 5),
    "LwF": (LwF, {}, 1, "class", 5),
    "ER-task": (ER, dict(lr=0.05, buffer_size=200), 3, "task", 5),
    "ER-domain": (ER, dict(lr=0.05, buffer_size=200), 1, "domain", 3),
}
STRATEGIES = ["Finetune", "Joint", "ER", "EWC", "LwF"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            cls, kwargs, epochs, scenario, n_tasks = CONFIGS[name]
            root = tmp_path_factory.mktemp(name)
            probes: tuple[ContinualCallback, ...] = {"EWC": (EWCProbe(),), "LwF": (LwFProbe(),)}.get(name, ())
            logger = CSVLogger(root, name="logs") if name == "Finetune" else False
            L.seed_everything(0, verbose=False)
            cache[name] = run_stream(cls(**kwargs), root, epochs, scenario, n_tasks, probes, logger)
        return cache[name]

    return get


def steps_per_task(run: Run) -> list[int]:
    return [run.epochs * math.ceil(len(t.train) / BATCH_SIZE) for t in run.datamodule.stream]


def assert_lower_triangular(matrix: list[list[float]], n: int) -> None:
    assert len(matrix) == n and all(len(row) == n for row in matrix)
    for i, row in enumerate(matrix):
        for j, a in enumerate(row):
            if j > i:
                assert math.isnan(a), f"R[{i}][{j}] = {a} should be NaN (task {j} not seen yet)"
            else:
                assert 0.0 <= a <= 1.0, f"R[{i}][{j}] = {a} is not an accuracy"


# ---------------------------------------------------------------------------------------------- accuracy matrices


@pytest.mark.parametrize("name", STRATEGIES)
def test_split_digits_run_gives_lower_triangular_matrix(runs, name: str) -> None:
    run = runs(name)
    assert_lower_triangular(run.matrix, 5)
    assert run.trainer.continual_results["metrics"]["final/avg_acc"] == pytest.approx(average_accuracy(run.matrix))
    if name != "Joint":  # Joint (final_only) trains only at the last task
        assert all(run.matrix[i][i] > 0.5 for i in range(5)), f"{name} did not learn its tasks: {run.matrix}"
    assert run.matrix[4][4] > 0.5


def test_joint_trains_only_at_the_last_task(runs) -> None:
    run = runs("Joint")
    expected = []
    for t in range(5):
        expected.append(("task_start", t))
        if t == 4:
            expected += [("train_start", 4), ("train_end", 4)]
        expected += [("task_end", t), ("task_evaluated", t)]
    assert run.recorder.events == expected
    # trained on everything at once: no forgetting, every task learned
    assert average_accuracy(run.matrix) > 0.6
    assert min(run.matrix[4]) > 0.4
    n_all = sum(len(t.train) for t in run.datamodule.stream)
    assert run.trainer.global_step == math.ceil(n_all / BATCH_SIZE)


def test_er_beats_finetune(runs) -> None:
    er, ft = average_accuracy(runs("ER").matrix), average_accuracy(runs("Finetune").matrix)
    assert er > ft + 0.3, f"ER {er:.3f} vs Finetune {ft:.3f}"
    assert er > 0.6


def test_finetune_forgets(runs) -> None:
    r = runs("Finetune").matrix
    assert r[0][0] > 0.9
    assert r[4][0] < r[0][0] - 0.5, f"task 0 accuracy {r[0][0]:.3f} -> {r[4][0]:.3f}: no forgetting"
    # class-incremental finetuning: after the last task, old tasks are (nearly) lost
    assert max(r[4][:4]) < 0.3


# ---------------------------------------------------------------------------------------------- scenarios


def test_task_incremental_masks_logits_and_er_is_accurate(runs) -> None:
    run = runs("ER-task")
    model, stream = run.model.eval(), run.datamodule.stream
    assert model.scenario == "task"
    xs, ts = [], []
    for task in stream:
        x, y, t = task.test.__getitems__(list(range(20)))
        xs.append(x)
        ts.append(t)
    x, t = torch.cat(xs), torch.cat(ts)
    with torch.no_grad():
        logits = model(x, t)
    owner = torch.tensor(stream.class_to_task())
    own = owner.unsqueeze(0) == t.unsqueeze(1)  # (batch, classes): the sample's own task's classes
    low = torch.finfo(logits.dtype).min
    assert bool((logits[~own] == low).all()), "a logit outside the sample's task is not masked"
    assert bool((logits[own] > low).all())
    assert bool((owner[logits.argmax(1)] == t).all()), "a prediction left its task"
    with pytest.raises(ValueError, match="task id"):
        model(x)
    assert_lower_triangular(run.matrix, 5)
    acc = average_accuracy(run.matrix)
    assert acc > 0.9, f"ER task-IL final average accuracy {acc:.3f}"


def test_domain_incremental_permutation_runs(runs) -> None:
    run = runs("ER-domain")
    stream = run.datamodule.stream
    assert stream.scenario == "domain" and len(stream) == 3
    assert [t.domain for t in stream] == ["permutation_0", "permutation_1", "permutation_2"]
    assert_lower_triangular(run.matrix, 3)
    assert all(run.matrix[i][i] > 0.3 for i in range(3)), run.matrix  # chance is 0.1
    model = run.model.eval()
    x, _, t = stream[1].test.__getitems__(list(range(8)))
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x))  # one shared head: no task masking
    assert set(run.model.buffer.all()["t"].tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------- strategy state


def test_ewc_fisher_and_penalty(runs) -> None:
    run = runs("EWC")
    info = run.probes[0].info
    fisher, n_params = info["fisher"], info["n_params"]
    assert n_params == sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert fisher.shape == (n_params,), "online EWC keeps one Fisher value per trainable parameter"
    assert bool((fisher >= 0).all()) and float(fisher.sum()) > 0 and bool(torch.isfinite(fisher).all())
    assert torch.equal(info["anchor"], info["flat"]), "the anchor is not the parameters after task 0"
    assert info["penalty_at_anchor"] == 0.0
    assert info["penalty_perturbed"] > 0
    assert info["penalty_perturbed"] == pytest.approx(info["expected_perturbed"], rel=1e-4)
    assert info["penalty_restored"] == 0.0
    # head rows of classes not seen in task 0 are masked, so they carry no Fisher information
    offset = 0
    for pname, p in run.model.named_parameters():
        if pname == "head.weight":
            break
        offset += p.numel()
    head = run.model.head.weight
    head_w = fisher[offset: offset + head.numel()].view_as(head)
    assert float(head_w[2:].abs().sum()) == 0.0 and float(head_w[:2].sum()) > 0
    # online EWC with gamma = 1 accumulates: the final Fisher dominates task 0's
    final = run.model.ewc_fisher
    assert final.shape == (n_params,) and bool((final >= fisher - 1e-6).all()) and float(final.sum()) > float(fisher.sum())
    with torch.no_grad():
        assert float(run.model.penalty()) == 0.0  # the anchor moved to the end of the last task


def test_lwf_teacher_is_frozen_and_stays_in_eval(runs) -> None:
    run = runs("LwF")
    probe: LwFProbe = run.probes[0]
    assert [e["has_teacher"] for e in probe.at_task_start] == [False, True, True, True, True]
    for e in probe.at_task_start[1:]:
        assert e["equals_student"], f"task {e['task']}: the teacher is not a snapshot of the network"
        assert not e["shares_storage"], "the teacher shares parameters with the student"
    assert len(probe.at_train_start) == 5
    for e in probe.at_train_start:
        assert e["student_training"]
        if e["task"] > 0:
            assert not e["teacher_training"], f"task {e['task']}: teacher in train mode during training"
            assert not e["teacher_requires_grad"] and not e["teacher_in_optimizer"]
    model = run.model
    model.train()
    assert model.training and model.backbone.training
    assert not any(m.training for m in model.teacher.modules())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model.eval()


def test_er_buffer_holds_all_seen_tasks_as_uint8(runs) -> None:
    run = runs("ER")
    buf, stream = run.model.buffer, run.datamodule.stream
    assert len(buf) == 200
    assert buf.data_x.dtype == torch.uint8 and buf.data_x.shape == (200, 1, 8, 8)
    kept = buf.all()
    assert set(kept["t"].tolist()) == set(range(5))
    assert set(kept["y"].tolist()) == set(range(10))
    assert torch.equal(torch.tensor(stream.class_to_task())[kept["y"]], kept["t"])
    assert int(buf.num_seen) == run.epochs * sum(len(t.train) for t in stream)
    # every stored sample is a training image of its task, with that image's label
    for task in stream:
        sel = kept["t"] == task.id
        x_all, y_all, _ = task.train.__getitems__(list(range(len(task.train))))
        match = (kept["x"][sel].flatten(1).unsqueeze(1) == x_all.flatten(1).unsqueeze(0)).all(-1)
        assert bool(match.any(1).all()), f"task {task.id}: a buffer image is not in its training set"
        label_ok = (match & (kept["y"][sel].unsqueeze(1) == y_all.unsqueeze(0))).any(1)
        assert bool(label_ok.all()), f"task {task.id}: a buffer label does not belong to its image"


# ---------------------------------------------------------------------------------------------- the training loop


@pytest.mark.parametrize("name", ["Finetune", "ER", "EWC", "LwF"])
def test_optimizer_rebuilt_at_each_task(runs, name: str) -> None:
    run = runs(name)
    opts = run.recorder.optimizers
    assert len(opts) == 5
    assert all(a is not b for i, a in enumerate(opts) for b in opts[i + 1:]), "an optimizer was reused across tasks"
    trainable = {id(p) for p in run.model.parameters() if p.requires_grad}
    for opt in opts:
        assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
        assert opt.param_groups[0]["lr"] == run.model.hparams.lr


@pytest.mark.parametrize("name", ["Finetune", "ER", "LwF"])
def test_global_step_is_monotonic_across_tasks(runs, name: str) -> None:
    run = runs(name)
    steps, per_task = run.recorder.steps_at_train_start, steps_per_task(run)
    assert steps[0] == 0
    assert all(b > a for a, b in zip(steps, steps[1:], strict=False)), f"global step went back: {steps}"
    assert [b - a for a, b in zip(steps, steps[1:], strict=False)] == per_task[:-1]
    assert run.trainer.global_step == sum(per_task)
    assert run.trainer.current_epoch == run.epochs * 5


@pytest.mark.parametrize("name", ["Finetune", "ER", "EWC"])
def test_hook_order(runs, name: str) -> None:
    events = runs(name).recorder.events
    expected = [(hook, t) for t in range(5)
                for hook in ("task_start", "train_start", "train_end", "task_end", "task_evaluated")]
    assert events == expected


def test_results_files_match_the_matrix(runs) -> None:
    run = runs("Finetune")
    log_dir = Path(run.trainer.log_dir)
    matrix = run.trainer.accuracy_matrix
    csv_path, json_path = log_dir / "accuracy_matrix.csv", log_dir / "results.json"
    assert csv_path.is_file() and json_path.is_file()

    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task"] + [f"task_{j}" for j in range(5)]
    assert len(rows) == 6
    for i, row in enumerate(rows[1:]):
        assert int(row[0]) == i
        for j, cell in enumerate(row[1:]):
            if math.isnan(matrix[i][j]):
                assert cell == ""
            else:
                assert float(cell) == pytest.approx(matrix[i][j], abs=1e-6)

    results = json.loads(json_path.read_text())
    for i, row in enumerate(results["accuracy_matrix"]):
        for j, a in enumerate(row):
            assert (a is None) if math.isnan(matrix[i][j]) else a == pytest.approx(matrix[i][j])
    assert results["metrics"]["final/avg_acc"] == pytest.approx(average_accuracy(matrix))
    stream = run.datamodule.stream
    assert results["stream"] == {"name": stream.name, "scenario": "class", "tasks": 5, "signature": stream.signature()}


# ---------------------------------------------------------------------------------------------- checkpoints


def test_er_checkpoint_round_trip(runs, tmp_path: Path) -> None:
    run = runs("ER")
    path = tmp_path / "er.ckpt"
    run.trainer.save_checkpoint(path)
    loaded = ER.load_from_checkpoint(path, map_location="cpu")
    model = run.model
    assert isinstance(loaded, ER) and loaded.hparams.buffer_size == 200 and loaded.hparams.lr == 0.05
    assert int(loaded.current_task) == 4 and torch.equal(loaded.class_task, model.class_task)

    model.eval()
    loaded.eval()
    with torch.no_grad():
        for task in run.datamodule.stream:
            x, _, t = task.test.__getitems__(list(range(len(task.test))))
            assert torch.equal(loaded(x, t), model(x, t)), f"task {task.id}: predictions differ after loading"

    a, b = model.buffer, loaded.buffer
    assert a.fields == b.fields and len(a) == len(b) == 200
    for name in a.fields:
        sa, sb = getattr(a, f"data_{name}"), getattr(b, f"data_{name}")
        assert sa.dtype == sb.dtype and torch.equal(sa, sb), name
    assert torch.equal(a.num_seen, b.num_seen)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    sa, sb = a.sample(32), b.sample(32)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lwf_checkpoint_round_trip(runs, tmp_path: Path) -> None:
    run = runs("LwF")
    path = tmp_path / "lwf.ckpt"
    run.trainer.save_checkpoint(path)
    loaded = LwF.load_from_checkpoint(path, map_location="cpu")
    x, _, t = run.datamodule.stream[0].test.__getitems__(list(range(16)))
    run.model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), run.model(x, t))
    assert loaded.teacher is not None
