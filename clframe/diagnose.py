"""Turn any exception that reaches the ``clframe`` command into one paragraph: problem, cause, fix.

:func:`explain` is the single place where the command decides what to tell the user. It knows
clframe's own errors (every :class:`~clframe.errors.ClframeError`, whose message already says what
to do), and the foreign errors that bad input produces further down: Lightning's trainer
configuration, OmegaConf interpolation, the file system (long names, permissions, a full disk) and
torch's checkpoint reader. Lightning re-raises errors from inside ``fit`` and jsonargparse wraps
errors raised while building classes, so the whole ``__cause__`` / ``__context__`` chain is searched.
Anything else is reported as an unexpected error (likely a bug) with a pointer to the traceback.
:func:`explain_parser_value` does the same for the config parser's messages about a bad value.
"""

from __future__ import annotations

import difflib
import errno
import linecache
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clframe.errors import ClframeError

DEBUG_ENV = "CLFRAME_DEBUG"
INPUT_STATUS = 2  # bad input: configuration, data, checkpoint, machine
BUG_STATUS = 1  # not recognised as bad input


@dataclass(frozen=True)
class Explanation:
    """What the command prints (after ``clframe: error: ``) and the exit status it ends with."""

    message: str
    status: int


def debug_requested() -> bool:
    """True when ``CLFRAME_DEBUG`` is set to anything but empty/0/false: show the full traceback."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and every exception it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def explain(err: BaseException) -> Explanation:
    """The one-paragraph explanation of ``err`` and its exit status."""
    errors = list(chain(err))
    for e in errors:  # clframe's own message wins: it was written for this exact problem
        if isinstance(e, ClframeError):
            return Explanation(_one_paragraph(str(e)), INPUT_STATUS)
    for explainer in (_checkpoint_read, _state_dict_mismatch, _out_of_memory, _lightning_config, _omegaconf, _file_system, _clframe_refusal,
                      _optimizer_setting):
        for e in errors:
            if (message := explainer(e)) is not None:
                return Explanation(_one_paragraph(message), INPUT_STATUS)
    return Explanation(
        _one_paragraph(
            f"unexpected {type(err).__name__}: {err or '(no message)'}. This is not a known kind of bad input, so "
            f"it may be a bug in clframe or in your own code; run again with {DEBUG_ENV}=1 (or --debug) to see the "
            "full traceback, and report it with the command you ran. Checkpoints and logs written so far are kept."
        ),
        BUG_STATUS,
    )


def _one_paragraph(message: str) -> str:
    return " ".join(message.split())


def _clframe_refusal(err: BaseException) -> str | None:
    """A ValueError raised by clframe's own code: a deliberate check of an argument, whose message says
    what is wrong (the code predates :class:`ClframeError` in places). From torch or NumPy it may be a bug."""
    if not isinstance(err, ValueError) or not str(err).strip():
        return None
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not _in_package(filename := tb.tb_frame.f_code.co_filename):
        return None
    deliberate = "raise" in linecache.getline(filename, tb.tb_lineno)  # not a C function (torch.cat) failing there
    return str(err) if deliberate else None


def _optimizer_setting(err: BaseException) -> str | None:
    """torch.optim's refusal of a hyperparameter (``Invalid weight_decay value: -1.0``)."""
    if not isinstance(err, ValueError) or not (m := re.match(r"Invalid (\w+) value: (.*)", str(err))):
        return None
    return (f"the optimizer refused {m.group(1)} = {m.group(2)}: torch.optim accepts only valid (mostly "
            f"non-negative) values; fix --model.{m.group(1)}")


def _in_package(filename: str) -> bool:
    package = Path(__file__).resolve().parent
    try:
        return Path(filename).resolve().is_relative_to(package)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- checkpoints

_CHECKPOINT_READ_ERRORS = (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError,
                           zipfile.BadZipFile)


def _checkpoint_read(err: BaseException) -> str | None:
    """An error raised inside ``torch.load``: the file is truncated, empty, not a checkpoint or unsafe."""
    path = _torch_load_path(err)
    if path is None or not isinstance(err, _CHECKPOINT_READ_ERRORS):
        return None
    if isinstance(err, pickle.UnpicklingError) and (unsafe := re.search(r"GLOBAL (\S+)", str(err))):
        return (f"checkpoint {path} refers to {unsafe.group(1)}, which could run code when loaded, so it was not "
                "loaded. Only load checkpoints you trust; resume from a checkpoint written by clframe, or start "
                "without --ckpt_path.")
    detail = str(err)
    if m := re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", detail, re.S):
        detail = m.group(1)  # torch's advice to retry with weights_only=False is not one to follow here
    size = _size(path)
    what = "is empty" if size == 0 else "is truncated, damaged or not a PyTorch checkpoint"
    return (f"cannot read checkpoint {path}: the file {what} ({type(err).__name__}: {' '.join(detail.split())[:200] or 'no detail'}). "
            "It may have been cut short by a crash or a full disk during saving. Resume from an earlier checkpoint "
            "(e.g. another file in the same folder), or start again without --ckpt_path; the file was left as it is.")


