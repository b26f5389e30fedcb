"""Package names imported on first use (PEP 562), so ``import clframe`` costs no Lightning, torch or timm.

A package lists where each of its names lives; the module behind a name is imported the first time the
name is read (``clframe.ER``, ``from clframe.strategies import ER``, a config's
``class_path: clframe.strategies.ER``), and the value is then kept on the package like an ordinary
import. (:mod:`clframe.static_catalog` reads these tables from the source to list strategies without
importing them.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose names live in ``modules`` ({module: names})."""
    origin = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = origin.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        __import__(module)  # not importlib.import_module: `python -X importtime` shows only imports made this way
        value = getattr(sys.modules[module], name)
        setattr(sys.modules[package], name, value)  # later reads skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(origin))

    return __getattr__, __dir__

