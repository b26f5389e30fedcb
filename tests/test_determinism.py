"""Determinism and precision: the same seed gives the same run; bf16-mixed works on the CPU."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

from clframe import ER, EWC, ContinualDataModule, ContinualTrainer, Finetune, Joint, LwF
from tests.conftest import QUIET_TRAINER


def _run(tmp_path, strategy, seed=0, precision="32-true", **kwargs):
    L.seed_everything(seed)
    data = ContinualDataModule(source="digits", n_tasks=5, batch_size=32)
    model = strategy(**kwargs)
    trainer = ContinualTrainer(epochs_per_task=1, precision=precision, default_root_dir=tmp_path, **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    return trainer, model


@pytest.mark.parametrize("strategy,kwargs", [(ER, {"buffer_size": 50}), (EWC, {}), (LwF, {})])
def test_same_seed_same_run(tmp_path, strategy, kwargs):
    kwargs = {**kwargs, "backbone_kwargs": {"dropout": 0.3}}  # randomness inside the steps too
    t1, m1 = _run(tmp_path / "a", strategy, **kwargs)
    t2, m2 = _run(tmp_path / "b", strategy, **kwargs)
    np.testing.assert_array_equal(t1.accuracy_matrix, t2.accuracy_matrix)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    _, m3 = _run(tmp_path / "c", strategy, seed=1, **kwargs)
    assert not torch.equal(m1.head.weight, m3.head.weight)  # the seed matters


def test_the_seed_is_recorded_with_the_results(tmp_path):
    trainer, _ = _run(tmp_path, Finetune, seed=7)
    saved = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert saved["seed"] == 7 and saved["data_seed"] == 7
    assert trainer.continual_results["seed"] == 7


@pytest.mark.parametrize("strategy,kwargs", [(Finetune, {}), (Joint, {"final_only": False}), (ER, {"buffer_size": 50}),
                                             (EWC, {}), (LwF, {})])
def test_bf16_mixed_on_cpu(tmp_path, strategy, kwargs):
    trainer, model = _run(tmp_path, strategy, precision="bf16-mixed", lr=0.1, **kwargs)
    matrix = np.asarray(trainer.accuracy_matrix, dtype=float)
    assert np.isfinite(np.diag(matrix)).all() and np.diag(matrix).mean() > 0.6  # each task gets learned
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.head.weight.dtype == torch.float32  # mixed precision keeps fp32 master weights
