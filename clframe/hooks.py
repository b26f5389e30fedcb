"""Lightning's per-step dispatch without its no-op work, inside Lightning.

Every training step Lightning calls about 25 hooks on the module and the callbacks, most of them the base
classes' empty methods, and wraps each call in a profiler context and two ``_current_fx_name`` assignments
(``nn.Module.__setattr__``, a few microseconds each). With a small model that is a visible share of a step
(``benchmarks/perf.py overhead``). What is skipped here has no effect by construction:

* :class:`PassThrough`: the default profiler (Lightning's ``PassThroughProfiler`` records nothing either),
  its ``profile`` returning one shared empty context instead of building a generator context per call.
* :func:`skipping_noop_hooks`: while the stream runs, the per-step training hooks that the module or a callback
  inherits unchanged from ``LightningModule`` / ``Callback`` (empty methods whose result Lightning ignores)
  are shadowed by ``None`` on the instance. Lightning's dispatch skips an attribute that is not callable,
  so those calls (and their profiler contexts and bookkeeping) disappear; an overridden hook runs as before.
  The shadows are removed when the stream ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.profilers import PassThroughProfiler

PER_BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                   "on_before_optimizer_step", "on_before_zero_grad")
"""Hooks called every training step whose base implementations do nothing and whose results Lightning ignores
(``on_train_batch_start`` may return -1 to end the epoch; ``None`` is what the base method returns). The
evaluation batch hooks are left alone: Lightning reads their signatures (``dataloader_idx``), and an
evaluation has few batches."""

_NULL = contextlib.nullcontext()


class PassThrough(PassThroughProfiler):
    """Lightning's pass-through profiler with a shared empty context: no generator per profiled call."""

    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return _NULL


def _shadow(obj: Any, base: type, shadowed: list[tuple[Any, str]]) -> None:
    if not hasattr(obj, "__dict__"):  # a slotted object: nothing to shadow with
        return
    for name in PER_BATCH_HOOKS:
        if name in vars(obj) or not hasattr(base, name):
            continue  # set on the instance by its owner: leave it alone
        if getattr(type(obj), name, None) is getattr(base, name):
            object.__setattr__(obj, name, None)
            shadowed.append((obj, name))


@contextlib.contextmanager
def skipping_noop_hooks(trainer: L.Trainer, module: L.LightningModule) -> Iterator[None]:
    """Shadow the module's and the callbacks' inherited empty per-batch hooks while the block runs."""
    shadowed: list[tuple[Any, str]] = []
    _shadow(module, L.LightningModule, shadowed)
    for callback in trainer.callbacks:
        _shadow(callback, L.Callback, shadowed)
    try:
        yield
    finally:
        for obj, name in shadowed:
            if vars(obj).get(name, 0) is None:
                del vars(obj)[name]
