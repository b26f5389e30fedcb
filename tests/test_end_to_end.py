"""One end-to-end run on a real MNIST subset, through the shipped Split-MNIST config."""

from __future__ import annotations

from pathlib import Path

from clframe.cli import run_cli
from clframe.metrics import average_accuracy
from tests.conftest import requires_data

REPO = Path(__file__).resolve().parents[1]


def _run(config: str, tmp_path: Path, *extra: str):
    return run_cli(["fit", "--config", str(REPO / "configs/split_mnist" / config), f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                    "--data.train_samples_per_class=300", "--data.test_samples_per_class=200", *extra])


@requires_data
def test_split_mnist_er_beats_finetune_on_real_data(tmp_path):
    er = _run("er.yaml", tmp_path / "er")
    ft = _run("finetune.yaml", tmp_path / "ft")
    er_acc, ft_acc = average_accuracy(er.trainer.accuracy_matrix), average_accuracy(ft.trainer.accuracy_matrix)
    # Finetune forgets almost everything in class-incremental Split-MNIST; replay keeps most of it.
    assert ft_acc < 0.3, ft_acc
    assert er_acc > ft_acc + 0.3, (er_acc, ft_acc)
    assert er.datamodule.stream.input_shape == (1, 28, 28)
