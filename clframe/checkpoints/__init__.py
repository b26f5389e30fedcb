"""Checkpoints that are safe to load, written atomically and sealed, tied to the run that wrote them.

- ``io``: atomic sealed writes, integrity check, loading without running code (``SafeCheckpointIO``).
- ``identity``: the run's settings stored in each checkpoint; resuming a differently configured run is refused.
- ``preemption``: SIGTERM saves ``last.ckpt`` and exits with status 143.
"""

from clframe.checkpoints.identity import RunIdentityRecorder, check_same_run, newest_of_this_run, run_identity
from clframe.checkpoints.install import checkpoint_kwargs
from clframe.checkpoints.io import SafeCheckpointIO, load_checkpoint, verify_checkpoint, write_checkpoint
from clframe.checkpoints.preemption import PreemptionCheckpoint

__all__ = ["PreemptionCheckpoint", "checkpoint_kwargs", "RunIdentityRecorder", "SafeCheckpointIO", "check_same_run", "load_checkpoint",
           "newest_of_this_run", "run_identity", "verify_checkpoint", "write_checkpoint"]
