"""The ``clframe`` console command: each subcommand imports only what it needs.

Importing Lightning costs seconds (it imports torchmetrics, which imports torchvision's models,
``torch._dynamo`` and transformers), so only the subcommands that run Lightning pay for it:

- ``clframe --help`` prints the subcommands and the catalogue read from the source files (no torch);
- ``clframe bench | report | compare`` manage suites of runs (yaml, json, csv, matplotlib; each run of a
  suite is its own ``clframe fit`` process);
- ``clframe fit | validate | test | predict`` (and anything else) go to Lightning's CLI in
  :mod:`clframe.cli`, whose ``--help`` lists every option, strategy class and callback.
"""

from __future__ import annotations

import os
import sys

SUITE_COMMANDS = ("bench", "report", "compare")
DESCRIPTION = ("clframe: continual learning on PyTorch Lightning.\n"
               "Run `clframe fit --config configs/<benchmark>/<strategy>.yaml`; dotted options override the config.\n"
               "Suites of runs (methods x seeds): `clframe bench SUITE.yaml --jobs N`, `clframe report SUITE.yaml`, "
               "`clframe compare RUN_DIR...` (see `clframe bench --help`).\n"
               "Errors end in one paragraph; add --debug (or set CLFRAME_DEBUG=1) to see the full traceback.")
_SUBCOMMANDS = {  # fit's line is ContinualTrainer.fit's docstring (read in top_level_help)
    "fit": "",
    "validate": "Evaluate a checkpoint on the validation data of every task it has seen (needs "
                "--data.val_fraction).",
    "test": "Evaluate a checkpoint on the test data of every task it has seen: its row of the accuracy matrix.",
    "predict": "Write predictions.csv: the predicted class of every test sample of the seen tasks.",
    "bench": "Run every (run, seed) of a suite, N at a time; a rerun resumes.",
    "report": "Tables (Markdown, CSV) and plots of a suite's finished runs.",
    "compare": "Two or more runs side by side: config differences, metrics, matrices.",
}


def top_level_help() -> str:
    """What ``clframe --help`` prints: usage, the subcommands and the catalogue, without importing Lightning."""
    from clframe import catalog, static_catalog

    subcommands = dict(_SUBCOMMANDS, fit=static_catalog.method_summary("clframe.trainer", "ContinualTrainer", "fit"))
    lines = [f"usage: clframe [-h] [-c CONFIG] [--print_config[=flags]] {{{','.join(subcommands)}}} ...", "",
             DESCRIPTION, "", "options:",
             "  -h, --help            Show this help message and exit.",
             "  -c CONFIG, --config CONFIG",
             "                        Path to a configuration file in json or yaml format.",
             "  --print_config[=flags]",
             "                        Print the configuration after applying all other arguments and exit.",
             "", "subcommands (`clframe <subcommand> --help` lists its options):"]
    lines += [f"  {name:<10}{text}" for name, text in subcommands.items()]
    return "\n".join([*lines, "", catalog.describe()])


def _wants_help(argv: list[str]) -> bool:
    return [a for a in argv if a != "--debug"] in (["-h"], ["--help"])


def main() -> None:
    """Console-script entry point (``clframe``); see the module docstring for what each subcommand imports."""
    try:
        _dispatch(sys.argv[1:])
    except BrokenPipeError:  # output piped into a reader that stopped early (``clframe --help | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        sys.exit(0)


def _dispatch(argv: list[str]) -> None:
    if argv[:1] and argv[0] in SUITE_COMMANDS:
        from clframe.bench.cli import main as suite_main

        sys.exit(suite_main(argv))
    if _wants_help(argv):
        print(top_level_help())
        sys.exit(0)
    from clframe.cli import main as lightning_main

    lightning_main()


if __name__ == "__main__":
    main()
