"""InTAct: the interval bound is sound and exact, boxes are percentiles merged by union, the terms
vanish where they must, and the regulariser rides on any strategy, checkpoints and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clframe.cli import run_cli
from clframe.data.datamodule import ContinualDataModule
from clframe.strategies import ER, EWC, Finetune
from clframe.strategies.intact import InTActConfig, IntervalActivation, interval_output_change, percentile
from clframe.trainer import ContinualTrainer
from tests.conftest import QUIET_TRAINER


def test_the_output_change_bound_holds_for_ten_thousand_points_in_the_box():
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 10)
    lower = torch.randn(64, generator=gen)
    upper = lower + torch.rand(64, generator=gen) * 2
    dw, db = torch.randn(10, 64, generator=gen) * 0.1, torch.randn(10, generator=gen) * 0.1
    lo, hi = interval_output_change(dw, db, lower, upper)
    points = lower + torch.rand(10_000, 64, generator=gen) * (upper - lower)
    with torch.no_grad():
        before = layer(points)
        after = nn.functional.linear(points, layer.weight + dw, layer.bias + db)
    change = after - before
    assert (change >= lo - 1e-5).all() and (change <= hi + 1e-5).all()
    # exact: the box corner chosen by the sign of dW reaches each bound
    corner_hi = torch.where(dw > 0, upper, lower)  # (10, 64): one corner per output unit
    assert torch.allclose((dw * corner_hi).sum(1) + db, hi, atol=1e-5)


def test_the_drift_term_is_zero_when_only_zero_width_dimensions_change():
    lower = torch.rand(8)
    upper = lower + torch.rand(8)
    upper[:3] = lower[:3]  # zero-width dimensions
    dw = torch.zeros(4, 8)
    dw[:, :3] = torch.randn(4, 3)
    lo, hi = interval_output_change(dw, torch.zeros(4), lower, upper)
    assert torch.allclose(lo, hi)  # the change is the same at every point of the box...
    dw_outside = dw.clone()
    dw_outside[:, :3] = 0
    dw_outside[0, 5] = 0.3  # ...while a change on a wide dimension opens the interval
    lo2, hi2 = interval_output_change(dw_outside, torch.zeros(4), lower, upper)
    assert (hi2 - lo2)[0] > 0 and torch.equal(lo2[1:], hi2[1:])
    lo3, hi3 = interval_output_change(dw - dw, torch.zeros(4), lower, upper)
    assert float(lo3.pow(2).mean() + hi3.pow(2).mean()) == 0.0


def test_boxes_are_percentiles_merged_by_union():
    values = torch.randn(1000, 6)
    assert torch.allclose(percentile(values, 5.0), torch.from_numpy(np.percentile(values.numpy(), 5.0, axis=0)).float(),
                          atol=1e-5)
    ia = IntervalActivation(6)
    ia.recorded = [values[:500], values[500:]]
    ia.merge_recorded(5.0, 95.0)
    first = (ia.lower.clone(), ia.upper.clone())
    ia.recorded = [values * 0.1]  # a narrower task: the union keeps the old box
    ia.merge_recorded(5.0, 95.0)
    assert torch.equal(ia.lower, first[0]) and torch.equal(ia.upper, first[1])
    ia.recorded = [values + 10]  # a shifted task: the box grows upwards only
    ia.merge_recorded(5.0, 95.0)
    assert torch.equal(ia.lower, first[0]) and (ia.upper > first[1]).all()


def _data(n_tasks: int = 3, scenario: str = "domain") -> ContinualDataModule:
    shift = {"tasks": "permutation"} if scenario == "domain" else {}  # domain: permuted digits, one head
    return ContinualDataModule(source="digits", scenario=scenario, n_tasks=n_tasks, batch_size=32,
                               train_samples_per_class=30, test_samples_per_class=10, **shift)


def _fit(model, data, tmp_path, **trainer):
    trainer = ContinualTrainer(default_root_dir=tmp_path, logger=False, **{**QUIET_TRAINER, **trainer})
    trainer.fit(model, datamodule=data)
    return trainer


MLP = {"backbone": "mlp", "backbone_kwargs": {"hidden_sizes": [32, 32], "activation": "leaky_relu"}}


def test_terms_at_the_first_step_of_a_task_and_boxes_after_each_task(tmp_path):
    model = Finetune(**MLP, lr=0.05, intact=InTActConfig())
    data = _data()
    model.bind_stream(data.stream)
    reg = model.intact
    assert reg.layer_names == ["backbone.net.3", "head"]  # second hidden linear + the shared head (domain)
    x, y, t = data.stream.tasks[0].train.__getitems__(list(range(16)))
    reg.begin_step()
    loss = model.training_loss((x, y, t))
    penalty = reg.penalty(model)
    assert not reg.active and reg.last_terms["int"] == 0 and penalty > 0  # task 0: only Var
    assert torch.isclose(penalty, 0.01 * reg.last_terms["var"])
    _fit(model, _data(1), tmp_path)  # one task: boxes recorded from its training data
    assert reg.active and all(w > 0 for w in reg.box_widths())
    model.on_task_start(data.stream.tasks[1])
    reg.begin_step()
    model.training_loss((x, y, t))
    reg.penalty(model)
    # the weights equal their frozen copies at the start of a task: no drift yet
    assert reg.last_terms["int"] == 0 and reg.last_terms["feat"] == 0
    assert loss.requires_grad


def test_a_domain_incremental_run_and_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Finetune(**MLP, optimizer="adam", lr=1e-3, intact=InTActConfig())  # the reference's optimiser
    trainer = _fit(model, _data(), tmp_path, epochs_per_task=2)
    assert all(v > 0 for v in (model.intact.last_terms["int"], model.intact.last_terms["feat"]))
    assert len(trainer.accuracy_matrix) == 3
    state = model.state_dict()
    assert {"intact.intervals.0.lower", "intact.intervals.1.upper", "intact.old_weight_0"} <= set(state)
    assert any(k.startswith("intact.old_network.") for k in state)
    fresh = Finetune(**MLP, optimizer="adam", lr=1e-3, intact=InTActConfig())
    fresh.bind_stream(_data().stream)
    fresh.load_state_dict(state)
    assert fresh.intact.active and fresh.intact.box_widths() == model.intact.box_widths()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("intact.") for n in trained)  # the frozen copy is not trained


@pytest.mark.parametrize("strategy", [ER, EWC])
def test_intact_rides_on_other_strategies(strategy, tmp_path):
    extra = {"buffer_size": 40} if strategy is ER else {"ewc_lambda": 10.0}
    model = strategy(**MLP, lr=0.05, intact={"lambda_var": 0.1, "layers": "hidden"}, **extra)
    trainer = _fit(model, _data(2, scenario="class"), tmp_path)
    # class-IL: the head's input is observed (Var, Align) but IntDrift leaves the head's weights alone
    assert model.intact.layer_names == ["backbone.net.3", "head"] and model.intact.drift == [True, False]
    assert model.intact.active
    assert all(0.0 <= a <= 1.0 for a in trainer.accuracy_matrix[-1])


def test_intact_from_the_cli(tmp_path):
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                   "--trainer.epochs_per_task=1", "--data.n_tasks=2", "--model=Finetune",
                   "--model.backbone_kwargs={hidden_sizes: [16, 16]}",
                   "--model.intact={lambda_var: 0.05, lambda_int: 2.0}"])
    assert cli.model.intact.config.lambda_int == 2.0 and cli.model.intact.active


def test_bad_intact_settings_are_refused():
    with pytest.raises(ValueError, match="lower_percentile"):
        InTActConfig(lower_percentile=50, upper_percentile=40)
    model = Finetune(backbone="mlp", backbone_kwargs={"hidden_sizes": [16]},
                     intact=InTActConfig(layers="hidden", observe_head_input=False))
    with pytest.raises(ValueError, match="no linear layer to protect"):
        model.bind_stream(_data(2, scenario="class").stream)


def test_class_incremental_var_and_align_include_the_head_input():
    """The reference applies Var and Align at every interval layer, the one in front of the head included;
    only IntDrift on the head is limited to domain-incremental streams."""
    torch.manual_seed(0)
    data = _data(2, scenario="class")
    x, y, t = data.stream.tasks[0].train.__getitems__(list(range(32)))
    variances = {}
    for observe in (False, True):
        torch.manual_seed(0)
        model = Finetune(**MLP, intact=InTActConfig(observe_head_input=observe))
        model.bind_stream(data.stream)
        reg = model.intact
        reg.begin_step()
        model.training_loss((x, y, t))
        reg.penalty(model)
        with torch.no_grad():
            hidden = model.backbone.net[:3](model.preprocess(x).flatten(1))  # input of backbone.net.3
            head_in = model.features(x)
        per_layer = [a.var(dim=0, unbiased=False).mean() for a in (hidden, head_in)]
        expected = per_layer[0] + (per_layer[1] if observe else 0)
        assert torch.isclose(reg.last_terms["var"], expected, rtol=1e-5)
        variances[observe] = float(reg.last_terms["var"])
    assert variances[True] > variances[False]
    # IntDrift: moving the head's weights costs nothing in class-IL, Align sees the head input's box
    model.intact.intervals[0].lower.fill_(-1e6)  # the hidden box covers everything: no Align from it
    model.intact.intervals[0].upper.fill_(1e6)
    model.intact.intervals[1].lower.fill_(10.0)
    model.intact.intervals[1].upper.fill_(11.0)
    for ia in model.intact.intervals:
        ia.has_box.fill_(True)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    model.intact.begin_step()
    model.training_loss((x, y, t))
    model.intact.penalty(model)
    assert model.intact.last_terms["int"] == 0 and model.intact.last_terms["align"] > 0
