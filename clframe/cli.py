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
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from clframe import catalog
from clframe.config_tags import refuse_python_tags
from clframe.data.datamodule import ContinualDataModule
from clframe.diagnose import chain, debug_requested, explain, explain_parser_value
from clframe.errors import ClframeError, ConfigError
from clframe.strategies.base import ContinualModule
from clframe.trainer import ContinualTrainer

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")
SEED_MAX = 2**32 - 1
DESCRIPTION = ("clframe: continual learning on PyTorch Lightning.\n"
               "Run `clframe fit --config configs/<benchmark>/<strategy>.yaml`; dotted options override the config.\n"
               "Suites of runs (methods x seeds): `clframe bench SUITE.yaml --jobs N`, `clframe report SUITE.yaml`, "
               "`clframe compare RUN_DIR...` (see `clframe bench --help`).\n"
               "Errors end in one paragraph; add --debug (or set CLFRAME_DEBUG=1) to see the full traceback.")


class _CatalogHelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of the description and of the catalogue printed under ``--help``."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class ClframeArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors name the config key and what it accepts, in one short message."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.exit_on_error:  # the message the user will read; inner parsers' messages stay raw for it
            message = explain_parser_error(message, getattr(ex, "subcommand_parser", None) or self)
            if not debug_requested():  # the message alone, in one paragraph, not 75 lines of usage before it
                message = " ".join(line.strip() for line in message.splitlines() if line.strip())
                self._logger.error(message)
                sys.stderr.write(f"tip: `clframe fit --help` lists every option\nerror: {message}\n")
                self.exit(2)
        super().error(message, ex)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _strategy_class(path: str) -> type | None:
    name = path.rsplit(".", 1)[-1]
    return catalog.strategies().get(name)


def _not_allowed(key: str | None, choices: str, value: str) -> str:
    allowed = [a.strip().strip("'\"") for a in choices.split(",")]
    return (f"{key}: {value.strip()!r} is not allowed{_did_you_mean(value.strip(), allowed)}; "
            f"choose one of: {', '.join(allowed)}")


def explain_parser_error(message: str, parser: Any = None) -> str:
    """Rewrite jsonargparse's nested error text into "<key>: what is wrong; what is allowed".

    Unrecognised shapes are returned unchanged, so nothing jsonargparse says is ever lost.
    """
    head = re.match(r'Parser key "([\w.]+)":', message)
    key = head.group(1) if head else None
    names = list(catalog.strategies())
    if key == "data" and (m := re.search(r"class_path '[\w.]+':\s*\n\s*Parser key \"([\w.]+)\":\s*\n\s*"
                                         r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", message)):
        return _not_allowed(f"data.{m.group(1)}", m.group(2), m.group(3))  # data options keep their short names
    if explained := explain_parser_value(message, key):
        return explained
    if m := re.search(r"Import path ?([\w.]*) does not correspond to a subclass of (\w+)", message):
        given = m.group(1) or (g.group(1).strip() if (g := re.search(r"Given value: (.*)", message)) else "?")
        hint = f"; choose one of: {', '.join(names)}" if m.group(2) == "ContinualModule" else ""
        return (f"{key or 'class_path'}: class_path {given!r} is not a {m.group(2)} subclass, so it is refused "
                f"(a config may only name {m.group(2)} classes here; nothing else is built or run){hint}")
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
        return _not_allowed(key, m.group(1), m.group(2))
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
    """LightningCLI with clframe's trainer, any ContinualModule as the model and any ContinualDataModule
    (``--data=mymodule.MyDataModule`` or ``data: {class_path: ..., init_args: ...}``) as the data; without a
    class path the data options (``data: {source: mnist}``, ``--data.n_tasks=10``) go to ContinualDataModule."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        refuse_python_tags(sys.argv[1:] if args is None else list(args))
        catalog.strategies()  # import every strategy family, so short names (--model=HyperInterval) resolve
        super().__init__(
            model_class=ContinualModule,
            subclass_mode_model=True,
            datamodule_class=ContinualDataModule,
            subclass_mode_data=True,
            trainer_class=ContinualTrainer,
            seed_everything_default=0,
            parser_class=ClframeArgumentParser,
            parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION, "epilog": catalog.describe(),
                           "formatter_class": _CatalogHelpFormatter},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The data module class when a config gives only its options (every config written before subclass mode)."""
        parser.set_defaults({"data": {"class_path": f"{ContinualDataModule.__module__}.{ContinualDataModule.__name__}"}})

    def _set_seed(self) -> None:
        """Refuse a seed NumPy cannot take with the option's name, before Lightning fails on it."""
        seed = self._get(self.config, "seed_everything")
        if not isinstance(seed, bool) and seed is not None and not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"seed_everything must be between 0 and {SEED_MAX} (NumPy's seed range), got {seed}; "
                              "pick a seed in that range, or true for a random one")
        super()._set_seed()

    def _parse_ckpt_path(self) -> None:
        """Keep the user's config on resume, however ``--ckpt_path`` is written. (LightningCLI would silently
        replace the model with the checkpoint's when the path is a file.) ``ContinualTrainer.fit`` compares
        the config with the checkpoint's and refuses any difference, listing them."""


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
    """Console-script entry point: any error ends with one readable paragraph (see :mod:`clframe.diagnose`).

    Bad input exits with status 2, anything unrecognised with 1; ``--debug`` or ``CLFRAME_DEBUG=1``
    prints the full traceback too. Nothing written before the error is touched.
    """
    if sys.argv[1:2] and sys.argv[1] in ("bench", "report", "compare"):  # suites of runs, not a LightningCLI
        from clframe.bench.cli import main as bench_main

        sys.exit(bench_main(sys.argv[1:]))
    argv = sys.argv[1:]
    debug = "--debug" in argv or debug_requested()
    sys.argv = [sys.argv[0], *with_default_config([a for a in argv if a != "--debug"])]
    try:
        ContinualCLI()
    except (SystemExit, KeyboardInterrupt):
        raise  # the parser's one-line errors (2), --help, SIGTERM (143, see clframe.checkpoints) and Ctrl-C
    except BaseException as err:  # noqa: BLE001 - this is the one place every error is turned into words
        report = explain(err)
        if debug:
            traceback.print_exception(err)
        print(f"clframe: error: {report.message}", file=sys.stderr)
        sys.exit(report.status)


def input_error(err: BaseException) -> ClframeError | None:
    """The ClframeError behind ``err`` (jsonargparse wraps errors raised while building classes)."""
    return next((e for e in chain(err) if isinstance(e, ClframeError)), None)


if __name__ == "__main__":
    main()
