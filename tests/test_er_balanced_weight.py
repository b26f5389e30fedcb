"""ER's ``new_weight="balanced"``: the new batch weighted 1/t and the replayed one 1 - 1/t in the t-th task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from clframe import ER
from clframe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", [0, 2])
def test_balanced_weight_is_one_over_the_task_count(task):
    torch.manual_seed(0)
    model = ER(buffer_size=20, new_weight="balanced", num_classes=4, input_shape=(8,), scenario="class",
               mask_unseen_classes=False, replay_batch_size=5)
    model.current_task.fill_(task)
    x, y, t = torch.randn(6, 8), torch.tensor([0, 1, 0, 1, 1, 0]), torch.zeros(6, dtype=torch.long)
    model.buffer.add(x=torch.randn(10, 8), y=torch.tensor([2, 3] * 5), t=torch.ones(10, dtype=torch.long))
    state = model.buffer.generator.get_state()
    replay = model.buffer.sample(5)
    model.buffer.generator.set_state(state)
    w = 1.0 / (task + 1)
    expected = w * F.cross_entropy(model(x, t), y) + (1 - w) * F.cross_entropy(model(replay["x"], replay["t"]), replay["y"])
    torch.testing.assert_close(model.training_loss((x, y, t)), expected)


def test_unknown_weight_name_is_refused():
    with pytest.raises(ConfigError, match="new_weight"):
        ER(new_weight="equal")


@pytest.mark.parametrize("path", sorted(REPO.glob("configs/three_scenarios/*/er.yaml")), ids=lambda p: p.parent.name)
def test_three_scenario_er_configs_use_the_reference_memory(path):
    args = yaml.safe_load(path.read_text())["model"]["init_args"]
    assert (args["buffer_policy"], args["buffer_update"], args["new_weight"]) == ("class_balanced", "task_end", "balanced")
