"""Every pair of scenario (class, task, domain) and kind of tasks (split, permutation, rotation,
corruption, datasets) builds the stream its name promises or stops with one clear error; the
data module's image padding; ``from_stream`` takes the stream's scenario."""

from __future__ import annotations

import pytest
import torch

from clframe.data.datamodule import ContinualDataModule
from clframe.data.resize import resize_source
from clframe.data.scenarios import TASK_KINDS, ScenarioError, domain_split
from clframe.data.sources import load_source
from clframe.strategies import Finetune

SCENARIOS = ("class", "task", "domain")


def _data(scenario: str, tasks: str | None, **kwargs) -> ContinualDataModule:
    defaults = {"split": {"n_tasks": 5}, "permutation": {"n_tasks": 3}, "rotation": {"angles": [0.0, 45.0, 90.0]},
                "corruption": {"corruptions": ["none", "gaussian_noise", "contrast"]},
                "datasets": {"domain_sources": ["digits", "digits"]}}.get(tasks, {})
    if tasks in ("rotation", "corruption", "datasets"):
        defaults["n_tasks"] = None
    return ContinualDataModule(source="digits", scenario=scenario, tasks=tasks, **{**defaults, **kwargs})


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("tasks", TASK_KINDS)
def test_every_scenario_and_kind_builds_what_its_name_says(scenario: str, tasks: str) -> None:
    stream = _data(scenario, tasks).stream
    assert stream.scenario == scenario
    labels = [set(t.train.targets.unique().tolist()) | set(t.test.targets.unique().tolist()) for t in stream]
    for task, seen in zip(stream, labels, strict=True):
        assert seen == set(task.classes), f"task {task.id} holds labels outside its classes"
    if tasks == "split":
        if scenario == "domain":  # within-task labels, one shared 2-way head
            assert stream.num_classes == 2 and all(t.classes == (0, 1) for t in stream)
            assert stream.class_names == ["0/2/4/6/8", "1/3/5/7/9"]
        else:  # disjoint classes, one id per class
            assert stream.num_classes == 10 and [t.classes for t in stream] == [(2 * i, 2 * i + 1) for i in range(5)]
    else:
        n = len(stream)
        if scenario == "domain":  # one label space
            assert stream.num_classes == 10 and all(t.classes == tuple(range(10)) for t in stream)
        else:  # each domain brings ten new classes
            assert stream.num_classes == 10 * n
            assert [t.classes for t in stream] == [tuple(range(10 * i, 10 * i + 10)) for i in range(n)]


def test_domain_split_relabels_within_task_and_keeps_the_samples() -> None:
    source = load_source("digits")
    stream = domain_split(source, n_tasks=5)
    for task in stream:
        original = source.train_y[task.train.indices]
        assert set(original.tolist()) == {2 * task.id, 2 * task.id + 1}
        assert torch.equal(task.train.targets, original - 2 * task.id)
    # a shuffled class order: task t's j-th class in the order maps to label j
    shuffled = domain_split(source, n_tasks=5, shuffle_classes=True, seed=1)
    order = shuffled.description["class_order"]
    for task in shuffled:
        original = source.test_y[task.test.indices]
        expected = torch.tensor([order.index(int(c)) - 2 * task.id for c in original])
        assert torch.equal(task.test.targets, expected)


