"""The catalogue read from clframe's source files instead of importing them: strategy names with the first
line of their docstring, and the built-in data sources.

``clframe --help`` prints the catalogue; importing every strategy to read it would import Lightning,
torchmetrics and torchvision (most of 10+ s). Parsing the files takes a few milliseconds. What this module
reads is checked against the imported classes by the tests (``tests/test_startup.py``), so it cannot
drift from what ``clframe fit`` accepts.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STRATEGY_BASE = ("clframe.strategies.base", "ContinualModule")


def _module_file(module: str) -> Path | None:
    """The source file of a clframe module (``None`` outside clframe)."""
    parts = module.split(".")
    if parts[0] != "clframe":
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_name(base.name + ".py")):
        if path.is_file():
            return path
    return None


@functools.cache
def _tree(module: str) -> ast.Module | None:
    path = _module_file(module)
    return ast.parse(path.read_text(encoding="utf-8"), str(path)) if path else None


def _lazy_origins(tree: ast.Module) -> dict[str, str]:
    """{name: module} of a package's top-level ``... = lazy_exports(__name__, {module: [names]})``."""
    for node in tree.body:
        call = node.value if isinstance(node, (ast.Assign, ast.Expr)) else None
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "lazy_exports" and len(call.args) == 2:
            modules = ast.literal_eval(call.args[1])
            return {name: module for module, names in modules.items() for name in names}
    return {}


@functools.cache
def _find_class(module: str, name: str) -> tuple[str, ast.ClassDef] | None:
    """Where the class ``name`` seen from ``module`` is defined: followed through imports and lazy exports."""
    tree = _tree(module)
    if tree is None:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_class(node.module, alias.name)
    origin = _lazy_origins(tree).get(name)
    return _find_class(origin, name) if origin else None


def _bases(module: str, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
    """The clframe classes ``cls`` derives from directly, in order (outside classes are left out)."""
    found = []
    for base in cls.bases:
        base = base.value if isinstance(base, ast.Subscript) else base
        if isinstance(base, ast.Name) and (where := _find_class(module, base.id)) is not None:
            found.append(where)
    return found


def _is_strategy(module: str, cls: ast.ClassDef) -> bool:
    if (module, cls.name) == STRATEGY_BASE:
        return True
    return any(_is_strategy(*base) for base in _bases(module, cls))


def _docstring(module: str, cls: ast.ClassDef) -> str:
    """The class docstring, or the first one up its bases (as ``inspect.getdoc`` does)."""
    doc = ast.get_docstring(cls)
    if doc is not None:
        return doc
    return next((d for base in _bases(module, cls) if (d := _docstring(*base))), "")


def strategy_summaries(packages: tuple[str, ...]) -> dict[str, str]:
    """{strategy name: first docstring line} for the ContinualModule classes the packages export
    (``__all__``, names ending in ``Module`` left out), in name order; the packages are imported (they
    export lazily), the strategies are not."""
    found: dict[str, str] = {}
    for package in packages:
        try:
            exported = importlib.import_module(package).__all__
        except ModuleNotFoundError as err:  # a family not present in this install
            if err.name is None or not package.startswith(err.name):
                raise
            continue
        for name in exported:
            where = _find_class(package, name)
            if where is None or name.endswith("Module") or not _is_strategy(*where) or name in found:
                continue
            doc = inspect.cleandoc(_docstring(*where)).strip()
            found[name] = doc.splitlines()[0] if doc else ""
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def source_names(module: str = "clframe.data.sources") -> list[str]:
    """The data sources ``module`` registers at import (``register_source("name", ...)`` at top level, or
    in a top-level loop over ``("name", loader)`` pairs)."""
    tree = _tree(module)
    names: list[str] = []
    for node in tree.body if tree else []:
        if isinstance(node, ast.Expr) and _calls_register(node) and isinstance(node.value, ast.Call):
            first = node.value.args[0] if node.value.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append(first.value)
        elif isinstance(node, ast.For) and any(_calls_register(s) for s in node.body) and \
                isinstance(node.iter, (ast.Tuple, ast.List)):
            names += [item.elts[0].value for item in node.iter.elts
                      if isinstance(item, ast.Tuple) and isinstance(item.elts[0], ast.Constant)]
    return names


def _calls_register(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "register_source" for n in ast.walk(node))


def method_summary(module: str, cls: str, method: str) -> str:
    """The first docstring line of ``cls.method`` in ``module`` ("" when there is none)."""
    where = _find_class(module, cls)
    for node in where[1].body if where else []:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == method:
            doc = ast.get_docstring(node) or ""
            return doc.strip().splitlines()[0] if doc.strip() else ""
    return ""
