"""Tests for clframe.data.cache (decoded images kept on disk) and the batched JPEG decode in sources."""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clframe.data import cache, sources
from clframe.data.sources import _decode_one, _decoded, _Split, load_source

pytestmark = pytest.mark.filterwarnings("ignore:cifar10. loading:UserWarning")


def jpeg(seed: int, mode: str = "RGB", size: tuple[int, int] = (32, 32)) -> bytes:
    """A noisy JPEG (real DCT content, not a flat colour) so decoders have something to disagree on."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG", quality=75)
    return buf.getvalue()


def write_split(path: Path, images: list[bytes], labels: list[int]) -> None:
    img = pa.array([{"bytes": b, "path": None} for b in images],
                   type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": img, "label": pa.array(labels, pa.int64())}), path)


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    """A data root holding ``cifar10-jpeg/{train,test}.parquet`` as the real copy does: 10 classes of JPEGs."""
    folder = tmp_path / "data" / "cifar10-jpeg"
    folder.mkdir(parents=True)
    train = [jpeg(i, "L" if i == 3 else "RGB") for i in range(20)]  # one grey JPEG, as Tiny-ImageNet has
    write_split(folder / "train.parquet", train, [i % 10 for i in range(20)])
    write_split(folder / "test.parquet", [jpeg(100 + i) for i in range(10)], list(range(10)))
    return tmp_path / "data"


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts how many images the loaders decode."""
    calls: list[int] = []
    original = sources._decoded

    def counting(split, channels, image_size):
        calls.append(len(split.images))
        return original(split, channels, image_size)

    monkeypatch.setattr(sources, "_decoded", counting)
    return calls


def entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_second_load_reads_the_cache_without_decoding(fake_cifar: Path, tmp_path: Path, decode_calls) -> None:
    where = tmp_path / "cache"
    first = load_source("cifar10", root=fake_cifar, cache=str(where))
    assert decode_calls == [20, 10]
    second = load_source("cifar10", root=fake_cifar, cache=str(where))
    assert decode_calls == [20, 10]  # nothing decoded again
    assert len(entries(where)) == 1
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, key), getattr(second, key))
    assert (second.class_names, second.mean, second.std) == (first.class_names, first.mean, first.std)
    uncached = load_source("cifar10", root=fake_cifar, cache=False)
    assert torch.equal(uncached.train_x, second.train_x) and decode_calls == [20, 10, 20, 10]


def test_cached_images_are_copy_on_write_maps_without_torch_warnings(fake_cifar: Path, tmp_path: Path) -> None:
    where = tmp_path / "cache"
    load_source("cifar10", root=fake_cifar, cache=str(where))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays; the map is opened writable (mode c)
        warnings.filterwarnings("ignore", "cifar10. loading")
        data = load_source("cifar10", root=fake_cifar, cache=str(where))
    before = data.train_x[0].clone()
    data.train_x[0] += 1  # stays in this process: the file is never written through the map
    again = load_source("cifar10", root=fake_cifar, cache=str(where))
    assert torch.equal(again.train_x[0], before)


def test_changed_source_file_gets_a_new_entry(fake_cifar: Path, tmp_path: Path, decode_calls) -> None:
    where = tmp_path / "cache"
    load_source("cifar10", root=fake_cifar, cache=str(where))
    test_file = fake_cifar / "cifar10-jpeg" / "test.parquet"
    write_split(test_file, [jpeg(200 + i) for i in range(10)], list(range(10)))
    st = test_file.stat()
    os.utime(test_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    data = load_source("cifar10", root=fake_cifar, cache=str(where))
    assert decode_calls == [20, 10, 20, 10] and len(entries(where)) == 2
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg(200))).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(data.test_x[0], expected)


