"""The overhead experiment's fourth side: the plain loop written as a minimal Lightning program, no clframe.

What a Lightning user writes for ER without a continual-learning library: one ``LightningModule`` holding the
network and the plain loop's reservoir, automatic optimisation, ``self.log`` of the training loss, a fresh
``Trainer`` per task (``max_epochs=1``, CSV logger, progress bar, checkpointing and model summary off) and
``trainer.test`` over one loader per seen task after each task. Batches, buffer draws and the arithmetic are the
plain loop's, so its accuracy matrix equals the plain loop's; what it adds is Lightning's own training and
evaluation loops, the floor any Lightning-native library starts from.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from perf_experiment import Experiment, PlainReservoir
from timing import quiet
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from clframe.data.samplers import epoch_seed


class _Order(Sampler[int]):
    """The plain loop's epoch order: ``randperm`` from the task's epoch seed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist())


class _Pairs(Dataset):
    """Inputs and labels, a batch gathered with one ``index_select`` (as the plain loop gathers)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(positions, dtype=torch.long)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


def _as_is(batch: Any) -> Any:
    return batch


class BareER(L.LightningModule):
    """ER as the plain loop does it: new batch joined with a replayed one, one cross-entropy, then the insert."""

    def __init__(self, net: nn.Module, buffer: PlainReservoir, lr: float, replay_batch_size: int) -> None:
        super().__init__()
        self.net, self.buffer, self.lr, self.replay_batch_size = net, buffer, lr, replay_batch_size

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.buffer.seen:
            rx, ry = self.buffer.sample(self.replay_batch_size)
            x_in, y_in = torch.cat([x, rx]), torch.cat([y, ry])
        else:
            x_in, y_in = x, y
        loss = F.cross_entropy(self.net(x_in), y_in)
        self.log("train/loss", loss)
        self.buffer.add(x, y)
        return loss

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("acc", (self.net(x).argmax(1) == y).float().mean(), batch_size=len(y))  # weighted: exact accuracy

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)  # a fresh optimizer per task, as the plain loop


def run_bare_lightning(exp: Experiment, root: str, seed: int = 0) -> dict[str, Any]:
    net = exp.fresh_net()
    module = BareER(net, PlainReservoir(exp.buffer_size, tuple(exp.train[0][0].shape[1:]), seed), exp.lr,
                    exp.replay_batch_size)
    rows, steps = [], 0
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for task_id, (x_all, y_all) in enumerate(exp.train):
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, default_root_dir=root,
                            logger=CSVLogger(root))
        train = DataLoader(_Pairs(x_all, y_all), batch_size=exp.batch_size, collate_fn=_as_is,
                           sampler=_Order(len(y_all), epoch_seed(exp.stream.seed, task_id)))
        tests = [DataLoader(_Pairs(x, y), batch_size=exp.eval_batch_size, collate_fn=_as_is)
                 for x, y in exp.test[: task_id + 1]]
        with quiet():
            trainer.fit(module, train)
            results = trainer.test(module, tests, verbose=False)
        steps += trainer.global_step
        rows.append([r[f"acc/dataloader_idx_{j}"] if len(tests) > 1 else r["acc"] for j, r in enumerate(results)])
    return {"accuracy_matrix": rows, "steps": steps,
            "samples": sum(len(y) for _, y in exp.train) + (steps - 1) * exp.replay_batch_size}
