"""Scenario builders: turn a loaded data source into a :class:`TaskStream`.

Two questions define a stream: how the tasks differ (``tasks``: ``split`` = each task a subset of the
classes; ``permutation``, ``rotation``, ``corruption``, ``datasets`` = each task a new input
distribution) and what is shared at test time (``scenario``: ``class``, ``task``, ``domain``).
Every pair is a stream (see :func:`build_stream`):

- split + class/task: labels are remapped to the class order, so task 0 owns the lowest label ids and
  "classes seen so far" is a prefix.
- split + domain: each task's classes are relabelled to their position within the task (task t's
  classes become 0..k-1), one shared k-way head (Split-MNIST as a domain-incremental problem).
- domain shift + domain: the label space is shared and the inputs change.
- domain shift + class/task: task t's labels are offset by t x (classes per domain), so every task
  brings new classes (Permuted-MNIST as a 100-class problem, or with one head per task).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from clframe.data.corruptions import CORRUPTIONS, DEFAULT_CORRUPTIONS, corrupt
from clframe.data.sources import SourceData
from clframe.data.stream import Task, TaskDataset, TaskStream
from clframe.errors import ClframeError


class ScenarioError(ClframeError):
    """A scenario's arguments do not describe a valid stream; the message says how to fix them."""


# ----------------------------------------------------------------------------- helpers
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _limit_per_class(labels: Tensor, classes: Sequence[int], limit: int | None, gen: torch.Generator) -> Tensor:
    """Indices of the samples of ``classes`` (in label space), at most ``limit`` per class, seeded."""
    if limit is not None and limit < 1:
        raise ScenarioError(f"samples per class must be a positive number (or unset for all), got {limit}")
    picks = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        if limit is not None and len(idx) > limit:
            idx = idx[torch.randperm(len(idx), generator=gen)[:limit]].sort().values
        picks.append(idx)
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


