"""Checkpoints: no code runs on load, atomic sealed writes, refused corruption, the same run on resume,
``last`` of this run, SIGTERM saves and exits 143."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from clframe import ER, EWC, ContinualDataModule, ContinualTrainer
from clframe.checkpoints import io as ckio
from clframe.checkpoints import load_checkpoint, verify_checkpoint, write_checkpoint
from clframe.cli import main, run_cli
from clframe.errors import CheckpointError
from tests.conftest import QUIET_TRAINER
from tests.helpers.resume import Case, assert_resumed_exactly, assert_same_matrix_and_weights, run_case
from tests.helpers.signals import SignalAtStep, SignalInValidation

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates ``marker``: what a poisoned checkpoint could do with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poisoned(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"callbacks": {"clframe_stream_progress": {"task_id": 0, "rows": [], "task_ended": False}},
                "state_dict": {}, "note": Payload(marker)}, path)
    return path


def _data(**kw) -> ContinualDataModule:
    return ContinualDataModule(source="digits", n_tasks=2, batch_size=32, train_samples_per_class=16,
                               test_samples_per_class=8, **kw)


def _trainer(ckpt_dir: Path | None, root: Path, *callbacks, logger=False, **kw) -> ContinualTrainer:
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1, save_top_k=0)
    return ContinualTrainer(epochs_per_task=2, logger=logger, callbacks=[ckpt, *callbacks], default_root_dir=root,
                            **{**QUIET_TRAINER, "enable_checkpointing": True}, **kw)


def _run(root: Path, ckpt_dir: Path | None, model=None, data=None, ckpt_path=None, callbacks=(), **kw):
    L.seed_everything(0)
    model = model or ER(buffer_size=30, lr=0.05)
    trainer = _trainer(ckpt_dir, root, *callbacks, **kw)
    trainer.fit(model, datamodule=data or _data(), ckpt_path=ckpt_path)
    return trainer, model


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished short ER run and its last.ckpt."""
    root = tmp_path_factory.mktemp("finished")
    trainer, _ = _run(root, root / "ck")
    return root / "ck" / "last.ckpt", trainer.accuracy_matrix


