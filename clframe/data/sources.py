"""Whole image data sets, loaded by name into compact in-memory tensors.

Every source returns a :class:`SourceData`: uint8 images ``(N, C, H, W)`` and int64 labels, so a
scenario can slice tasks out of it without touching disk again and strategies can normalise on
the device. Data live under a data root (``CLFRAME_DATA``, else the user cache folder); nothing is
fetched unless ``download=True``.
"""

from __future__ import annotations

import bisect
import inspect
import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clframe.data.cache import CacheSetting, cache_setting, cached_source, new_image_array
from clframe.errors import ClframeError

ENV_VAR = "CLFRAME_DATA"
IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
)
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_DIGITS_SEED = 0


class DataSourceError(ClframeError):
    """Bad input to a data source; the message says what is wrong and how to fix it."""


@dataclass(repr=False, eq=False)
class SourceData:
    """A whole data set in memory: uint8 images (N, C, H, W), int64 labels, per-channel stats in [0, 1]."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Checked here so that user-registered loaders fail at once, not deep inside a training run.
        self.class_names = [str(c) for c in self.class_names]
        self.mean, self.std = tuple(float(m) for m in self.mean), guard_std(self.std, f"source {self.name!r}")
        for split in ("train", "test"):
            _check_split(self, split)
        if self.test_x.shape[1:] != self.train_x.shape[1:]:
            raise DataSourceError(
                f"source {self.name!r}: train images are {tuple(self.train_x.shape[1:])} but test images are "
                f"{tuple(self.test_x.shape[1:])}; resize both splits to one shape in the loader"
            )
        if len(self.mean) != self.train_x.shape[1] or len(self.std) != self.train_x.shape[1]:
            raise DataSourceError(
                f"source {self.name!r}: mean/std need one value per channel ({self.train_x.shape[1]}), got "
                f"{self.mean} / {self.std}"
            )
        _check_every_class_present(self)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"SourceData(name={self.name!r}, train={tuple(self.train_x.shape)}, test={tuple(self.test_x.shape)}, "
            f"num_classes={self.num_classes})"
        )


STD_FLOOR = 1e-3  # in [0, 1] units: under a quarter of a grey level, i.e. a constant channel


def guard_std(std: Sequence[float], where: str) -> tuple[float, ...]:
    """Per-channel std with constant channels set to 1 (left unscaled), so normalising never divides by ~0.

    A channel that never varies (e.g. blue = 0 in every image) has std 0; dividing by it turns every
    input into NaN or inf, which then looks like a learning-rate problem.
    """
    out = tuple(float(v) for v in std)
    constant = [c for c, v in enumerate(out) if not v >= STD_FLOOR]  # `not >=` also catches NaN
    if constant:
        warnings.warn(f"{where}: channel(s) {constant} are constant (std {[out[c] for c in constant]}); they are "
                      "left unscaled (std 1) instead of divided by ~0. Check the images if this is unexpected.",
                      UserWarning, stacklevel=2)
    return tuple(1.0 if c in constant else v for c, v in enumerate(out))


def _check_split(data: SourceData, split: str) -> None:
    x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataSourceError(
            f"source {data.name!r}: {split}_x must be a uint8 tensor (N, C, H, W) with C = 1 or 3, got {got}; "
            "convert the images in the loader"
        )
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataSourceError(
            f"source {data.name!r}: {split}_y must be an int64 tensor of shape ({x.shape[0]},), got {got}"
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
        raise DataSourceError(
            f"source {data.name!r}: {split} labels span {int(y.min())}..{int(y.max())} but there are "
            f"{data.num_classes} class names; labels must be 0..{data.num_classes - 1}"
        )


def _check_every_class_present(data: SourceData) -> None:
    """A class without train samples is refused: it would get a head unit that is never trained. A class
    without test samples is warned about: its task's accuracy then covers only the task's other classes."""
    for split in ("train", "test"):
        counts = torch.bincount(getattr(data, f"{split}_y"), minlength=data.num_classes)
        empty = [i for i, n in enumerate(counts.tolist()) if n == 0]
        if not empty:
            continue
        shown = ", ".join(f"{i} ({data.class_names[i]!r})" for i in empty[:10])
        shown += f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        if split == "train":
            raise DataSourceError(
                f"source {data.name!r}: class(es) {shown} have no train samples (of {data.num_classes} classes). "
                "Add train samples for them, or remove them from the class names (integer labels without class "
                "names must be 0..K-1; gaps are closed automatically)"
            )
        warnings.warn(
            f"source {data.name!r}: class(es) {shown} have no test samples, so the accuracy of their tasks is "
            "measured on the tasks' other classes only; add test samples for them to score them",
            UserWarning, stacklevel=4,
        )


# ---------------------------------------------------------------------------------------------- data root


def default_data_root() -> Path:
    """``$CLFRAME_DATA`` if set, else ``$XDG_CACHE_HOME/clframe/data`` (``~/.cache/clframe/data``)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "clframe" / "data"


