"""``check_finite_loss`` on an accelerator: no host read of the loss per step, the first bad step named, and
no checkpoint written after it. The accelerator path is forced on the CPU (``_defer_loss_check``); the CPU
path (an error at the bad step itself) is tested end to end in ``test_bad_input.py``."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.overrides import TorchFunctionMode

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.errors import NonFiniteLossError
from clframe.strategies.base import ContinualModule
from tests.conftest import QUIET_TRAINER
from tests.helpers.poison import PoisonAtStep

HOST_READS = {"__bool__", "item", "tolist", "__float__", "__int__", "cpu", "numpy"}


class _HostReads(TorchFunctionMode):
    """Counts tensor operations that copy a value to the host (a device sync on an accelerator)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += getattr(func, "__name__", "") in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.fixture
def deferred(monkeypatch):
    """The accelerator path on the CPU, with the reads of the host made by each ``watch_loss`` call."""
    monkeypatch.setattr(ContinualModule, "_defer_loss_check", staticmethod(lambda loss: True))
    reads: list[tuple[int, int]] = []
    watch = ContinualModule.watch_loss

    def counted(self, loss):
        step = self.global_step
        with _HostReads() as mode:
            try:
                watch(self, loss)
            finally:
                reads.append((step, mode.reads))

    monkeypatch.setattr(ContinualModule, "watch_loss", counted)
    return reads


def _fit(tmp_path, poison_step: int, every: int, steps: int = 12, callbacks=()):
    dm = ContinualDataModule(n_tasks=2, class_order=list(range(4)), batch_size=16)
    trainer = ContinualTrainer(steps_per_task=steps, default_root_dir=tmp_path, logger=False,
                               callbacks=[PoisonAtStep(poison_step), *callbacks],
                               **{**QUIET_TRAINER, "enable_checkpointing": bool(callbacks)})
    model = ER(buffer_size=20)
    model.finite_check_every = every
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(model, datamodule=dm)
    return str(err.value)


def test_no_host_read_between_checks_and_the_bad_step_is_named(tmp_path, deferred):
    message = _fit(tmp_path, poison_step=6, every=5)
    assert "at global step 6 (noticed at step 9" in message and "learning rate" in message
    assert [step for step, n in deferred if n] == [4, 9]  # reads only on the check steps
    assert deferred[-1][0] == 9


def test_no_checkpoint_is_written_after_a_bad_step(tmp_path, deferred):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    message = _fit(tmp_path, poison_step=3, every=1000, callbacks=[ckpt])
    assert "at global step 3" in message
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_a_bad_last_step_is_caught_at_the_end_of_the_task(tmp_path, deferred):
    message = _fit(tmp_path, poison_step=11, every=1000, steps=12)
    assert "at global step 11" in message
    assert all(n == 0 for _, n in deferred)  # the only read was at the task's end, outside training steps
