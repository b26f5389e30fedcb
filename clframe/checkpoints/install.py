"""The checkpoint machinery ContinualTrainer installs by default."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins import CheckpointIO

from clframe.checkpoints.identity import RunIdentityRecorder
from clframe.checkpoints.io import SafeCheckpointIO
from clframe.checkpoints.preemption import PreemptionCheckpoint


def checkpoint_kwargs(kwargs: dict[str, Any], trust: bool = False) -> dict[str, Any]:
    """``Trainer`` keyword arguments with clframe's checkpoint I/O (unless the user gave a CheckpointIO or a
    strategy object, which brings its own) and the identity and SIGTERM callbacks added."""
    plugins = kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if isinstance(kwargs.get("strategy", "auto"), str) and not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(SafeCheckpointIO(trust=trust))
    callbacks = [*kwargs.get("callbacks", []), RunIdentityRecorder(), PreemptionCheckpoint()]
    return {"plugins": plugins, "callbacks": callbacks}
