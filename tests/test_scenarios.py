"""Tests for clframe.data.scenarios and clframe.data.stream: class-, task- and domain-incremental
streams built from the embedded ``digits`` source or small synthetic sources, their error messages,
the batched dataset path and stream signatures."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from clframe.data.datamodule import ConcatTaskDataset
from clframe.data.scenarios import (
    PermutePixels,
    RotateImages,
    ScenarioError,
    class_incremental,
    domain_incremental,
    task_incremental,
)
from clframe.data.sources import SOURCE_NAMES, DataSourceError, SourceData, load_source
from clframe.data.stream import TaskDataset, TaskStream, passthrough_collate


@pytest.fixture(scope="module")
def digits() -> SourceData:
    return load_source("digits")


def synthetic_source(
    n_classes: int = 10,
    train_per_class: int = 6,
    test_per_class: int = 3,
    shape: tuple[int, int, int] = (1, 4, 4),
    seed: int = 0,
    name: str = "synthetic",
) -> SourceData:
    """Random uint8 images, classes in blocks (labels 0,0,..,1,1,..)."""
    g = torch.Generator().manual_seed(seed)
    train_y = torch.arange(n_classes).repeat_interleave(train_per_class)
    test_y = torch.arange(n_classes).repeat_interleave(test_per_class)
    train_x = torch.randint(0, 256, (len(train_y), *shape), dtype=torch.uint8, generator=g)
    test_x = torch.randint(0, 256, (len(test_y), *shape), dtype=torch.uint8, generator=g)
    c = shape[0]
    return SourceData(name, train_x, train_y, test_x, test_y, [f"class{i}" for i in range(n_classes)],
                      (0.5,) * c, (0.25,) * c)


def source_labels(ds: TaskDataset, source_y: torch.Tensor) -> torch.Tensor:
    """The original (source) labels of a task dataset's samples."""
    return source_y[ds.indices]


# ---------------------------------------------------------------------------------------------- class-incremental


def test_class_incremental_partitions_classes_and_samples(digits: SourceData) -> None:
    stream = class_incremental(digits, n_tasks=5, shuffle_classes=True, seed=3)
    order = stream.description["class_order"]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert stream.scenario == "class" and len(stream) == stream.num_tasks == 5 and stream.num_classes == 10
    assert stream.input_shape == (1, 8, 8) and stream.mean == digits.mean
    assert stream.class_names == [digits.class_names[c] for c in order]

    # every class in exactly one task; task t owns labels 2t, 2t+1 (positions in the class order)
    all_classes = [c for task in stream for c in task.classes]
    assert sorted(all_classes) == list(range(10))
    for t, task in enumerate(stream):
        assert task.id == t and task.classes == (2 * t, 2 * t + 1)
    assert stream.class_to_task() == [c // 2 for c in range(10)]

    for split, source_y in (("train", digits.train_y), ("test", digits.test_y)):
        parts = [getattr(task, split) for task in stream]
        assert sum(len(p) for p in parts) == len(source_y), f"{split} sizes do not add up"
        idx = torch.cat([p.indices for p in parts])
        assert len(idx.unique()) == len(idx), f"a {split} sample is in two tasks"
        for task, ds in zip(stream, parts, strict=True):
            labels = ds.targets
            assert set(labels.unique().tolist()) == set(task.classes), f"task {task.id} {split} has foreign labels"
            # remapped label = position of the source class in the class order
            assert torch.equal(torch.tensor(order)[labels], source_labels(ds, source_y))
            x, y, t = ds.__getitems__(list(range(len(ds))))
            assert torch.equal(x, getattr(digits, f"{split}_x")[ds.indices])
            assert torch.equal(y, labels) and bool((t == task.id).all())


def test_natural_order_without_shuffle(digits: SourceData) -> None:
    stream = class_incremental(digits, classes_per_task=5, seed=42)
    assert stream.description["class_order"] == list(range(10))
    assert [t.classes for t in stream] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert torch.equal(stream[1].train.targets, source_labels(stream[1].train, digits.train_y))


@pytest.mark.parametrize(
    "kwargs",
    [dict(first_task_classes=50, classes_per_task=10), dict(first_task_classes=50, n_tasks=6),
     dict(first_task_classes=50, n_tasks=6, classes_per_task=10)],
    ids=["cpt", "n_tasks", "both"],
)
def test_first_task_classes_b50_inc10(kwargs: dict) -> None:
    src = synthetic_source(n_classes=100, train_per_class=2, test_per_class=1)
    stream = class_incremental(src, **kwargs)
    sizes = [len(t.classes) for t in stream]
    assert sizes == [50, 10, 10, 10, 10, 10]
    assert stream[0].classes == tuple(range(50)) and stream[5].classes == tuple(range(90, 100))
    assert len(stream[0].train) == 100 and len(stream[3].train) == 20 and len(stream[3].test) == 10
    assert sum(len(t.train) for t in stream) == len(src.train_y)


def test_explicit_class_order_subset(digits: SourceData) -> None:
    order = [7, 2, 9, 0]
    stream = class_incremental(digits, n_tasks=2, class_order=order, shuffle_classes=True, seed=5)
    assert stream.description["class_order"] == order  # an explicit order wins over shuffling
    assert stream.num_classes == 4 and stream.class_names == ["7", "2", "9", "0"]
    assert [t.classes for t in stream] == [(0, 1), (2, 3)]
    for split, source_y in (("train", digits.train_y), ("test", digits.test_y)):
        for task in stream:
            ds = getattr(task, split)
            src_labels = source_labels(ds, source_y)
            assert set(src_labels.unique().tolist()) == {order[c] for c in task.classes}
            assert torch.equal(torch.tensor(order)[ds.targets], src_labels)
        total = sum(len(getattr(t, split)) for t in stream)
        assert total == int(torch.isin(source_y, torch.tensor(order)).sum())


def test_shuffle_classes_is_seeded(digits: SourceData) -> None:
    def order(seed: int) -> list[int]:
        return class_incremental(digits, n_tasks=5, shuffle_classes=True, seed=seed).description["class_order"]

    assert order(11) == order(11)
    assert order(11) != order(12)
    assert len({tuple(order(s)) for s in range(5)}) == 5
    a = class_incremental(digits, n_tasks=5, shuffle_classes=True, seed=11)
    b = class_incremental(digits, n_tasks=5, shuffle_classes=True, seed=11)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta.train.indices, tb.train.indices) and torch.equal(ta.train.targets, tb.train.targets)


