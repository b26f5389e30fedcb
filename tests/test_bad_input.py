"""Bad input: every row of docs/errors.md gets a clear error, a non-zero exit, and no damage.

Each case runs the real ``clframe`` entry point (in-process, for speed) and checks the exit status
and the words of the message that name the problem and the fix.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from clframe.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar=false", "--trainer.epochs_per_task=1", "--data.n_tasks=2"]


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["clframe", "fit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def _image_folder(root: Path, empty_class: bool = False, corrupt: bool = False) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / "imgs" / split / cls
            folder.mkdir(parents=True)
            if empty_class and cls == "dog" and split == "train":
                continue
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    if corrupt:
        (root / "imgs" / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    return root


CASES = {
    # name: (arguments, words that must appear in the message)
    "unknown strategy": (["--model=Nope"], ["Nope"]),
    "unknown data set": (["--data.source=nope"], ["unknown data source", "digits", "mnist"]),
    "unknown config key": (["--model.bufer_size=3"], ["bufer_size"]),
    "classes do not divide": (["--data.n_tasks=3"], ["cannot be split evenly", "n_tasks"]),
    "class listed twice": (["--data.class_order=[0,1,1,2]"], ["more than once"]),
    "unknown class in the order": (["--data.class_order=[0,1,2,42]"], ["42", "valid class ids"]),
    "zero buffer size": (["--model.buffer_size=0"], ["capacity", "positive"]),
    "negative buffer size": (["--model.buffer_size=-5"], ["capacity", "positive"]),
    "wrong type (sweep value)": (["--model.buffer_size=lots"], ["buffer_size", "lots"]),
    "non-positive learning rate": (["--model.lr=0"], ["lr must be positive"]),
    "max_epochs instead of epochs_per_task": (["--trainer.max_epochs=3"], ["epochs_per_task"]),
    "zero epochs per task": (["--trainer.epochs_per_task=0"], ["epochs_per_task"]),
    "unknown backbone": (["--model.backbone=resnet9000"], ["unknown backbone", "mlp"]),
    "option the backbone does not have": (["--model.backbone_kwargs={hiden_sizes: [8]}"],
                                          ["hiden_sizes", "did you mean 'hidden_sizes'", "its options"]),
    "resume without a checkpoint": (["--ckpt_path=last"], ["no last.ckpt", "save_last"]),
    "missing checkpoint file": (["--ckpt_path=/nonexistent/x.ckpt"], ["does not exist"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_configuration(case, tmp_path, monkeypatch, capsys):
    args, words = CASES[case]
    code, err = run_main(monkeypatch, capsys, f"--trainer.default_root_dir={tmp_path}", *FAST, *args)
    assert code != 0
    for word in words:
        assert word in err, f"{case}: {word!r} not in:\n{err[-1500:]}"


def test_missing_data_folder_with_downloads_off(tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, f"--trainer.default_root_dir={tmp_path}", *FAST,
                         "--data.source=mnist", f"--data.data_root={tmp_path / 'nothing'}")
    assert code == 2 and "CLFRAME_DATA" in err and "download" in err


def test_corrupt_data_file(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08\x03garbage")
    code, err = run_main(monkeypatch, capsys, f"--trainer.default_root_dir={tmp_path}", *FAST,
                         "--data.source=mnist", f"--data.data_root={tmp_path / 'data'}")
    assert code == 2 and "MNIST" in err


@pytest.mark.parametrize("problem", ["empty class", "corrupt image"])
def test_bad_image_folder(problem, tmp_path, monkeypatch, capsys):
    root = _image_folder(tmp_path, empty_class=problem == "empty class", corrupt=problem == "corrupt image")
    code, err = run_main(monkeypatch, capsys, f"--trainer.default_root_dir={tmp_path}", *FAST,
                         "--data.source=image_folder", "--data.n_tasks=1", f"--data.data_root={root}",
                         "--data.source_options={path: imgs, image_size: 8}")
    assert code == 2
    assert ("dog" in err and "no images" in err) if problem == "empty class" else "bad.png" in err


def _checkpointed(tmp_path: Path, *extra: str) -> list[str]:
    return [f"--trainer.default_root_dir={tmp_path}", *FAST, "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1",
            "--trainer.callbacks.save_last=true", *extra]


def test_nan_loss_mid_task_stops_cleanly_and_keeps_checkpoints(tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, *_checkpointed(
        tmp_path, "--trainer.callbacks+=tests.helpers.poison.PoisonAtStep", "--trainer.callbacks.step=20"))
    assert code == 2
    assert "loss became nan" in err and "global step 20" in err and "learning rate" in err
    import torch

    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 20 and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                            if isinstance(v, torch.Tensor) and v.is_floating_point())
    assert list(tmp_path.rglob("metrics.csv"))


def test_checkpoint_from_a_different_config_is_refused_and_left_intact(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["clframe", "fit", *_checkpointed(tmp_path)])
    main()
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    code, err = run_main(monkeypatch, capsys, *_checkpointed(tmp_path / "other", "--data.class_order=[3,2,1,0]",
                                                             f"--ckpt_path={ckpt}"))
    assert code == 2 and ("different task stream" in err or "configured differently" in err) and "--ckpt_path" in err
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before


def test_bad_input_table_lists_every_tested_case():
    table = (REPO / "docs" / "errors.md").read_text()
    for case in [*CASES, "missing data folder", "corrupt data file", "empty class", "corrupt image",
                 "NaN loss", "different config"]:
        assert case.lower() in table.lower(), case

