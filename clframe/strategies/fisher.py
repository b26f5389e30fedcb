"""Diagonal Fisher information without per-sample gradients of the whole network.

EWC needs ``F_i = 1/N sum_n w_n (d log p(y_n|x_n) / d theta_i)^2`` with ``w_n = p(y_n|x_n)`` (the estimator
of Mammoth's ``ewc_on``). Materialising every sample's gradient of every parameter (``torch.func.vmap``)
costs a full copy of the network per sample. For a linear layer ``o = W a + b`` the sample's gradient is
the outer product ``g_n a_n^T`` of its output gradient and its input, so the weighted sum of squares is
``(w * g^2)^T a^2``: one matrix product on quantities a single backward pass already has. A 2-d convolution
is a linear layer on the unfolded input patches, so the same holds there per output position, summed over
positions before squaring. Other layer types (norm layers, embeddings, custom layers) keep the exact
per-sample path; so does a layer called more than once per forward, where the closed form does not apply.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F


def closed_form_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Layers (exactly ``nn.Linear`` or a zero-padded, ungrouped ``nn.Conv2d``) whose trainable weight and
    bias take the closed form; subclasses are left out (their forward may differ, e.g. masked weights)."""
    layers = {}
    for name, m in module.named_modules():
        if type(m) is nn.Conv2d and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            continue
        if type(m) in (nn.Linear, nn.Conv2d) and m.weight.requires_grad:
            layers[name] = m
    return layers


@contextmanager
def tapped(layers: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Record every call's (input, output) of ``layers`` while the block runs."""
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    handles = [layer.register_forward_hook(lambda _m, args, out, name=name: records[name].append((args[0], out)))
               for name, layer in layers.items()]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def sample_log_likelihood(module: nn.Module, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
    """``log p(y_n | x_n)`` per sample, under the module's own (scenario-masked) logits."""
    return F.log_softmax(module(x, t), dim=1).gather(1, y.unsqueeze(1)).squeeze(1)


def _linear_sq_grads(layer: nn.Linear, a: Tensor, g: Tensor, w: Tensor, chunk: int = 32) -> tuple[Tensor, Tensor]:
    if a.dim() == 2:
        wg2 = w.unsqueeze(1) * g.pow(2)
        return wg2.t() @ a.pow(2), wg2.sum(0)
    a, g = a.flatten(1, -2), g.flatten(1, -2)  # (B, positions, features): sum over positions, then square
    weight = torch.zeros_like(layer.weight, dtype=g.dtype)
    for s in range(0, a.shape[0], chunk):  # a chunk's per-sample gradients of this one layer at a time
        per_sample = torch.einsum("bpo,bpi->boi", g[s:s + chunk], a[s:s + chunk])
        weight += (w[s:s + chunk].view(-1, 1, 1) * per_sample.pow(2)).sum(0)
    return weight, (w.unsqueeze(1) * g.sum(1).pow(2)).sum(0)


def _conv_sq_grads(layer: nn.Conv2d, a: Tensor, g: Tensor, w: Tensor, chunk: int = 32) -> tuple[Tensor, Tensor]:
    weight, bias = torch.zeros_like(layer.weight), torch.zeros(layer.out_channels, dtype=g.dtype, device=g.device)
    for s in range(0, a.shape[0], chunk):  # a chunk's per-sample weight gradients of this one layer at a time
        cols = F.unfold(a[s:s + chunk], layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        gs, ws = g[s:s + chunk].flatten(2), w[s:s + chunk]
        per_sample = torch.bmm(gs, cols.transpose(1, 2))  # (b, out, in * kh * kw)
        weight += (ws.view(-1, 1, 1) * per_sample.pow(2)).sum(0).view_as(weight)
        bias += (ws.unsqueeze(1) * gs.sum(2).pow(2)).sum(0)
    return weight, bias


def per_sample_sq_grads(module: nn.Module, names: list[str], x: Tensor, y: Tensor, t: Tensor) -> dict[str, Tensor]:
    """``sum_n w_n g_n^2`` for the parameters ``names`` from per-sample gradients (``torch.func``), the exact
    path for any layer type."""
    fixed = {n: p.detach() for n, p in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def log_lik(p: dict[str, Tensor], xs: Tensor, ys: Tensor, ts: Tensor) -> Tensor:
        logits = functional_call(module, ({**fixed, **p}, buffers), (xs.unsqueeze(0), ts.unsqueeze(0)))
        return F.log_softmax(logits, dim=1)[0].gather(0, ys.unsqueeze(0)).squeeze(0)

    params = {n: fixed[n] for n in names}
    with torch.enable_grad():
        grads = vmap(grad(log_lik), in_dims=(None, 0, 0, 0))(params, x, y, t)
    lik = vmap(log_lik, in_dims=(None, 0, 0, 0))(params, x, y, t).exp()
    return {n: (lik.view(-1, *[1] * (grads[n].dim() - 1)) * grads[n].pow(2)).sum(0) for n in names}


def fisher_sq_grads(module: nn.Module, names: list[str], x: Tensor, y: Tensor, t: Tensor,
                    closed_form: bool = True) -> dict[str, Tensor]:
    """``sum_n p(y_n|x_n) (d log p(y_n|x_n) / d theta)^2`` over one batch for every parameter in ``names``.

    ``module`` must be in eval mode (samples independent of each other). With ``closed_form`` the
    linear and convolution layers take the closed form and only the other parameters go per sample.
    """
    layers = closed_form_layers(module) if closed_form else {}
    wanted = set(names)
    layers = {n: m for n, m in layers.items()
              if all(f"{n}.{p}" in wanted for p, q in m.named_parameters(recurse=False) if q.requires_grad)}
    covered = {f"{n}.{p}" for n, m in layers.items() for p, q in m.named_parameters(recurse=False) if q.requires_grad}
    out: dict[str, Tensor] = {}
    if layers:
        with torch.enable_grad(), tapped(layers) as records:
            ll = sample_log_likelihood(module, x, y, t)
            if any(len(r) != 1 for r in records.values()):  # a layer used twice: its gradient is a sum
                return per_sample_sq_grads(module, names, x, y, t)
            outputs = [records[n][0][1] for n in layers]
            grads = torch.autograd.grad(ll.sum(), outputs, allow_unused=True)
        w = ll.detach().exp()
        for (name, layer), g in zip(layers.items(), grads, strict=True):
            a = records[name][0][0].detach()
            if g is None:
                continue
            sq = _linear_sq_grads(layer, a, g, w) if isinstance(layer, nn.Linear) else _conv_sq_grads(layer, a, g, w)
            out[f"{name}.weight"] = sq[0]
            if layer.bias is not None and layer.bias.requires_grad:
                out[f"{name}.bias"] = sq[1]
    rest = [n for n in names if n not in covered]
    if rest:
        out.update(per_sample_sq_grads(module, rest, x, y, t))
    params = dict(module.named_parameters())
    return {n: out.get(n, torch.zeros_like(params[n])) for n in names}
