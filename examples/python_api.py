"""The Python API without the CLI: a stream, a strategy, continual evaluation, checkpoints, resume.

    python examples/python_api.py                       # Split-MNIST if $CLFRAME_DATA has it, else Split-Digits
    python examples/python_api.py --steps 20 --out /tmp/api   # a quick run

It trains ER on a class-incremental stream with per-iteration evaluation (stability gap), a CSV
logger and a checkpoint after every task; then it rebuilds everything from the last checkpoint,
as a crashed or preempted job would, and checks that the restored model scores the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.callbacks import ContinualEvaluation
from clframe.data.sources import default_data_root


def make_data(steps: int | None) -> ContinualDataModule:
    """Split-MNIST from the offline data folder when present; the bundled digits data otherwise."""
    has_mnist = (default_data_root() / "MNIST").exists()
    small = {"train_samples_per_class": 100, "test_samples_per_class": 50} if steps else {}
    return ContinualDataModule(source="mnist" if has_mnist else "digits", scenario="class", n_tasks=5,
                               batch_size=32, **small)


def make_trainer(out: Path, steps: int | None, resume: bool = False) -> ContinualTrainer:
    return ContinualTrainer(
        epochs_per_task=1, steps_per_task=steps, default_root_dir=out, logger=CSVLogger(out, name="api", version=0),
        callbacks=[ContinualEvaluation(every_n_steps=5, samples_per_task=200, plots=not resume),
                   ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)],
        enable_progress_bar=False, enable_model_summary=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps per task (default: 1 epoch)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/python_api"))
    args = parser.parse_args()

    L.seed_everything(0)
    trainer = make_trainer(args.out, args.steps)
    model = ER(backbone="mlp", backbone_kwargs={"hidden_sizes": [256, 256]}, buffer_size=200, lr=0.1)
    trainer.fit(model, datamodule=make_data(args.steps))
    results = trainer.continual_results
    print(f"final average accuracy {100 * results['metrics']['final/avg_acc']:.2f}%, "
          f"min-ACC {100 * results['metrics']['stability/min_acc']:.2f}%")
    print(f"files: {sorted(p.name for p in Path(trainer.log_dir).iterdir())}")

    # Resume: a fresh process would do exactly this. The stream is finished, so fit() only restores
    # the task pointer, weights, buffer and accuracy matrix; evaluating again must give the same row.
    L.seed_everything(0)
    restored_trainer = make_trainer(args.out / "resumed", args.steps, resume=True)
    restored = ER(backbone="mlp", backbone_kwargs={"hidden_sizes": [256, 256]}, buffer_size=200, lr=0.1)
    data = make_data(args.steps)
    restored_trainer.fit(restored, datamodule=data, ckpt_path=args.out / "checkpoints" / "last.ckpt")
    again = restored_trainer.evaluate_seen_tasks(restored, data, log=False)
    print(f"after the restart: last row {[round(a, 4) for a in again]} "
          f"(before: {[round(a, 4) for a in results['accuracy_matrix'][-1]]})")
    assert again == results["accuracy_matrix"][-1], "the restored model should score exactly as before"


if __name__ == "__main__":
    main()
