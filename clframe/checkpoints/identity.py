"""What run a checkpoint belongs to, so a resume continues the same run or is refused.

Every checkpoint records its run's identity: the strategy class, the strategy's and the data
module's hyperparameters, and the trainer's per-task budget (``clframe_run``, a JSON string, so it
loads under ``weights_only=True``). On resume the identity of the run being started is compared with
the checkpoint's, key by key; any difference is refused with the list of differences, unless the
user names the keys allowed to change (``allow_changed``). ``--ckpt_path last`` uses the same
identity to pick, among the ``last*.ckpt`` files it finds, the newest one written by this run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L

from clframe.checkpoints.io import load_checkpoint
from clframe.errors import CheckpointError

KEY = "clframe_run"
# Where data is read from and how fast: changing them does not change the run.
HARMLESS = ("data.data_root", "data.download", "data.num_workers", "data.device_resident")
_SKIP = ("_instantiator", "_class_path")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            if k not in _SKIP:
                _flatten(f"{prefix}.{k}", v, out)
        return
    out[prefix] = json.loads(json.dumps(value, default=str))  # lists for tuples, str for paths and objects


class RunIdentity(dict):
    """A run's identity, plus the default value of every option it has (``defaults``).

    The defaults let a checkpoint written before an option existed resume into a run that leaves the
    option at its default: the key is absent from the checkpoint, and the run behaves as it did then.
    """

    defaults: dict[str, Any]


def _option_defaults(prefix: str, cls: type, out: dict[str, Any]) -> None:
    """Flattened defaults of every ``__init__`` parameter along ``cls``'s class hierarchy."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.default is not inspect.Parameter.empty and f"{prefix}.{p.name}" not in out:
                try:
                    _flatten(f"{prefix}.{p.name}", p.default, out)
                except (TypeError, ValueError):
                    continue


def run_identity(trainer: Any, model: L.LightningModule, datamodule: L.LightningDataModule | None) -> RunIdentity:
    """The settings that make a run this run, as ``{"model.lr": 0.05, ...}``."""
    out = RunIdentity({"model.class_path": f"{type(model).__module__}.{type(model).__qualname__}"})
    out.defaults = {}
    _flatten("model", dict(model.hparams), out)
    _option_defaults("model", type(model), out.defaults)
    if datamodule is not None:
        _flatten("data", dict(datamodule.hparams), out)
        _option_defaults("data", type(datamodule), out.defaults)
    out["trainer.epochs_per_task"] = getattr(trainer, "epochs_per_task", None)
    out["trainer.steps_per_task"] = getattr(trainer, "steps_per_task", None)
    return out


def differences(saved: Mapping[str, Any], now: Mapping[str, Any], allow: Iterable[str] = ()) -> list[str]:
    """``"key: checkpoint -> now"`` for every key whose value differs, except harmless or allowed keys, and
    options newer than the checkpoint that the run leaves at their default."""
    allowed = (*HARMLESS, *allow)
    defaults = getattr(now, "defaults", {})
    other_class = saved.get("model.class_path") != now.get("model.class_path")
    out = []
    for key in sorted(set(saved) | set(now)):
        if other_class and key.startswith("model.") and key != "model.class_path":
            continue  # another strategy has other options: the class is the difference to report
        if any(key == a or key.startswith(a + ".") for a in allowed):
            continue
        if key not in saved and key in defaults and now.get(key) == defaults[key]:
            continue  # an option added after the checkpoint was written, left at its default
        old, new = saved.get(key, "<unset>"), now.get(key, "<unset>")
        if old != new:
            out.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return out


def saved_identity(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The identity stored in a loaded checkpoint (None for checkpoints written before it was recorded)."""
    raw = checkpoint.get(KEY)
    return json.loads(raw) if isinstance(raw, str) else None


def check_same_run(path: str | Path, checkpoint: Mapping[str, Any], now: Mapping[str, Any],
                   allow: Sequence[str] = ()) -> None:
    """Refuse to resume ``checkpoint`` into a run configured differently, listing every difference."""
    saved = saved_identity(checkpoint)
    if saved is None:
        return
    diff = differences(saved, now, allow)
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was written by a run configured differently, so resuming would not continue the "
            f"same run. Differences (checkpoint -> now): {'; '.join(diff)}. Resume with the checkpoint's settings "
            "(the run's config.yaml) or start again without --ckpt_path; for a change you mean to make, name the keys: "
            f"--trainer.allow_changed=[{', '.join(d.split(':')[0] for d in diff)}] "
            "(Python: ContinualTrainer(allow_changed=[...]))."
        )


def newest_of_this_run(candidates: Sequence[Path], now: Mapping[str, Any], allow: Sequence[str] = (),
                       trust: bool = False) -> Path:
    """The newest candidate written by a run with this identity; the newest overall when none is (so that
    the caller's check names the differences)."""
    by_age = sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True)
    for path in by_age:
        try:
            saved = saved_identity(load_checkpoint(path, trust=trust, mmap=True))
        except CheckpointError:
            continue
        if saved is None or not differences(saved, now, allow):
            return path
    return by_age[0]


class RunIdentityRecorder(L.Callback):
    """Writes the run's identity into every checkpoint (``checkpoint["clframe_run"]``)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = json.dumps(run_identity(trainer, pl_module, trainer.datamodule), sort_keys=True)
