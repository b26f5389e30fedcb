"""Tests for clframe.data.sources: the built-in loaders on real data, and their error messages."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clframe.data import sources
from clframe.data.sources import (
    SOURCE_NAMES,
    DataSourceError,
    SourceData,
    default_data_root,
    load_source,
    register_source,
    resolve_data_root,
)


def data_root(*required: str) -> Path:
    """The offline data folder from CLFRAME_DATA; skips the test when it (or a needed subfolder) is absent."""
    env = os.environ.get("CLFRAME_DATA")
    if not env:
        pytest.skip("CLFRAME_DATA is not set: point it at the offline data folder to run the data-set tests")
    root = Path(env).expanduser()
    for sub in ("", *required):
        if not (root / sub).is_dir():
            pytest.skip(f"CLFRAME_DATA={env} has no folder {root / sub}")
    return root


def check_source(
    data: SourceData, n_train: int, n_test: int, shape: tuple[int, int, int], n_classes: int
) -> None:
    assert data.train_x.shape == (n_train, *shape) and data.test_x.shape == (n_test, *shape)
    assert data.train_x.dtype == data.test_x.dtype == torch.uint8
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    assert data.input_shape == shape and data.num_classes == n_classes == len(data.class_names)
    assert set(data.train_y.unique().tolist()) == set(range(n_classes))
    assert 0 <= int(data.test_y.min()) and int(data.test_y.max()) < n_classes
    assert len(data.mean) == len(data.std) == shape[0]


# ---------------------------------------------------------------------------------------------- digits


def test_digits_shapes_and_values(tmp_path: Path) -> None:
    data = load_source("digits", root=tmp_path / "never-created")
    check_source(data, 1438, 359, (1, 8, 8), 10)
    assert int(data.train_x.max()) == 255 and int(data.train_x.min()) == 0
    assert not (tmp_path / "never-created").exists()
    x = data.train_x.double() / 255
    assert data.mean[0] == pytest.approx(x.mean().item()) and data.std[0] == pytest.approx(
        x.std().item(), rel=1e-3
    )


def test_digits_split_is_deterministic_and_stratified() -> None:
    a, b = load_source("digits"), load_source("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    train_counts, test_counts = torch.bincount(a.train_y), torch.bincount(a.test_y)
    for n_train, n_test in zip(train_counts.tolist(), test_counts.tolist(), strict=True):
        assert n_test == round(0.2 * (n_train + n_test))
    # the two splits are disjoint: no test image also appears in train with the same label
    train_set = {(bytes(x.flatten().tolist()), int(y)) for x, y in zip(a.train_x, a.train_y, strict=True)}
    overlap = sum(
        (bytes(x.flatten().tolist()), int(y)) in train_set for x, y in zip(a.test_x, a.test_y, strict=True)
    )
    assert overlap < 5  # a few 8x8 digits are exact duplicates in the raw data


# ---------------------------------------------------------------------------------------------- real data sets


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like(name: str, folder: str) -> None:
    data = load_source(name, root=data_root(folder))
    check_source(data, 60000, 10000, (1, 28, 28), 10)
    assert data.name == name


def test_cifar10_from_jpeg_parquet_copy() -> None:
    root = data_root("cifar10-jpeg")
    if (root / "cifar-10-batches-py").exists():
        pytest.skip("the torchvision CIFAR-10 folder is present, so the Parquet fallback is not used")
    with pytest.warns(UserWarning, match="JPEG quality 75"):
        data = load_source("cifar10", root=root)
    check_source(data, 50000, 10000, (3, 32, 32), 10)
    assert data.class_names[:3] == ["airplane", "automobile", "bird"]
    mean = (data.train_x.double() / 255).mean(dim=(0, 2, 3))
    assert mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.01)
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_tiny_imagenet() -> None:
    data = load_source("tiny_imagenet", root=data_root("tiny-imagenet"))
    check_source(data, 20000, 10000, (3, 64, 64), 200)
    assert data.class_names[0] == "Egyptian cat"  # words.tsv name of the first ClassLabel id, n02124075
    assert torch.bincount(data.test_y).tolist() == [50] * 200


def test_tiny_imagenet_rejects_bad_class_names_option(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="'words' or 'wnid'"):
        load_source("tiny_imagenet", root=tmp_path, class_names="human")


# ---------------------------------------------------------------------------------------------- image_folder


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_tree(base: Path, classes: dict[str, int], color_of: dict[str, tuple[int, int, int]]) -> None:
    for name, n in classes.items():
        for i in range(n):
            write_image(base / name / f"{i}.png", color_of[name])


COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def test_image_folder_train_test(tmp_path: Path) -> None:
    make_tree(tmp_path / "pets" / "train", {"cat": 3, "dog": 2}, COLORS)
    make_tree(tmp_path / "pets" / "test", {"cat": 1, "dog": 1}, COLORS)
    (tmp_path / "pets" / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    data = load_source("image_folder", root=tmp_path, path="pets", image_size=8)
    check_source(data, 5, 2, (3, 8, 8), 2)
    assert data.class_names == ["cat", "dog"] and data.train_y.tolist() == [0, 0, 0, 1, 1]
    assert data.train_x[0, :, 0, 0].tolist() == [255, 0, 0] and data.test_x[1, :, 0, 0].tolist() == [
        0,
        0,
        255,
    ]
    grey = load_source("image_folder", path=tmp_path / "pets", image_size=4, channels=1)
    assert grey.input_shape == (1, 4, 4) and len(grey.mean) == 1


def test_image_folder_seeded_split(tmp_path: Path) -> None:
    make_tree(tmp_path / "flat", {"cat": 10, "dog": 5}, COLORS)
    a = load_source("image_folder", path=tmp_path / "flat", test_fraction=0.2, seed=1)
    b = load_source("image_folder", path=tmp_path / "flat", test_fraction=0.2, seed=1)
    assert torch.bincount(a.test_y).tolist() == [2, 1] and torch.bincount(a.train_y).tolist() == [8, 4]
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.test_x, b.test_x)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist"):
        load_source("image_folder", path=tmp_path / "nowhere")
    with pytest.raises(DataSourceError, match="needs option.*path"):
        load_source("image_folder")

    make_tree(tmp_path / "a" / "train", {"cat": 2, "dog": 2}, COLORS)
    make_tree(tmp_path / "a" / "test", {"cat": 1}, COLORS)
    with pytest.raises(DataSourceError, match=r"only in train: \['dog'\]"):
        load_source("image_folder", path=tmp_path / "a")
    with pytest.raises(DataSourceError, match="test_fraction"):
        load_source("image_folder", path=tmp_path / "a" / "train")

    (tmp_path / "a" / "test" / "dog").mkdir()
    with pytest.raises(DataSourceError, match=r"class folder .*dog has no images"):
        load_source("image_folder", path=tmp_path / "a")

    bad = tmp_path / "a" / "test" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataSourceError, match=r"cannot decode image .*broken\.jpg.*remove or fix"):
        load_source("image_folder", path=tmp_path / "a")


def test_image_folder_rejects_bad_options(tmp_path: Path) -> None:
    make_tree(tmp_path / "flat", {"cat": 2}, COLORS)
    with pytest.raises(DataSourceError, match="channels"):
        load_source("image_folder", path=tmp_path / "flat", test_fraction=0.5, channels=2)
    with pytest.raises(DataSourceError, match="test_fraction"):
        load_source("image_folder", path=tmp_path / "flat", test_fraction=1.5)


# ---------------------------------------------------------------------------------------------- hf (local Parquet)


def png_bytes(color: int, size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_hf_parquet(path: Path, images: list[bytes], labels: list, names: list[str] | None) -> None:
    """A Parquet file in the layout that Hugging Face `datasets` writes (Image struct + ClassLabel metadata)."""
    cells = pa.array(
        [{"bytes": b, "path": None} for b in images],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"image": cells, "label": labels})
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_hf_local_parquet(tmp_path: Path) -> None:
    folder = tmp_path / "toy"
    write_hf_parquet(
        folder / "train-00000.parquet", [png_bytes(c, (6, 6)) for c in (0, 50)], [0, 1], ["zero", "one"]
    )
    write_hf_parquet(folder / "train-00001.parquet", [png_bytes(100, (6, 6))], [1], ["zero", "one"])
    write_hf_parquet(folder / "test-00000.parquet", [png_bytes(200, (6, 6))], [0], ["zero", "one"])
    data = load_source("hf", root=tmp_path, path="toy")
    check_source(data, 3, 1, (1, 6, 6), 2)
    assert data.class_names == ["zero", "one"] and data.train_x[:, 0, 0, 0].tolist() == [0, 50, 100]
    assert data.test_x[0, 0, 0, 0] == 200


def test_hf_sizes_colour_and_string_labels(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    train = [png_bytes(10, (6, 6)), png_bytes((1, 2, 3), (8, 4), "RGB")]
    write_hf_parquet(folder / "train.parquet", train, ["b", "a"], None)
    write_hf_parquet(folder / "valid.parquet", [png_bytes(30, (6, 6))], ["a"], None)
    with pytest.raises(DataSourceError, match="differ in size.*image_size"):
        load_source("hf", path=folder)
    data = load_source("hf", path=folder, image_size=5)
    check_source(data, 2, 1, (3, 5, 5), 2)  # one colour image makes the whole set RGB
    assert data.class_names == ["a", "b"] and data.train_y.tolist() == [1, 0]
    assert data.train_x[0, :, 2, 2].tolist() == [10, 10, 10]


def test_hf_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataSourceError, match="CLFRAME_DATA"):
        load_source("hf", root=tmp_path, path="someone/dataset")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(DataSourceError, match=r"pip install clframe\[hf\]"):
        load_source("hf", root=tmp_path, path="someone/dataset", download=True)

    write_hf_parquet(tmp_path / "cols" / "train.parquet", [png_bytes(0, (4, 4))], [0], None)
    write_hf_parquet(tmp_path / "cols" / "test.parquet", [png_bytes(0, (4, 4))], [0], None)
    with pytest.raises(DataSourceError, match="no column 'lbl'.*label_column"):
        load_source("hf", path=tmp_path / "cols", label_column="lbl")

    (tmp_path / "cols" / "test.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DataSourceError, match=r"cannot read Parquet file .*test\.parquet"):
        load_source("hf", path=tmp_path / "cols")


# ---------------------------------------------------------------------------------------------- registry and errors


def test_unknown_source_lists_names() -> None:
    with pytest.raises(DataSourceError) as err:
        load_source("imagenet-22k")
    assert all(name in str(err.value) for name in SOURCE_NAMES)
    assert {
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "tiny_imagenet",
        "hf",
        "image_folder",
    } <= set(SOURCE_NAMES)


def test_unknown_option_lists_accepted_ones() -> None:
    with pytest.raises(DataSourceError, match="unknown option.*image_sise.*accepts: path, image_size"):
        load_source("image_folder", path="x", image_sise=32)
    with pytest.raises(DataSourceError, match="accepts: none"):
        load_source("digits", seed=3)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet"])
def test_missing_data_without_download(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataSourceError, match="CLFRAME_DATA") as err:
        load_source(name, root=tmp_path)
    assert str(tmp_path) in str(err.value) and "download=True" in str(err.value)


def test_corrupt_torchvision_files_are_named(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / f).write_bytes(b"\x00\x00\x08\x03 too short")
    with pytest.raises(DataSourceError, match=f"could not read MNIST.*{raw}"):
        load_source("mnist", root=tmp_path)


def test_register_custom_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))
    monkeypatch.setattr(sources, "SOURCE_NAMES", sources.SOURCE_NAMES)

    def tiny(root: Path, download: bool, n: int = 4) -> SourceData:
        x = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
        y = torch.arange(n) % 2
        return SourceData("tiny", x, y, x, y, ["a", "b"], (0.0,) * 3, (1.0,) * 3)

    register_source("My-Tiny", tiny)
    assert "my_tiny" in sources.SOURCE_NAMES
    assert load_source("my_tiny", root=tmp_path, n=6).train_x.shape == (6, 3, 2, 2)

    def wrong(root: Path, download: bool) -> SourceData:
        x = torch.zeros(2, 2, 2, 2)
        return SourceData(
            "wrong",
            x,
            torch.zeros(2, dtype=torch.int64),
            x,
            torch.zeros(2, dtype=torch.int64),
            ["a"],
            (0,),
            (1,),
        )

    register_source("wrong", wrong)
    with pytest.raises(DataSourceError, match="uint8 tensor"):
        load_source("wrong")


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLFRAME_DATA", str(tmp_path / "data"))
    assert default_data_root() == tmp_path / "data" and resolve_data_root(None) == tmp_path / "data"
    monkeypatch.delenv("CLFRAME_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_root() == tmp_path / "cache" / "clframe" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_root() == tmp_path / ".cache" / "clframe" / "data"
    assert resolve_data_root("~/elsewhere") == tmp_path / "elsewhere"


def test_source_data_repr_is_short() -> None:
    data = load_source("digits")
    assert (
        repr(data) == "SourceData(name='digits', train=(1438, 1, 8, 8), test=(359, 1, 8, 8), num_classes=10)"
    )
