"""The DER paper's Seq-CIFAR-10 configs (ER, DER, DER++, iCaRL): each runs unchanged but for a small step budget.

The fast test swaps the data for a small 32x32 RGB stand-in (the configs' model, strategy, augmentation and
Task-IL scoring are what is checked); the slow test runs them on the real CIFAR-10 copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import clframe.data.datamodule as datamodule_module
from clframe.cli import run_cli
from clframe.data.augment import CropFlip
from clframe.data.sources import SourceData
from tests.conftest import requires_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["er", "der", "derpp", "icarl", "joint"]
SMALL = ["--trainer.epochs_per_task=1", "--trainer.enable_progress_bar=false", "--model.backbone_kwargs={nf: 4}",
         "--data.eval_batch_size=100"]


def _stand_in(*args, **kwargs) -> SourceData:
    g = torch.Generator().manual_seed(0)
    train_y, test_y = torch.arange(10).repeat(8), torch.arange(10).repeat(3)
    return SourceData("cifar10_stand_in", torch.randint(0, 256, (80, 3, 32, 32), dtype=torch.uint8, generator=g),
                      train_y, torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=g), test_y,
                      [str(c) for c in range(10)], (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def _check(cli, name):
    assert isinstance(cli.model._train_pipeline, CropFlip)
    results = cli.trainer.continual_results
    assert len(results["accuracy_matrix"]) == 5 and len(results["task_il_accuracy_matrix"]) == 5
    til, cil = results["metrics"]["final/til_avg_acc"], results["metrics"]["final/avg_acc"]
    assert til >= cil - 1e-9  # restricting the outputs to the right task never turns a right answer wrong


@pytest.mark.parametrize("name", CONFIGS)
def test_seq_cifar10_configs_run_with_a_small_budget(name, tmp_path, monkeypatch):
    monkeypatch.setattr(datamodule_module, "load_source", _stand_in)
    cli = run_cli(["fit", "--config", str(REPO / "configs" / "seq_cifar10" / f"{name}.yaml"),
                   f"--trainer.default_root_dir={tmp_path}", *SMALL])
    _check(cli, name)


@pytest.mark.slow
@requires_data
@pytest.mark.parametrize("name", CONFIGS)
def test_seq_cifar10_configs_on_real_data(name, tmp_path):
    cli = run_cli(["fit", "--config", str(REPO / "configs" / "seq_cifar10" / f"{name}.yaml"),
                   f"--trainer.default_root_dir={tmp_path}", *SMALL, "--data.train_samples_per_class=20",
                   "--data.test_samples_per_class=10"])
    _check(cli, name)


PAPER_SCALE = {  # config -> CPU-sized overrides (the configs' own headers name them)
    "split_cifar10/er_stability_gap": ["--trainer.callbacks.init_args.samples_per_task=20"],
    "split_cifar10/icarl_resnet18_baseline": [],
    "split_cifar10/icarl_resnet18_vb": ["--trainer.epochs_per_task=4"],
}


@pytest.mark.parametrize("name", sorted(PAPER_SCALE))
def test_paper_scale_cifar_configs_run_unchanged_with_a_small_budget(name, tmp_path, monkeypatch):
    monkeypatch.setattr(datamodule_module, "load_source", _stand_in)
    cli = run_cli(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), f"--trainer.default_root_dir={tmp_path}",
                   *SMALL, *PAPER_SCALE[name]])
    assert len(cli.trainer.continual_results["accuracy_matrix"]) == 5