@pytest.mark.parametrize("damage", ["truncate_images", "garbage_meta", "missing_labels", "wrong_shape"])
def test_damaged_entry_is_rebuilt(fake_cifar: Path, tmp_path: Path, decode_calls, damage: str) -> None:
    where = tmp_path / "cache"
    good = load_source("cifar10", root=fake_cifar, cache=str(where))
    good_train, good_test = good.train_x.clone(), good.test_x.clone()
    del good  # a file truncated under a live map faults on access (SIGBUS): the cache only ever renames
    (entry,) = entries(where)
    if damage == "truncate_images":
        with open(entry / "train_x.npy", "r+b") as f:
            f.truncate(1000)
    elif damage == "garbage_meta":
        (entry / "meta.json").write_bytes(b"\x00not json")
    elif damage == "missing_labels":
        (entry / "test_y.npy").unlink()
    else:
        np.save(entry / "test_x.npy", np.zeros((3, 3, 32, 32), np.uint8))
    with pytest.warns(UserWarning, match="is damaged"):
        data = load_source("cifar10", root=fake_cifar, cache=str(where))
    assert decode_calls == [20, 10, 20, 10]
    assert torch.equal(data.train_x, good_train) and torch.equal(data.test_x, good_test)
    load_source("cifar10", root=fake_cifar, cache=str(where))  # and the rebuilt entry is good
    assert decode_calls == [20, 10, 20, 10]