def test_val_fraction_is_disjoint_from_train(digits: SourceData) -> None:
    plain = class_incremental(digits, n_tasks=5, seed=1)
    split = class_incremental(digits, n_tasks=5, seed=1, val_fraction=0.2)
    for p, s in zip(plain, split, strict=True):
        assert p.val is None and s.val is not None
        train, val = set(s.train.indices.tolist()), set(s.val.indices.tolist())
        assert not train & val, f"task {s.id}: validation overlaps training"
        assert train | val == set(p.train.indices.tolist())
        assert len(val) == round(0.2 * len(p.train))
        assert s.val.inputs is digits.train_x and s.val.task_id == s.id
        assert set(s.val.targets.unique().tolist()) <= set(s.classes)
        assert torch.equal(s.test.indices, p.test.indices)  # the test split is untouched
    again = class_incremental(digits, n_tasks=5, seed=1, val_fraction=0.2)
    assert torch.equal(again[2].val.indices, split[2].val.indices)


def test_per_class_limits(digits: SourceData) -> None:
    stream = class_incremental(digits, n_tasks=5, seed=4, train_samples_per_class=5, test_samples_per_class=2)
    full = class_incremental(digits, n_tasks=5, seed=4)
    for task, whole in zip(stream, full, strict=True):
        for ds, n in ((task.train, 5), (task.test, 2)):
            assert torch.bincount(ds.targets, minlength=10)[list(task.classes)].tolist() == [n] * len(task.classes)
        assert set(task.train.indices.tolist()) <= set(whole.train.indices.tolist())
    again = class_incremental(digits, n_tasks=5, seed=4, train_samples_per_class=5, test_samples_per_class=2)
    assert torch.equal(again[0].train.indices, stream[0].train.indices)
    other = class_incremental(digits, n_tasks=5, seed=5, train_samples_per_class=5, test_samples_per_class=2)
    assert not torch.equal(other[0].train.indices, stream[0].train.indices)
    # a limit above the class sizes keeps everything
    big = class_incremental(digits, n_tasks=5, train_samples_per_class=10_000)
    assert sum(len(t.train) for t in big) == len(digits.train_y)


def test_task_incremental_sets_scenario(digits: SourceData) -> None:
    stream = task_incremental(digits, n_tasks=5, shuffle_classes=True, seed=2)
    ref = class_incremental(digits, n_tasks=5, shuffle_classes=True, seed=2)
    assert stream.scenario == "task" and ref.scenario == "class"
    assert [t.classes for t in stream] == [t.classes for t in ref]
    assert stream.description["class_order"] == ref.description["class_order"]
    assert torch.equal(stream[3].train.indices, ref[3].train.indices)