def _split_val(indices: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    if not fraction:
        return indices, None
    if not 0.0 < fraction < 1.0:
        raise ScenarioError(f"val_fraction must be in [0, 1), got {fraction}")
    perm = indices[torch.randperm(len(indices), generator=gen)]
    n_val = max(1, int(round(fraction * len(indices))))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def resolve_class_order(num_classes: int, class_order: Sequence[int] | None, seed: int | None) -> list[int]:
    """The order in which classes arrive: given explicitly, seeded permutation, or natural order."""
    if class_order is not None:
        order = [int(c) for c in class_order]
        unknown = sorted({c for c in order if not 0 <= c < num_classes})
        if unknown:
            raise ScenarioError(
                f"class_order names classes {unknown} that the data set does not have; valid class ids are "
                f"0..{num_classes - 1}."
            )
        dupes = sorted({c for c in order if order.count(c) > 1})
        if dupes:
            raise ScenarioError(f"class_order lists classes {dupes} more than once; give each class once.")
        return order
    if seed is None:
        return list(range(num_classes))
    return torch.randperm(num_classes, generator=_generator(seed)).tolist()


def split_classes(
    n_classes: int, n_tasks: int | None, classes_per_task: int | None, first_task_classes: int | None
) -> list[int]:
    """Number of classes in each task, checked: every task non-empty and all classes used."""
    if n_classes == 0:
        raise ScenarioError("the class order is empty; give at least one class (or leave class_order unset for all)")
    first = first_task_classes
    if first is not None and not 0 < first <= n_classes:
        raise ScenarioError(f"first_task_classes must be in 1..{n_classes}, got {first}")
    rest = n_classes - (first or 0)
    rest_tasks = None if n_tasks is None else n_tasks - (1 if first else 0)
    if n_tasks is not None and n_tasks < 1:
        raise ScenarioError(f"n_tasks must be at least 1, got {n_tasks}")
    if classes_per_task is not None and classes_per_task < 1:
        raise ScenarioError(f"classes_per_task must be at least 1, got {classes_per_task}")
    if classes_per_task is None and rest_tasks is None:
        raise ScenarioError("give n_tasks or classes_per_task (or both) to split the classes into tasks")
    if classes_per_task is None:
        if rest_tasks == 0:
            if rest:
                raise ScenarioError(f"{rest} classes are left after the first task but no task to hold them")
            return [first]
        if rest % rest_tasks:
            raise ScenarioError(
                f"{rest} classes cannot be split evenly into {rest_tasks} tasks; choose n_tasks dividing {rest} "
                f"(e.g. {[d for d in range(1, rest + 1) if rest % d == 0]}), or set classes_per_task, "
                "first_task_classes or a shorter class_order."
            )
        classes_per_task = rest // rest_tasks
    if rest % classes_per_task:
        raise ScenarioError(
            f"{rest} classes do not divide into tasks of {classes_per_task}; choose classes_per_task dividing "
            f"{rest}, set first_task_classes, or give a class_order with a multiple of {classes_per_task} classes."
        )
    counts = ([first] if first else []) + [classes_per_task] * (rest // classes_per_task)
    if n_tasks is not None and len(counts) != n_tasks:
        raise ScenarioError(
            f"n_tasks={n_tasks} and classes_per_task={classes_per_task} (first_task_classes={first}) do not fit "
            f"{n_classes} classes: that split gives {len(counts)} tasks. Drop one of the two arguments, or give "
            "a class_order with only the classes you want."
        )
    if not counts or min(counts) < 1:
        raise ScenarioError("the split leaves a task without classes")
    return counts


# ----------------------------------------------------------------------------- class/task-incremental
def class_incremental(
    source: SourceData,
    n_tasks: int | None = None,
    classes_per_task: int | None = None,
    first_task_classes: int | None = None,
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    seed: int = 0,
    val_fraction: float = 0.0,
    train_samples_per_class: int | None = None,
    test_samples_per_class: int | None = None,
    scenario: str = "class",
) -> TaskStream:
    """Split a source's classes into tasks.

    ``class_order`` fixes the order explicitly (it may list a subset of the classes); otherwise the
    natural order is used, or a permutation seeded by ``seed`` when ``shuffle_classes`` is set.
    ``first_task_classes`` gives a larger first task ("B50-inc10": 50 then 10 per task).
    Labels are remapped to positions in the class order.
    """
    order = resolve_class_order(source.num_classes, class_order, seed if shuffle_classes else None)
    counts = split_classes(len(order), n_tasks, classes_per_task, first_task_classes)
    within = scenario == "domain"  # split tasks sharing one head: labels are positions within the task
    if within and len(set(counts)) > 1:
        raise ScenarioError(
            f"a domain-incremental split stream shares one head of k outputs between tasks, so every task needs "
            f"the same number of classes; this split gives {counts}. Drop first_task_classes (or make the class "
            "order divide evenly), or use scenario='class' or 'task' for tasks of different sizes."
        )
    gen = _generator(seed)
    label_map = torch.full((source.num_classes,), -1, dtype=torch.long)
    label_map[torch.tensor(order)] = torch.arange(len(order)) % counts[0] if within else torch.arange(len(order))
    train_y, test_y = label_map[source.train_y], label_map[source.test_y]

    pos_train, pos_test = _positions(order, source.num_classes, source.train_y, source.test_y) if within else (train_y, test_y)
    tasks, start = [], 0
    for t, n in enumerate(counts):
        positions = tuple(range(start, start + n))
        classes = tuple(range(n)) if within else positions
        start += n
        train_idx = _limit_per_class(pos_train, positions, train_samples_per_class, gen)
        test_idx = _limit_per_class(pos_test, positions, test_samples_per_class, gen)
        if len(train_idx) == 0 or len(test_idx) == 0:
            names = [source.class_names[order[c]] for c in positions]
            raise ScenarioError(f"task {t} (classes {names}) has no {'training' if len(train_idx) == 0 else 'test'} samples")
        train_idx, val_idx = _split_val(train_idx, val_fraction, gen)
        tasks.append(Task(
            id=t, classes=classes,
            train=TaskDataset(source.train_x, train_y, t, train_idx),
            test=TaskDataset(source.test_x, test_y, t, test_idx),
            val=None if val_idx is None else TaskDataset(source.train_x, train_y, t, val_idx),
        ))
    names = [source.class_names[c] for c in order]
    if within:  # output j stands for the j-th class of every task, e.g. "0/2/4/6/8"
        names = ["/".join(names[j::counts[0]]) for j in range(counts[0])]
    description = {"class_order": order, "counts": counts, "val_fraction": val_fraction,
                   "train_limit": train_samples_per_class, "test_limit": test_samples_per_class}
    if within:
        description["labels"] = "within_task"
    return TaskStream(
        name=f"split_{source.name}", scenario=scenario, tasks=tasks, num_classes=counts[0] if within else len(order),
        input_shape=tuple(source.input_shape), mean=tuple(source.mean), std=tuple(source.std),
        class_names=names, seed=seed, description=description,
    )


def _positions(order: Sequence[int], num_classes: int, *labels: Tensor) -> tuple[Tensor, ...]:
    """Source labels mapped to positions in the class order (-1 for classes left out)."""
    pos = torch.full((num_classes,), -1, dtype=torch.long)
    pos[torch.tensor(list(order))] = torch.arange(len(order))
    return tuple(pos[y] for y in labels)


def task_incremental(source: SourceData, **kwargs) -> TaskStream:
    """The class-incremental split with the task id available at test time."""
    return class_incremental(source, scenario="task", **kwargs)


def domain_split(source: SourceData, **kwargs) -> TaskStream:
    """The class split as a domain-incremental stream: every task's classes relabelled to 0..k-1 (their
    position within the task) and one shared k-way head, as in Split-MNIST's domain-incremental form."""
    return class_incremental(source, scenario="domain", **kwargs)


# ----------------------------------------------------------------------------- domain-incremental
class PermutePixels:
    """Applies one fixed pixel permutation (the same for every channel) to a uint8 batch."""

    def __init__(self, permutation: Tensor) -> None:
        self.permutation = permutation

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.flatten(-2)  # gather: the same result as flat[..., permutation], several times faster
        return flat.gather(-1, self.permutation.expand_as(flat)).view_as(x)


class RotateImages:
    """Rotates a batch of images by one fixed angle (degrees, counter-clockwise)."""

    def __init__(self, angle: float) -> None:
        self.angle = float(angle)

    def __call__(self, x: Tensor) -> Tensor:
        return TF.rotate(x, self.angle, interpolation=InterpolationMode.BILINEAR)


DOMAIN_KINDS = ("permutation", "rotation", "datasets", "corruption")
TASK_KINDS = ("split", *DOMAIN_KINDS)
"""How tasks differ: a split of the classes, or a shift of the input distribution."""

_SPLIT_OPTIONS = ("classes_per_task", "first_task_classes", "class_order", "shuffle_classes")
_KIND_OPTIONS = {"angles": "rotation", "corruptions": "corruption", "domain_sources": "datasets"}


def resolve_task_kind(scenario: str, tasks: str | None = None, domain: str | None = None) -> str:
    """The kind of tasks (:data:`TASK_KINDS`) that ``tasks`` (or its older name ``domain``) asks for.

    Unset, class- and task-incremental streams split the classes; a domain-incremental stream must say
    which, since both a class split and a domain shift make sense there.
    """
    if scenario not in ("class", "task", "domain"):
        raise ScenarioError(f"unknown scenario {scenario!r}; allowed: class, task, domain")
    for name, value in (("tasks", tasks), ("domain", domain)):
        if value is not None and value not in TASK_KINDS:
            raise ScenarioError(f"unknown {name} {value!r}; allowed: {', '.join(TASK_KINDS)}")
    if tasks is not None and domain is not None and tasks != domain:
        raise ScenarioError(
            f"tasks={tasks!r} and domain={domain!r} disagree: both say how the tasks differ (domain is the older "
            "name of tasks). Set only tasks."
        )
    kind = tasks if tasks is not None else domain
    if kind is None and scenario == "domain":
        raise ScenarioError(
            "scenario='domain' needs to know how the tasks differ: set tasks='split' for a class split with one "
            "shared head of within-task labels (Split-MNIST as a domain-incremental problem), or tasks="
            "'permutation', 'rotation', 'corruption' or 'datasets' for a shift of the inputs over one label space."
        )
    return kind or "split"


def check_unused_options(kind: str, **options: object) -> None:
    """Refuse options that the stream would ignore (a class order on permuted tasks, angles on a split)."""
    unused = [n for n in _SPLIT_OPTIONS if options.get(n) not in (None, False) and kind != "split"]
    unused += [n for n, k in _KIND_OPTIONS.items() if options.get(n) is not None and kind != k]
    if unused:
        owners = {**dict.fromkeys(_SPLIT_OPTIONS, "split"), **_KIND_OPTIONS}
        detail = ", ".join(f"{n} (for tasks={owners[n]!r})" for n in unused)
        raise ScenarioError(
            f"{detail} would have no effect on {kind!r} tasks. Remove it, or set tasks to the kind it belongs to."
        )


def _corrupted(data: TaskDataset, name: str, severity: int, seed: int) -> TaskDataset:
    """The task's samples as a fixed, seeded corrupted copy (only the selected samples are copied)."""
    x = corrupt(data.inputs[data.indices], name, severity, seed)
    return TaskDataset(x, data.labels[data.indices], data.task_id)


def domain_incremental(
    sources: SourceData | Sequence[SourceData],
    kind: str = "permutation",
    n_tasks: int | None = None,
    seed: int = 0,
    angles: Sequence[float] | None = None,
    angle_range: tuple[float, float] = (0.0, 180.0),
    identity_first: bool = False,
    val_fraction: float = 0.0,
    train_samples_per_class: int | None = None,
    test_samples_per_class: int | None = None,
    corruptions: Sequence[str] | None = None,
    severity: int = 3,
    scenario: str = "domain",
) -> TaskStream:
    """Tasks that differ in their inputs; by default (``scenario="domain"``) they share one label space.

    ``permutation``: each task a seeded pixel permutation (``identity_first`` keeps task 0 plain).
    ``rotation``: each task rotates by one angle, given in ``angles`` or drawn from ``angle_range``.
    ``datasets``: one task per source; the sources must share class count and input shape.
    ``corruption``: each task one image corruption (``corruptions``, names from
    :data:`clframe.data.corruptions.CORRUPTIONS`, ``none`` = clean) at ``severity`` 1-5, applied once
    to the task's images with a seed of (stream seed, task): a fixed corrupted copy, CIFAR-10-C style.

    ``scenario="class"`` or ``"task"``: task t's labels are offset by ``t * num_classes``, so each domain
    brings its own classes (a ``n_tasks * num_classes``-way head, seen classes growing in class-incremental
    streams, the task's own block of outputs in task-incremental ones).
    """
    if scenario not in ("class", "task", "domain"):
        raise ScenarioError(f"unknown scenario {scenario!r}; allowed: class, task, domain")
    if kind not in DOMAIN_KINDS:
        raise ScenarioError(f"unknown domain-incremental kind {kind!r}; allowed: {', '.join(DOMAIN_KINDS)}")
    srcs = [sources] if isinstance(sources, SourceData) else list(sources)
    if not srcs:
        raise ScenarioError("domain_incremental needs at least one data source")
    gen = _generator(seed)
    if kind == "datasets":
        if n_tasks is not None and n_tasks != len(srcs):
            raise ScenarioError(f"n_tasks={n_tasks} but {len(srcs)} data sets were given; one task per data set")
        ref = srcs[0]
        for s in srcs[1:]:
            if s.num_classes != ref.num_classes or tuple(s.input_shape) != tuple(ref.input_shape):
                raise ScenarioError(
                    f"data sets {ref.name} ({ref.num_classes} classes, {tuple(ref.input_shape)}) and {s.name} "
                    f"({s.num_classes} classes, {tuple(s.input_shape)}) do not share a label space and input shape; "
                    "a domain sequence needs equal class counts and image sizes (set image_size/channels)."
                )
        plan = [(s, None, s.name) for s in srcs]
    elif kind == "corruption":
        if len(srcs) != 1:
            raise ScenarioError(f"kind='corruption' takes one data source, got {len(srcs)}")
        names = list(corruptions) if corruptions is not None else list(DEFAULT_CORRUPTIONS[:n_tasks or None])
        unknown = [c for c in names if c not in CORRUPTIONS]
        if unknown:
            raise ScenarioError(f"unknown corruption(s) {', '.join(unknown)}; allowed: {', '.join(CORRUPTIONS)}")
        if n_tasks is not None and n_tasks != len(names):
            raise ScenarioError(f"n_tasks={n_tasks} but {len(names)} corruptions were given; one task per corruption "
                                f"(default list: {', '.join(DEFAULT_CORRUPTIONS)})")
        if not 1 <= severity <= 5:
            raise ScenarioError(f"corruption severity must be 1..5, got {severity}")
        plan = [(srcs[0], name, f"{name}_{severity}" if name != "none" else "clean") for name in names]
    else:
        if len(srcs) != 1:
            raise ScenarioError(f"kind={kind!r} takes one data source, got {len(srcs)}")
        if angles is not None:
            n_tasks = len(angles) if n_tasks is None else n_tasks
            if len(angles) != n_tasks:
                raise ScenarioError(f"{len(angles)} angles given for n_tasks={n_tasks}; give one angle per task")
        if not n_tasks or n_tasks < 1:
            raise ScenarioError("n_tasks must be a positive number of tasks for permuted or rotated streams")
        src = srcs[0]
        n_pixels = src.input_shape[-1] * src.input_shape[-2]
        plan = []
        for t in range(n_tasks):
            if kind == "permutation":
                perm = torch.arange(n_pixels) if (identity_first and t == 0) else torch.randperm(n_pixels, generator=gen)
                plan.append((src, PermutePixels(perm), f"permutation_{t}"))
            else:
                lo, hi = angle_range
                angle = float(angles[t]) if angles is not None else lo + (hi - lo) * torch.rand(1, generator=gen).item()
                plan.append((src, RotateImages(angle), f"rotation_{angle:.1f}"))

    tasks = []
    num_classes = srcs[0].num_classes
    classes = tuple(range(num_classes))
    for t, (src, transform, domain) in enumerate(plan):
        train_idx = _limit_per_class(src.train_y, classes, train_samples_per_class, gen)
        test_idx = _limit_per_class(src.test_y, classes, test_samples_per_class, gen)
        train_idx, val_idx = _split_val(train_idx, val_fraction, gen)
        if kind == "corruption":  # transform is the corruption's name: copy the task's images once, corrupted
            split_seed = (seed * 1_000_003 + t) * 3
            train = _corrupted(TaskDataset(src.train_x, src.train_y, t, train_idx), transform, severity, split_seed)
            test = _corrupted(TaskDataset(src.test_x, src.test_y, t, test_idx), transform, severity, split_seed + 1)
            val = None if val_idx is None else _corrupted(TaskDataset(src.train_x, src.train_y, t, val_idx), transform,
                                                          severity, split_seed + 2)
            tasks.append(Task(id=t, classes=classes, domain=domain, train=train, test=test, val=val))
            continue
        tasks.append(Task(
            id=t, classes=classes, domain=domain,
            train=TaskDataset(src.train_x, src.train_y, t, train_idx, transform),
            test=TaskDataset(src.test_x, src.test_y, t, test_idx, transform),
            val=None if val_idx is None else TaskDataset(src.train_x, src.train_y, t, val_idx, transform),
        ))
    mean = tuple(sum(m) / len(srcs) for m in zip(*(s.mean for s in srcs), strict=True))
    std = tuple(sum(m) / len(srcs) for m in zip(*(s.std for s in srcs), strict=True))
    description = {"domains": [d for _, _, d in plan], "train_limit": train_samples_per_class,
                   "test_limit": test_samples_per_class, "val_fraction": val_fraction}
    names = list(srcs[0].class_names)
    if scenario != "domain":  # every domain brings its own classes
        tasks = [_with_label_offset(task, task.id * num_classes) for task in tasks]
        names = [f"{name}@{domain}" for _, _, domain in plan for name in names]
        num_classes *= len(plan)
        description["labels"] = "offset_per_task"
    return TaskStream(
        name=f"{kind}_{'_'.join(s.name for s in srcs)}", scenario=scenario, tasks=tasks, num_classes=num_classes,
        input_shape=tuple(srcs[0].input_shape), mean=mean, std=std, class_names=names, seed=seed,
        description=description,
    )


def _offset(data: TaskDataset | None, offset: int) -> TaskDataset | None:
    if data is None:
        return None
    return TaskDataset(data.inputs, data.labels + offset, data.task_id, data.indices, data.input_transform,
                       data.sample_transform)


def _with_label_offset(task: Task, offset: int) -> Task:
    """The task with its labels moved to ``offset..offset+C-1`` (one label copy per task; inputs stay shared)."""
    return Task(id=task.id, classes=tuple(c + offset for c in task.classes), domain=task.domain,
                train=_offset(task.train, offset), test=_offset(task.test, offset), val=_offset(task.val, offset))
