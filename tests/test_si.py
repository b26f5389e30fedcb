"""Synaptic Intelligence: the path integral and importance against a computation by hand on a tiny
linear problem (plain SGD, so every step's change is -lr * gradient), both gradient conventions,
the clipping of Omega, and an exact resume from a checkpoint written mid-task."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clframe.errors import ConfigError
from clframe.strategies import SI
from tests.helpers.resume import fit_saving_every_step

LR, C, XI = 0.5, 2.0, 0.1


class Identity(nn.Module):
    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _tiny(**kwargs) -> SI:
    torch.manual_seed(0)
    return SI(backbone=Identity(), num_classes=2, input_shape=[3], scenario="domain", optimizer="sgd", lr=LR,
              si_c=C, xi=XI, **kwargs)


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g), torch.zeros(4, dtype=torch.long))
            for _ in range(n)]


def _train(model: SI, batches) -> None:
    """What Lightning does per step: closure (zero_grad, loss, backward, on_before_optimizer_step), step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def closure(batch):
        opt.zero_grad()
        loss = model.training_loss(batch)
        loss.backward()
        model.on_before_optimizer_step(opt)
        return loss

    for i, batch in enumerate(batches):
        model.optimizer_step(0, i, opt, lambda b=batch: closure(b))


def _by_hand(batches_per_task, importance_grad: str, nonnegative: bool):
    """Omega after each task, from the formulas alone (the head is the only layer: theta = (W, b))."""
    torch.manual_seed(0)
    head = nn.Linear(3, 2)
    w, b = head.weight.detach().clone(), head.bias.detach().clone()
    omega_w, omega_b = torch.zeros_like(w), torch.zeros_like(b)
    start_w, start_b = w.clone(), b.clone()
    omegas = []
    for t, batches in enumerate(batches_per_task):
        path_w, path_b = torch.zeros_like(w), torch.zeros_like(b)
        for x, y, _ in batches:
            wv, bv = w.clone().requires_grad_(), b.clone().requires_grad_()
            ce = F.cross_entropy(x @ wv.T + bv, y)
            gw, gb = torch.autograd.grad(ce, (wv, bv))
            # the surrogate c * Omega * (theta - theta*)^2 and its gradient 2 c Omega (theta - theta*)
            sw, sb = (2 * C * omega_w * (w - start_w), 2 * C * omega_b * (b - start_b)) if t else (0 * w, 0 * b)
            tw, tb = gw + sw, gb + sb  # the gradient of the whole loss, which SGD follows
            dw, db = -LR * tw, -LR * tb
            used_w, used_b = (gw, gb) if importance_grad == "task" else (tw, tb)
            path_w -= used_w * dw
            path_b -= used_b * db
            w, b = w + dw, b + db
        omega_w = omega_w + path_w / ((w - start_w) ** 2 + XI)
        omega_b = omega_b + path_b / ((b - start_b) ** 2 + XI)
        if nonnegative:
            omega_w, omega_b = omega_w.clamp(min=0), omega_b.clamp(min=0)
        start_w, start_b = w.clone(), b.clone()
        omegas.append(torch.cat([omega_w.flatten(), omega_b]))
    return omegas, torch.cat([w.flatten(), b])


@pytest.mark.parametrize(("importance_grad", "nonnegative"), [("task", True), ("total", False), ("task", False)])
def test_importance_matches_the_path_integral_by_hand(importance_grad: str, nonnegative: bool) -> None:
    tasks = [_batches(5, seed=1), _batches(5, seed=2)]
    expected, final = _by_hand(tasks, importance_grad, nonnegative)
    model = _tiny(importance_grad=importance_grad, nonnegative_omega=nonnegative)
    for t, batches in enumerate(tasks):
        model.on_task_start(SimpleNamespace(id=t))
        _train(model, batches)
        model.on_task_end(SimpleNamespace(id=t))
        torch.testing.assert_close(model.si_omega, expected[t], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.si_anchor, final, rtol=1e-5, atol=1e-6)
    assert model.si_path.abs().sum() == 0  # reset for the next task


def test_the_two_conventions_differ_once_the_surrogate_acts() -> None:
    tasks = [_batches(5, seed=1), _batches(5, seed=2)]
    task_grad, _ = _by_hand(tasks, "task", False)
    total_grad, _ = _by_hand(tasks, "total", False)
    torch.testing.assert_close(task_grad[0], total_grad[0])  # no surrogate during the first task
    assert not torch.allclose(task_grad[1], total_grad[1])


def test_surrogate_loss_is_c_omega_squared_distance() -> None:
    model = _tiny()
    model.on_task_start(SimpleNamespace(id=0))
    assert model.surrogate() == 0
    model.si_omega = torch.arange(8, dtype=torch.float)
    model.si_anchor = model._flat_params() - 1.0
    assert model.surrogate().item() == pytest.approx(sum(range(8)))
    x, y, t = _batches(1, seed=3)[0]
    ce = F.cross_entropy(model(x, t), y)
    assert model.training_loss((x, y, t)).item() == pytest.approx(ce.item() + C * sum(range(8)), rel=1e-6)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="xi must be positive"):
        SI(xi=0.0)
    with pytest.raises(ConfigError, match="si_c"):
        SI(si_c=-1.0)


def _run(root, ckpt_path=None):
    return fit_saving_every_step(
        root, lambda: SI(si_c=1.0, backbone_kwargs={"hidden_sizes": [32]}, optimizer="adam", lr=1e-3),
        {"source": "digits", "n_tasks": 3, "batch_size": 64, "class_order": list(range(6))}, ckpt_path, epochs_per_task=1)


def test_resume_mid_task_is_exact(tmp_path) -> None:
    full_trainer, full = _run(tmp_path / "full")
    assert full.si_omega.numel() and full.si_omega.abs().sum() > 0
    per_task = full_trainer.global_step // 3
    step = per_task + 2  # inside task 1: Omega of task 0 and a partial path integral are in the checkpoint
    trainer, resumed = _run(tmp_path / "resumed", tmp_path / "full" / f"step={step}.ckpt")
    np.testing.assert_array_equal(trainer.accuracy_matrix, full_trainer.accuracy_matrix)
    for name in ("si_omega", "si_anchor", "si_path"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
