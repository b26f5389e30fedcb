"""Decoded image data sets kept on disk, so a data set is decoded once per machine instead of once per run.

Decoding 60,000 JPEGs (CIFAR-10's Parquet copy) takes tens of seconds; reading the decoded uint8 arrays
back takes well under a second. A cache entry is a folder of plain ``.npy`` files (images, labels) and a
``meta.json`` (class names, statistics). Images are opened as copy-on-write memory maps, so:

* a run pages in only the samples it touches, and data larger than memory streams from disk batch by
  batch (each batch is gathered from the map by :class:`~clframe.data.stream.TaskDataset`);
* the tensors are writable (``mmap_mode="c"``): torch warns about non-writable arrays, and an in-place
  edit stays private to the process, never reaching the file;
* nothing read can run code: ``allow_pickle=False`` and JSON metadata.

The first decode writes straight into the entry's memory-mapped image files (file-backed pages the kernel
can write out), so it does not need a second in-memory copy. What still copies the images into memory:
``image_size`` (resizing), ``tasks="corruption"`` (corrupted copies are made once), and a GPU-resident
data set. Never edit an entry's files in place while a run maps them (a truncated mapped file faults);
delete the folder instead, which is safe at any time.

The entry's name holds a key over the source name, its options, :data:`DECODE_VERSION` with the decoding
libraries' versions, and the sizes and modification times of the source files, so a changed file or a
changed decoder gets a new entry. An entry is written into a temporary folder and renamed into place in
one step, so concurrent runs never read half an entry; a damaged entry is removed and decoded again.

Where: ``CLFRAME_CACHE`` (a folder; ``0``/``off`` disables the cache), else ``<data root>/.clframe_cache``
when the data root is writable, else ``$XDG_CACHE_HOME/clframe/decoded`` (``~/.cache/clframe/decoded``).
``load_source(..., cache=...)`` and the data module's ``data_cache`` option override the variable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENV_VAR = "CLFRAME_CACHE"
DECODE_VERSION = "1"
"""Bump when the decoding code changes its output: every cached entry is then decoded again."""
CacheSetting = bool | str | os.PathLike | None
_OFF = frozenset({"0", "off", "false", "no", "none", ""})
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")
_STALE_TMP_S = 3600.0  # a temporary folder this old belongs to a run that was killed mid-write
_setting: ContextVar[CacheSetting] = ContextVar("clframe_data_cache", default=None)
_target: ContextVar[_Target | None] = ContextVar("clframe_decode_target", default=None)


@dataclass
class _Target:
    """The temporary folder of the entry being decoded, and the image files already decoded into it."""

    folder: Path
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def new_image_array(split: str, shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array for one split's decoded images. While a cached load decodes, it is the
    entry's own ``.npy`` file, memory-mapped, so even the first decode never holds a whole data set in memory."""
    target = _target.get()
    if target is not None:
        path = target.folder / f"{split}_x.npy"
        try:
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
            if hasattr(os, "posix_fallocate"):  # reserve the blocks now: a full disk is then an OSError here,
                with open(path, "r+b") as f:    # not a SIGBUS when a page of the (sparse) map is written
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError:
            pass  # e.g. a full disk: decode into memory; writing the entry then reports the problem
        else:
            target.arrays[f"{split}_x"] = arr
            return arr
    return np.empty(shape, dtype=np.uint8)


@contextlib.contextmanager
def cache_setting(setting: CacheSetting) -> Iterator[None]:
    """Within the block, loaders cache according to ``setting`` (None: environment/default; False: off;
    a path: that folder). Used by ``load_source`` so registered loaders keep their signature."""
    token = _setting.set(setting)
    try:
        yield
    finally:
        _setting.reset(token)


def cache_dir(data_root: Path, setting: CacheSetting = None) -> Path | None:
    """The folder for cache entries of data under ``data_root``, or None when caching is off."""
    setting = _setting.get() if setting is None else setting
    if setting is None:
        setting = os.environ.get(ENV_VAR)
    if setting is False or (isinstance(setting, str) and setting.strip().lower() in _OFF):
        return None
    if setting is not None and setting is not True:
        return Path(setting).expanduser()
    if _writable(data_root):
        return data_root / ".clframe_cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "clframe" / "decoded"


def _writable(folder: Path) -> bool:
    """Whether the data root is meant to be written: ``os.access`` alone says yes to root (the super-user)
    even for a folder marked read-only, so the folder's write bits and a read-only mount count too."""
    try:
        st, fs = folder.stat(), os.statvfs(folder)
    except OSError:
        return False
    return (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) and bool(st.st_mode & 0o222)
            and not fs.f_flag & os.ST_RDONLY)


def _decoder_versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {"decode": DECODE_VERSION, "pillow": PIL.__version__, "torchvision": torchvision.__version__,
            "numpy_major": np.__version__.split(".")[0]}


