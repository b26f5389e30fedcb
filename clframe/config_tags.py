"""Refuse Python-object YAML tags (``!!python/object/apply:os.system``) in config files, naming the key.

The YAML loader behind the CLI never builds Python objects, so such a tag cannot run code; but its
error names only a line and column. This check reads every ``--config`` file first, without
constructing anything (``yaml.compose``), and names the file and the dotted key that holds the tag.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from clframe.errors import ConfigError

_PYTHON_TAG = "tag:yaml.org,2002:python/"


def _config_files(argv: Sequence[str]) -> list[Path]:
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return [f for f in files if f.is_file()]


def _python_tags(node: yaml.Node, key: str) -> list[tuple[str, str]]:
    found = [(key or "<top level>", node.tag)] if node.tag.startswith(_PYTHON_TAG) else []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else "?"
            found += _python_tags(k, key)
            found += _python_tags(v, f"{key}.{name}" if key else name)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found += _python_tags(v, f"{key}[{i}]")
    return found


def refuse_python_tags(argv: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming the file and key of the first Python tag in a ``--config`` file."""
    for path in _config_files(argv):
        try:
            docs = list(yaml.compose_all(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue  # malformed files are reported by the parser itself
        for doc in docs:
            for key, tag in _python_tags(doc, "") if doc is not None else []:
                short = "!!" + tag.removeprefix("tag:yaml.org,2002:")
                raise ConfigError(f"{path}: key {key} uses the YAML tag {short}, which would build a Python object; "
                                  "configs may hold only plain values (numbers, strings, lists, mappings) and "
                                  "class_path entries. Replace it with a plain value.")
