"""The device-resident data path, the per-sample crop+flip it relies on, and the speed options of the model.

On a CPU the mode is forced (``device_resident=True``); it then serves the same batches as the normal path,
resumes mid-epoch bit-exactly and runs the replay strategies with their buffer beside the data.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.data import device_resident as resident
from clframe.data.augment import crop_flip
from clframe.data.scenarios import ScenarioError
from clframe.errors import ConfigError
from clframe.strategies import DERpp
from tests.conftest import QUIET_TRAINER


def _batches(loader, epoch: int = 0) -> list[tuple[torch.Tensor, ...]]:
    loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning calls at every epoch start
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True))


@pytest.mark.parametrize("options", [{}, {"joint_batches": "per_task"}, {"views_per_sample": 2}])
def test_device_batches_are_the_normal_paths_batches(options):
    served = {}
    for mode in (False, True):
        data = ContinualDataModule(source="digits", n_tasks=5, batch_size=32, device_resident=mode, **options)
        data.set_task(1)
        if options.get("joint_batches"):
            data.train_scope = "seen"
        loader = data.train_dataloader()
        served[mode] = (_batches(loader, 0), _batches(data.train_dataloader(), 3),
                        list(data.test_dataloader()))
    for normal, on_device in zip(served[False], served[True], strict=True):
        assert _same(normal, on_device)


def test_auto_is_off_on_a_cpu_and_bad_settings_are_refused():
    data = ContinualDataModule(source="digits", n_tasks=5)
    assert data.hparams.device_resident == "auto"
    assert not isinstance(data.train_dataloader().dataset, resident.DeviceTaskData)
    assert resident.normalize("TRUE") is True and resident.normalize("auto") == "auto"
    with pytest.raises(ScenarioError, match="auto, true or false"):
        ContinualDataModule(source="digits", device_resident="gpu")


def _every_step_run(root, ckpt_path=None, device_resident=True):
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=64, class_order=list(range(4)),
                               device_resident=device_resident, train_transforms="cifar_crop_flip")
    model = ER(buffer_size=40, backbone_kwargs={"dropout": 0.2})
    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = ContinualTrainer(epochs_per_task=2, logger=False, callbacks=[ckpt], default_root_dir=root,
                               **{**QUIET_TRAINER, "enable_checkpointing": True})
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


def _assert_same_run(a, b, what):
    (ta, ma), (tb, mb) = a, b
    np.testing.assert_array_equal(ta.accuracy_matrix, tb.accuracy_matrix, err_msg=what)
    for (name, u), (_, v) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v), (what, name)


def test_resume_mid_epoch_is_bit_exact_and_matches_the_normal_path(tmp_path):
    full = _every_step_run(tmp_path / "full")
    _assert_same_run(full, _every_step_run(tmp_path / "normal", device_resident=False), "normal path")
    per_epoch = full[0].global_step // 4
    for step in (1, per_epoch + 1):  # mid-epoch in the first task's first and second epoch
        resumed = _every_step_run(tmp_path / f"from{step}", tmp_path / "full" / f"step={step}.ckpt")
        _assert_same_run(full, resumed, f"resumed at step {step}")
    switched = _every_step_run(tmp_path / "switched", tmp_path / "full" / "step=2.ckpt", device_resident=False)
    _assert_same_run(full, switched, "resumed on the host path")  # checkpoints do not depend on the mode


def test_crop_flip_is_per_sample_reproducible_and_covers_every_draw():
    x = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(1, 3, 8, 8).expand(2000, -1, -1, -1).contiguous()
    torch.manual_seed(1)
    a = crop_flip(x, padding=2)
    torch.manual_seed(1)
    assert torch.equal(a, crop_flip(x, padding=2))  # the global RNG (checkpointed) decides every draw
    padded = torch.nn.functional.pad(x[:1], (2,) * 4)
    candidates = torch.stack([c for dy in range(5) for dx in range(5)
                              for c in (padded[0, :, dy:dy + 8, dx:dx + 8], padded[0, :, dy:dy + 8, dx:dx + 8].flip(-1))])
    match = (a[:, None] == candidates[None]).flatten(2).all(2)  # which (offset, flip) each sample got
    assert match.any(1).all()  # every output is one zero-padded crop, flipped or not
    counts = match.float().argmax(1).bincount(minlength=len(candidates))
    assert (counts > 0).all()  # all 25 offsets x 2 flips occur: a fresh draw per sample
    assert abs(counts[1::2].sum().item() / len(a) - 0.5) < 0.05  # flip with p = 0.5


@pytest.mark.parametrize("strategy", [ER, DERpp])
def test_replay_in_device_mode_with_bf16_and_channels_last(strategy):
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=16, device_resident=True,
                               train_transforms="cifar_crop_flip")
    model = strategy(backbone="resnet18", backbone_kwargs={"nf": 4}, buffer_size=50, replay_batch_size=16,
                     memory_format="channels_last")
    trainer = ContinualTrainer(steps_per_task=3, logger=False, precision="bf16-mixed", **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    on_device = next(v for k, v in data._on_device.items() if k[0] == "train")
    assert model.buffer.data_x.device == on_device.x.device and len(model.buffer) == 50
    if strategy is DERpp:
        assert model.buffer.data_logits.dtype == torch.float32  # stored in full precision under autocast
    assert len(trainer.accuracy_matrix) == 2


def test_speed_options_are_checked_and_compile_is_in_place():
    with pytest.raises(ConfigError, match="channels_last"):
        ER(memory_format="nhwc")
    model = ER(compile_backbone=True, num_classes=10, input_shape=(1, 8, 8), scenario="class")
    assert model.backbone._compiled_call_impl is not None  # compiled lazily, at the first forward
    assert all("_orig_mod" not in k for k in model.state_dict())  # checkpoints keep their names


@pytest.mark.slow
def test_a_compiled_backbone_trains():
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=16, device_resident=True)
    model = ER(buffer_size=20, compile_backbone=True)
    trainer = ContinualTrainer(steps_per_task=2, logger=False, **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    assert len(trainer.accuracy_matrix) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_keeps_data_and_buffer_on_a_cuda_device():
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=16, train_transforms="cifar_crop_flip")
    model = DERpp(buffer_size=50, replay_batch_size=16, memory_format="channels_last")
    trainer = ContinualTrainer(steps_per_task=5, logger=False, accelerator="gpu", devices=1, precision="bf16-mixed",
                               **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    copies = list(data._on_device.values())
    assert copies and all(c.x.device.type == "cuda" for c in copies)  # auto: on for a CUDA device
    assert model.buffer.data_x.device.type == "cuda" and len(trainer.accuracy_matrix) == 2


def test_each_rank_gets_the_normal_paths_shard():
    from types import SimpleNamespace

    served = {}
    for mode in (False, True):
        data = ContinualDataModule(source="digits", n_tasks=5, batch_size=10, eval_batch_size=16, device_resident=mode)
        data.set_task(2)
        for rank in range(2):
            data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
            served[mode, rank] = (_batches(data.train_dataloader(), 1), list(data.test_dataloader()))
    for rank in range(2):
        (train, test), (train_d, test_d) = served[False, rank], served[True, rank]
        assert _same(train, train_d) and _same(test, test_d)


def test_auto_keeps_data_on_a_cuda_device_only_when_it_fits(monkeypatch):
    data = ContinualDataModule(source="digits", n_tasks=5)
    task = data.stream.tasks[0].train
    need = resident.dataset_bytes(task)
    assert need == len(task) * (64 + 8 + 8)  # 8x8 uint8 image, int64 label and task id
    cuda = torch.device("cuda", 0)
    for free, expected in ((4 * need, True), (need, False)):  # at most half the free memory
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 8 * need))
        assert resident.resolve("auto", cuda, task) is expected
    assert resident.resolve("auto", torch.device("cpu"), task) is False and resident.resolve(False, cuda, task) is False
    drawn = task.subset(torch.arange(10))
    drawn.sample_transform = lambda x: x  # a per-sample transform applied while reading: cannot be copied once
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * need, 100 * need))
    assert resident.resolve("auto", cuda, drawn) is False
    with pytest.raises(ScenarioError, match="per-sample transform"):
        resident.resolve(True, torch.device("cpu"), drawn)
