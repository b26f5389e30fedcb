"""Read back what an offline wandb run recorded, without a server.

Offline runs keep everything in one ``run-<id>.wandb`` file: wandb's LevelDB-style log of
``wandb_internal_pb2.Record`` protobufs (7-byte header ``:W&B`` + magic + version, then 32 KiB
blocks of chunks, each ``crc32c(4) length(2) type(1) payload``). wandb 0.31 writes no
``wandb-summary.json`` offline (its Go core derives that when syncing), so tests parse this log.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

_HEADER = 7
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """The config, the explicit summary updates and the history rows of one offline run."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a wandb transaction log")
    out, pos, parts = [], _HEADER, []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding
            continue
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            parts = [payload]
        elif kind == _MIDDLE:
            parts.append(payload)
        elif kind == _LAST:
            out.append(b"".join([*parts, payload]))
            parts = []
    return out


def _put(target: dict[str, Any], item: Any) -> None:
    """Store an item; wandb-core sends nested values (a table's ``_type``, ``path``...) as
    ``nested_key`` paths, which are rebuilt into dicts here."""
    value = json.loads(item.value_json)
    if not item.nested_key:
        target[item.key] = value
        return
    *parents, last = item.nested_key
    for name in parents:
        target = target.setdefault(name, {})
    target[last] = value


def read_offline_run(run_dir: str | Path, timeout: float = 60.0) -> OfflineRun:
    """Parse ``run_dir/run-*.wandb`` (``run_dir`` is an ``offline-run-*`` folder).

    wandb-core is a separate process that may still be appending to the log after the training process
    (or ``wandb.finish()``) returned, so the log is read again until it holds the run's ``exit`` record.
    """
    run_dir = Path(run_dir)
    deadline = time.monotonic() + timeout
    while True:
        run, complete = _parse(run_dir)
        if complete or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def _parse(run_dir: Path) -> tuple[OfflineRun, bool]:
    log = next(run_dir.glob("run-*.wandb"))
    run = OfflineRun(path=run_dir)
    complete = False
    for raw in _records(log.read_bytes()):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:  # the last record is still being written
            break
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                _put(run.config, item)
        elif kind == "summary":
            for item in record.summary.update:
                _put(run.summary, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "exit":
            complete = True
    return run, complete


def offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline run under ``root`` (a ``save_dir`` or ``WANDB_DIR``), oldest first."""
    return [read_offline_run(p) for p in sorted(Path(root).rglob("offline-run-*")) if p.is_dir()]
