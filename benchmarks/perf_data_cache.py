"""``perf.py data-cache``: decode throughput of CIFAR-10's JPEGs and time to the first training batch with the
decoded-data cache off, cold and warm (method in ``DATA_CACHE_DOC``)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

from timing import RESULTS, ROOT, machine, write_results

DATA_CACHE_DOC = """Decoded-data cache: CIFAR-10 (JPEG Parquet copy) decode throughput and time to the first training batch.

Two measurements, both on the data under ``CLFRAME_DATA``:

* **decode**: the 60,000 CIFAR-10 JPEGs (bytes already read from Parquet) decoded by a plain PIL loop, a
  plain ``torchvision.io.decode_jpeg`` loop (one call per image), clframe's decoder before this change
  (PIL per image, kept in ``_decode_one``) and clframe's decoder now (``decode_jpeg`` on chunks of 512);
* **first batch**: a fresh process per run, from process start (and from ``ContinualDataModule.setup``)
  to the first batch of task 0's training loader, with the cache off, with an empty cache (decodes and
  writes it) and with that cache filled (reads it).

Repeats are interleaved; medians are reported. Usage::

    CLFRAME_DATA=/path/to/data python benchmarks/perf.py data-cache --repeats 3
"""

FIRST_BATCH = r"""
import json, time, sys, warnings
start = time.perf_counter()
warnings.simplefilter("ignore")
from clframe.data.datamodule import ContinualDataModule
cache = sys.argv[1] if sys.argv[1] != "off" else False
dm = ContinualDataModule(source="cifar10", n_tasks=5, batch_size=32, data_cache=cache, seed=0)
setup = time.perf_counter()
dm.setup("fit")
x, y, t = next(iter(dm.train_dataloader()))
end = time.perf_counter()
print(json.dumps({"from_process_start": end - start, "from_setup": end - setup, "batch": list(x.shape)}))
"""


def first_batch(cache: str) -> dict:
    """One fresh process; its interpreter start is not included (``time.perf_counter`` at the top)."""
    proc = subprocess.run([sys.executable, "-c", FIRST_BATCH, cache], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decode_times() -> dict[str, float]:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from clframe.data import sources

    root = sources.default_data_root() / "cifar10-jpeg"
    splits = [sources._Split(images=pq.read_table(root / f"{s}.parquet").column("img").combine_chunks()
                             .field("bytes").to_pylist(), origins=[(0, s)]) for s in ("train", "test")]
    images = splits[0].images + splits[1].images
    out = {}

    start = time.perf_counter()
    np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    out["plain PIL loop"] = time.perf_counter() - start

    start = time.perf_counter()
    torch.stack([decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
                 for b in images])
    out["plain torchvision decode_jpeg loop"] = time.perf_counter() - start

    real_chunk = sources._decode_jpeg_chunk
    sources._decode_jpeg_chunk = lambda chunk, channels: [None] * len(chunk)  # the PIL-per-image path
    try:
        start = time.perf_counter()
        old = sources._decode_images(splits, None, 3)
        out["clframe before (PIL per image)"] = time.perf_counter() - start
    finally:
        sources._decode_jpeg_chunk = real_chunk
    start = time.perf_counter()
    new = sources._decode_images(splits, None, 3)
    out["clframe now (decode_jpeg, chunks of 512)"] = time.perf_counter() - start
    assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True)), "the two decoders disagree"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        sources.load_source("cifar10", cache=False)
        out["clframe now, whole load_source (Parquet read + decode + labels)"] = time.perf_counter() - start
    return {k: {"seconds": v, "images_per_s": len(images) / v} for k, v in out.items()}


def cmd_data_cache(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
    decode: list[dict] = []
    for r in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix="clframe-cache-bench-"))
        try:
            runs["off"].append(first_batch("off"))
            runs["cold"].append(first_batch(str(folder)))
            runs["warm"].append(first_batch(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        decode.append(decode_times())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['from_setup']:.2f} s" for k, v in runs.items()), flush=True)
    med = {k: {m: median(run[m] for run in v) for m in ("from_process_start", "from_setup")} for k, v in runs.items()}
    dec = {k: median(d[k]["seconds"] for d in decode) for k in decode[0]}
    write_results(Path(args.out) if args.out else RESULTS / "data_cache", data={
        "machine": machine(), "first_batch_runs": runs, "decode_runs": decode, "first_batch_median": med,
        "decode_median_s": dec})
    print("\n| CIFAR-10 (JPEG q75), first training batch | from process start (s) | from setup (s) |\n|---|---|---|")
    for k, label in (("off", "cache off (decode every run)"), ("cold", "first run (decode + write cache)"),
                     ("warm", "second run (cache filled)")):
        print(f"| {label} | {med[k]['from_process_start']:.2f} | {med[k]['from_setup']:.2f} |")
    print("\n| decoding all 60,000 images | s | images/s |\n|---|---|---|")
    for k, v in dec.items():
        print(f"| {k} | {v:.2f} | {60000 / v:,.0f} |")
