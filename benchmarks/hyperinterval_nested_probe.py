"""Why nested HyperInterval forgets here: watch the hypernetwork stop depending on the embedding.

Trains nested HyperInterval on Split-MNIST (task-incremental, the official nested settings on the
CPU-sized 784-100-100-2 target, 600 iterations per task) and prints every 150 iterations:

- the mean |w| of the hypernetwork's first-layer weights on the embedding inputs (and on the chunk
  embeddings, for comparison);
- the relative radius of the generated weight box (||radius|| / ||centre||);
- how far the current task's generated weights are from every earlier task's (relative L2).

    CLFRAME_DATA=/path/to/data python benchmarks/hyperinterval_nested_probe.py --beta 0.001

Findings are in benchmarks/results/hyperinterval.md (nested bullet).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from clframe.data.datamodule import ContinualDataModule
from clframe.strategies.interval import HyperInterval
from clframe.trainer import ContinualTrainer


class EmbeddingSensitivity(L.Callback):
    """Print how strongly the generated weights depend on the task embedding."""

    def __init__(self, every: int = 150) -> None:
        self.every = every

    @torch.no_grad()
    def on_train_batch_end(self, trainer, model: HyperInterval, outputs, batch, batch_idx: int) -> None:
        step = int(model.task_step)
        if step % self.every:
            return
        m, task = model.hparams.embedding_dim, int(model.current_task)
        first = model.hypernet.layers[0].weight
        weights = [model.hypernet(model.embedding_box(j, model.hparams.epsilon).centre) for j in range(task + 1)]
        box = model.hypernet(model.embedding_box(task, model.hparams.epsilon))
        to_old = [float((weights[-1] - w).norm() / w.norm()) for w in weights[:-1]]
        print(f"task {task} step {step}: |W_embedding| {first[:, :m].abs().mean():.4f} "
              f"|W_chunk| {first[:, m:].abs().mean():.4f} relative box radius "
              f"{float(box.radius.norm() / box.centre.norm()):.3f} relative distance to earlier tasks "
              f"{[round(d, 4) for d in to_old]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", type=float, default=0.001)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    data = ContinualDataModule(source="mnist", scenario="task", n_tasks=5, batch_size=64, normalize=False)
    model = HyperInterval(backbone="mlp", backbone_kwargs={"hidden_sizes": [100, 100]}, hnet_hidden=[100],
                          embedding_dim=24, epsilon=args.epsilon, beta=args.beta, kappa_min=0.5, nested=True,
                          custom_init=True, optimizer="adam", lr=1e-3, chunk_size=2000)
    trainer = ContinualTrainer(steps_per_task=args.steps, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False,
                               default_root_dir="runs/hyperinterval_nested_probe",
                               callbacks=[EmbeddingSensitivity()])
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main()