# ---------------------------------------------------------------------------------------------- domain-incremental


def test_domain_permutation(digits: SourceData) -> None:
    stream = domain_incremental(digits, kind="permutation", n_tasks=3, seed=0)
    assert stream.scenario == "domain" and len(stream) == 3 and stream.num_classes == 10
    perms = []
    for task in stream:
        assert task.classes == tuple(range(10)) and task.domain == f"permutation_{task.id}"
        tf = task.train.input_transform
        assert isinstance(tf, PermutePixels) and task.test.input_transform is tf  # same map on train and test
        perm = tf.permutation
        assert torch.equal(perm.sort().values, torch.arange(64))
        perms.append(perm)
        # the data are the source's, permuted; labels are untouched
        assert len(task.train) == len(digits.train_y) and len(task.test) == len(digits.test_y)
        x, y, t = task.train.__getitems__(list(range(0, len(task.train), 37)))
        raw = digits.train_x[task.train.indices[::37]]
        assert torch.equal(x, raw.flatten(-2)[..., perm].view_as(raw))
        assert torch.equal(y, digits.train_y[task.train.indices[::37]]) and bool((t == task.id).all())
        # fixed: the same sample is permuted the same way every time
        assert torch.equal(task.test[5][0], task.test[5][0])
    assert not torch.equal(perms[0], perms[1]) and not torch.equal(perms[1], perms[2])
    assert not torch.equal(perms[0], perms[2])
    assert not any(torch.equal(p, torch.arange(64)) for p in perms)

    again = domain_incremental(digits, kind="permutation", n_tasks=3, seed=0)
    assert all(torch.equal(a.train.input_transform.permutation, p) for a, p in zip(again, perms, strict=True))
    other = domain_incremental(digits, kind="permutation", n_tasks=3, seed=1)
    assert not torch.equal(other[0].train.input_transform.permutation, perms[0])


def test_domain_permutation_identity_first(digits: SourceData) -> None:
    stream = domain_incremental(digits, kind="permutation", n_tasks=3, seed=0, identity_first=True)
    assert torch.equal(stream[0].train.input_transform.permutation, torch.arange(64))
    x, _, _ = stream[0].test.__getitems__(list(range(len(stream[0].test))))
    assert torch.equal(x, digits.test_x[stream[0].test.indices])
    for task in stream.tasks[1:]:
        assert not torch.equal(task.train.input_transform.permutation, torch.arange(64))


def test_domain_rotation_given_angles(digits: SourceData) -> None:
    stream = domain_incremental(digits, kind="rotation", angles=[0, 90, 45], seed=0)
    assert len(stream) == 3 and [t.domain for t in stream] == ["rotation_0.0", "rotation_90.0", "rotation_45.0"]
    assert [t.train.input_transform.angle for t in stream] == [0.0, 90.0, 45.0]
    assert all(isinstance(t.train.input_transform, RotateImages) for t in stream)
    positions = list(range(0, len(digits.test_y), 11))
    raw = digits.test_x[stream[0].test.indices[positions]]
    x0, x90, x45 = (t.test.__getitems__(positions)[0] for t in stream)
    assert x90.dtype == torch.uint8 and x90.shape == raw.shape
    assert torch.equal(x0, raw)
    # 90 degrees counter-clockwise maps the pixel grid onto itself: equal to rot90 up to interpolation
    diff = (x90.int() - torch.rot90(raw, 1, dims=(-2, -1)).int()).abs()
    assert int(diff.max()) <= 1
    assert int((x90.int() - torch.rot90(raw, -1, dims=(-2, -1)).int()).abs().max()) > 100  # not clockwise
    assert not torch.equal(x45, raw) and not torch.equal(x45, x90)


def test_domain_rotation_from_range_is_seeded(digits: SourceData) -> None:
    def angles(seed: int) -> list[float]:
        s = domain_incremental(digits, kind="rotation", n_tasks=4, angle_range=(10.0, 30.0), seed=seed)
        return [t.train.input_transform.angle for t in s]

    a = angles(0)
    assert len(a) == 4 and all(10.0 <= x <= 30.0 for x in a) and len(set(a)) == 4
    assert angles(0) == a and angles(1) != a