def fingerprint(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """``(path, size, mtime in ns)`` of every source file: a rewritten or replaced file changes the key."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append((str(Path(f).resolve()), st.st_size, st.st_mtime_ns))
    return out


def entry_key(name: str, files: Sequence[Path], options: dict[str, Any]) -> str:
    payload = {"name": name, "options": options, "decoders": _decoder_versions(), "files": fingerprint(files)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_source(
    data_root: Path, name: str, files: Sequence[Path], options: dict[str, Any], build: Callable[[], Any]
) -> Any:
    """The ``SourceData`` that ``build()`` decodes, read from the cache when an entry for exactly these
    files and options exists, else built once and written there (the result is then read back memory-mapped,
    so first and later runs hold the same kind of tensors)."""
    folder = cache_dir(data_root)
    if folder is None:
        return build()
    entry = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{entry_key(name, files, options)}"
    data = read_entry(entry)
    if data is not None:
        return data
    target = _new_target(entry)
    token = _target.set(target)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = build()
    except BaseException:
        if target is not None:
            shutil.rmtree(target.folder, ignore_errors=True)
        raise
    finally:
        _target.reset(token)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for w in caught:  # shown now, and again on every cached load (the build's warnings describe the data)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        write_entry(entry, data, notes, target)
    except OSError as e:
        warnings.warn(f"could not write the decoded-data cache {entry} ({type(e).__name__}: {e}); the data set will "
                      f"be decoded again next time. Set {ENV_VAR} to a writable folder (or 0 to turn the cache off).",
                      UserWarning, stacklevel=3)
        return data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes were just shown
        return read_entry(entry) or data


def _new_target(entry: Path) -> _Target | None:
    """A fresh temporary folder beside the entry (None when it cannot be made: the build then runs in memory)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(entry)
        tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError:
        return None
    return _Target(tmp)


def write_entry(entry: Path, data: Any, notes: Sequence[str] = (), target: _Target | None = None) -> None:
    """Write ``data`` as a complete entry in a temporary folder, then rename it into place atomically.
    Images already decoded into ``target``'s files are flushed there, not written again."""
    target = target or _new_target(entry)
    if target is None:
        entry.parent.mkdir(parents=True, exist_ok=True)  # raises the reason
        raise OSError(f"cannot create a temporary folder in {entry.parent}")
    tmp = target.folder
    try:
        shapes = {}
        for key in _ARRAYS:
            tensor, written = getattr(data, key), target.arrays.get(key)
            if written is not None and tensor.data_ptr() == written.ctypes.data and tensor.shape == written.shape:
                written.flush()
            else:  # unlink first: a file still mapped must never be truncated under its map
                (tmp / f"{key}.npy").unlink(missing_ok=True)
                np.save(tmp / f"{key}.npy", np.ascontiguousarray(tensor.numpy()), allow_pickle=False)
            shapes[key] = list(tensor.shape)
        meta = {"version": DECODE_VERSION, "name": data.name, "class_names": list(data.class_names),
                "mean": list(data.mean), "std": list(data.std), "shapes": shapes, "notes": list(notes)}
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not another process winning the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def read_entry(entry: Path) -> Any | None:
    """The cached ``SourceData``, None when there is no entry; a damaged entry is removed (and None returned)."""
    from clframe.data.sources import DataSourceError, SourceData

    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != DECODE_VERSION:
            raise ValueError(f"version {meta.get('version')!r}, expected {DECODE_VERSION!r}")
        arrays = {}
        for key in _ARRAYS:
            is_x = key.endswith("_x")
            arr = np.load(entry / f"{key}.npy", mmap_mode="c" if is_x else None, allow_pickle=False)
            if list(arr.shape) != meta["shapes"][key] or arr.dtype != (np.uint8 if is_x else np.int64):
                raise ValueError(f"{key} is {arr.dtype} {arr.shape}, meta.json says {meta['shapes'][key]}")
            arrays[key] = torch.from_numpy(arr)
        with warnings.catch_warnings(record=True) as caught:  # its own checks repeat some of the notes
            warnings.simplefilter("always")
            data = SourceData(meta["name"], arrays["train_x"], arrays["train_y"], arrays["test_x"],
                              arrays["test_y"], meta["class_names"], tuple(meta["mean"]), tuple(meta["std"]))
        notes = [str(n) for n in meta.get("notes", [])]
        notes += [str(w.message) for w in caught if str(w.message) not in notes]
    except (OSError, ValueError, KeyError, TypeError, EOFError, DataSourceError) as e:
        warnings.warn(f"the decoded-data cache entry {entry} is damaged ({type(e).__name__}: {e}); it is removed "
                      "and the data set decoded again", UserWarning, stacklevel=3)
        _remove(entry)
        return None
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    return data


def _remove(entry: Path) -> None:
    """Move the entry aside first, so no other process ever reads a half-deleted folder."""
    doomed = entry.parent / f".{entry.name}.del-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, doomed)
    except OSError:
        return  # already moved or removed by another process
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_tmp(entry: Path) -> None:
    now = time.time()
    for tmp in entry.parent.glob(f".{entry.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
