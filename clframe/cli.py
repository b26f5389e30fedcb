"""The ``clframe`` command: Lightning's CLI over ContinualTrainer, strategies and task streams.

``clframe fit --config configs/<benchmark>/<strategy>.yaml`` runs a whole experiment;
``clframe fit`` without a config runs the embedded default (ER on 5-task Split-Digits).
Configs may use OmegaConf interpolation within a file (``${data.batch_size}``); dotted overrides
(``--model.lr=0.1``, ``--data.n_tasks=10``) work, which is what a wandb sweep agent sends.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from clframe import catalog
from clframe.data.datamodule import ContinualDataModule
from clframe.errors import ClframeError
from clframe.strategies.base import ContinualModule
from clframe.trainer import ContinualTrainer

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")
DESCRIPTION = ("clframe: continual learning on PyTorch Lightning.\n"
               "Run `clframe fit --config configs/<benchmark>/<strategy>.yaml`; dotted options override the config.")


class _CatalogHelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of the description and of the catalogue printed under ``--help``."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class ClframeArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors name the config key and what it accepts, in one short message."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.exit_on_error:  # the message the user will read; inner parsers' messages stay raw for it
            message = explain_parser_error(message, getattr(ex, "subcommand_parser", None) or self)
        super().error(message, ex)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strategy_class(path: str) -> type | None:
    name = path.rsplit(".", 1)[-1]
    return catalog.strategies().get(name)


def explain_parser_error(message: str, parser: Any = None) -> str:
    """Rewrite jsonargparse's nested error text into "<key>: what is wrong; what is allowed".

    Unrecognised shapes are returned unchanged, so nothing jsonargparse says is ever lost.
    """
    head = re.match(r'Parser key "([\w.]+)":', message)
    key = head.group(1) if head else None
    names = list(catalog.strategies())
    if m := re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*Option '(\w+)' is not accepted", message):
        cls = _strategy_class(m.group(1))
        options = catalog.init_options(cls) if cls is not None else []
        allowed = f"; its options: {', '.join(options)}" if options else ""
        return (f"{key or 'model'}.init_args.{m.group(2)}: {m.group(1)} has no option {m.group(2)!r}"
                f"{_did_you_mean(m.group(2), options)}{allowed}")
    if m := re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*Parser key \"([\w.]+)\":\s*\n\s*(.+)", message):
        return f"{key or 'model'}.init_args.{m.group(2)} ({m.group(1)}): {m.group(3).strip()}"
    if key == "model" and (m := re.search(r"Expected a dot import path string: (\S+)", message)
                           or re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*module .* has no attribute", message)):
        wanted = m.group(1)
        reason = re.search(r"class_path '[\w.]+':\s*\n\s*(.+)", message)
        if "." in wanted and not wanted.startswith("clframe.") and reason:
            return (f"model: cannot import {wanted!r} ({reason.group(1).strip()}); make its module importable "
                    "(run from its folder with PYTHONPATH=.) or choose one of: " + ", ".join(names))
        return (f"model: unknown strategy {wanted!r}{_did_you_mean(wanted.rsplit('.', 1)[-1], names)}; choose one of: "
                f"{', '.join(names)}, or give the import path of your own ContinualModule subclass")
    if m := re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", message):
        allowed = [a.strip().strip("'\"") for a in m.group(1).split(",")]
        return (f"{key}: {m.group(2).strip()!r} is not allowed{_did_you_mean(m.group(2).strip(), allowed)}; "
                f"choose one of: {', '.join(allowed)}")
    if m := re.search(r"does not accept option '([\w.]+)'", message):
        known = [a.dest for a in getattr(parser, "_actions", []) if isinstance(getattr(a, "dest", None), str)]
        return f"unknown config key {m.group(1)!r}{_did_you_mean(m.group(1), known)}; see `clframe fit --help`"
    if m := re.match(r"unrecognized arguments: (.*)", message):
        known = ["--" + a.dest for a in getattr(parser, "_actions", []) if isinstance(getattr(a, "dest", None), str)]
        hints = [f"{arg}{_did_you_mean(arg.split('=')[0], known)}" for arg in m.group(1).split()]
        return f"unrecognized arguments: {', '.join(hints)}; see `clframe fit --help`"
    if key and (m := re.search(r"Given value: (.*)", message)) and (types := re.findall(r"Expected a <class '(\w+)'>", message)):
        return f"{key}: expected {' or '.join(dict.fromkeys(t.replace('NoneType', 'null') for t in types))}, got {m.group(1).strip()!r}"
    if key and (m := re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", message)):
        return f"{key}: expected {m.group(1)}, got {m.group(2).strip()!r}"
    return message


class ContinualCLI(LightningCLI):
    """LightningCLI with clframe's trainer and data module, any ContinualModule as the model."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        catalog.strategies()  # import every strategy family, so short names (--model=HyperInterval) resolve
        super().__init__(
            model_class=ContinualModule,
            subclass_mode_model=True,
            datamodule_class=ContinualDataModule,
            trainer_class=ContinualTrainer,
            seed_everything_default=0,
            parser_class=ClframeArgumentParser,
            parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION, "epilog": catalog.describe(),
                           "formatter_class": _CatalogHelpFormatter},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        _add_task_optimizers(self, subcommand)


def _add_task_optimizers(cli: LightningCLI, subcommand: str | None) -> None:
    """LightningCLI's ``--optimizer`` / ``--lr_scheduler`` (YAML ``optimizer:`` / ``lr_scheduler:``) for a
    continual run: handed to the strategy as factories that every task start calls again, instead of
    Lightning's one optimizer built before the model exists (the network is built from the stream)."""
    config = cli.config_init.get(str(subcommand), cli.config_init)
    optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
    if optimizer is None and scheduler is None:
        return
    plain = (lambda spec: spec.as_dict() if hasattr(spec, "as_dict") else spec)  # {class_path, init_args}
    cli.model.set_optimizer(optimizer=plain(optimizer), lr_scheduler=plain(scheduler))


def with_default_config(argv: list[str]) -> list[str]:
    """``fit`` without ``--config`` runs the embedded default experiment (overrides still apply)."""
    if argv and argv[0] == "fit" and not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        return ["fit", "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


def run_cli(args: Sequence[str] | None = None) -> ContinualCLI:
    """Run the CLI on an argument list (``sys.argv`` by default) and return it, for tests and notebooks."""
    argv = list(sys.argv[1:] if args is None else args)
    return ContinualCLI(args=with_default_config(argv))


def main() -> None:
    """Console-script entry point: bad input ends with one readable paragraph and exit status 2."""
    sys.argv = [sys.argv[0], *with_default_config(sys.argv[1:])]
    try:
        ContinualCLI()
    except ValueError as err:
        cause = input_error(err)
        if cause is None:
            raise  # not bad input: a bug, keep the traceback
        print(f"clframe: error: {cause}", file=sys.stderr)
        sys.exit(2)


def input_error(err: BaseException) -> ClframeError | None:
    """The ClframeError behind ``err`` (jsonargparse wraps errors raised while building classes)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ClframeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
