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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from clframe import catalog, reporting
from clframe.config_tags import refuse_python_tags
from clframe.data.datamodule import ContinualDataModule
from clframe.diagnose import chain, debug_requested, explain, explain_parser_value
from clframe.entry import DESCRIPTION
from clframe.errors import ClframeError, ConfigError
from clframe.strategies.base import ContinualModule
from clframe.trainer import ContinualTrainer

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")
SEED_MAX = 2**32 - 1


class _CatalogHelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of the description and of the catalogue printed under ``--help``."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class ClframeArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors name the config key and what it accepts, in one short message."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.exit_on_error:  # the message the user will read; inner parsers' messages stay raw for it
            if _CASE_FIXES and (fix := _CaseFix.of(message)) is not None:
                raise fix  # the same value in another case: parse again with the allowed spelling
            message = explain_parser_error(message, getattr(ex, "subcommand_parser", None) or self)
            if not debug_requested():  # the message alone, in one paragraph, not 75 lines of usage before it
                message = " ".join(line.strip() for line in message.splitlines() if line.strip())
                self._logger.error(message)
                sys.stderr.write(f"tip: `clframe fit --help` lists every option\nerror: {message}\n")
                self.exit(2)
        super().error(message, ex)


_CASE_FIXES = True


class _CaseFix(Exception):
    """An option value that differs from an allowed one only in case (``--data.scenario=Class``)."""

    def __init__(self, key: str, given: str, allowed: str) -> None:
        super().__init__(key, given, allowed)
        self.key, self.given, self.allowed = key, given, allowed

    @classmethod
    def of(cls, message: str) -> _CaseFix | None:
        keys = re.findall(r'Parser key "([\w.]+)":', message)
        m = re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", message)
        if not keys or m is None:
            return None
        given = m.group(2).strip()
        allowed = [a.strip().strip("'\"") for a in m.group(1).split(",")]
        same = [a for a in allowed if a.lower() == given.lower()]
        return cls(keys[-1], given, same[0]) if len(same) == 1 else None

    def apply(self, argv: list[str]) -> list[str] | None:
        """``argv`` with the value spelled as allowed; ``None`` when it came from a config file."""
        name = self.key.rsplit(".", 1)[-1]
        fixed = [f"{a.split('=', 1)[0]}={self.allowed}" if a.startswith("--") and a.endswith(f"={self.given}")
                 and a.split("=", 1)[0].rsplit(".", 1)[-1] == name else a for a in argv]
        return fixed if fixed != argv else None


def canonical_strategy_args(argv: list[str]) -> list[str]:
    """Strategy names in any case (``--model=icarl``, ``--model=DERPP``) as their class names."""
    by_lower: dict[str, list[str]] = {}
    for name in catalog.strategies():
        by_lower.setdefault(name.lower(), []).append(name)
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag not in ("--model", "--model.class_path"):
            continue
        if not eq and i + 1 < len(out):  # --model icarl
            j, value = i + 1, out[i + 1]
        else:
            j = i
        names = by_lower.get(value.lower(), [])
        if "." not in value and value not in names and len(names) == 1:
            out[j] = f"{flag}={names[0]}" if j == i else names[0]
    return out


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    """The closest choice, ignoring case (``DERPP`` -> ``DERpp``, ``icarl`` -> ``ICaRL``)."""
    choices = list(choices)
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return f" (did you mean {lower[word.lower()]!r}?)"
    close = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return f" (did you mean {lower[close[0]]!r}?)" if close else ""


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
    if (m := re.search(r"class_path '[\w.]+':\s*\n\s*Parser key \"([\w.]+)\":\s*\n\s*Does not validate against any "
                       r"of the Union subtypes[\s\S]*?Given value: (.*)", message)) and "- Expected a typing.Literal[" in message:
        # an option typed as a union of choices (e.g. ``bool | Literal["auto"]``): name every choice
        block = message[m.start(): m.end()]
        allowed = [a for g in re.findall(r"- Expected a typing\.Literal\[(.*)\]", block) for a in g.split(",")]
        allowed += ["true", "false"] if "- Expected a <class 'bool'>" in block else []
        name = f"data.{m.group(1)}" if key == "data" else f"{key or 'model'}.init_args.{m.group(1)}"
        return _not_allowed(name, ",".join(allowed), m.group(2))
    if m := re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*Parser key \"([\w.]+)\":\s*\n\s*(.+)", message):
        if lit := re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", m.group(3)):
            allowed = [a.strip().strip("'\"") for a in lit.group(1).split(",")]
            return (f"{key or 'model'}.init_args.{m.group(2)} ({m.group(1)}): {lit.group(2).strip()!r} is not allowed"
                    f"{_did_you_mean(lit.group(2).strip(), allowed)}; choose one of: {', '.join(allowed)}")
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
        catalog.callbacks()  # listed among the known callbacks of `fit --help`
        self.argv = list(sys.argv[1:] if args is None else args)
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

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        _add_task_optimizers(self, subcommand)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        reset_foreign_backbone_options(config, self.argv)

    # LightningCLI calls before_<subcommand> / after_<subcommand> and <subcommand> when defined here
    # (fit announces its log folder itself: ContinualTrainer.fit)
    def after_test(self) -> None:
        self.evaluation = reporting.report_evaluation(self.trainer, self.model, "test")

    def after_validate(self) -> None:
        self.evaluation = reporting.report_evaluation(self.trainer, self.model, "validate")

    def predict(self, **kwargs: Any) -> dict[str, Any]:
        """``trainer.predict`` over the seen tasks' test data; kept as ``self.predictions`` and written out."""
        self.predictions = reporting.collect_predictions(self.trainer.predict(**kwargs))
        reporting.write_predictions(reporting.log_folder(self.trainer), self.predictions)
        return self.predictions

    def _prepare_evaluation(self) -> None:
        """``test``/``validate``/``predict`` build the network from the stream, as ``fit`` does, before
        Lightning loads the checkpoint's weights into it. Lightning's hint to pass the checkpoint's callbacks
        again concerns resuming training, not evaluating, so it is not shown here."""
        if self.model.backbone is None:
            self.model.bind_stream(self.datamodule.stream)
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used to create")

    before_test = before_validate = before_predict = _prepare_evaluation

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


