"""EWC's Fisher: the closed form for linear and convolution layers equals the per-sample-gradient path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clframe.data.stream import Task, TaskDataset
from clframe.strategies import EWC
from clframe.strategies.fisher import closed_form_layers


class SmallNet(nn.Module):
    """Conv (with BN: a per-sample fallback layer) -> tokens through a shared linear -> features."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.tokens = nn.Linear(3, 5)  # applied to every spatial position: a 3-d input
        self.out = nn.Linear(5, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))           # (B, 3, 4, 4)
        h = torch.tanh(self.tokens(h.flatten(2).transpose(1, 2)))  # (B, 16, 5)
        return self.out(h.mean(1))


def small_task(dtype: torch.dtype, n: int = 24) -> Task:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, 1, 8, 8), generator=gen).to(dtype)
    y = torch.randint(0, 4, (n,), generator=gen)
    data = TaskDataset(x, y, task_id=0)
    return Task(id=0, classes=(0, 1, 2, 3), train=data, test=data)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_closed_form_fisher_equals_the_per_sample_path(dtype, tol) -> None:
    torch.manual_seed(0)
    fishers = {}
    base = SmallNet()
    with torch.no_grad():  # BN statistics away from the defaults, so eval mode matters
        base.norm.running_mean.uniform_(-0.5, 0.5)
        base.norm.running_var.uniform_(0.5, 2.0)
    for method in ("per_sample", "closed_form"):
        torch.manual_seed(0)
        model = EWC(backbone=SmallNet(), num_classes=6, input_shape=[1, 8, 8], scenario="class",
                    fisher_method=method, fisher_batch_size=10)
        model.backbone.load_state_dict(base.state_dict())
        model.class_task.copy_(torch.tensor([0, 0, 0, 0, 1, 1]))  # classes 4, 5 masked in task 0
        model.to(dtype)
        fishers[method] = model.fisher_diagonal(small_task(dtype))
    assert set(closed_form_layers(model)) == {"backbone.conv", "backbone.tokens", "backbone.out", "head"}
    slow, fast = fishers["per_sample"], fishers["closed_form"]
    assert fast.dtype == dtype and fast.shape == slow.shape and float(slow.abs().max()) > 1e-3
    assert torch.allclose(fast, slow, rtol=tol, atol=tol), float((fast - slow).abs().max())


def test_a_layer_called_twice_falls_back_to_per_sample_gradients() -> None:
    class Twice(nn.Module):
        num_features = 4

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    x = torch.randn(12, 4, dtype=torch.float64)
    data = TaskDataset(x, torch.randint(0, 2, (12,)), task_id=0)
    task = Task(id=0, classes=(0, 1), train=data, test=data)
    out = {}
    for method in ("per_sample", "closed_form"):
        torch.manual_seed(0)
        model = EWC(backbone=Twice(), num_classes=2, input_shape=[4], scenario="domain", fisher_method=method)
        model.double()
        out[method] = model.fisher_diagonal(task)
    assert torch.allclose(out["closed_form"], out["per_sample"], rtol=1e-6, atol=1e-6)


def test_chunked_closed_forms_do_not_depend_on_the_chunk_size() -> None:
    from clframe.strategies.fisher import _conv_sq_grads, _linear_sq_grads

    torch.manual_seed(0)
    lin, conv = nn.Linear(4, 3), nn.Conv2d(2, 3, 3, padding=1)
    a, g, w = torch.randn(10, 5, 4), torch.randn(10, 5, 3), torch.rand(10)
    assert all(torch.allclose(x, y) for x, y in zip(_linear_sq_grads(lin, a, g, w, chunk=3),
                                                    _linear_sq_grads(lin, a, g, w, chunk=100), strict=True))
    a, g = torch.randn(10, 2, 5, 5), torch.randn(10, 3, 5, 5)
    assert all(torch.allclose(x, y) for x, y in zip(_conv_sq_grads(conv, a, g, w, chunk=3),
                                                    _conv_sq_grads(conv, a, g, w, chunk=100), strict=True))
