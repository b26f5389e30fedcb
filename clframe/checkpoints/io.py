"""Reading and writing checkpoint files safely.

Writing: the checkpoint is written to a hidden file in the destination folder, sealed with a SHA-256
of its bytes, flushed to disk and renamed over the old file. A rename within one folder is atomic,
so a crash at any moment leaves either the previous complete checkpoint or the new one, never a
half-written file; staging in the destination folder also means a full ``$TMPDIR`` does not matter.

The seal lives in the zip archive's comment (the last bytes of every ``torch.save`` file), so a
sealed checkpoint is still an ordinary file for ``torch.load`` and Lightning. Reading recomputes the
hash and refuses a file whose bytes changed (bit flips, truncation), and refuses empty or non-zip
files, naming the file. Files without a seal (written by plain Lightning) are read without the check.

Loading: ``torch.load(weights_only=True)``, whose unpickler rebuilds only tensors, containers,
numbers and strings, plus the few plain config types clframe itself stores (``SAFE_TYPES``). A file
that needs any other Python object (which unpickling would run arbitrary code to build) is refused
unless the caller trusts it explicitly (``trust=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from clframe.errors import CheckpointError

TRUST_HINT = ("If you trust where this file comes from, allow it explicitly: --trainer.trust_checkpoints=true "
              "(Python: ContinualTrainer(trust_checkpoints=True)).")
_EOCD = b"PK\x05\x06"  # zip "end of central directory" record: 22 bytes + comment, at the end of the file
_TAG = b"clframe-sha256:"
_SEALED_TAIL = 22 + len(_TAG) + 64
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> digest: hash a file once per process


def safe_types() -> list[Any]:
    """Python types besides tensors and containers that clframe's own checkpoints may hold (strategy
    configs passed as objects through the Python API, paths given as ``Path``)."""
    from clframe.strategies.intact import InTActConfig
    from clframe.strategies.prompt.ovor import VORConfig
    from clframe.strategies.replay.view_batch import ViewBatchConfig

    return [InTActConfig, VORConfig, ViewBatchConfig, pathlib.PosixPath, pathlib.WindowsPath,
            pathlib.PurePosixPath, pathlib.PureWindowsPath]


# ------------------------------------------------------------------ the seal
def _hash(f: Any, size: int) -> str:
    f.seek(0)
    digest, left = hashlib.sha256(), size
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _seal(f: Any) -> None:
    """Put the SHA-256 of everything before the comment into the archive comment of a ``torch.save`` file."""
    size = f.seek(0, os.SEEK_END)
    f.seek(size - 22)
    eocd = f.read(22)
    if size < 22 or eocd[:4] != _EOCD or eocd[20:22] != b"\0\0":
        return  # not the layout torch.save writes; leave the file unsealed rather than damage it
    digest = _hash(f, size - 2).encode()
    f.seek(size - 2)
    f.write(struct.pack("<H", len(_TAG) + 64) + _TAG + digest)


def verify_checkpoint(path: str | Path) -> bool:
    """Check a checkpoint file's bytes: True when its seal matches, False when it has no seal.

    Raises ``CheckpointError`` naming the file when it is empty, not a checkpoint archive, or sealed
    and changed since it was written (truncated, bit flips)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return True
    fix = "resume from an earlier checkpoint of the run, or start it again without --ckpt_path"
    if stat.st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never completely written; {fix}.")
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            raise CheckpointError(f"{path} is not a checkpoint (a checkpoint is a zip archive written by torch.save; "
                                  f"this file starts with {f.seek(0) or f.read(16)!r}); {fix}.")
        if stat.st_size < _SEALED_TAIL:
            return False
        f.seek(stat.st_size - _SEALED_TAIL)
        tail = f.read(_SEALED_TAIL)
        if tail[:4] != _EOCD or tail[22:22 + len(_TAG)] != _TAG:
            return False
        stored = tail[22 + len(_TAG):].decode("ascii", "replace")
        actual = _hash(f, stat.st_size - _SEALED_TAIL + 20)
    if actual != stored:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match the one written with it "
                              f"(stored {stored[:12]}..., now {actual[:12]}...), so some of its bytes changed on disk "
                              f"or in a copy; {fix}.")
    _VERIFIED[key] = actual
    return True


# ------------------------------------------------------------------ reading and writing
def _require_file(path: Path) -> None:
    """Refuse a path that is not a file, saying what it is instead: a folder is the common slip (the
    checkpoint folder instead of a file in it), and "does not exist" would send the user looking in vain."""
    if path.is_file():
        return
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        examples = f" (it holds {', '.join(str(p) for p in found[:3])}{', ...' if len(found) > 3 else ''})" \
            if found else " (it holds no .ckpt file)"
        raise CheckpointError(f"--ckpt_path {path} is a folder, not a checkpoint file{examples}; give the path of "
                              "one .ckpt file, or --ckpt_path last for this run's newest last.ckpt.")
    raise CheckpointError(f"checkpoint {path} does not exist; give the path of a .ckpt file, or --ckpt_path last "
                          "for this run's newest last.ckpt.")


def load_checkpoint(path: str | Path, map_location: Any = "cpu", trust: bool = False, mmap: bool = False) -> Any:
    """Verify and load a checkpoint file without running code from it (unless ``trust``)."""
    path = Path(path)
    _require_file(path)
    if not mmap:
        verify_checkpoint(path)
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(safe_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if found := re.search(r"GLOBAL ([\w.]+)", str(err)):
            what = found.group(1)
            raise CheckpointError(
                f"refusing to load {path}: it holds a Python object ({what}) that unpickling would run code to "
                "rebuild, and clframe loads checkpoints without running code (a plain config class of your own "
                f"can be allowed with torch.serialization.add_safe_globals). {TRUST_HINT}") from None
        detail = [line for line in str(err).splitlines() if line.strip()][1:2] or [_first_line(err)]
        raise CheckpointError(f"{path} is not a readable checkpoint ({detail[0].strip()}); it may be corrupt, not a "
                              f"checkpoint file, or hold data that loading without running code refuses. "
                              f"{TRUST_HINT}") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, struct.error) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a checkpoint file: "
                              f"{_first_line(err)}); resume from an earlier checkpoint, or start again.") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def write_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a sealed hidden file in the destination folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w+b") as f:
            torch.save(checkpoint, f)
            f.flush()
            _seal(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointError(
            f"cannot write checkpoint {path}: {err.strerror or err}. The run stopped so that it does not go on "
            "without the checkpoints it was asked to write; the previous checkpoint (if any) is intact. Free "
            "space or fix the permissions of the checkpoint folder (or choose another dirpath) and resume with "
            "--ckpt_path last.") from err


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic, sealed writes and safe loads (see the module docstring).

    Remote paths (``s3://`` and the like) go through Lightning's own writer, loaded with
    ``weights_only=True`` unless ``trust``."""

    def __init__(self, trust: bool = False) -> None:
        self.trust = trust

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_checkpoint(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only=False if self.trust else True)
        return load_checkpoint(str(path).removeprefix("file://"), map_location=map_location, trust=self.trust)
