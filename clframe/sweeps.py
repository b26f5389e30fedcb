"""wandb sweep files, expanded locally the way ``wandb agent`` would run them.

A sweep file (``configs/sweeps/*.yaml``) names a base config in its ``command`` and flat, dotted
parameters (``model.lr``, ``data.batch_size``, ``trainer.epochs_per_task``, ``seed_everything``).
The agent picks values, turns them into flags and runs the command: ``${args}`` becomes
``--model.lr=0.05`` (``f"--{name}={value}"``, see ``create_sweep_command_args`` in
``wandb/sdk/launch/sweeps/utils.py``) and ``${env}`` becomes ``/usr/bin/env``
(``Agent._command_run`` in ``wandb/wandb_agent.py``). This module does the same without a server,
so tests can check that every sampled value reaches the model, and ``examples/run_sweep.py`` can
run a sweep offline. Sampling here is random search whatever the file's ``method``: the Bayesian
and grid searches live in wandb's server.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: The agent's default command when a sweep gives none.
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]

#: Distributions this expansion can sample (the ones the shipped sweeps use, and their relatives).
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values", "normal", "log_normal")


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep file and check the parts the local expansion relies on."""
    sweep = yaml.safe_load(Path(path).read_text())
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise ValueError(f"{path}: a sweep file needs a `parameters` mapping")
    for name, spec in sweep["parameters"].items():
        if not isinstance(spec, dict) or "parameters" in spec:
            raise ValueError(f"{path}: parameter {name!r} must be flat (dotted names, e.g. model.lr), not nested")
    return sweep


def infer_distribution(spec: Mapping[str, Any]) -> str:
    """The distribution of a parameter, inferred as wandb does when ``distribution`` is absent."""
    if "distribution" in spec:
        return str(spec["distribution"])
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    raise ValueError(f"cannot infer a distribution from {dict(spec)}")


def _quantize(x: float, q: float) -> float:
    return round(x / q) * q


def sample_value(spec: Mapping[str, Any], rng: random.Random) -> Any:
    """One draw from a sweep parameter, with wandb's meaning of each distribution
    (``log_uniform`` takes natural-log bounds, ``log_uniform_values`` the values themselves)."""
    dist = infer_distribution(spec)
    lo, hi = spec.get("min"), spec.get("max")
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        values, weights = list(spec["values"]), spec.get("probabilities")
        return rng.choices(values, weights=weights)[0] if weights else rng.choice(values)
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "uniform":
        return rng.uniform(float(lo), float(hi))
    if dist == "q_uniform":
        return _quantize(rng.uniform(float(lo), float(hi)), spec.get("q", 1.0))
    if dist == "log_uniform":
        return math.exp(rng.uniform(float(lo), float(hi)))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "q_log_uniform_values":
        q = spec.get("q", 1)
        value = _quantize(math.exp(rng.uniform(math.log(lo), math.log(hi))), q)
        return int(value) if isinstance(q, int) else value
    if dist == "inv_log_uniform_values":
        return 1.0 / math.exp(rng.uniform(math.log(1.0 / hi), math.log(1.0 / lo)))
    if dist == "normal":
        return rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))
    if dist == "log_normal":
        return math.exp(rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0)))
    raise ValueError(f"distribution {dist!r} is not supported here; use one of {', '.join(DISTRIBUTIONS)}")


def sample_parameters(sweep: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """One run's parameter values ``{dotted name: value}``, in the file's order."""
    return {name: sample_value(spec, rng) for name, spec in sweep["parameters"].items()}


def command_args(values: Mapping[str, Any]) -> dict[str, list[str]]:
    """The agent's argument macros for one run's values, built as ``create_sweep_command_args``
    builds them (``str(value)`` after ``=``; booleans print as ``True``/``False``)."""
    flags = [f"--{k}={v}" for k, v in values.items()]
    return {
        "args": flags,
        "args_no_hyphens": [f"{k}={v}" for k, v in values.items()],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in values.items() if v is not False],
        "args_no_equals": [x for k, v in values.items() for x in (f"--{k}", str(v))],
        "args_json": [json.dumps(dict(values))],
    }


def build_command(sweep: Mapping[str, Any], values: Mapping[str, Any], env: str = "/usr/bin/env",
                  interpreter: str = "python") -> list[str]:
    """The full command line the agent would start for ``values`` (as in ``Agent._command_run``:
    a ``${macro}`` item is replaced by its list, an unknown macro by nothing)."""
    macros: dict[str, list[str]] = {**command_args(values), "env": [env], "interpreter": [interpreter]}
    if "program" in sweep:
        macros["program"] = [str(sweep["program"])]
    command: list[str] = []
    for item in sweep.get("command") or DEFAULT_COMMAND:
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            command += macros.get(item[2:-1]) or []
        else:
            command.append(item)
    return command


def cli_args(command: Sequence[str]) -> list[str]:
    """The arguments the clframe CLI receives from ``command``: everything from the ``fit``
    subcommand on (what ``clframe`` or ``python -m clframe.cli`` would see as ``sys.argv[1:]``)."""
    try:
        return list(command[list(command).index("fit"):])
    except ValueError:
        raise ValueError(f"the sweep command does not run `clframe fit`: {list(command)}") from None


def expand(sweep: Mapping[str, Any], n: int, seed: int = 0) -> list[tuple[dict[str, Any], list[str]]]:
    """``n`` sampled runs of ``sweep``: each run's values and its CLI argument list (``fit ...``)."""
    rng = random.Random(seed)
    runs = []
    for _ in range(n):
        values = sample_parameters(sweep, rng)
        runs.append((values, cli_args(build_command(sweep, values))))
    return runs