def test_domain_datasets_sequence() -> None:
    a = synthetic_source(seed=1, name="a")
    b = synthetic_source(seed=2, name="b", train_per_class=4)
    stream = domain_incremental([a, b], kind="datasets")
    assert [t.domain for t in stream] == ["a", "b"] and stream.scenario == "domain"
    assert stream[0].train.inputs is a.train_x and stream[1].train.inputs is b.train_x
    assert len(stream[1].train) == len(b.train_y) and stream[1].train.input_transform is None
    assert stream[1].train.task_id == 1
    with pytest.raises(ScenarioError, match="one task per data set"):
        domain_incremental([a, b], kind="datasets", n_tasks=3)


def test_domain_datasets_with_mismatched_shapes_raise() -> None:
    a = synthetic_source(name="small")
    b = synthetic_source(name="large", shape=(1, 6, 6))
    with pytest.raises(ScenarioError) as err:
        domain_incremental([a, b], kind="datasets")
    msg = str(err.value)
    assert "small" in msg and "large" in msg and "input shape" in msg and "image_size" in msg
    c = synthetic_source(name="fewer", n_classes=5)
    with pytest.raises(ScenarioError, match="label space"):
        domain_incremental([a, c], kind="datasets")


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(n_tasks=3), ["10 classes", "3 tasks", "dividing"]),
        (dict(classes_per_task=3), ["do not divide", "classes_per_task"]),
        (dict(n_tasks=3, classes_per_task=2), ["n_tasks=3", "classes_per_task=2", "5 tasks"]),
        (dict(n_tasks=5, class_order=[1, 2, 2, 3]), ["more than once", "[2]"]),
        (dict(n_tasks=2, class_order=[0, 12, 3, -1]), ["[-1, 12]", "0..9"]),
        (dict(n_tasks=0), ["n_tasks", "at least 1"]),
        (dict(n_tasks=-2), ["n_tasks", "at least 1"]),
        (dict(n_tasks=2, classes_per_task=0), ["classes_per_task", "at least 1"]),
        (dict(), ["n_tasks or classes_per_task"]),
        (dict(n_tasks=5, first_task_classes=0), ["first_task_classes", "1..10"]),
        (dict(n_tasks=5, first_task_classes=11), ["first_task_classes", "1..10"]),
        (dict(n_tasks=1, first_task_classes=4), ["6 classes are left", "no task"]),
        (dict(n_tasks=5, val_fraction=1.5), ["val_fraction"]),
    ],
    ids=["indivisible", "cpt_indivisible", "inconsistent", "duplicate", "unknown_class", "zero_tasks",
         "negative_tasks", "zero_cpt", "no_split", "first_zero", "first_too_big", "first_leftover", "bad_val"],
)
def test_class_incremental_bad_arguments(digits: SourceData, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ScenarioError) as err:
        class_incremental(digits, **kwargs)
    for w in words:
        assert w in str(err.value), f"{w!r} missing from: {err.value}"
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(kind="scramble", n_tasks=2), ["scramble", "permutation", "rotation", "datasets"]),
        (dict(kind="permutation", n_tasks=0), ["n_tasks", "positive"]),
        (dict(kind="permutation", n_tasks=-1), ["n_tasks", "positive"]),
        (dict(kind="permutation"), ["n_tasks", "positive"]),
        (dict(kind="rotation", n_tasks=3, angles=[0, 45]), ["2 angles", "n_tasks=3"]),
    ],
    ids=["unknown_kind", "zero_tasks", "negative_tasks", "no_tasks", "angle_count"],
)
def test_domain_incremental_bad_arguments(digits: SourceData, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ScenarioError) as err:
        domain_incremental(digits, **kwargs)
    for w in words:
        assert w in str(err.value), f"{w!r} missing from: {err.value}"


def test_domain_incremental_needs_one_source_for_permutations(digits: SourceData) -> None:
    with pytest.raises(ScenarioError, match="one data source"):
        domain_incremental([digits, digits], kind="permutation", n_tasks=2)
    with pytest.raises(ScenarioError, match="at least one"):
        domain_incremental([], kind="datasets")


def test_empty_class_order_raises_scenario_error(digits: SourceData) -> None:
    with pytest.raises(ScenarioError):
        class_incremental(digits, n_tasks=5, class_order=[])


def test_negative_per_class_limit_raises(digits: SourceData) -> None:
    with pytest.raises(ScenarioError):
        class_incremental(digits, n_tasks=5, train_samples_per_class=-1)


def test_rotation_with_zero_tasks_raises(digits: SourceData) -> None:
    with pytest.raises(ScenarioError):
        domain_incremental(digits, kind="rotation", n_tasks=0, angles=[10, 20])


def test_unknown_source_lists_allowed_names() -> None:
    with pytest.raises(DataSourceError) as err:
        load_source("nope")
    msg = str(err.value)
    assert "nope" in msg
    for name in ("digits", "mnist", "cifar10", "image_folder"):
        assert name in msg
    for name in SOURCE_NAMES:
        assert name in msg


