"""In-process kill/resume checks: save checkpoints at chosen points of a run, resume a fresh run from
each one, and require the resumed run to match the uninterrupted one bit for bit.

A checkpoint taken in-process at step N holds exactly what a run killed after that save would find on
disk, so resuming from it reproduces a crash at any later moment before the next save. This is much
cheaper than killing subprocesses, so the kill/resume matrix uses it (tests/test_resume_matrix.py).

Besides the final checkpoint (weights, strategy state, optimizer and loop state, callbacks) and the
accuracy matrix, :class:`StateProbe` fingerprints every tensor, array and number a strategy holds at
the start of every training step, *including plain attributes outside ``state_dict``*, so strategy
state that a checkpoint forgets shows up at the first step where it differs, with its name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from clframe import ContinualDataModule, ContinualTrainer
from clframe.callbacks.base import ContinualCallback
from clframe.data.stream import Task
from clframe.strategies.base import ContinualModule

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}

# Attributes that are not training state: Lightning's bookkeeping and per-evaluation scratch values
# (rebuilt by every validation/test run before they are read).
# "_scratch", "_ones_kept": the replay buffer's work tensors (contents never read before written; made lazily)
_NOT_STATE = {"_scratch", "_ones_kept", "training", "_trainer", "_hparams", "_hparams_initial", "_hparams_name", "_metric_attributes",
              "_current_fx_name", "_param_requires_grad_state", "_device", "_dtype", "_example_input_array",
              "_compiler_ctx", "_fabric", "_fabric_optimizers", "_log_hyperparams", "_strict_loading",
              "_automatic_optimization", "_device_mesh", "_register_load_state_dict_pre_hook", "_backbone_spec",
              "_eval_counts", "eval_accuracy", "_jit_is_scripting", "_truncated_bptt_steps", "_running_torchscript",
              "_prepare_data_per_node", "_ddp_params_and_buffers_to_ignore",
              "allow_zero_length_dataloader_with_multiple_devices", "_log_on_step",
              # per-step scratch and caches, recomputed from checkpointed state before they are read:
              "_batch_idx",  # iCaRL, GeRe: the loop's batch index, set at the start of every training step
              "_schedule",  # iCaRL: the exemplar-to-batch schedule, a pure function of (seed, task, epoch, memory)
              "last_terms",  # InTAct: the last step's loss terms, kept for logging
              "_live_cache", "_stack_cache",  # masked layers: masks computed from the scores, keyed by their version
              # counts and results of the latest evaluation, rebuilt by every test run before they are read
              "_infer_counts", "_select_counts", "_extra_counts", "extra_accuracy",
              "_task_accuracy", "_confusion", "eval_confusion",  # the metrics of every evaluation pass
              "_last_loss",  # HyperInterval: this step's loss, set in training_step and read after its update
              # supermasks: the frozen weights' values, taken when every fit starts; only entries that no
              # step may change are read, and those equal the checkpointed weights
              "_editable",
              }


def _digest(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha1(raw).hexdigest()
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{value.shape}:" + hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
    if isinstance(value, torch.Generator):
        return _digest(value.get_state())
    if isinstance(value, bool | int | str) or value is None:
        return repr(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return None


def _collect(prefix: str, value: Any, out: dict[str, str], depth: int = 0) -> None:
    digest = _digest(value)
    if digest is not None:
        out[prefix] = digest
    elif depth < 4 and isinstance(value, list | tuple):
        out[prefix] = f"len {len(value)}"
        for i, v in enumerate(value):
            _collect(f"{prefix}[{i}]", v, out, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for k, v in value.items():
            _collect(f"{prefix}[{k!r}]", v, out, depth + 1)


def strategy_state(module: torch.nn.Module) -> dict[str, str]:
    """Fingerprints of everything a strategy holds: its ``state_dict`` and every plain attribute of
    every submodule (tensors, arrays, generators, numbers, and lists/dicts of them)."""
    out: dict[str, str] = {}
    for key, value in module.state_dict().items():
        _collect(f"state_dict.{key}", value, out)
    for name, sub in module.named_modules():
        for key, value in vars(sub).items():
            if key in _NOT_STATE or key.startswith("_forward") or key.endswith("_hooks") or key in (
                    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks", "_version"):
                continue
            _collect(f"{name or 'self'}.{key}", value, out)
        for pname, p in sub.named_parameters(recurse=False):  # requires_grad decides what a task trains
            out[f"{name or 'self'}.{pname}.requires_grad"] = repr(p.requires_grad)
    return out


class StateProbe(ContinualCallback):
    """Records :func:`strategy_state` at the start of every training step and after every task's end hooks."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.records[f"step {trainer.global_step} start"] = strategy_state(pl_module)

    def on_task_end(self, trainer, module: ContinualModule, task: Task) -> None:
        self.records[f"task {task.id} end"] = strategy_state(module)