def _add_task_optimizers(cli: LightningCLI, subcommand: str | None) -> None:
    """LightningCLI's ``--optimizer`` / ``--lr_scheduler`` (YAML ``optimizer:`` / ``lr_scheduler:``) for a
    continual run: handed to the strategy as factories that every task start calls again, instead of
    Lightning's one optimizer built before the model exists (the network is built from the stream)."""
    config = cli.config_init.get(str(subcommand), cli.config_init)
    optimizer, scheduler = config.get("optimizer"), config.get("lr_scheduler")
    if optimizer is None and scheduler is None:
        return
    def plain(spec: Any) -> Any:  # {class_path, init_args}
        return spec.as_dict() if hasattr(spec, "as_dict") else spec

    cli.model.set_optimizer(optimizer=plain(optimizer), lr_scheduler=plain(scheduler))


def _flag_value(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The last value given on the command line for any of ``names`` (``--a=b`` or ``--a b``)."""
    value = None
    for i, arg in enumerate(argv):
        flag, eq, rest = arg.partition("=")
        if flag in names:
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _config_backbone(argv: list[str]) -> str | None:
    """The backbone the ``--config`` files name (the last one that does)."""
    import yaml

    backbone = None
    for i, arg in enumerate(argv):
        flag, eq, rest = arg.partition("=")
        path = rest if eq else (argv[i + 1] if flag == "--config" and i + 1 < len(argv) else None)
        if flag != "--config" or path is None or not Path(path).is_file():
            continue
        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
        found = (model.get("init_args") or {}).get("backbone", model.get("backbone")) if isinstance(model, dict) else None
        backbone = found if isinstance(found, str) else backbone
    return backbone


def reset_foreign_backbone_options(config: Any, argv: list[str]) -> None:
    """``--model.backbone=X`` on the command line drops the config files' ``backbone_kwargs`` when they were
    written for another backbone (``hidden_sizes`` of an MLP would reach a ResNet); a note says so, and
    ``--model.backbone_kwargs`` sets options for the new backbone."""
    wanted = _flag_value(argv, ("--model.backbone", "--model.init_args.backbone"))
    if wanted is None or _flag_value(argv, ("--model.backbone_kwargs", "--model.init_args.backbone_kwargs")) is not None:
        return
    init_args = config.get("model", {}).get("init_args") if hasattr(config.get("model"), "get") else None
    if init_args is None or not init_args.get("backbone_kwargs") or _config_backbone(argv) in (None, wanted):
        return
    dropped = init_args.get("backbone_kwargs")
    dropped = dropped.as_dict() if hasattr(dropped, "as_dict") else dropped
    init_args["backbone_kwargs"] = None
    print(f"clframe: --model.backbone={wanted}: the config's backbone_kwargs {dropped} belong to another backbone and "
          "are not used (set options with --model.backbone_kwargs)", file=sys.stderr)


def with_default_config(argv: list[str]) -> list[str]:
    """A subcommand without ``--config`` uses the embedded default experiment (overrides still apply), so
    ``clframe test --ckpt_path ...`` evaluates a checkpoint of ``clframe fit``."""
    if argv and argv[0] in ("fit", "validate", "test", "predict") and \
            not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


def run_cli(args: Sequence[str] | None = None) -> ContinualCLI:
    """Run the CLI on an argument list (``sys.argv`` by default) and return it, for tests and notebooks."""
    argv = list(sys.argv[1:] if args is None else args)
    return _case_insensitive(lambda a: ContinualCLI(args=a), with_default_config(argv))


def _case_insensitive(start: Any, argv: list[str]) -> ContinualCLI:
    """``start(argv)`` with strategy names and option values accepted in any case."""
    global _CASE_FIXES
    argv = canonical_strategy_args(argv)
    try:
        for _ in range(20):
            try:
                return start(argv)
            except _CaseFix as fix:
                fixed = fix.apply(argv)
                if fixed is None:  # from a config file: report it, with the suggestion
                    _CASE_FIXES = False
                else:
                    argv = fixed
        return start(argv)
    finally:
        _CASE_FIXES = True


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

    def start(args: list[str]) -> ContinualCLI:
        sys.argv = [sys.argv[0], *args]  # DDP starts the other ranks from sys.argv: they must see the fixed names
        return ContinualCLI()

    try:
        _case_insensitive(start, with_default_config([a for a in argv if a != "--debug"]))
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