# ---------------------------------------------------------------------------------------------- datasets and loaders


def test_task_dataset_getitems_and_getitem(digits: SourceData) -> None:
    task = class_incremental(digits, n_tasks=5)[2]
    ds = task.test
    x, y, t = ds.__getitems__([0, 3, 5])
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.uint8
    assert y.shape == (3,) and y.dtype == torch.int64 and t.shape == (3,) and t.dtype == torch.int64
    assert t.tolist() == [2, 2, 2] and set(y.tolist()) <= set(task.classes)
    assert torch.equal(x, digits.test_x[ds.indices[[0, 3, 5]]])
    xi, yi, ti = ds[3]
    assert xi.shape == (1, 8, 8) and xi.dtype == torch.uint8 and yi.ndim == 0 and ti.ndim == 0
    assert torch.equal(xi, x[1]) and int(yi) == int(y[1]) and int(ti) == 2
    assert torch.equal(ds.targets, ds.labels[ds.indices])
    sub = ds.subset(torch.tensor([5, 0]))
    assert len(sub) == 2 and torch.equal(sub.__getitems__([0, 1])[0], x[[2, 0]]) and sub.task_id == 2
    with pytest.raises(ValueError, match="differ in length"):
        TaskDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 0)


def test_dataloader_with_passthrough_collate(digits: SourceData) -> None:
    task = class_incremental(digits, n_tasks=5)[1]
    ds = task.train
    loader = DataLoader(ds, batch_size=32, shuffle=True, collate_fn=passthrough_collate,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == -(-len(ds) // 32)
    for x, y, t in batches[:-1]:
        assert x.shape == (32, 1, 8, 8) and x.dtype == torch.uint8
        assert y.shape == (32,) and y.dtype == torch.int64 and t.shape == (32,) and bool((t == 1).all())
    assert len(batches[-1][1]) == len(ds) - 32 * (len(batches) - 1)
    ys = torch.cat([b[1] for b in batches])
    assert torch.equal(ys.sort().values, ds.targets.sort().values)  # every sample exactly once


def test_concat_task_dataset_matches_its_parts(digits: SourceData) -> None:
    # permuted tasks: each part keeps its own transform inside the concatenation
    stream = domain_incremental(digits, kind="permutation", n_tasks=3, seed=0, train_samples_per_class=4)
    parts = [t.train for t in stream]
    cat = ConcatTaskDataset(parts)
    assert len(cat) == sum(len(p) for p in parts) == 120
    where = [(k, i) for k, p in enumerate(parts) for i in range(len(p))]
    positions = torch.randperm(len(cat), generator=torch.Generator().manual_seed(0))[:50].tolist()
    positions += [0, len(cat) - 1, 40, 39, 40]  # part boundaries and a repeat
    x, y, t = cat.__getitems__(positions)
    assert x.shape == (len(positions), 1, 8, 8) and x.dtype == torch.uint8
    for row, pos in enumerate(positions):
        k, i = where[pos]
        xe, ye, te = parts[k][i]
        assert torch.equal(x[row], xe) and int(y[row]) == int(ye) and int(t[row]) == int(te) == k
    loader = DataLoader(cat, batch_size=16, shuffle=True, collate_fn=passthrough_collate)
    seen = torch.cat([b[2] for b in loader])
    assert torch.bincount(seen).tolist() == [40, 40, 40]


# ---------------------------------------------------------------------------------------------- signatures


def test_signature_tracks_order_and_seed(digits: SourceData) -> None:
    def sig(**kw) -> str:
        return class_incremental(digits, n_tasks=5, **kw).signature()

    base = sig(shuffle_classes=True, seed=0)
    assert sig(shuffle_classes=True, seed=0) == base and len(base) == 16
    assert sig(shuffle_classes=True, seed=1) != base  # another seed: another class order
    assert sig(seed=0) != base
    assert sig(seed=0) != sig(seed=1)  # the seed alone (same order) still changes it
    assert sig(class_order=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]) != sig()
    assert sig(train_samples_per_class=5) != sig()
    assert task_incremental(digits, n_tasks=5).signature() != sig()


def test_task_stream_rejects_unknown_scenario(digits: SourceData) -> None:
    stream = class_incremental(digits, n_tasks=5)
    with pytest.raises(ValueError, match="scenario must be one of"):
        TaskStream("x", "online", stream.tasks, 10, (1, 8, 8), (0.0,), (1.0,))