def _raised_in(err: BaseException, folder: str) -> bool:
    """Whether ``err`` was raised while running code under ``folder`` (a path fragment), at any depth."""
    tb = err.__traceback__
    while tb is not None:
        if folder in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


def _raised_directly_in(err: BaseException, file: str, function: str) -> bool:
    """Whether ``err`` was raised by a ``raise`` in ``function`` of the file ``file`` (a path fragment) itself, not
    in something that function called."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    code = tb.tb_frame.f_code
    return file in code.co_filename.replace("\\", "/") and code.co_name == function


def _out_of_memory(err: BaseException) -> str | None:
    """The accelerator's or the machine's memory ran out: the run is too big for it, not broken."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        where = "the accelerator's memory"
    elif isinstance(err, MemoryError):
        where = "the machine's memory (RAM)"
    else:
        return None
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return (f"out of {where} ({first}). Lower --data.batch_size and --data.eval_batch_size, train in lower precision "
            "(--trainer.precision=16-mixed or bf16-mixed), pick a smaller backbone or buffer, or use a larger device. "
            "Checkpoints written so far are kept.")


def _state_dict_mismatch(err: BaseException) -> str | None:
    """A checkpoint whose tensors do not fit the model built from this config (another strategy, backbone or size)."""
    if not isinstance(err, RuntimeError) or "Error(s) in loading state_dict" not in str(err):
        return None
    detail = " ".join(str(err).split())
    return (f"the checkpoint's weights do not fit the model built from this config ({detail[:300]}"
            f"{'...' if len(detail) > 300 else ''}). It was written with another strategy, backbone or layer sizes: "
            "resume with the config that produced it, or start a new run without --ckpt_path.")


def _torch_load_path(err: BaseException) -> str | None:
    """The file handed to ``torch.load`` if ``err`` was raised inside it, else None."""
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "load" and code.co_filename.replace("\\", "/").endswith("torch/serialization.py"):
            target = tb.tb_frame.f_locals.get("f")
            return os.fspath(target) if isinstance(target, (str, os.PathLike)) else str(getattr(target, "name", target))
        tb = tb.tb_next
    return None


def _size(path: str) -> int | None:
    try:
        return Path(path).stat().st_size
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- Lightning

def _lightning_config(err: BaseException) -> str | None:
    """Lightning's refusal of a trainer setting (accelerator, devices, precision, strategy, callbacks)."""
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover - Lightning is a dependency
        return None
    refused = isinstance(err, (ValueError, TypeError)) and (
        _raised_in(err, "lightning/pytorch/trainer/connectors/")
        or _raised_directly_in(err, "lightning/pytorch/trainer/trainer.py", "__init__"))  # e.g. barebones conflicts
    if not isinstance(err, MisconfigurationException) and not refused:
        return None
    text = str(err).strip()
    lower = text.lower()
    if "gpu" in lower or "cuda" in lower or "mps" in lower or "tpu" in lower:
        hint = ("this machine has no such accelerator visible to PyTorch; use --trainer.accelerator=cpu (or auto, "
                "which picks what exists), or run on a machine with one")
    elif "barebones" in lower:
        hint = ("barebones mode turns off logging, checkpointing, the progress bar and the model summary, so it refuses "
                "options that ask for them (a config file may set them): unset the option named, e.g. "
                "--trainer.log_every_n_steps=null or --trainer.enable_checkpointing=null, or drop --trainer.barebones")
    elif "devices" in lower or "num_nodes" in lower:
        hint = ("--trainer.devices takes a positive number of devices, a list of device ids (e.g. [0, 1]), -1 for all, "
                "or auto; --trainer.num_nodes a positive number of machines")
    else:
        hint = "change that --trainer option (clframe fit --help lists them)"
    return f"the trainer settings were refused: {text} Fix: {hint}."


# ---------------------------------------------------------------------------------------------- OmegaConf

def _omegaconf(err: BaseException) -> str | None:
    try:
        from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException
    except ImportError:  # pragma: no cover - optional
        return None
    if not isinstance(err, OmegaConfBaseException):
        return None
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, InterpolationResolutionError):
        return (f"a ${{...}} interpolation in the config cannot be resolved: {detail}. Interpolations refer to keys of "
                "the same config by their full dotted name (e.g. ${data.batch_size}); fix the name or give the key "
                "a value (clframe fit --config <file> --print_config shows the keys).")
    return f"the config could not be read by OmegaConf: {detail}. Check the YAML of the --config files."