@dataclass
class Case:
    """One strategy on one small stream."""

    make_model: Callable[[], ContinualModule]
    data: dict[str, Any]
    trainer: dict[str, Any] = field(default_factory=lambda: {"epochs_per_task": 2})
    callbacks: Callable[[], list[L.Callback]] = list


@dataclass
class Run:
    trainer: ContinualTrainer
    model: ContinualModule
    probe: StateProbe
    checkpoint: dict[str, Any]


def run_case(case: Case, root: Path, ckpt_path: Path | None = None, save: L.Callback | None = None, seed: int = 0) -> Run:
    """One whole stream; with ``ckpt_path``, resumed from that checkpoint; ``save`` writes the checkpoints."""
    L.seed_everything(seed)
    data = ContinualDataModule(**case.data)
    model = case.make_model()
    probe = StateProbe()
    callbacks = [*case.callbacks(), probe] + ([save] if save is not None else [])
    trainer = ContinualTrainer(default_root_dir=root, callbacks=callbacks,
                               **{"enable_checkpointing": False, **QUIET, **case.trainer})
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return Run(trainer, model, probe, trainer._checkpoint_connector.dump_checkpoint())


# Checkpoint entries that legitimately differ between a resumed and an uninterrupted run: the version, and
# the counters of the stand-alone evaluation loops (``trainer.test`` after every task; they steer nothing).
_CKPT_SKIP = ("pytorch-lightning_version", "loops.test_loop", "loops.validate_loop", "loops.predict_loop")


def differences(a: Any, b: Any, where: str, out: list[str]) -> list[str]:
    """Where two checkpoint-like values (tensors, arrays, containers, NaN-aware floats) differ, bit for bit."""
    if where.split("[")[0] in _CKPT_SKIP or where in _CKPT_SKIP:
        return out
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and (
            torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) if a.is_floating_point() else torch.equal(a, b))
        if not same:
            out.append(where)
    elif isinstance(a, np.ndarray):
        if not (isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")):
            out.append(where)
    elif isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            out.append(f"{where} (keys {set(a) ^ set(b) if isinstance(b, dict) else type(b)})")
        else:
            for k in a:
                differences(a[k], b[k], f"{where}.{k}" if isinstance(k, str) else f"{where}[{k!r}]", out)
    elif isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            out.append(f"{where} (length)")
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                differences(x, y, f"{where}[{i}]", out)
    elif isinstance(a, float) and math.isnan(a):
        if not (isinstance(b, float) and math.isnan(b)):
            out.append(f"{where}: nan != {b!r}")
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")
    return out


def assert_resumed_exactly(full: Run, resumed: Run, label: str) -> None:
    """The resumed run ends where the uninterrupted one does: accuracy matrix, every checkpoint entry
    (weights, strategy state, optimizer, loops, callbacks), and every probed attribute at every step it ran."""
    diff: list[str] = []
    differences(full.trainer.continual_results, resumed.trainer.continual_results, "results", diff)
    for key in full.checkpoint.keys() | resumed.checkpoint.keys():
        differences(full.checkpoint.get(key), resumed.checkpoint.get(key), key, diff)
    for point, state in resumed.probe.records.items():
        expected = full.probe.records.get(point, {})
        keys = sorted(k for k in expected.keys() | state.keys() if expected.get(k) != state.get(k))
        if keys:
            diff.append(f"state at {point} (first point the resumed run differs): {keys[:10]}")
            break
    assert not diff, f"{label}: the resumed run differs from the uninterrupted one in " + "; ".join(diff[:15])


# ------------------------------------------------------------------ the per-strategy resume tests' shape
def fit_saving_every_step(root: Path, make_model: Callable[[], ContinualModule], data: dict[str, Any],
                          ckpt_path: Path | None = None, epochs_per_task: int = 2,
                          ) -> tuple[ContinualTrainer, ContinualModule]:
    """A seeded stream that writes ``step=N.ckpt`` into ``root`` after every training step; with
    ``ckpt_path``, the same stream resumed from that checkpoint."""
    L.seed_everything(0)
    datamodule = ContinualDataModule(**data)
    model = make_model()
    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = ContinualTrainer(epochs_per_task=epochs_per_task, callbacks=[ckpt], default_root_dir=root,
                               **{**QUIET, "enable_checkpointing": True})
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, model


def assert_same_matrix_and_weights(full: tuple[ContinualTrainer, ContinualModule],
                                   resumed: tuple[ContinualTrainer, ContinualModule], label: object = "") -> None:
    """The resumed run's accuracy matrix and every tensor of its ``state_dict`` equal the uninterrupted run's."""
    (full_trainer, full_model), (trainer, model) = full, resumed
    np.testing.assert_array_equal(trainer.accuracy_matrix, full_trainer.accuracy_matrix, err_msg=str(label))
    for (name, a), (_, b) in zip(full_model.state_dict().items(), model.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), (label, name)
