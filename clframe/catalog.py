"""What clframe offers, by name: strategies, data sources, scenarios and the repo's example configs.

Read by ``clframe --help`` and by the CLI's error messages, so that both list what really exists
instead of a hand-kept copy that goes stale.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from clframe import static_catalog

if TYPE_CHECKING:
    from clframe.strategies.base import ContinualModule

# Packages whose strategies are listed; importing them registers their ContinualModule subclasses.
STRATEGY_PACKAGES = ("clframe.strategies", "clframe.strategies.interval", "clframe.strategies.prompt")

SCENARIOS = {
    "class": "class-incremental: new classes per task, one head, no task id at test time",
    "task": "task-incremental: new classes per task, the task id is given",
    "domain": "domain-incremental: one shared head, no task id (--data.tasks: split, permutation, rotation, "
              "corruption, datasets)",
}


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rsplit(" ", 1)[0] + " ..."


def strategies() -> dict[str, type[ContinualModule]]:
    """The strategies the strategy packages export (``__all__``), by class name, in name order."""
    from clframe.strategies.base import ContinualModule

    found: dict[str, type[ContinualModule]] = {}
    for package in STRATEGY_PACKAGES:
        try:
            module = importlib.import_module(package)
        except ModuleNotFoundError as err:  # a family not present in this install
            if err.name is None or not package.startswith(err.name):
                raise
            continue
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, ContinualModule) and not name.endswith("Module"):
                found.setdefault(name, obj)
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def callbacks() -> dict[str, type]:
    """The callback classes ``clframe.callbacks`` exports, by name; importing them is what lists them among
    the known callbacks of ``clframe fit --help`` (the package imports them only on first use)."""
    import lightning as L

    module = importlib.import_module("clframe.callbacks")
    found = {name: getattr(module, name) for name in module.__all__}
    return {name: obj for name, obj in found.items() if inspect.isclass(obj) and issubclass(obj, L.Callback)}


def init_options(cls: type) -> list[str]:
    """The constructor arguments a config may set for ``cls`` (following ``**kwargs`` up the bases)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def source_names() -> list[str]:
    from clframe.data import sources

    return list(sources.SOURCE_NAMES)


def example_configs() -> list[str]:
    """The repo's ``configs/<benchmark>/<strategy>.yaml`` files (present in a source checkout)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root.parent)) for p in root.rglob("*.yaml")
                  if p.parent.name not in ("sweeps", "loggers") and p.parent != root)


def strategy_summaries() -> dict[str, str]:
    """{strategy: first line of its docstring}, read from the source files (see :mod:`clframe.static_catalog`)
    so that ``clframe --help`` needs neither Lightning nor torch; from the classes once Lightning is loaded
    (importing them is then cheap: ``clframe fit``) or when the install ships no source files."""
    found = {} if "lightning" in sys.modules else static_catalog.strategy_summaries(STRATEGY_PACKAGES)
    if found:
        return found
    return {name: (inspect.getdoc(cls) or "").strip().split("\n")[0] for name, cls in strategies().items()}


def describe() -> str:
    """The catalogue as plain text for ``clframe --help`` (without importing Lightning or torch)."""
    lines = ["strategies (--model=<name>, or model.class_path in a config):"]
    found = strategy_summaries()
    width = max(16, *(len(name) + 2 for name in found))
    for name, summary in found.items():
        lines.append(f"  {name:<{width}}{_shorten(summary, 100 - width)}")
    lines += ["", "data sources (--data.source=<name>; offline root: $CLFRAME_DATA or --data.data_root):",
              "  " + ", ".join(static_catalog.source_names() or source_names()),
              "", "scenarios (--data.scenario=<name>):"]
    lines += [f"  {name:<16}{text}" for name, text in SCENARIOS.items()]
    configs = example_configs()
    if configs:
        benchmarks: dict[str, list[str]] = {}
        for path in configs:
            bench, file = path.split("/", 1)[1].rsplit("/", 1)
            benchmarks.setdefault(bench, []).append(file.removesuffix(".yaml"))
        lines += ["", "benchmarks with ready configs (clframe fit --config configs/<benchmark>/<strategy>.yaml):"]
        for bench, names in benchmarks.items():
            wrapped = textwrap.wrap(", ".join(names), 78)
            if len(bench) > 20:  # a nested folder (three_scenarios/split_mnist_task): names on the next line
                lines += [f"  {bench}", *(" " * 24 + line for line in wrapped)]
            else:
                lines += [f"  {bench:<22}{wrapped[0]}", *(" " * 24 + more for more in wrapped[1:])]
    lines += ["", "Start: clframe fit (ER on Split-Digits, no download); options: clframe fit --help;",
              "a strategy's options: clframe fit --model.help ER"]
    return "\n".join(lines)