# ---------------------------------------------------------------------------------------------- file system

def _file_system(err: BaseException) -> str | None:
    if not isinstance(err, OSError) or err.errno is None:
        return None
    where = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        where = f"{err.filename2} (staged as {err.filename})"
    kept = "Checkpoints and logs written before this point are kept."
    if err.errno == errno.ENAMETOOLONG:
        return (f"a path is too long for the file system: {_short(where)}. Each folder or file name may be at most "
                "255 bytes (and a whole path about 4096); shorten --trainer.default_root_dir, the logger's name or "
                "version, or the checkpoint dirpath/filename.")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {_short(where)}: {err.strerror} (the folder is read-only or belongs to someone else). "
                "Point --trainer.default_root_dir (and any checkpoint dirpath or logger save_dir) at a folder you can "
                f"write, or fix its permissions. {kept}")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {_short(where)} ({err.strerror}). Free space or write "
                f"elsewhere (--trainer.default_root_dir, the checkpoint dirpath); checkpoints are first written to "
                f"the temporary folder ({tempfile.gettempdir()}, set by TMPDIR), which needs room for one checkpoint "
                f"too. Fewer checkpoints (save_top_k) also help. {kept}")
    if err.errno in (errno.EISDIR, errno.ENOTDIR):
        return (f"{_short(where)}: {err.strerror}; a file was expected where there is a folder or the other way "
                "round. Check the paths in the config and on the command line.")
    if err.errno == errno.ENOENT and err.filename is not None:
        return f"{_short(where)} does not exist ({err.strerror}); check the path in the config or on the command line."
    return None


def _short(path: object, limit: int = 160) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[:60]}...{text[-60:]} ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------- config parsing

def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_CLASS_EXAMPLES = {"Logger": "CSVLogger, TensorBoardLogger, WandbLogger",
                   "Callback": "ModelCheckpoint, clframe.callbacks.ContinualEvaluation"}


def explain_parser_value(message: str, key: str | None) -> str | None:
    """jsonargparse's wording of a bad value, rewritten where it misleads (``key`` is the option it names): a
    non-finite number, an empty or non-mapping config, a YAML flow mapping without spaces, a choice among
    literals, a logger or callback name that cannot be imported. None when the message has none of these shapes."""
    nested = re.search(r"class_path '([\w.]+)':\s*\n\s*Parser key \"([\w.]+)\"", message)
    where = f"{key or 'model'}.init_args.{nested.group(2)} ({nested.group(1)})" if nested else key
    if where and (m := re.search(r"(?:Given|Got) value: ([-+]?(?:nan|inf(?:inity)?))\s*$", message, re.I | re.M)):
        return f"{where}: {m.group(1)} is not allowed; give a finite number"
    if (m := re.match(r"Unexpected config:\s*(.*)", message, re.S)) is not None:
        what = "is empty" if not m.group(1).strip() else f"is not a mapping of options (it starts {m.group(1)[:40]!r})"
        return (f"the --config file {what}; a config is a YAML mapping with model:, data: and trainer: sections "
                "(`clframe fit --print_config` prints a complete one)")
    if key and (m := re.search(r"Given value: (\{.*\})\s*$", message, re.M)) and re.search(r"\w:[^\s/]", m.group(1)):
        fixed = re.sub(r"(\w):(?=[^\s/])", r"\1: ", m.group(1))
        return f"{key}: {m.group(1)!r} is not a mapping: YAML needs a space after each key's colon, e.g. {fixed}"
    if nested and (m := re.search(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", message)):
        allowed = [a.strip().strip("'\"") for a in m.group(1).split(",")]
        return (f"{where}: {m.group(2).strip()!r} is not allowed{_did_you_mean(m.group(2).strip(), allowed)}; "
                f"choose one of: {', '.join(allowed)}")
    literals = re.findall(r"- Expected a typing\.Literal\[(.*)\]", message)
    if key and not nested and literals and (m := re.search(r"Given value: (.*)", message)):
        allowed = [a.strip().strip("'\"") for group in literals for a in group.split(",")]
        allowed += [t.replace("NoneType", "null") for t in re.findall(r"- Expected a <class '(\w+)'>", message)]
        return (f"{key}: {m.group(1).strip()!r} is not allowed{_did_you_mean(m.group(1).strip(), allowed)}; "
                f"choose one of: {', '.join(dict.fromkeys(allowed))}")
    wanted = re.search(r"Expected a dot import path string: (\S+)", message)
    if key and key.startswith("trainer.") and wanted and "does not correspond to a subclass" not in message:
        kind = "Logger" if key.endswith("logger") else "Callback"
        return (f"{key}: {wanted.group(1)!r} is not a {kind} class that can be imported; give the class name or "
                f"import path of a {kind} (e.g. {_CLASS_EXAMPLES[kind]})")
    return None