def resolve_data_root(root: str | os.PathLike | None) -> Path:
    """The given root (with ``~`` expanded), else :func:`default_data_root`."""
    return Path(root).expanduser() if root is not None else default_data_root()


def _resolve_path(root: Path, path: str | os.PathLike) -> Path:
    """Source options name folders either absolutely or relative to the data root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _not_found(what: str, searched: Sequence[Path]) -> DataSourceError:
    where = ", ".join(str(p) for p in searched)
    return DataSourceError(
        f"{what} not found or incomplete (searched {where}). Put the files there, point the {ENV_VAR} "
        "environment variable (or the data_root setting) at the folder that holds them, or pass "
        "download=True to fetch them."
    )


# ---------------------------------------------------------------------------------------------- registry

SourceFn = Callable[..., SourceData]
_REGISTRY: dict[str, SourceFn] = {}
SOURCE_NAMES: tuple[str, ...] = ()


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_source(name: str, fn: SourceFn) -> None:
    """Add (or replace) a loader ``fn(root: Path, download: bool, **options) -> SourceData``."""
    global SOURCE_NAMES
    if not isinstance(name, str) or not _normalize(name):
        raise DataSourceError(f"a source name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise DataSourceError(
            f"source {name!r}: the loader must be callable as fn(root, download, **options)"
        )
    _REGISTRY[_normalize(name)] = fn
    SOURCE_NAMES = tuple(_REGISTRY)


def load_source(
    name: str, root: str | os.PathLike | None = None, download: bool = False, cache: CacheSetting = None,
    **options: Any,
) -> SourceData:
    """Load the registered source ``name`` (case-insensitive, ``-`` = ``_``) from the data root.

    ``cache``: where decoded images are kept between runs (see :mod:`clframe.data.cache`): None for
    ``CLFRAME_CACHE`` or the default folder, False to decode every time, or a folder.
    """
    fn = _REGISTRY.get(_normalize(name)) if isinstance(name, str) else None
    if fn is None:
        raise DataSourceError(
            f"unknown data source {name!r}; choose one of: {', '.join(_REGISTRY)} "
            "(or add your own with register_source(name, fn))"
        )
    _check_options(_normalize(name), fn, options)
    with cache_setting(cache):
        data = fn(resolve_data_root(root), download, **options)
    if not isinstance(data, SourceData):
        raise DataSourceError(
            f"the loader for source {name!r} returned {type(data).__name__}; it must return SourceData"
        )
    return data


def _check_options(name: str, fn: SourceFn, options: dict[str, Any]) -> None:
    """Turn a wrong option into a message listing the right ones (a TypeError would not)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    allowed = ", ".join(accepted) or "none"
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataSourceError(
            f"unknown option(s) {', '.join(unknown)} for source {name!r}; it accepts: {allowed}"
        )
    missing = [p.name for p in params if p.default is p.empty and p.name not in options]
    if missing:
        raise DataSourceError(
            f"source {name!r} needs option(s) {', '.join(missing)}, e.g. load_source({name!r}, {missing[0]}=...)"
        )


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DataSourceError(
            f"image_size must be a positive int (or None to keep the sizes), got {image_size!r}"
        )


def _check_channels(channels: int | None, allow_auto: bool) -> None:
    allowed = (1, 3, None) if allow_auto else (1, 3)
    if channels not in allowed:
        raise DataSourceError(f"channels must be one of {allowed} (1 = grey, 3 = RGB), got {channels!r}")


