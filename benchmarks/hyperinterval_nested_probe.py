"""Why nested HyperInterval forgets here: watch the hypernetwork stop depending on the embedding.

Trains nested HyperInterval on Split-MNIST (task-incremental, the official nested settings on the
CPU-sized 784-100-100-2 target, 600 iterations per task) and prints every 150 iterations:

- the mean |w| of the hypernetwork's first-layer weights on the embedding inputs (and on the chunk
  embeddings, for comparison);
- the relative radius of the generated weight box (||radius|| / ||centre||);
- how far the current task's generated weights are from every earlier task's (relative L2).

    CLFRAME_DATA=/path/to/data python benchmarks/hyperinterval_nested_probe.py --beta 0.001

As the reference code runs (no embedding copy, lowest-training-loss selection, universal box eps/M) at the
official length: ``--custom-init 0 --model-selection train_loss --steps 2000``; ``--chunk-size 0`` gives the
reference's unchunked hypernetwork (slow on a CPU). Per-task and universal accuracies are printed after
every task, the whole matrix at the end.

Findings are in benchmarks/results/hyperinterval.md (nested bullet).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from clframe.callbacks.base import ContinualCallback
from clframe.data.datamodule import ContinualDataModule
from clframe.strategies.interval import HyperInterval
from clframe.trainer import ContinualTrainer


class PrintAccuracies(ContinualCallback):
    """Print each evaluation row (per-task, universal) as soon as a task is evaluated."""

    def on_task_evaluated(self, trainer, pl_module, task, accuracies) -> None:
        extra = getattr(pl_module, "extra_accuracy", {})
        row = [round(100 * a, 1) for a in accuracies[: task.id + 1]]
        uni = [round(100 * a, 1) for a in extra.get("universal", [])[: task.id + 1]]
        print(f"after task {task.id}: per-task {row} universal {uni}", flush=True)


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
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100], help="target MLP hidden sizes")
    parser.add_argument("--hnet-hidden", type=int, nargs="+", default=[100])
    parser.add_argument("--chunk-size", type=int, default=2000, help="0: unchunked (the reference)")
    parser.add_argument("--custom-init", type=int, default=1, help="1: copy the previous embedding (the intended behaviour); "
                        "0: the reference's effective behaviour (its custom_init is a no-op)")
    parser.add_argument("--model-selection", default="last", choices=["last", "train_loss"])
    parser.add_argument("--universal-radius", default="eps", choices=["eps", "intersection"])
    parser.add_argument("--every", type=int, default=150, help="print the sensitivity every N steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    data = ContinualDataModule(source="mnist", scenario="task", n_tasks=5, batch_size=64, normalize=False)
    model = HyperInterval(backbone="mlp", backbone_kwargs={"hidden_sizes": args.hidden}, hnet_hidden=args.hnet_hidden,
                          embedding_dim=24, epsilon=args.epsilon, beta=args.beta, kappa_min=0.5, nested=True,
                          custom_init=bool(args.custom_init), optimizer="adam", lr=1e-3,
                          chunk_size=args.chunk_size or None, model_selection=args.model_selection,
                          universal_radius=args.universal_radius)
    trainer = ContinualTrainer(steps_per_task=args.steps, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False,
                               default_root_dir="runs/hyperinterval_nested_probe",
                               callbacks=[EmbeddingSensitivity(args.every), PrintAccuracies()])
    trainer.fit(model, datamodule=data)
    for row in trainer.accuracy_matrix:
        print("accuracy row", [round(100 * a, 1) for a in row])
    extra = trainer.continual_results.get("extra_accuracy", {})
    for name in ("universal", "worst_case"):
        if name in extra:
            print(f"{name} last row", [None if a is None else round(100 * a, 1) for a in extra[name][-1]])
    metrics = trainer.continual_results["metrics"]
    print({k: round(v, 4) for k, v in sorted(metrics.items()) if isinstance(v, float)}, flush=True)


if __name__ == "__main__":
    main()
