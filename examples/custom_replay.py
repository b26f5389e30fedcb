"""Subclass a strategy in your own code: ER with a class-balanced replay draw.

Plain ER draws replayed samples uniformly from the buffer, so classes that filled more of the
buffer are replayed more. Here each stored sample is drawn with probability inversely proportional
to its class's count: every stored class is replayed about equally often. Everything else (buffer
insertion, checkpoints, DDP, the CLI) is inherited unchanged.

    python examples/custom_replay.py                  # ER vs the subclass on Split-Digits, no download
    cd examples && PYTHONPATH=. clframe fit --model=custom_replay.BalancedReplayER   # as a CLI strategy
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import Tensor

from clframe import ER, ContinualDataModule, ContinualTrainer


class BalancedReplayER(ER):
    """ER whose replay batch holds about the same number of samples of every stored class."""

    def replay_batch(self, batch_size: int) -> dict[str, Tensor] | None:
        stored = self.buffer.all()
        if len(stored["y"]) == 0:
            return None
        labels = stored["y"].cpu()
        weights = 1.0 / torch.bincount(labels)[labels].float()  # each class gets the same total weight
        n = min(self.hparams.replay_batch_size or batch_size, len(labels))
        pick = torch.multinomial(weights, n, replacement=False, generator=self.buffer.generator)
        return {name: values[pick.to(values.device)] for name, values in stored.items()}


def run(strategy: type[ER], epochs: int, n_tasks: int) -> float:
    data = ContinualDataModule(source="digits", scenario="class", n_tasks=n_tasks, batch_size=10)
    model = strategy(backbone="mlp", backbone_kwargs={"hidden_sizes": [100, 100]}, buffer_size=50, lr=0.05)
    trainer = ContinualTrainer(epochs_per_task=epochs, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False,
                               default_root_dir=f"runs/examples/{strategy.__name__}")  # results.json goes here
    trainer.fit(model, datamodule=data)
    return trainer.continual_results["metrics"]["final/avg_acc"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5)
    args = parser.parse_args()
    for strategy in (ER, BalancedReplayER):
        L.seed_everything(0)
        print(f"{strategy.__name__}: final average accuracy {100 * run(strategy, args.epochs, args.tasks):.2f}%")
