"""ER with the memory filled at task ends (``buffer_update="task_end"``), the stability-gap paper's semantics."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.nn import functional as F

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.errors import ConfigError
from clframe.strategies.replay.view_batch import ViewBatchConfig
from tests.conftest import QUIET_TRAINER
from tests.helpers.resume import assert_same_matrix_and_weights, fit_saving_every_step

REPO = Path(__file__).resolve().parents[1]
STABILITY_GAP_ER_CONFIGS = sorted(REPO.glob("configs/*/er_stability_gap.yaml"))


class BufferWatch(L.Callback):
    """Records, before every training step, which tasks' labels the buffer holds and the step's task."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, set[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stored = pl_module.buffer.all()["y"] if len(pl_module.buffer) else torch.empty(0, dtype=torch.long)
        tasks = {int(pl_module.class_task[c]) for c in stored.unique().tolist()}
        self.seen.append((int(pl_module.current_task), tasks))


def _digits(n_tasks: int = 3, batch_size: int = 32) -> ContinualDataModule:
    return ContinualDataModule(source="digits", n_tasks=n_tasks, batch_size=batch_size,
                               class_order=list(range(2 * n_tasks)))


def _fit(model: ER, data: ContinualDataModule, *callbacks: L.Callback, epochs: int = 1) -> ContinualTrainer:
    trainer = ContinualTrainer(epochs_per_task=epochs, logger=False, callbacks=list(callbacks), **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    return trainer


def test_task_end_memory_holds_only_earlier_tasks_during_a_task():
    L.seed_everything(0)
    watch = BufferWatch()
    model = ER(buffer_size=60, buffer_policy="class_balanced", buffer_update="task_end", new_weight=0.5)
    _fit(model, _digits(), watch)
    assert watch.seen, "no training step was observed"
    for task, stored_tasks in watch.seen:
        assert stored_tasks == set(range(task)), (task, stored_tasks)  # every earlier task, never the current one


def test_online_memory_holds_the_current_task_during_a_task():
    L.seed_everything(0)
    watch = BufferWatch()
    model = ER(buffer_size=60, buffer_policy="class_balanced", buffer_update="online")
    _fit(model, _digits(), watch)
    assert any(task in stored for task, stored in watch.seen[1:])


@pytest.mark.parametrize("n_tasks", [1, 2, 3])
def test_task_end_memory_is_class_balanced_over_finished_tasks(n_tasks):
    """After task t ends: equal shares of every class of tasks <= t, each sample a real training sample."""
    L.seed_everything(0)
    data = _digits(n_tasks)
    model = ER(buffer_size=60, buffer_policy="class_balanced", buffer_update="task_end")
    _fit(model, data)
    stored = model.buffer.all()
    classes = list(range(2 * n_tasks))
    counts = torch.bincount(stored["y"], minlength=len(classes)).tolist()
    assert counts == [60 // len(classes)] * len(classes)
    train = {task.id: task.train for task in data.stream.tasks}
    for x, y, t in zip(stored["x"], stored["y"], stored["t"], strict=True):
        assert int(model.class_task[y]) == int(t)
        task_x, task_y, _ = train[int(t)].__getitems__(list(range(len(train[int(t)]))))
        match = (task_x == x).flatten(1).all(1) & (task_y == y)
        assert bool(match.any()), "the buffer holds a sample that is not in its task's training data"


def test_empty_memory_loss_is_the_weighted_new_loss():
    torch.manual_seed(0)
    model = ER(buffer_size=20, buffer_update="task_end", new_weight=0.3, num_classes=4, input_shape=(8,),
               scenario="class", mask_unseen_classes=False)
    x, y, t = torch.randn(6, 8), torch.tensor([0, 1, 0, 1, 1, 0]), torch.zeros(6, dtype=torch.long)
    loss = model.training_loss((x, y, t))
    torch.testing.assert_close(loss, 0.3 * F.cross_entropy(model(x, t), y))


def test_loss_with_memory_weights_new_and_replayed_terms():
    torch.manual_seed(0)
    model = ER(buffer_size=20, buffer_update="task_end", new_weight=0.3, num_classes=4, input_shape=(8,),
               scenario="class", mask_unseen_classes=False, replay_batch_size=5)
    model.buffer.add(x=torch.randn(10, 8), y=torch.tensor([2, 3] * 5), t=torch.ones(10, dtype=torch.long))
    x, y, t = torch.randn(6, 8), torch.tensor([0, 1, 0, 1, 1, 0]), torch.zeros(6, dtype=torch.long)
    state = model.buffer.generator.get_state()
    replay = model.buffer.sample(5)
    model.buffer.generator.set_state(state)  # the loss draws the same replay batch
    expected = 0.3 * F.cross_entropy(model(x, t), y) + 0.7 * F.cross_entropy(model(replay["x"], replay["t"]), replay["y"])
    torch.testing.assert_close(model.training_loss((x, y, t)), expected)


def test_unmasked_head_scores_every_class():
    model = ER(num_classes=4, input_shape=(8,), scenario="class", mask_unseen_classes=False)
    model.class_task.copy_(torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(model(torch.randn(3, 8))).all()  # classes of task 1 are scored during task 0
    masked = ER(num_classes=4, input_shape=(8,), scenario="class")
    masked.class_task.copy_(torch.tensor([0, 0, 1, 1]))
    assert (masked(torch.randn(3, 8))[:, 2:] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("path", STABILITY_GAP_ER_CONFIGS, ids=lambda p: p.parent.name)
def test_stability_gap_configs_use_the_official_semantics(path):
    config = yaml.safe_load(path.read_text())
    args = config["model"]["init_args"]
    assert args["buffer_update"] == "task_end"
    assert args["mask_unseen_classes"] is False
    assert args["replay_batch_size"] == config["data"]["batch_size"]  # an equally sized memory batch, always


def test_bad_buffer_update_is_refused():
    with pytest.raises(ConfigError, match="buffer_update"):
        ER(buffer_update="sometimes")
    with pytest.raises(ConfigError, match="view_batch"):
        ER(buffer_update="task_end", view_batch=ViewBatchConfig())


def _task_end_er() -> ER:
    return ER(buffer_size=40, buffer_policy="class_balanced", buffer_update="task_end", new_weight=0.5,
              mask_unseen_classes=False, backbone_kwargs={"dropout": 0.2})


DIGITS_2 = {"source": "digits", "n_tasks": 2, "batch_size": 64, "class_order": list(range(4))}


def test_task_end_resume_is_bit_exact(tmp_path):
    """Mid-task, the last step of a task (saved before the task-end fill) and just after a fill."""
    full = fit_saving_every_step(tmp_path / "full", _task_end_er, DIGITS_2)
    per_task = full[0].global_step // 2
    for step in (per_task // 2, per_task, per_task + 1):
        resumed = fit_saving_every_step(tmp_path / f"from{step}", _task_end_er, DIGITS_2,
                                        tmp_path / "full" / f"step={step}.ckpt")
        assert_same_matrix_and_weights(full, resumed, step)