# ------------------------------------------------------------------ security
@pytest.mark.parametrize("spelling", ["path", "last"])
def test_poisoned_checkpoint_is_refused_and_its_code_never_runs(tmp_path, spelling):
    marker = tmp_path / "PWNED"
    path = _poisoned(tmp_path / "ck" / "last.ckpt", marker)
    trainer = _trainer(tmp_path / "ck", tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*last\.ckpt.*io\.open.*trust_checkpoints"):
        trainer.fit(ER(), datamodule=_data(), ckpt_path=path if spelling == "path" else "last", weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("spelling", ["path", "last"])
def test_cli_refuses_a_poisoned_checkpoint(tmp_path, spelling, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    path = _poisoned(tmp_path / "ck" / "last.ckpt", marker)
    monkeypatch.setattr(sys, "argv", ["clframe", "fit", "--trainer.enable_progress_bar=false", "--data.n_tasks=2",
                                      f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=true",
                                      "--trainer.callbacks+=ModelCheckpoint",
                                      f"--trainer.callbacks.dirpath={tmp_path / 'ck'}", "--weights_only=true",
                                      f"--ckpt_path={path if spelling == 'path' else 'last'}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_trust_checkpoints_is_the_explicit_opt_in(tmp_path):
    marker = tmp_path / "PWNED"
    path = _poisoned(tmp_path / "x.ckpt", marker)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    load_checkpoint(path, trust=True)
    assert marker.exists()


def test_python_tags_and_foreign_classes_in_configs_name_the_key(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    cases = {
        "tag.yaml": (f"model:\n  class_path: ER\n  init_args:\n    lr: !!python/object/apply:os.system ['touch {marker}']\n",
                     "key model.init_args.lr uses the YAML tag !!python/object/apply:os.system"),
        "model.yaml": (f"model:\n  class_path: os.system\n  init_args:\n    command: touch {marker}\n",
                       "model: class_path 'os.system' is not a ContinualModule subclass"),
        "callback.yaml": (f"trainer:\n  callbacks:\n    - class_path: subprocess.Popen\n      init_args:\n        args: [touch, {marker}]\n",
                          "trainer.callbacks: class_path 'subprocess.Popen' is not a Callback subclass"),
        "logger.yaml": (f"trainer:\n  logger:\n    class_path: subprocess.Popen\n    init_args:\n      args: [touch, {marker}]\n",
                        "trainer.logger: class_path 'subprocess.Popen' is not a Logger subclass"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        monkeypatch.setattr(sys, "argv", ["clframe", "fit", "--config", str(tmp_path / name)])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2 and expected in capsys.readouterr().err, name
    assert not marker.exists()


# ------------------------------------------------------------------ integrity and atomic writes
def _sealed(tmp_path: Path) -> Path:
    path = tmp_path / "good.ckpt"
    write_checkpoint({"state_dict": {"w": torch.randn(4096)}, "note": "x"}, path)
    return path


@pytest.mark.parametrize("damage", ["bitflip", "truncated", "empty", "text"])
def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path, damage):
    good = _sealed(tmp_path)
    data = bytearray(good.read_bytes())
    assert verify_checkpoint(good) and torch.load(good, weights_only=True)["note"] == "x"  # still a torch file
    if damage == "bitflip":
        data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes({"bitflip": bytes(data), "truncated": bytes(data[: len(data) // 2]), "empty": b"",
                     "text": b"epoch: 3\nthis is not a checkpoint\n"}[damage])
    with pytest.raises(CheckpointError, match=r"bad\.ckpt"):
        load_checkpoint(bad)


def test_resume_refuses_a_truncated_checkpoint(tmp_path, finished):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(finished[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"last\.ckpt.* not a readable checkpoint|last\.ckpt.*corrupt"):
        _run(tmp_path, tmp_path / "ck", ckpt_path=bad)


_KILL_MID_WRITE = """
import os, signal, sys, torch
from clframe.checkpoints import io
path = sys.argv[1]
io.write_checkpoint({"w": torch.zeros(100_000), "v": 1}, path)
real_save = torch.save
def dying_save(obj, f):
    import io as _io
    buf = _io.BytesIO(); real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
io.torch.save = dying_save
io.write_checkpoint({"w": torch.ones(100_000), "v": 2}, path)
"""


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing of the writer's clean-up runs."""


def test_a_write_that_never_finishes_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    write_checkpoint({"w": torch.zeros(10_000), "v": 1}, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise Killed

    monkeypatch.setattr(ckio.torch, "save", dying_save)
    with pytest.raises(Killed):
        write_checkpoint({"w": torch.ones(10_000), "v": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1 and verify_checkpoint(path)


@pytest.mark.slow
def test_sigkill_during_a_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE, str(path)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["v"] == 1 and verify_checkpoint(path)


def test_full_or_read_only_folder_stops_with_a_clear_error(tmp_path, monkeypatch):
    good = _sealed(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckio.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*good\.ckpt: No space left on device"):
        write_checkpoint({"a": 1}, good)
    monkeypatch.undo()
    assert load_checkpoint(good)["note"] == "x" and not list(tmp_path.glob(".*partial"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*a_file/ck"):
        _run(tmp_path, blocker / "ck")  # a folder that cannot be written, like a read-only one


def test_checkpoints_do_not_need_the_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))  # as full as a temp dir can be
    _run(tmp_path, tmp_path / "ck")
    assert verify_checkpoint(tmp_path / "ck" / "last.ckpt")


# ------------------------------------------------------------------ the same run
@pytest.mark.parametrize("change", ["strategy", "buffer", "batch_size", "data_seed", "epochs"])
@pytest.mark.parametrize("spelling", ["path", "last"])
def test_resume_with_another_config_is_refused_listing_the_differences(tmp_path, finished, change, spelling):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "last.ckpt").write_bytes(finished[0].read_bytes())
    model = {"strategy": EWC(), "buffer": ER(buffer_size=20, lr=0.05)}.get(change)
    data = {"batch_size": _data().__class__(source="digits", n_tasks=2, batch_size=16, train_samples_per_class=16,
                                            test_samples_per_class=8), "data_seed": _data(seed=3)}.get(change)
    expected = {"strategy": r"model\.class_path: \"clframe\.strategies\.replay\.er\.ER\" -> \"clframe\.strategies\.baselines\.EWC\"",
                "buffer": r"model\.buffer_size: 30 -> 20", "batch_size": r"data\.batch_size: 32 -> 16",
                "data_seed": r"data\.seed: null -> 3", "epochs": r"trainer\.epochs_per_task: 2 -> 1"}[change]
    L.seed_everything(0)
    trainer = ContinualTrainer(epochs_per_task=1 if change == "epochs" else 2, logger=False, default_root_dir=tmp_path,
                               callbacks=[ModelCheckpoint(dirpath=ck, save_last=True)],
                               **{**QUIET_TRAINER, "enable_checkpointing": True})
    with pytest.raises(CheckpointError, match=expected):
        trainer.fit(model or ER(buffer_size=30, lr=0.05), datamodule=data or _data(),
                    ckpt_path=ck / "last.ckpt" if spelling == "path" else "last")


def test_allow_changed_lets_a_named_key_change(tmp_path, finished):
    trainer, _ = _run(tmp_path, None, model=ER(buffer_size=30, lr=0.1), ckpt_path=finished[0], allow_changed=["model.lr"])
    assert len(trainer.accuracy_matrix) == 2


def test_cli_explicit_path_uses_the_users_config_and_refuses_the_difference(tmp_path, finished):
    with pytest.raises(CheckpointError, match=r"model\.class_path: .*ER\" -> .*EWC\""):
        run_cli(["fit", "--trainer.enable_progress_bar=false", "--data.n_tasks=2", "--model=EWC",
                 f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={finished[0]}"])


def test_last_picks_the_checkpoint_of_this_run(tmp_path):
    """Run A (lr 0.05) and B (lr 0.2) share a root; B's is newer. Resuming A's config takes A's last.ckpt."""
    a, _ = _run(tmp_path, None, logger=None)
    b, _ = _run(tmp_path, None, model=ER(buffer_size=30, lr=0.2), logger=None)
    assert not np.array_equal(a.accuracy_matrix, b.accuracy_matrix, equal_nan=True)
    resumed, _ = _run(tmp_path, None, ckpt_path="last", logger=None)
    np.testing.assert_array_equal(resumed.accuracy_matrix, a.accuracy_matrix)


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path):
    full, full_model = _run(tmp_path / "full", tmp_path / "full_ck")
    with pytest.raises(SystemExit) as exit_:
        _run(tmp_path / "killed", tmp_path / "ck", callbacks=[SignalAtStep(5)])
    assert exit_.value.code == 143
    assert load_checkpoint(tmp_path / "ck" / "last.ckpt")["global_step"] == 5
    assert_same_matrix_and_weights((full, full_model), _run(tmp_path / "killed", tmp_path / "ck", ckpt_path="last"))


def test_sigterm_saves_last_ckpt_even_without_save_last(tmp_path):
    def run(ckpt_path=None, *callbacks):
        L.seed_everything(0)
        trainer = ContinualTrainer(epochs_per_task=2, logger=False, default_root_dir=tmp_path,
                                   callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck"), *callbacks],
                                   **{**QUIET_TRAINER, "enable_checkpointing": True})
        trainer.fit(ER(buffer_size=30), datamodule=_data(), ckpt_path=ckpt_path)
        return trainer

    with pytest.raises(SystemExit) as exit_:
        run(None, SignalAtStep(3))
    assert exit_.value.code == 143
    assert load_checkpoint(tmp_path / "ck" / "last.ckpt")["global_step"] == 3
    np.testing.assert_array_equal(run("last").accuracy_matrix, run().accuracy_matrix)


VALIDATED = Case(lambda: ER(buffer_size=30, lr=0.05, backbone_kwargs={"hidden_sizes": [32], "dropout": 0.2}),
                 {"source": "digits", "n_tasks": 2, "batch_size": 16, "train_samples_per_class": 40,
                  "test_samples_per_class": 8, "val_fraction": 0.2, "eval_batch_size": 8},
                 {"epochs_per_task": 2})


class Validations(L.Callback):
    """Every finished validation (sanity checks aside): when it ran, and the accuracies it measured."""

    def __init__(self) -> None:
        self.done: list[tuple[str, int, int, str]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.done.append((trainer.state.fn, trainer.global_step, trainer.current_epoch, repr(pl_module.eval_accuracy)))


def _with(case: Case, *callbacks: L.Callback, **trainer_kw) -> Case:
    return dataclasses.replace(case, trainer={**case.trainer, **trainer_kw},
                               callbacks=lambda: [*case.callbacks(), *callbacks])


@pytest.mark.parametrize(("run", "batch", "every"), [(1, 1, 1.0), (3, 2, 1.0), (5, 0, 1.0), (1, 1, 0.5)],
                         ids=["first epoch", "after task 0", "last epoch of task 1", "mid-epoch"])
def test_sigterm_during_validation_saves_a_checkpoint_that_resumes_exactly(tmp_path, run, batch, every):
    """SIGTERM while a validation runs (Lightning stops after the running validation batch): 143, a
    last.ckpt, and a resumed run that validates again from that validation on and ends bit for bit where the
    uninterrupted one does. Validations 1, 2, 4, 5 are the fit's epoch ends; 3 is the evaluation after task 0;
    with ``val_check_interval=0.5``, 1 is in the middle of the first epoch."""
    case = _with(VALIDATED, val_check_interval=every)
    full_log, killed_log, resumed_log = Validations(), Validations(), Validations()
    full = run_case(_with(case, full_log), tmp_path / "full")
    killed = _with(case, ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=0), SignalInValidation(run, batch),
                   killed_log, enable_checkpointing=True)
    with pytest.raises(SystemExit) as exit_:
        run_case(killed, tmp_path / "killed")
    assert exit_.value.code == 143 and len(killed_log.done) == run - 1
    # save_top_k=0 and no save_last: only the SIGTERM handler writes last.ckpt
    resumed = run_case(_with(case, resumed_log), tmp_path / "resumed", ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert_resumed_exactly(full, resumed, f"resumed from SIGTERM in validation {run}")
    assert resumed_log.done == full_log.done[run - 1:]  # the interrupted validation ran again, and each one once


@pytest.mark.slow
def test_sigterm_ends_the_clframe_process_with_status_143(tmp_path):
    cmd = [sys.executable, "-m", "clframe.cli", "fit", f"--trainer.default_root_dir={tmp_path}", "--data.n_tasks=2",
           "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true", "--trainer.callbacks+=ModelCheckpoint",
           f"--trainer.callbacks.dirpath={tmp_path / 'ck'}", "--trainer.callbacks.save_last=true",
           "--trainer.callbacks.every_n_train_steps=50", "--trainer.callbacks+=tests.helpers.signals.SignalAtStep",
           "--trainer.callbacks.step=7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "stopped by SIGTERM" in proc.stderr and load_checkpoint(tmp_path / "ck" / "last.ckpt")["global_step"] == 7
    assert not list(tmp_path.rglob("results.json"))
    proc = subprocess.run(cmd[:-2] + ["--ckpt_path=last"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.rglob("results.json"))


# ------------------------------------------------------------------ every family under the allow-list
def _family(name: str):
    from clframe.strategies import L2P, WSN, DERpp, GeRe, ICaRL, LwF, SupSup
    from clframe.strategies.interval import HyperInterval

    vit = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 16, "num_heads": 2, "mlp_ratio": 2.0}
    small = {"backbone_kwargs": {"hidden_sizes": [16, 16]}}
    return {
        "ER": lambda: (ER(buffer_size=30), {}),
        "DERpp": lambda: (DERpp(buffer_size=30), {}),
        "iCaRL": lambda: (ICaRL(buffer_size=30), {}),
        "GeRe": lambda: (GeRe(backbone="mlp", general={"source": "digits", "n": 32}, general_classes=10), {}),
        "EWC": lambda: (EWC(), {}),
        "LwF": lambda: (LwF(), {}),
        "SupSup": lambda: (SupSup(**small), {"scenario": "task"}),
        "WSN": lambda: (WSN(keep_best=True, **small), {"scenario": "task", "val_fraction": 0.2}),
        "HyperInterval": lambda: (HyperInterval(backbone_kwargs={"hidden_sizes": [8]}, hnet_hidden=[8], embedding_dim=4),
                                  {"scenario": "task"}),
        "L2P": lambda: (L2P(backbone="vit_tiny_patch16_224", pretrained=False, backbone_kwargs=vit, pool_size=4,
                            prompt_length=2, top_k=2), {}),
        "InTAct": lambda: (ER(buffer_size=30, intact={"lambda_var": 0.01, "lambda_int": 1.0, "lambda_feat": 1.0}), {}),
    }[name]()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ER", "DERpp", "iCaRL", "GeRe", "EWC", "LwF", "SupSup", "WSN", "HyperInterval", "L2P",
                                  "InTAct"])
def test_every_family_saves_checkpoints_that_load_safely_and_resume(tmp_path, name):
    model, data_kw = _family(name)
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = ContinualTrainer(epochs_per_task=2, logger=False, callbacks=[ckpt], default_root_dir=tmp_path,
                               **{**QUIET_TRAINER, "enable_checkpointing": True})
    trainer.fit(model, datamodule=_data(**data_kw))
    files = sorted((tmp_path / "ck").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    for f in files:
        assert verify_checkpoint(f) and "clframe_run" in load_checkpoint(f)  # sealed, and no type beyond the allow-list
    L.seed_everything(0)
    model2, _ = _family(name)
    resumed = ContinualTrainer(epochs_per_task=2, logger=False, default_root_dir=tmp_path / "r", **QUIET_TRAINER)
    resumed.fit(model2, datamodule=_data(**data_kw), ckpt_path=files[len(files) // 2])
    assert len(resumed.accuracy_matrix) == 2 and resumed.global_step == trainer.global_step


def test_an_option_newer_than_the_checkpoint_left_at_its_default_is_no_difference():
    from clframe.checkpoints.identity import differences, run_identity

    class _T:
        epochs_per_task, steps_per_task = 1, None

    now = run_identity(_T(), ER(buffer_size=30), _data())
    saved = {k: v for k, v in now.items() if k != "model.memory_format"}  # written before the option existed
    assert "model.memory_format" in now.defaults and differences(saved, now) == []
    changed = run_identity(_T(), ER(buffer_size=30, memory_format="channels_last"), _data())
    assert differences(saved, changed) == ['model.memory_format: "<unset>" -> "channels_last"']