def test_pickled_npy_is_refused_not_loaded(fake_cifar: Path, tmp_path: Path) -> None:
    where = tmp_path / "cache"
    load_source("cifar10", root=fake_cifar, cache=str(where))
    (entry,) = entries(where)
    np.save(entry / "train_y.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.warns(UserWarning, match="is damaged"):
        load_source("cifar10", root=fake_cifar, cache=str(where))


def test_lost_race_keeps_the_winners_entry(fake_cifar: Path, tmp_path: Path) -> None:
    """Two runs decoding at once: the second rename finds the entry in place and leaves it be."""
    where = tmp_path / "cache"
    data = load_source("cifar10", root=fake_cifar, cache=str(where))
    (entry,) = entries(where)
    cache.write_entry(entry, data)  # as the slower process would
    assert entries(where) == [entry] and not list(where.glob(".*"))
    assert cache.read_entry(entry) is not None


def test_location_default_env_and_read_only_fallback(fake_cifar: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir(fake_cifar) == fake_cifar / ".clframe_cache"
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
    assert cache.cache_dir(fake_cifar) == tmp_path / "env"
    assert cache.cache_dir(fake_cifar, setting=str(tmp_path / "opt")) == tmp_path / "opt"  # the option wins
    monkeypatch.setenv(cache.ENV_VAR, "off")
    assert cache.cache_dir(fake_cifar) is None
    monkeypatch.delenv(cache.ENV_VAR)
    mode = fake_cifar.stat().st_mode
    fake_cifar.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)  # read-only (also for root)
    try:
        load_source("cifar10", root=fake_cifar)
        assert not (fake_cifar / ".clframe_cache").exists()
        assert len(entries(tmp_path / "xdg" / "clframe" / "decoded")) == 1
    finally:
        fake_cifar.chmod(mode)


def test_unwritable_cache_folder_warns_and_still_loads(fake_cifar: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write the decoded-data cache"):
        data = load_source("cifar10", root=fake_cifar, cache=str(blocker / "cache"))
    assert data.train_x.shape == (20, 3, 32, 32)


def test_build_warnings_come_back_on_cached_loads(tmp_path: Path) -> None:
    """A warning about the data (here: labels renumbered) is shown on every load, cached or not."""
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True)
    write_split(folder / "train.parquet", [jpeg(i) for i in range(4)], [10, 20, 10, 20])
    write_split(folder / "test.parquet", [jpeg(9), jpeg(8)], [10, 20])
    for _ in range(2):
        with pytest.warns(UserWarning, match="renumbered") as record:
            load_source("hf", root=tmp_path / "data", path="toy", cache=str(tmp_path / "cache"))
        assert sum("renumbered" in str(w.message) for w in record) == 1


# ---------------------------------------------------------------------------------------------- fast decode


@pytest.mark.parametrize("channels", [3, None, 1])
@pytest.mark.parametrize("image_size", [None, 20])
def test_batched_jpeg_decode_matches_pil(channels: int | None, image_size: int | None) -> None:
    images = [jpeg(i, "L" if i % 3 == 0 else "RGB") for i in range(9)] + [png()]
    split = _Split(images=images, labels=[0] * len(images))
    fast = list(_decoded(split, channels, image_size))
    slow = [_decode_one(src, channels, image_size) for src in images]
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_jpeg_in_a_batch_is_named() -> None:
    images = [jpeg(0), jpeg(1)[:40], jpeg(2)]
    with pytest.raises(sources.DataSourceError, match="cannot decode image row 1 of bad.parquet"):
        list(_decoded(_Split(images=images, labels=[0, 0, 0], origins=[(0, "bad.parquet")]), 3, None))


def test_real_jpegs_decode_as_pil_does() -> None:
    env = os.environ.get("CLFRAME_DATA")
    files = [Path(env or "") / "cifar10-jpeg" / "test.parquet", Path(env or "") / "tiny-imagenet" / "valid.parquet"]
    files = [f for f in files if env and f.is_file()]
    if not files:
        pytest.skip("set CLFRAME_DATA to the offline data folder")
    for f in files:
        table = pq.read_table(f).slice(0, 400)
        column = "img" if "img" in table.column_names else "image"
        images = table.column(column).combine_chunks().field("bytes").to_pylist()
        fast = list(_decoded(_Split(images=images, labels=[0] * len(images)), 3, None))
        for src, a in zip(images, fast, strict=True):
            assert np.array_equal(a, _decode_one(src, 3, None))


# ---------------------------------------------------------------------------------------------- data module


def test_data_module_serves_cached_data_through_worker_processes(fake_cifar: Path, tmp_path: Path) -> None:
    """The memory-mapped images reach loader processes (num_workers=2) and give the same batches as in-process."""
    from clframe.data.datamodule import ContinualDataModule

    def batches(workers: int) -> list[tuple[torch.Tensor, ...]]:
        dm = ContinualDataModule(source="cifar10", data_root=str(fake_cifar), data_cache=str(tmp_path / "cache"),
                                 n_tasks=5, batch_size=2, eval_batch_size=4, num_workers=workers, seed=0)
        dm.setup("fit")
        dm.set_task(1)
        return [*dm.train_dataloader(), *dm.test_dataloader()]

    in_process, workers = batches(0), batches(2)
    assert len(in_process) == len(workers) >= 2 + 1  # task 1's 2 training batches, then the seen tasks' tests
    for a, b in zip(in_process, workers, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert len(entries(tmp_path / "cache")) == 1


def test_first_decode_writes_images_straight_into_the_entry(fake_cifar: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The images are decoded into the entry's memory-mapped file (no whole copy in memory), not saved after."""
    saved: list[str] = []
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda path, *a, **k: (saved.append(Path(path).name), real_save(path, *a, **k)))
    data = load_source("cifar10", root=fake_cifar, cache=str(tmp_path / "cache"))
    assert sorted(saved) == ["test_y.npy", "train_y.npy"]
    assert data.train_x.shape == (20, 3, 32, 32) and not list((tmp_path / "cache").glob(".*"))


def test_failed_decode_leaves_no_temporary_folder(fake_cifar: Path, tmp_path: Path) -> None:
    write_split(fake_cifar / "cifar10-jpeg" / "test.parquet", [jpeg(1)[:50]] * 10, list(range(10)))
    with pytest.raises(sources.DataSourceError, match="cannot decode image row 0 of"):
        load_source("cifar10", root=fake_cifar, cache=str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []
