"""The end-of-task test of every seen task runs as one evaluation loop over one loader of single-task batches,
and gives exactly what one loader per task gave (the accuracy row, the confusion matrix, Task-IL scores)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.data.samplers import ShardSampler, TaskBatchSampler
from clframe.data.stream import passthrough_collate
from tests.conftest import QUIET_TRAINER


@pytest.mark.parametrize("world", [1, 3])
def test_task_batches_are_the_per_task_loaders_batches_one_after_the_other(world):
    sizes, batch = [0, 5, 70, 17], 16
    for rank in range(world):
        expected, offset = [], 0
        for n in sizes:
            share = list(ShardSampler(n, rank, world))
            expected += [[offset + i for i in share[lo:lo + batch]] for lo in range(0, len(share), batch)]
            offset += n
        sampler = TaskBatchSampler(sizes, batch, rank, world)
        assert [b.tolist() for b in sampler] == expected and len(sampler) == len(expected)
        assert all(b.dtype == torch.long for b in sampler)
        assert list(TaskBatchSampler(sizes, batch, rank, world, as_lists=True)) == expected


class _Loops(L.Callback):
    """Counts test epochs and the loaders and task ids the test batches came from."""

    def __init__(self) -> None:
        self.epochs, self.loader_ids, self.batch_tasks = 0, set(), []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.epochs += 1

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.loader_ids.add(dataloader_idx)
        self.batch_tasks.append(batch[2].unique().tolist())


def _per_task_loaders(dm: ContinualDataModule) -> list[DataLoader]:
    """What ``test_dataloader`` served before: one loader per seen task."""
    return [DataLoader(t.test, batch_size=dm.hparams.eval_batch_size, collate_fn=passthrough_collate)
            for t in dm.stream.tasks[: dm.current_task + 1]]


def _results(model) -> tuple:
    til = None if model.eval_accuracy_task_il is None else list(model.eval_accuracy_task_il)
    return list(model.eval_accuracy), model.eval_confusion.clone(), til


@pytest.mark.parametrize("scenario, report_task_il", [("class", True), ("task", False)])
def test_one_loop_gives_the_per_task_loops_results_bit_for_bit(tmp_path, scenario, report_task_il):
    dm = ContinualDataModule(n_tasks=4, class_order=list(range(8)), scenario=scenario, batch_size=16, eval_batch_size=32)
    loops = _Loops()
    trainer = ContinualTrainer(steps_per_task=3, default_root_dir=tmp_path, callbacks=[loops], logger=False,
                               **QUIET_TRAINER)
    model = ER(buffer_size=40, report_task_il=report_task_il)
    trainer.fit(model, datamodule=dm)
    assert loops.epochs == 4  # one test loop per task end, whatever the number of seen tasks
    assert loops.loader_ids == {0} and all(len(t) == 1 for t in loops.batch_tasks)  # single-task batches
    one = _results(model)
    assert one[0] == trainer.accuracy_matrix[-1]
    trainer.test(model, dataloaders=_per_task_loaders(dm), verbose=False)
    per_task = _results(model)
    assert one[0] == per_task[0]  # exact equality, not approximate
    assert torch.equal(one[1], per_task[1])
    assert one[2] == per_task[2]
    if report_task_il:
        assert one[2] is not None and len(trainer.progress.til_rows) == 4


def test_validation_and_prediction_use_the_one_loader(tmp_path):
    dm = ContinualDataModule(n_tasks=3, class_order=list(range(6)), batch_size=16, eval_batch_size=32, val_fraction=0.2)
    trainer = ContinualTrainer(steps_per_task=2, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
    model = ER(buffer_size=40)
    trainer.fit(model, datamodule=dm)
    assert len(trainer.progress.val_rows) == 3 and all(a == a for a in trainer.progress.val_rows[-1])
    predictions = trainer.predict(model, datamodule=dm)
    tasks = torch.cat([p["task_id"] for p in predictions])
    assert tasks.tolist() == sorted(tasks.tolist()) and tasks.unique().tolist() == [0, 1, 2]
    assert len(tasks) == sum(len(t.test) for t in dm.stream.tasks)
