"""The ``clframe`` command: Lightning's CLI over ContinualTrainer, strategies and task streams.

``clframe fit --config configs/<benchmark>/<strategy>.yaml`` runs a whole experiment;
``clframe fit`` without a config runs the embedded default (ER on 5-task Split-Digits).
Configs may use OmegaConf interpolation within a file (``${data.batch_size}``); dotted overrides
(``--model.lr=0.1``, ``--data.n_tasks=10``) work, which is what a wandb sweep agent sends.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from clframe.data.datamodule import ContinualDataModule
from clframe.errors import ClframeError
from clframe.strategies.base import ContinualModule
from clframe.trainer import ContinualTrainer

DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")


class ContinualCLI(LightningCLI):
    """LightningCLI with clframe's trainer and data module, any ContinualModule as the model."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=ContinualModule,
            subclass_mode_model=True,
            datamodule_class=ContinualDataModule,
            trainer_class=ContinualTrainer,
            seed_everything_default=0,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


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