# ---------------------------------------------------------------------------------------------- helpers


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of x/255, accumulated in float64 chunks so large sets stay cheap."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for chunk in x.split(4096):
        v = chunk.transpose(0, 1).reshape(c, -1).double()
        total += v.sum(1)
        squares += (v * v).sum(1)
    count = x.numel() / c * 255.0
    mean = total / count
    std = (squares / (count * 255.0) - mean**2).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class shuffle with NumPy's legacy RandomState, whose stream NumPy keeps fixed across
    versions, so the split is identical on every machine. Returns sorted (train, test) indices."""
    rng = np.random.RandomState(seed)
    test = [
        rng.permutation(idx)[: int(round(len(idx) * test_fraction))]
        for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


@dataclass
class _Split:
    """Undecoded images (encoded bytes, or file paths) with their raw labels."""

    images: list[bytes | str | Path] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    origins: list[tuple[int, str]] = field(default_factory=list)  # (first row, file) for rows given as bytes

    def describe(self, i: int) -> str:
        src = self.images[i]
        if not isinstance(src, bytes):
            return str(src)
        start, origin = self.origins[bisect.bisect_right([s for s, _ in self.origins], i) - 1]
        return f"row {i - start} of {origin}"


def _decode_one(src: bytes | str | Path, channels: int | None, image_size: int | None) -> np.ndarray:
    """One image as an (h, w, 1 or 3) uint8 array; grey stays grey only when channels is 1 or None."""
    from PIL import Image

    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
        grey = channels == 1 or (channels is None and img.mode in _GREY_MODES)
        img = _to_8bit(img)
        mode = "L" if grey else "RGB"
        img = img.convert(mode) if img.mode != mode else img
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _to_8bit(img: Any) -> Any:
    """A 16-bit grey image scaled to 8 bits (0..65535 -> 0..255); PIL's own convert would clip at 255.

    32-bit integer and float images have no agreed range, so they are refused rather than guessed.
    """
    from PIL import Image

    if img.mode == "F" or (img.mode == "I" and img.format not in ("PNG", None)):
        raise ValueError(f"{img.mode!r} ({'float' if img.mode == 'F' else '32-bit'}) images have no fixed range; "
                         "convert them to 8- or 16-bit images first")
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return img
    values = np.asarray(img).astype(np.float64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"pixel values span {values.min():g}..{values.max():g}, outside 16 bits; "
                         "convert the images to 8- or 16-bit first")
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")


def _decode_images(
    splits: Sequence[_Split], image_size: int | None, channels: int | None
) -> list[torch.Tensor]:
    """Decode every split into one (N, C, H, W) uint8 tensor each, with one size and channel count.

    ``channels=None`` keeps grey data grey and turns it RGB as soon as any image has colour.
    """
    first: tuple[str, tuple[int, int]] | None = None
    all_grey = True
    outs = []
    for split, split_name in zip(splits, ("train", "test"), strict=True):
        if not split.images:
            raise DataSourceError(
                f"the {split_name} split has no images; every data set needs train and test images"
            )
        out: np.ndarray | None = None
        for i, arr in enumerate(_decoded(split, channels, image_size)):
            if first is None:
                first = (split.describe(i), arr.shape[:2])
            if arr.shape[:2] != first[1]:
                (h0, w0), (h, w) = first[1], arr.shape[:2]
                raise DataSourceError(
                    f"images differ in size: {first[0]} is {w0}x{h0} but {split.describe(i)} is {w}x{h}; "
                    "pass image_size=<int> to resize every image to one square size"
                )
            if out is None:
                out = new_image_array(split_name, (len(split.images), 1 if channels == 1 else 3, *first[1]))
            all_grey &= arr.shape[2] == 1
            out[i] = arr.transpose(2, 0, 1)  # a grey image broadcasts to R = G = B, as PIL's L -> RGB does
        outs.append(out)
    if channels is None and all_grey:
        outs = [np.ascontiguousarray(o[:, :1]) for o in outs]
    return [torch.from_numpy(o) for o in outs]


_JPEG_CHUNK = 512  # images per decode_jpeg call: large enough to leave Python out of the loop, small in memory


def _decoded(split: _Split, channels: int | None, image_size: int | None) -> Iterator[np.ndarray]:
    """Every image of ``split`` as an (h, w, 1 or 3) uint8 array, in order, as :func:`_decode_one` gives it.

    JPEGs go through ``torchvision.io.decode_jpeg`` a chunk at a time (about 4x faster than a PIL loop,
    with the same libjpeg output: identical pixels, checked on every CIFAR-10 and Tiny-ImageNet image);
    what it cannot give identically (other formats, CMYK, colour to grey) goes through PIL.
    """
    from PIL import Image

    for start in range(0, len(split.images), _JPEG_CHUNK):
        chunk = split.images[start:start + _JPEG_CHUNK]
        fast = _decode_jpeg_chunk(chunk, channels)
        for j, (src, arr) in enumerate(zip(chunk, fast, strict=True)):
            try:
                arr = _decode_one(src, channels, image_size) if arr is None else _finish(arr, channels, image_size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise DataSourceError(f"cannot decode image {split.describe(start + j)} ({type(e).__name__}: {e}); "
                                      "remove or fix that file") from e
            yield arr


def _finish(arr: np.ndarray, channels: int | None, image_size: int | None) -> np.ndarray:
    """A torchvision-decoded image brought to what :func:`_decode_one` returns: grey made RGB when asked
    (before resizing, as PIL converts first), then PIL's bilinear resize if the size differs."""
    from PIL import Image

    if arr.shape[2] == 1 and channels == 3:
        arr = np.repeat(arr, 3, axis=2)
    if image_size is None or arr.shape[:2] == (image_size, image_size):
        return arr
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    out = np.asarray(img.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return out[:, :, None] if out.ndim == 2 else out


def _jpeg_bytes(src: bytes | str | Path) -> bytes | None:
    if isinstance(src, bytes):
        data = src
    elif Path(src).suffix.lower() in (".jpg", ".jpeg"):
        try:
            data = Path(src).read_bytes()
        except OSError:
            return None  # PIL then reports the file
    else:
        return None
    return data if data[:3] == b"\xff\xd8\xff" else None


def _decode_jpeg_chunk(chunk: Sequence[bytes | str | Path], channels: int | None) -> list[np.ndarray | None]:
    """The JPEGs of ``chunk`` decoded by torchvision as (h, w, c) arrays; None where PIL must decode instead.

    A grey JPEG decodes to its one channel, which the caller broadcasts to RGB exactly as PIL's L -> RGB
    does; a colour JPEG asked for as grey is left to PIL, whose RGB -> L formula libjpeg does not share.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # a torchvision build without its image library
        return [None] * len(chunk)
    raw = [_jpeg_bytes(src) for src in chunk]
    where = [i for i, b in enumerate(raw) if b is not None]
    out: list[np.ndarray | None] = [None] * len(chunk)
    if not where:
        return out
    tensors = [torch.frombuffer(bytearray(raw[i]), dtype=torch.uint8) for i in where]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, TypeError, ValueError):  # one bad file fails the call (and torchvision < 0.19 takes
        decoded = []                                   # no lists): one by one, PIL takes and reports bad ones
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.UNCHANGED))
            except (RuntimeError, ValueError):
                decoded.append(None)
    for i, img in zip(where, decoded, strict=True):
        if img is not None and (img.shape[0] == 3 and channels != 1 or img.shape[0] == 1):
            out[i] = img.permute(1, 2, 0).numpy()
    return out


def _encode_labels(
    train: list[Any], test: list[Any], names: list[str] | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Integer labels keep their ids (names from metadata, else the ids); string labels become
    ids in sorted order of the train labels."""
    values = train + test
    if any(v is None for v in values):
        raise DataSourceError("some rows have no label; drop them or fill the label column")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if names is None:
            return _contiguous_ids(train, test)
        return torch.tensor(train, dtype=torch.int64), torch.tensor(test, dtype=torch.int64), list(names)
    if all(isinstance(v, str) for v in values):
        names = sorted(set(train))
        unseen = sorted(set(test) - set(names))
        if unseen:
            raise DataSourceError(
                f"test labels {unseen[:10]} do not occur in the train split; the class sets must match"
            )
        index = {n: i for i, n in enumerate(names)}
        ids = [torch.tensor([index[v] for v in labels], dtype=torch.int64) for labels in (train, test)]
        return ids[0], ids[1], names
    raise DataSourceError(
        f"labels must be all integers or all strings, got e.g. {values[0]!r}; pick another label_column"
    )


def _contiguous_ids(train: list[int], test: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Integer labels without class names: ids 0..K-1 as they are; gaps (e.g. only 10 and 20) are closed
    by renumbering in sorted order, so no class without samples gets a head unit."""
    used = sorted({int(v) for v in train})
    if used == list(range(len(used))) or (used and used[0] < 0):
        names = [str(i) for i in range(max(int(v) for v in train + test) + 1)]
        return torch.tensor(train, dtype=torch.int64), torch.tensor(test, dtype=torch.int64), names
    unseen = sorted({int(v) for v in test} - set(used))
    if unseen:
        raise DataSourceError(f"test labels {unseen[:10]} do not occur in the train split; the class sets must match")
    index = {v: i for i, v in enumerate(used)}
    warnings.warn(f"the integer labels are not 0..K-1 (they are {used[:10]}{'...' if len(used) > 10 else ''}); "
                  f"they are renumbered 0..{len(used) - 1} in sorted order (class names keep the original labels), "
                  "and class_order refers to the new ids", UserWarning, stacklevel=4)
    ids = [torch.tensor([index[int(v)] for v in labels], dtype=torch.int64) for labels in (train, test)]
    return ids[0], ids[1], [str(v) for v in used]


def _assemble(
    name: str,
    train: _Split,
    test: _Split,
    names: list[str] | None,
    image_size: int | None,
    channels: int | None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> SourceData:
    train_x, test_x = _decode_images([train, test], image_size, channels)
    train_y, test_y, class_names = _encode_labels(train.labels, test.labels, names)
    mean, std = stats or _channel_stats(train_x)
    return SourceData(name, train_x, train_y, test_x, test_y, class_names, mean, std)


# ---------------------------------------------------------------------------------------------- Parquet / HF

_Table = tuple[Any, str]  # (pyarrow.Table, where it came from)


def _parquet_files(folder: Path) -> dict[str, list[Path]] | None:
    """Train/test files in the Hugging Face layout (top level or ``data/``); None when there are none."""
    for base in (folder, folder / "data"):
        train = sorted(base.glob("train*.parquet"))
        test = sorted(base.glob("test*.parquet")) or sorted(base.glob("valid*.parquet"))
        if train or test:
            if not (train and test):
                raise DataSourceError(
                    f"{base} holds {'train' if train else 'test'} Parquet files but no "
                    f"{'test*/valid*' if train else 'train*'}.parquet; add the missing split"
                )
            return {"train": train, "test": test}
    return None


def _read_parquet(files: Sequence[Path]) -> list[_Table]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        try:
            tables.append((pq.read_table(f), str(f)))
        except (OSError, pa.ArrowException) as e:
            raise DataSourceError(f"cannot read Parquet file {f} ({e}); remove or re-download it") from e
    return tables


def _classlabel_names(schema: Any, column: str) -> list[str] | None:
    """ClassLabel names from the ``huggingface`` schema metadata that ``datasets`` writes."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (TypeError, ValueError, KeyError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if names else None


def _pick_column(table: _Table, wanted: str | None, candidates: Sequence[str], option: str) -> str:
    columns = table[0].column_names
    for c in [wanted] if wanted else candidates:
        if c in columns:
            return c
    raise DataSourceError(
        f"{table[1]} has no column {wanted or ' / '.join(candidates)!r}; its columns are {columns}. "
        f"Pass {option}=<name> to pick one"
    )


def _image_cells(column: Any, origin: str) -> list[bytes | str]:
    """Encoded bytes of an HF Image column (struct of bytes/path, or plain binary); a path when no bytes."""
    import pyarrow as pa

    arr = column.combine_chunks()
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return arr.to_pylist()
    if pa.types.is_struct(arr.type) and arr.type.get_field_index("bytes") >= 0:
        data = arr.field("bytes").to_pylist()
        if arr.type.get_field_index("path") < 0:
            return data
        return [b if b is not None else p for b, p in zip(data, arr.field("path").to_pylist(), strict=True)]
    raise DataSourceError(
        f"the image column of {origin} has type {arr.type}, not an image (bytes/path struct)"
    )


def _split_from_tables(tables: Sequence[_Table], image_column: str, label_column: str) -> _Split:
    split = _Split()
    for table, origin in tables:
        for column in (image_column, label_column):
            _pick_column(
                (table, origin), column, (), "image_column" if column == image_column else "label_column"
            )
        if table.num_rows == 0:
            raise DataSourceError(f"{origin} has no rows; remove the empty file or write the data into it")
        split.origins.append((len(split.images), origin))
        split.images.extend(_image_cells(table.column(image_column), origin))
        split.labels.extend(table.column(label_column).to_pylist())
    return split


def _from_tables(
    name: str,
    tables: dict[str, list[_Table]],
    names: list[str] | None,
    image_column: str | None,
    label_column: str,
    image_size: int | None,
    channels: int | None,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> SourceData:
    first = tables["train"][0]
    image_column = _pick_column(first, image_column, ("img", "image"), "image_column")
    label_column = _pick_column(first, label_column, (), "label_column")
    names = names or _classlabel_names(first[0].schema, label_column)
    train, test = (_split_from_tables(tables[s], image_column, label_column) for s in ("train", "test"))
    return _assemble(name, train, test, names, image_size, channels, stats)


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataSourceError(
            "downloading from the Hugging Face hub needs the `datasets` package: pip install clframe[hf]"
        ) from e
    return datasets


def _hub_tables(path: str, label_column: str) -> tuple[dict[str, list[_Table]], list[str] | None]:
    """Fetch a hub data set with ``datasets`` and hand back its Arrow tables (no per-sample decoding)."""
    datasets = _import_datasets()
    try:
        dd = datasets.load_dataset(path)
    except Exception as e:  # network, auth and naming errors come in many types
        raise DataSourceError(
            f"could not fetch the Hugging Face data set {path!r} ({type(e).__name__}: {e}); check the name and "
            "the network, or download it yourself and pass its local folder as path="
        ) from e
    test_key = next((k for k in ("test", "validation", "valid") if k in dd), None)
    if "train" not in dd or test_key is None:
        raise DataSourceError(
            f"hub data set {path!r} has splits {list(dd)}; clframe needs train and test/validation"
        )
    tables = {
        s: [(dd[k].with_format("arrow")[:], f"{path} [{k}]")]
        for s, k in (("train", "train"), ("test", test_key))
    }
    feature = dd["train"].features.get(label_column)
    return tables, getattr(feature, "names", None)


# ---------------------------------------------------------------------------------------------- sources


def _load_digits(root: Path, download: bool) -> SourceData:
    """scikit-learn's bundled 8x8 digits, split 80/20 per class with a fixed seed (never touches disk)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None])
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = (torch.from_numpy(i) for i in _stratified_split(bunch.target, 0.2, _DIGITS_SEED))
    train_x = x[train_idx]
    mean, std = _channel_stats(train_x)
    names = [str(n) for n in bunch.target_names]
    return SourceData("digits", train_x, y[train_idx], x[test_idx], y[test_idx], names, mean, std)


_TORCHVISION_ERRORS = (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError)


def _torchvision_split(cls: type, root: Path, train: bool, download: bool, searched: Sequence[Path]) -> Any:
    """One torchvision split, with its errors turned into messages that say where and what to do."""
    try:
        return cls(str(root), train=train, download=download)
    except _TORCHVISION_ERRORS as e:
        if "not found" in str(e).lower():
            raise _not_found(f"{cls.__name__} data", searched) from e
        raise DataSourceError(
            f"could not {'download or ' if download else ''}read {cls.__name__} under {root} "
            f"({type(e).__name__}: {e}); delete the damaged files in {searched[0]} and load again with download=True"
        ) from e


def _load_mnist_like(cls: type, name: str, root: Path, download: bool, mean: float, std: float) -> SourceData:
    searched = [root / cls.__name__ / "raw"]
    train, test = (_torchvision_split(cls, root, t, download, searched) for t in (True, False))
    return SourceData(
        name,
        train.data.unsqueeze(1).contiguous(),
        train.targets.long(),
        test.data.unsqueeze(1).contiguous(),
        test.targets.long(),
        list(train.classes),
        (mean,),
        (std,),
    )


def _load_mnist(root: Path, download: bool) -> SourceData:
    from torchvision.datasets import MNIST

    return _load_mnist_like(MNIST, "mnist", root, download, 0.1307, 0.3081)


def _load_fashion_mnist(root: Path, download: bool) -> SourceData:
    from torchvision.datasets import FashionMNIST

    return _load_mnist_like(FashionMNIST, "fashion_mnist", root, download, 0.2860, 0.3530)


def _load_cifar(
    cls: type,
    name: str,
    root: Path,
    download: bool,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    searched: Sequence[Path],
) -> SourceData:
    train, test = (_torchvision_split(cls, root, t, download, searched) for t in (True, False))
    (train_x, train_y), (test_x, test_y) = _cifar_tensors(train), _cifar_tensors(test)
    return SourceData(name, train_x, train_y, test_x, test_y, list(train.classes), *stats)


def _cifar_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision keeps CIFAR as one HWC uint8 array: a permute gives NCHW without per-sample work."""
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(
        ds.targets, dtype=torch.int64
    )


def _load_cifar10(root: Path, download: bool) -> SourceData:
    """torchvision's CIFAR-10; offline, the Hugging Face Parquet copy under ``cifar10-jpeg/`` if present."""
    from torchvision.datasets import CIFAR10

    tv_dir, pq_dir = root / CIFAR10.base_folder, root / "cifar10-jpeg"
    pq_files = {s: [pq_dir / f"{s}.parquet"] for s in ("train", "test")}
    if not download and not tv_dir.exists() and all(f[0].is_file() for f in pq_files.values()):
        warnings.warn(
            f"cifar10: loading {pq_dir}, a lossy copy of CIFAR-10 (every image re-encoded as JPEG quality 75); "
            "results on it are close to, not equal to, CIFAR-10 results - quote them as 'CIFAR-10 (JPEG q75)'",
            UserWarning,
            stacklevel=3,
        )
        return cached_source(root, "cifar10_jpeg", pq_files["train"] + pq_files["test"], {"channels": 3},
                             lambda: _from_tables("cifar10_jpeg", {s: _read_parquet(f) for s, f in pq_files.items()},
                                                  None, "img", "label", None, 3, _CIFAR10_STATS))
    return _load_cifar(CIFAR10, "cifar10", root, download, _CIFAR10_STATS, [tv_dir, pq_dir])


def _load_cifar100(root: Path, download: bool) -> SourceData:
    from torchvision.datasets import CIFAR100

    return _load_cifar(CIFAR100, "cifar100", root, download, _CIFAR100_STATS, [root / CIFAR100.base_folder])


def _wordnet_names(folder: Path, wnids: list[str]) -> list[str]:
    """First synonym per WordNet id from ``words.tsv`` (``n01443537<TAB>goldfish, Carassius auratus``)."""
    words_file = folder / "words.tsv"
    if not words_file.is_file():
        return wnids
    words = dict(
        line.split("\t", 1) for line in words_file.read_text(encoding="utf-8").splitlines() if "\t" in line
    )
    return [words[w].split(",")[0].strip() if w in words else w for w in wnids]


def _load_tiny_imagenet(root: Path, download: bool, class_names: str = "words") -> SourceData:
    """Tiny-ImageNet-200 from Parquet (HF layout) under ``tiny-imagenet/``, or the hub when downloading.

    ``class_names="words"`` gives readable names from ``words.tsv``; ``"wnid"`` keeps the WordNet ids
    (needed to match ImageNet-1k classifiers).
    """
    if class_names not in ("words", "wnid"):
        raise DataSourceError(f"tiny_imagenet: class_names must be 'words' or 'wnid', got {class_names!r}")
    folder = root / "tiny-imagenet"
    files = _parquet_files(folder)
    if files is not None:
        data = cached_source(root, "tiny_imagenet", files["train"] + files["test"], {"channels": 3},
                             lambda: _from_tables("tiny_imagenet", {s: _read_parquet(f) for s, f in files.items()},
                                                  None, "image", "label", None, 3))
    elif download:
        data = _from_tables("tiny_imagenet", *_hub_tables("zh-plus/tiny-imagenet", "label"), "image", "label", None, 3)
    else:
        raise _not_found("Tiny-ImageNet Parquet files (train*.parquet and valid.parquet)", [folder])
    if class_names == "words":
        data.class_names = _wordnet_names(folder, data.class_names)
    return data


def _load_hf(
    root: Path,
    download: bool,
    path: str,
    image_column: str | None = None,
    label_column: str = "label",
    image_size: int | None = None,
) -> SourceData:
    """A Hugging Face image data set: a local folder of Parquet files, or a hub name when downloading."""
    _check_image_size(image_size)
    folder = _resolve_path(root, path)
    files = _parquet_files(folder) if folder.is_dir() else None
    if files is not None:
        options = {"image_column": image_column, "label_column": label_column, "image_size": image_size}
        return cached_source(root, f"hf:{path}", files["train"] + files["test"], options,
                             lambda: _from_tables(f"hf:{path}", {s: _read_parquet(f) for s, f in files.items()}, None,
                                                  image_column, label_column, image_size, None))
    if download:
        tables, names = _hub_tables(str(path), label_column)
    elif folder.is_dir():
        raise DataSourceError(
            f"{folder} holds no train*.parquet and test*/valid*.parquet files (also looked in {folder / 'data'}); "
            "put the Parquet files there, or pass a hub name with download=True"
        )
    else:
        raise _not_found(f"Hugging Face data set {str(path)!r}", [folder])
    return _from_tables(f"hf:{path}", tables, names, image_column, label_column, image_size, None)


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` for an ImageFolder-style tree; every class needs images."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataSourceError(
            f"{folder} has no class subfolders; expected {folder}/<class_name>/<image files>"
        )
    out = {}
    for c in classes:
        files = sorted(f for f in c.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataSourceError(
                f"class folder {c} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        out[c.name] = files
    return out


def _split_of(classes: dict[str, list[Path]], names: list[str]) -> _Split:
    pairs = [(f, names.index(c)) for c, files in classes.items() for f in files]
    return _Split(images=[f for f, _ in pairs], labels=[y for _, y in pairs])


def _load_image_folder(
    root: Path,
    download: bool,
    path: str,
    image_size: int = 32,
    channels: int = 3,
    test_fraction: float | None = None,
    seed: int = 0,
) -> SourceData:
    """Images in ``train/`` and ``test/`` class folders (or one class-folder tree split by ``test_fraction``)."""
    _check_image_size(image_size)
    _check_channels(channels, allow_auto=False)
    folder = _resolve_path(root, path)
    if not folder.is_dir():
        raise DataSourceError(
            f"image folder {folder} does not exist; pass path= an existing folder "
            f"(absolute, or relative to the data root {root})"
        )
    if test_fraction is None:
        train_dir, test_dir = folder / "train", folder / "test"
        if not (train_dir.is_dir() and test_dir.is_dir()):
            raise DataSourceError(
                f"{folder} needs train/ and test/ subfolders of class folders; or pass test_fraction=0.2 to split "
                "a single tree of class folders"
            )
        train_classes, test_classes = _class_files(train_dir), _class_files(test_dir)
        if set(train_classes) != set(test_classes):
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise DataSourceError(
                f"train and test class folders differ in {folder} (only in train: {only_train}, only in test: "
                f"{only_test}); give both the same class folders"
            )
        names = list(train_classes)
        train, test = _split_of(train_classes, names), _split_of(test_classes, names)
    else:
        if not 0 < test_fraction < 1:
            raise DataSourceError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
        classes = _class_files(folder)
        names = list(classes)
        whole = _split_of(classes, names)
        train_idx, test_idx = _stratified_split(np.asarray(whole.labels), test_fraction, seed)
        train, test = (
            _Split(images=[whole.images[i] for i in idx], labels=[whole.labels[i] for i in idx])
            for idx in (train_idx, test_idx)
        )
    name = f"image_folder:{folder.name}"
    options = {"image_size": image_size, "channels": channels, "test_fraction": test_fraction, "seed": seed}
    return cached_source(root, name, [*train.images, *test.images], options,
                         lambda: _assemble(name, train, test, names, image_size, channels))


for _name, _fn in (
    ("digits", _load_digits),
    ("mnist", _load_mnist),
    ("fashion_mnist", _load_fashion_mnist),
    ("cifar10", _load_cifar10),
    ("cifar100", _load_cifar100),
    ("tiny_imagenet", _load_tiny_imagenet),
    ("hf", _load_hf),
    ("image_folder", _load_image_folder),
):
    register_source(_name, _fn)
