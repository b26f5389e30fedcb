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
* :func:`skipping_noop_hooks` also, while the stream runs: reads ``training_step``'s signature once instead of
  every step (Lightning inspects it per batch to decide whether to pass ``batch_idx``), and, when neither the
  module nor the data module overrides ``on_before_batch_transfer``, ``transfer_batch_to_device`` or
  ``on_after_batch_transfer``, calls what the base hooks do (return the batch; ``move_data_to_device``)
  directly instead of resolving each of the three hooks per batch through ``is_overridden`` and the hook
  dispatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

PER_BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                   "on_before_optimizer_step", "on_before_zero_grad")
"""Hooks called every training step whose base implementations do nothing and whose results Lightning ignores
(``on_train_batch_start`` may return -1 to end the epoch; ``None`` is what the base method returns). The
evaluation batch hooks are left alone: Lightning reads their signatures (``dataloader_idx``), and an
evaluation has few batches."""

BATCH_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
"""The per-batch data hooks a module or a data module may override (Lightning then calls the override)."""

_NULL = contextlib.nullcontext()


class PassThrough(PassThroughProfiler):
    """Lightning's pass-through profiler with a shared empty context: no generator per profiled call."""

    def profile(self, action_name: str) -> contextlib.nullcontext:  # type: ignore[override]
        return _NULL


Shadows = list[tuple[Any, str, Any]]
"""What was set on which instance: ``(object, attribute, value)``, removed again at the end."""


def _set_shadow(obj: Any, name: str, value: Any, shadowed: Shadows) -> None:
    object.__setattr__(obj, name, value)
    shadowed.append((obj, name, value))


def _shadow(obj: Any, base: type, shadowed: Shadows) -> None:
    if not hasattr(obj, "__dict__"):  # a slotted object: nothing to shadow with
        return
    for name in PER_BATCH_HOOKS:
        if name in vars(obj) or not hasattr(base, name):
            continue  # set on the instance by its owner: leave it alone
        if getattr(type(obj), name, None) is getattr(base, name):
            _set_shadow(obj, name, None, shadowed)


def _shadow_step_signature(trainer: L.Trainer, module: L.LightningModule, shadowed: Shadows) -> None:
    """The training loop's per-batch ``_build_kwargs`` with ``training_step``'s signature read once."""
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if epoch_loop is None or not hasattr(type(epoch_loop), "_build_kwargs") or "_build_kwargs" in vars(epoch_loop):
        return
    takes_batch_idx = is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)

    def build_kwargs(kwargs: dict, batch: Any, batch_idx: int) -> dict:
        kwargs["batch"] = batch
        if takes_batch_idx:
            kwargs["batch_idx"] = batch_idx
        return kwargs

    _set_shadow(epoch_loop, "_build_kwargs", build_kwargs, shadowed)


def _shadow_batch_transfer(module: L.LightningModule, datamodule: L.LightningDataModule | None,
                           shadowed: Shadows) -> None:
    """Call the base batch-transfer hooks' work directly when nobody overrides them (see the module doc)."""
    owners = [module] + ([datamodule] if datamodule is not None else [])
    if any(is_overridden(name, owner) for name in BATCH_TRANSFER_HOOKS for owner in owners):
        return
    if any(name in vars(module) for name in ("_on_before_batch_transfer", "_apply_batch_transfer_handler")):
        return

    def on_before_batch_transfer(batch: Any, dataloader_idx: int = 0) -> Any:
        return batch

    def apply_batch_transfer_handler(batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
        return move_data_to_device(batch, device or module.device)

    _set_shadow(module, "_on_before_batch_transfer", on_before_batch_transfer, shadowed)
    _set_shadow(module, "_apply_batch_transfer_handler", apply_batch_transfer_handler, shadowed)


@contextlib.contextmanager
def skipping_noop_hooks(trainer: L.Trainer, module: L.LightningModule,
                        datamodule: L.LightningDataModule | None = None) -> Iterator[None]:
    """Shadow the module's and the callbacks' inherited empty per-batch hooks, and the per-batch signature and
    batch-transfer lookups, while the block runs (see the module doc)."""
    shadowed: Shadows = []
    _shadow(module, L.LightningModule, shadowed)
    for callback in trainer.callbacks:
        _shadow(callback, L.Callback, shadowed)
    _shadow_step_signature(trainer, module, shadowed)
    _shadow_batch_transfer(module, datamodule, shadowed)
    try:
        yield
    finally:
        for obj, name, value in shadowed:
            if vars(obj).get(name, _NULL) is value:
                del vars(obj)[name]
