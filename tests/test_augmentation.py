"""Input pipelines: presets and torchvision v2 lists from configs, training-only augmentation, raw replay storage."""

from __future__ import annotations

import pytest
import torch

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.cli import DEFAULT_CONFIG, run_cli
from clframe.data.augment import CropFlip, PerSample, build_pipeline
from clframe.errors import ConfigError
from tests.conftest import QUIET_TRAINER

FAST = ["--trainer.steps_per_task=2", "--data.n_tasks=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


def test_presets_and_v2_lists_build():
    assert isinstance(build_pipeline("cifar_crop_flip"), CropFlip)
    assert build_pipeline("none") is None and build_pipeline(None) is None
    pipe = build_pipeline([{"class_path": "RandomCrop", "init_args": {"size": 8, "padding": 2}},
                           "torchvision.transforms.v2.RandomHorizontalFlip"])
    assert isinstance(pipe, PerSample) and len(pipe.transforms) == 2
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    out = pipe(x)
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_crop_flip_draws_per_sample_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.arange(16 * 3 * 32 * 32, dtype=torch.float32).reshape(16, 3, 32, 32)
    y = CropFlip(4)(x)
    assert y.shape == x.shape
    same = [(y[i] == x[i]).all().item() for i in range(16)]
    assert not all(same)  # most samples moved, each with its own draw
    assert len({tuple(y[i, 0, 16, :4].tolist()) for i in range(16)}) > 1


@pytest.mark.parametrize("spec, needle", [
    ("cifar_crop_flp", "did you mean 'cifar_crop_flip'"),
    (["os.system"], "not a torchvision.transforms.v2 class"),
    (["RandomCrp"], "did you mean 'RandomCrop'"),
    ([{"class_path": "RandomCrop", "init_args": {"sise": 3}}], "RandomCrop"),
    ([{"init_args": {}}], "class_path"),
])
def test_bad_pipelines_are_refused_with_the_key(spec, needle):
    with pytest.raises(ConfigError, match="train_transforms") as err:
        build_pipeline(spec, "data.train_transforms")
    assert needle in str(err.value)


class Spy:
    """A pipeline that records what it saw and blanks the images (so augmented inputs are recognisable)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return torch.zeros_like(x)


def test_augmentation_reaches_training_only_and_the_buffer_keeps_raw_samples(tmp_path):
    train, evaluation = Spy(), Spy()
    data = ContinualDataModule(n_tasks=2, batch_size=8, train_transforms=train, eval_transforms=evaluation)
    model = ER(buffer_size=64, replay_batch_size=4)
    trainer = ContinualTrainer(steps_per_task=3, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    # 6 new batches, and a replay draw at every step after the first (the buffer fills online)
    assert train.calls.count(8) == 6 and train.calls.count(4) == 5
    assert evaluation.calls and all(n > 0 for n in evaluation.calls)  # every test batch, never in training
    stored = model.buffer.all()["x"]
    assert stored.dtype == torch.uint8 and stored.flatten(1).amax(1).gt(0).all()  # raw images, not the blanked ones


def test_transforms_from_the_command_line_and_yaml(tmp_path):
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", *FAST, "--data.train_transforms=cifar_crop_flip"])
    assert isinstance(cli.model._train_pipeline, CropFlip)
    config = tmp_path / "aug.yaml"
    config.write_text("data:\n  train_transforms:\n    - class_path: RandomCrop\n      init_args: {size: 8, padding: 1}\n"
                      "    - RandomHorizontalFlip\n")
    cli = run_cli(["fit", "--config", str(DEFAULT_CONFIG), "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *FAST])
    assert isinstance(cli.model._train_pipeline, PerSample)
