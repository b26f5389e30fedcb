"""Optimizers and schedules: --optimizer / --lr_scheduler for every strategy, rebuilt per task, carried on request."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.cli import run_cli
from clframe.errors import ConfigError
from clframe.optim import TaskCosineLR, WarmupCosineLR, build, optimizer_factory
from tests.conftest import QUIET_TRAINER


class OptimizerRecorder(L.Callback):
    """The optimizer class, learning rate and Adam step count at each task's end (and start)."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, float]] = []
        self.start_steps: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
        self.start_steps.append(max(steps, default=0.0))

    def on_train_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.ends.append((type(opt).__name__, opt.param_groups[0]["lr"]))


FAST = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.steps_per_task=3",
        "--data.n_tasks=2", "--trainer.callbacks+=tests.test_optim.OptimizerRecorder"]
SCHEDULE = ["--optimizer=Adam", "--optimizer.lr=0.01", "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1",
            "--lr_scheduler.gamma=0.5", "--model.lr_scheduler_interval=step"]
STRATEGIES = {  # one per family: replay, regularisation, supermask, interval, prompt (parameter groups)
    "ER": [],
    "EWC": ["--model=EWC"],
    "WSN": ["--model=WSN", "--data.scenario=task", "--model.backbone_kwargs={hidden_sizes: [32]}"],
    "HyperInterval": ["--model=HyperInterval", "--data.scenario=task"],
    "CODAPrompt": ["--model=CODAPrompt", "--model.backbone=vit_tiny_patch16_224", "--model.pretrained=false",
                   "--model.backbone_kwargs={img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 4}",
                   "--model.pool_size=4", "--model.prompt_length=4", "--model.layers=[0, 1]"],  # its cosine replaced
}


def _recorder(cli) -> OptimizerRecorder:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, OptimizerRecorder))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_cli_optimizer_and_scheduler_reach_every_task(tmp_path, name):
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", *FAST, *STRATEGIES[name], *SCHEDULE])
    # Adam at every task, and StepLR restarted per task: 3 steps of x0.5 from 0.01 in each
    assert _recorder(cli).ends == [("Adam", pytest.approx(0.01 * 0.5**3))] * 2
    assert cli.model.hparams.optimizer["class_path"] == "torch.optim.Adam"  # what ran is in the hparams


def test_an_epoch_schedule_restarts_at_every_task(tmp_path):
    args = [a for a in FAST if not a.startswith("--trainer.steps_per_task")]
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", *args, "--trainer.epochs_per_task=2",
                   "--optimizer=SGD", "--optimizer.lr=0.01", "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1",
                   "--lr_scheduler.gamma=0.5"])
    assert _recorder(cli).ends == [("SGD", pytest.approx(0.01 * 0.5**2))] * 2  # two epochs per task, then a restart


def test_model_level_optimizer_and_warmup_cosine_from_yaml(tmp_path):
    config = tmp_path / "opt.yaml"
    config.write_text("model:\n  init_args:\n    optimizer:\n      class_path: torch.optim.AdamW\n"
                      "      init_args: {lr: 0.004}\n    lr_scheduler:\n      class_path: clframe.optim.WarmupCosineLR\n"
                      "      init_args: {warmup_steps: 2}\n")
    cli = run_cli(["fit", "--config", str(cli_default()), "--config", str(config),
                   f"--trainer.default_root_dir={tmp_path}", *FAST])
    # cosine over the task's 3 steps after 2 warm-up steps: at step 3 the decay has reached its end
    assert _recorder(cli).ends == [("AdamW", pytest.approx(0.0))] * 2


def cli_default():
    from clframe.cli import DEFAULT_CONFIG

    return DEFAULT_CONFIG


def test_shortcut_names_are_sugar_for_the_same_factory():
    opt = optimizer_factory("SGD", lr=0.1, momentum=0.9)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ConfigError, match="unknown optimizer"):
        optimizer_factory("adamx", lr=0.1)


def test_warmup_cosine_shape():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupCosineLR(opt, warmup_steps=4, total_steps=12, min_lr_factor=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_task_cosine_without_a_trainer_spans_one_epoch():
    config = build([{"params": [torch.nn.Parameter(torch.zeros(1))]}], functools.partial(torch.optim.SGD, lr=1.0),
                   TaskCosineLR)
    assert config["lr_scheduler"]["interval"] == "epoch" and config["lr_scheduler"]["scheduler"].T_max == 1


def _run(root, reset: bool, ckpt_path=None, every_step=False):
    L.seed_everything(0)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=64, class_order=list(range(4)))
    model = ER(buffer_size=40, optimizer=functools.partial(torch.optim.Adam, lr=0.01),
               lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
               lr_scheduler_interval="step", reset_optimizer=reset, backbone_kwargs={"hidden_sizes": [32]})
    recorder = OptimizerRecorder()
    callbacks = [recorder]
    if every_step:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}"))
    trainer = ContinualTrainer(epochs_per_task=2, logger=False, callbacks=callbacks, default_root_dir=root,
                               **{**QUIET_TRAINER, "enable_checkpointing": every_step})
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model, recorder


def test_reset_optimizer_false_keeps_state_and_schedule(tmp_path):
    _, _, fresh = _run(tmp_path / "a", reset=True)
    _, _, kept = _run(tmp_path / "b", reset=False)
    steps = fresh.start_steps
    assert steps == [0.0, 0.0]  # a new optimizer per task
    assert kept.start_steps[0] == 0.0 and kept.start_steps[1] > 0  # Adam's moments carried into task 2
    per_task = kept.start_steps[1]
    # StepLR continued: task 2 ends after twice as many steps of decay as task 1
    assert kept.ends[1][1] == pytest.approx(0.01 * 0.5 ** (2 * per_task // 2))
    assert fresh.ends[1][1] == pytest.approx(fresh.ends[0][1])


def test_resume_mid_task_with_a_scheduler_is_bit_exact(tmp_path):
    full_trainer, full, _ = _run(tmp_path / "full", reset=True, every_step=True)
    steps_per_task = full_trainer.global_step // 2
    step = steps_per_task + 3  # inside task 2, after the scheduler moved
    trainer, resumed, rec = _run(tmp_path / "resumed", reset=True, ckpt_path=tmp_path / "full" / f"step={step}.ckpt")
    np.testing.assert_array_equal(trainer.accuracy_matrix, full_trainer.accuracy_matrix)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == full_trainer.lr_scheduler_configs[0].scheduler.last_epoch
