"""Startup cost: ``import clframe``, ``clframe --help`` and the suite commands do not import Lightning
(which imports torchmetrics, torchvision's models, ``torch._dynamo`` and transformers); the catalogue that
``--help`` reads from the source files matches the imported classes; lazy package names still resolve."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clframe import catalog, static_catalog
from clframe.entry import SUITE_COMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "torch", "transformers", "timm", "torchmetrics", "torchvision")
LAZY_PACKAGES = ("clframe", "clframe.strategies", "clframe.strategies.prompt", "clframe.strategies.interval",
                 "clframe.strategies.replay", "clframe.callbacks")

# In a fresh interpreter: import clframe, print the help, the catalogue and a suite command's help, and
# report which heavy modules got imported along the way.
_PROBE = """
import json, sys
import clframe, clframe.strategies, clframe.callbacks, clframe.bench.cli
from clframe import catalog
from clframe.entry import main
heavy = {"import": sorted(m for m in HEAVY if m in sys.modules)}
catalog.describe()
for args in (["--help"], ["report", "--help"]):
    sys.argv = ["clframe", *args]
    try:
        main()
    except SystemExit as stop:
        heavy[" ".join(args)] = [stop.code, sorted(m for m in HEAVY if m in sys.modules)]
print("PROBE" + json.dumps(heavy))
"""


@pytest.fixture(scope="module")
def probe() -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{_PROBE}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE"))
    return json.loads(line.removeprefix("PROBE")), proc.stdout


def test_import_clframe_imports_no_lightning_torch_transformers_or_timm(probe):
    assert probe[0]["import"] == []


def test_help_answers_without_lightning_and_lists_the_subcommands(probe):
    code, imported = probe[0]["--help"]
    assert code == 0 and imported == []
    out = probe[1]
    for name in ("fit", "validate", "test", "predict", *SUITE_COMMANDS):
        assert f"\n  {name} " in out, name
    assert "Train on every task of the stream" in out  # fit's line, from ContinualTrainer.fit
    assert catalog.describe() in out


def test_suite_commands_run_without_lightning(probe):
    code, imported = probe[0]["report --help"]
    assert code == 0 and "lightning" not in imported and "torch" not in imported


def test_the_catalogue_read_from_source_matches_the_imported_classes():
    imported = {name: (inspect.getdoc(cls) or "").strip().splitlines()[0]
                for name, cls in catalog.strategies().items()}
    assert static_catalog.strategy_summaries(catalog.STRATEGY_PACKAGES) == imported
    assert list(static_catalog.strategy_summaries(catalog.STRATEGY_PACKAGES)) == list(imported)  # same order
    assert static_catalog.source_names() == catalog.source_names()
    from clframe.trainer import ContinualTrainer

    assert static_catalog.method_summary("clframe.trainer", "ContinualTrainer", "fit") == \
        inspect.getdoc(ContinualTrainer.fit).splitlines()[0]


def test_without_source_files_the_catalogue_comes_from_the_imported_classes(monkeypatch):
    from_source = catalog.strategy_summaries()
    monkeypatch.setattr(static_catalog, "strategy_summaries", lambda packages: {})
    assert catalog.strategy_summaries() == from_source


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazily_exported_name_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert name in dir(module)
        if inspect.isclass(value):  # a config's class_path (clframe.strategies.ER) finds the same class
            assert getattr(importlib.import_module(value.__module__), name) is value
    with pytest.raises(AttributeError, match="has no attribute 'NotAName'"):
        module.NotAName  # noqa: B018


def test_star_import_and_config_class_paths_resolve():
    from jsonargparse import ArgumentParser

    from clframe.strategies import ER, ContinualModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ContinualModule, "model")
    config = parser.parse_args(["--model=clframe.strategies.ER", "--model.buffer_size=7"])
    assert parser.instantiate_classes(config).model.__class__ is ER
    namespace: dict = {}
    exec("from clframe.strategies import *", namespace)
    assert namespace["ER"] is ER


def test_fit_help_still_lists_every_strategy_and_callback_in_a_fresh_process():
    """What ``clframe fit --help`` lists as known subclasses comes from what is imported; the lazy packages
    must not hide any (the CLI imports every strategy and callback before building its parser)."""
    proc = subprocess.run([sys.executable, "-m", "clframe.cli", "fit", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    listed = set(re.findall(r"clframe(?:\.\w+)*\.(\w+)\b", proc.stdout))
    assert set(catalog.strategies()) <= listed
    assert set(catalog.callbacks()) <= listed


def test_help_piped_into_a_reader_that_stops_early_ends_quietly():
    """``clframe --help | head -1``: a closed pipe is not an error worth a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "clframe", "--help"], cwd=REPO, stdout=write_end,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode()