def test_domain_split_model_has_a_shared_head_without_masks() -> None:
    dm = _data("domain", "split")
    model = Finetune(backbone="mlp", backbone_kwargs={"hidden_sizes": [8]})
    model.bind_stream(dm.stream)
    assert model.head.out_features == 2 and model.logit_mask(torch.tensor([3])) is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scenario": "domain"}, "needs to know how the tasks differ"),
    ({"scenario": "domain", "tasks": "split", "first_task_classes": 4, "n_tasks": 4}, "same number of classes"),
    ({"scenario": "class", "tasks": "permutation", "n_tasks": 3, "class_order": [0, 1]}, "class_order"),
    ({"scenario": "task", "tasks": "rotation", "n_tasks": 2, "shuffle_classes": True}, "shuffle_classes"),
    ({"scenario": "domain", "tasks": "split", "angles": [0.0, 1.0]}, "angles"),
    ({"scenario": "class", "tasks": "split", "corruptions": ["none"]}, "corruptions"),
    ({"scenario": "domain", "tasks": "permutation", "n_tasks": 2, "domain_sources": ["digits"]}, "domain_sources"),
    ({"scenario": "domain", "tasks": "split", "domain": "permutation"}, "disagree"),
    ({"scenario": "class", "tasks": "datasets", "n_tasks": None}, "domain_sources"),
])
def test_combinations_that_cannot_work_stop_with_one_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ScenarioError, match=match):
        ContinualDataModule(source="digits", **kwargs).build_stream()


def test_domain_is_the_older_name_of_tasks() -> None:
    old = ContinualDataModule(source="digits", scenario="domain", domain="permutation", n_tasks=2).stream
    new = ContinualDataModule(source="digits", scenario="domain", tasks="permutation", n_tasks=2).stream
    assert old.signature() == new.signature()


def test_image_size_pads_with_zeros_or_resizes() -> None:
    source = load_source("digits")
    padded = resize_source(source, 12)
    assert padded.input_shape == (1, 12, 12)
    assert torch.equal(padded.train_x[:, :, 2:10, 2:10], source.train_x)
    assert padded.train_x[:, :, :2].sum() == 0 and padded.train_x[:, :, :, 10:].sum() == 0
    assert resize_source(source, 16, "bilinear").input_shape == (1, 16, 16)
    with pytest.raises(ScenarioError, match="padding cannot shrink"):
        resize_source(source, 6)
    dm = ContinualDataModule(source="digits", n_tasks=5, image_size=12)
    assert dm.stream.input_shape == (1, 12, 12)
    with pytest.raises(ScenarioError, match="resize must be"):
        ContinualDataModule(source="digits", resize="crop")


def test_from_stream_takes_the_scenario_of_its_stream() -> None:
    stream = _data("task", "split").stream
    dm = ContinualDataModule.from_stream(stream, batch_size=8)
    assert dm.hparams.scenario == "task" and dm.stream is stream
    with pytest.raises(ScenarioError, match="leave scenario out"):
        ContinualDataModule.from_stream(stream, scenario="class")
    with pytest.raises(ScenarioError, match="served as built"):
        ContinualDataModule.from_stream(stream, image_size=32)


CUSTOM_MODULE = '''
from clframe.data.datamodule import ContinualDataModule


class TinyDigits(ContinualDataModule):
    """A user's data module with one option of its own."""

    def __init__(self, label: str = "mine", **kwargs):
        super().__init__(**kwargs)
        self.label = label
'''


@pytest.mark.parametrize("how", ["flag", "config"])
def test_cli_takes_a_custom_data_module_and_keeps_the_shorthand(tmp_path, monkeypatch, how: str) -> None:
    from clframe.cli import ContinualCLI

    (tmp_path / "my_data.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    if how == "flag":
        args = ["--data=my_data.TinyDigits", "--data.label=ours", "--data.n_tasks=2"]
    else:
        (tmp_path / "c.yaml").write_text("data:\n  class_path: my_data.TinyDigits\n  init_args:\n    label: ours\n"
                                         "    n_tasks: 2\n")
        args = ["--config", str(tmp_path / "c.yaml")]
    cli = ContinualCLI(args=["--model=Finetune", f"--trainer.default_root_dir={tmp_path}", *args], run=False)
    assert type(cli.datamodule).__name__ == "TinyDigits"
    assert cli.datamodule.label == "ours" and cli.datamodule.hparams.n_tasks == 2
    # without a class path the options still go to ContinualDataModule
    plain = ContinualCLI(args=["--model=Finetune", "--data.n_tasks=2", "--data.source=digits",
                               f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert type(plain.datamodule) is ContinualDataModule and plain.datamodule.hparams.n_tasks == 2
