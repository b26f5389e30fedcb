"""LwF: each variant's distillation term against Li & Hoiem's formula worked out by hand on a tiny example,
the loss weighting, and the head-only warm-up."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from clframe import ContinualDataModule, ContinualTrainer, LwF
from tests.conftest import QUIET_TRAINER

T = 2.0
OWNER = [0, 0, 1, 1, 2, 2]  # class -> task; the current task is 2


def hand_l_old(student: list[list[float]], teacher: list[list[float]], s_cols: list[int], t_cols: list[int]) -> float:
    """-1/B sum_b sum_k p_k log q_k, p = softmax(teacher[t_cols] / T), q = softmax(student[s_cols] / T); the
    student's extra columns (after the teacher's) are classes the teacher gives probability 0."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        zs = [math.exp(s_row[c] / T) for c in s_cols]
        zt = [math.exp(t_row[c] / T) for c in t_cols]
        total -= sum(zt[k] / sum(zt) * math.log(zs[k] / sum(zs)) for k in range(len(t_cols)))
    return total / len(student)


def tiny_lwf(scenario: str, **kwargs) -> tuple[LwF, torch.Tensor, list[list[float]], list[list[float]]]:
    """A 3-feature, 6-class LwF in its third task, with a teacher that differs from the student."""
    torch.manual_seed(0)
    model = LwF(backbone="mlp", backbone_kwargs={"hidden_sizes": [5]}, num_classes=6, input_shape=[3],
                scenario=scenario, temperature=T, **kwargs)
    model.class_task.copy_(torch.tensor(OWNER))
    model.current_task.fill_(2)
    model._snapshot_teacher()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, 3)
    with torch.no_grad():
        student = model.head(model.features(x))
        teacher = model.teacher["head"](model.teacher["backbone"](x))
    return model, x, student.tolist(), teacher.tolist()


@pytest.mark.parametrize("scenario,kwargs,groups", [
    ("class", {"distill_classes": "seen"}, [([0, 1, 2, 3, 4, 5], [0, 1, 2, 3])]),
    ("class", {"distill_classes": "old"}, [([0, 1, 2, 3], [0, 1, 2, 3])]),
    ("task", {}, [([0, 1], [0, 1]), ([2, 3], [2, 3])]),
    ("domain", {}, [([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])]),
])
@pytest.mark.parametrize("weighting", ["sum", "balanced"])
@pytest.mark.parametrize("scale_by_t2", [False, True])
def test_distillation_equals_the_formula_by_hand(scenario, kwargs, groups, weighting, scale_by_t2) -> None:
    model, x, student, teacher = tiny_lwf(scenario, weighting=weighting, scale_by_t2=scale_by_t2, **kwargs)
    terms = [hand_l_old(student, teacher, s, t) for s, t in groups]
    expected = sum(terms) / (len(terms) if weighting == "balanced" else 1) * (T**2 if scale_by_t2 else 1.0)
    got = float(model.distillation(x, torch.tensor(student), task=2))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scenario,kwargs,groups", [
    ("class", {"distill_classes": "seen"}, [([0, 1, 2, 3, 4, 5], [0, 1, 2, 3])]),
    ("task", {}, [([0, 1], [0, 1]), ([2, 3], [2, 3])]),
    ("domain", {}, [([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])]),
])
def test_the_early_reference_averages_over_the_classes_too(scenario, kwargs, groups) -> None:
    """``distill_average="batch_and_classes"``: the mean over batch and (zero-padded) classes of van de Ven's code
    before May 2019, i.e. each term divided by its number of student columns."""
    model, x, student, teacher = tiny_lwf(scenario, distill_average="batch_and_classes", **kwargs)
    terms = [hand_l_old(student, teacher, s, t) / len(s) for s, t in groups]
    got = float(model.distillation(x, torch.tensor(student), task=2))
    assert got == pytest.approx(sum(terms), rel=1e-5)


@pytest.mark.parametrize("weighting", ["sum", "balanced"])
def test_total_loss_weights_new_and_old_terms(weighting) -> None:
    model, x, student, teacher = tiny_lwf("class", weighting=weighting, alpha=0.7)
    y = torch.tensor([4, 5, 4, 5])
    ce = float(torch.nn.functional.cross_entropy(torch.tensor(student), y))  # all seen classes are 0..5
    kd = hand_l_old(student, teacher, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3])
    t = 3  # the third task
    expected = ce + 0.7 * kd if weighting == "sum" else ce / t + (1 - 1 / t) * 0.7 * kd
    got = float(model.training_loss((x, y, torch.full((4,), 2))).detach())
    assert got == pytest.approx(expected, rel=1e-5)


def test_old_only_distillation_leaves_new_classes_free_and_seen_constrains_them() -> None:
    """With 'old' the term does not depend on the new classes' logits; with 'seen' it does."""
    for variant, depends in (("old", False), ("seen", True)):
        model, x, student, _ = tiny_lwf("class", distill_classes=variant)
        logits = torch.tensor(student, requires_grad=True)
        model.distillation(x, logits, task=2).backward()
        assert bool(logits.grad[:, 4:].abs().sum() > 0) is depends


class WeightsAtTrainStart(L.Callback):
    """Parameters at each task's first training step: after the warm-up (a module hook that runs first)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters()
                                   if not n.startswith("teacher.")})


def test_warm_up_trains_only_the_new_head_rows(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=32)
    model = LwF(backbone="mlp", backbone_kwargs={"hidden_sizes": [16]}, lr=0.1, warmup_epochs=2)
    probe = WeightsAtTrainStart()

    class Capture(L.Callback):  # the student as task 1 starts (the teacher snapshot equals it)
        def on_train_start(self, trainer, pl_module) -> None:
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if not n.startswith("teacher.")}
    capture = Capture()
    trainer = ContinualTrainer(epochs_per_task=1, logger=False, callbacks=[probe, capture], default_root_dir=tmp_path,
                               **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    before, after = capture.before, probe.snapshots[1]  # task 1: callback hooks run before the module's warm-up
    new = (model.class_task == 1).nonzero().squeeze(1)
    old = (model.class_task == 0).nonzero().squeeze(1)
    for name in before:
        if name.startswith("backbone."):
            assert torch.equal(before[name], after[name]), f"{name} moved during the warm-up"
    assert torch.equal(before["head.weight"][old], after["head.weight"][old])
    assert not torch.equal(before["head.weight"][new], after["head.weight"][new])
    assert int(model.warmed_up_task) == 1


def test_no_warm_up_when_turned_off(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=32)
    model = LwF(backbone="mlp", backbone_kwargs={"hidden_sizes": [16]}, lr=0.1, warmup_epochs=0)
    probe = WeightsAtTrainStart()
    trainer = ContinualTrainer(epochs_per_task=1, logger=False, callbacks=[probe], default_root_dir=tmp_path,
                               **QUIET_TRAINER)
    trainer.fit(model, datamodule=data)
    teacher = dict(model.teacher.named_parameters())
    assert torch.equal(teacher["head.weight"], probe.snapshots[1]["head.weight"])
