"""DDP: every rank trains on a disjoint, equally long shard of every task, the replay buffers stay
identical, evaluation covers every test sample exactly once, and W processes with batch B run what
one process with batch W * B runs.

The fast tests check the sharding logic without processes; the slow one runs the real command
(``clframe fit --trainer.strategy=ddp --trainer.devices=2 --trainer.accelerator=cpu``, gloo) and
compares it with a single process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

from clframe import ER, ContinualDataModule, ContinualTrainer
from clframe.callbacks import ContinualEvaluation
from clframe.cli import run_cli
from clframe.data.samplers import EpochShuffleSampler, PerTaskBatchSampler, ShardSampler
from clframe.errors import ConfigError
from clframe.strategies.replay.buffer import ReplayBuffer

REPO = Path(__file__).resolve().parents[1]


def _interleave(shares: list[list[int]]) -> list[int]:
    """The ranks' batches merged sample by sample (what ``ReplayModule.gather_ranks`` does)."""
    return [x for k in range(len(shares[0])) for x in (s[k] for s in shares)]


# ---------------------------------------------------------------------------------------- sharding logic
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("size", [60, 61, 62])
def test_training_shards_are_disjoint_equal_and_rebuild_the_single_process_order(world, size):
    single = EpochShuffleSampler(size, seed=5)
    ranks = [EpochShuffleSampler(size, seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 3):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        shares = [list(s) for s in ranks]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == size // world
        assert len(set().union(*shares)) == sum(map(len, shares))  # disjoint
        # a tail of fewer than `world` samples is left out; the rest is one process's order, interleaved
        assert _interleave(shares) == list(single)[: size - size % world]


@pytest.mark.parametrize("world", [2, 3])
def test_per_task_batches_split_across_ranks(world):
    sizes, batch = [13, 30, 7], 4
    single = list(PerTaskBatchSampler(sizes, batch * world, seed=1))
    ranks = [list(PerTaskBatchSampler(sizes, batch, seed=1, rank=r, world_size=world)) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for b, whole in enumerate(single):
        shares = [r[b] for r in ranks]
        assert all(len(s) == batch * len(sizes) for s in shares)
        assert _interleave(shares) == whole  # disjoint positions of the global batch, in its order


@pytest.mark.parametrize("size", [0, 1, 7, 72])
def test_evaluation_shards_cover_every_sample_once(size):
    shares = [list(ShardSampler(size, r, 3)) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(size))
    assert [len(ShardSampler(size, r, 3)) for r in range(3)] == [len(s) for s in shares]


def test_data_module_serves_this_ranks_shard():
    dm = ContinualDataModule(source="digits", n_tasks=5, batch_size=10, eval_batch_size=16)
    dm.setup()
    dm.set_task(2)
    served = {}
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        train = dm.train_dataloader()
        served[rank] = (train.batch_sampler.epoch_order().tolist(), dm.test_dataloader().batch_sampler.task_indices())
    dm.trainer = None
    (train0, test0), (train1, test1) = served[0], served[1]
    n = len(dm.stream.tasks[2].train)
    assert len(train0) == len(train1) == n // 2 and not set(train0) & set(train1)
    for j, (a, b) in enumerate(zip(test0, test1, strict=True)):
        assert sorted(a + b) == list(range(len(dm.stream.tasks[j].test)))
    assert len(dm.train_dataloader().batch_sampler.epoch_order()) == n  # no trainer: the whole task


def test_replay_draws_are_disjoint_shares_of_one_draw():
    def filled() -> ReplayBuffer:
        buf = ReplayBuffer(50, seed=3)
        for k in range(4):
            x = torch.arange(20 * k, 20 * (k + 1))
            buf.add(x, x % 10, torch.zeros_like(x))
        return buf

    single, ranks = filled(), [filled(), filled()]
    whole = single.sample(16)["x"].tolist()
    shares = [b.sample(8, rank=r, world_size=2)["x"].tolist() for r, b in enumerate(ranks)]
    assert _interleave(shares) == whole
    states = [b.generator.get_state() for b in (single, *ranks)]
    assert all(torch.equal(states[0], s) for s in states)  # the generators stay in step


def test_gathered_batches_are_interleaved_into_the_global_order():
    model = ER(backbone="mlp", buffer_size=10)
    model._trainer = SimpleNamespace(global_rank=0, world_size=2)
    model.all_gather = lambda data: {k: torch.stack([v, v + 100]) for k, v in data.items()}
    out = model.gather_ranks({"x": torch.tensor([0, 2, 4])})
    assert out["x"].tolist() == [0, 100, 2, 102, 4, 104]


def test_continual_evaluation_subsets_are_sharded():
    dm = ContinualDataModule(source="digits", n_tasks=5)
    stream = dm.stream
    whole = ContinualEvaluation(samples_per_task=50)
    whole._build_subsets(stream)
    parts = []
    for rank in range(2):
        cb = ContinualEvaluation(samples_per_task=50)
        cb._build_subsets(stream, rank, 2)
        parts.append(cb)
    assert [a + b for a, b in zip(parts[0]._offsets, parts[1]._offsets, strict=True)] == whole._offsets
    merged = torch.stack([parts[0]._data[1], parts[1]._data[1]], 1).flatten()
    assert torch.equal(merged, whole._data[1])


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook"])
def test_spawning_strategies_are_refused_with_a_pointer_to_ddp(strategy):
    with pytest.raises(ConfigError, match="strategy='ddp'"):
        ContinualTrainer(strategy=strategy, devices=2, accelerator="cpu", logger=False)


def test_lightning_does_not_inject_its_own_sampler():
    trainer = ContinualTrainer(use_distributed_sampler=True, logger=False)
    assert not trainer._accelerator_connector.use_distributed_sampler


# ---------------------------------------------------------------------------------------- real processes
class DDPProbe(L.Callback):
    """Writes what this rank trained on and evaluated to ``<out_dir>/rank<r>.json`` (for the test below)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"train": [], "test": [], "buffer": [], "subset_size": None}
        self._order: torch.Tensor | None = None
        self._seen, self._sum, self._tested = 0, 0, {}

    def _dump(self, trainer: L.Trainer) -> None:
        self.record["rank"], self.record["world_size"] = trainer.global_rank, trainer.world_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._order, self._seen, self._sum = trainer.train_dataloader.batch_sampler.epoch_order(), 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._seen += len(batch[1])
        self._sum += int(batch[0].long().sum())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        x = trainer.train_dataloader.dataset.__getitems__(self._order.tolist())[0]
        self.record["train"].append({"task": trainer.datamodule.current_task, "epoch": trainer.current_epoch,
                                     "indices": self._order.tolist(), "seen": self._seen, "sum": self._sum,
                                     "expected_sum": int(x.long().sum())})

    def on_train_end(self, trainer, pl_module) -> None:
        buf, digest = pl_module.buffer, hashlib.sha256()
        for name in buf.fields:
            digest.update(buf._storage(name).cpu().numpy().tobytes())
        digest.update(buf.generator.get_state().numpy().tobytes())
        self.record["buffer"].append({"hash": digest.hexdigest(), "size": len(buf), "seen": int(buf.num_seen),
                                      "step": trainer.global_step})
        cb = next(c for c in trainer.callbacks if isinstance(c, ContinualEvaluation))
        self.record["subset_size"] = len(cb._data[1])
        self._dump(trainer)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._tested = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        task = int(batch[2][0])  # one loader, single-task batches
        assert (batch[2] == task).all()
        self._tested[task] = self._tested.get(task, 0) + len(batch[1])

    def on_test_end(self, trainer, pl_module) -> None:
        loader = trainer.test_dataloaders
        sizes = loader.batch_sampler.lengths
        self.record["test"].append({"local": [self._tested.get(i, 0) for i in range(len(sizes))],
                                    "indices": loader.batch_sampler.task_indices(),
                                    "sizes": sizes,
                                    "reduced": pl_module._task_accuracy.last_seen.tolist()})
        self._dump(trainer)


# Adam keeps this small class-incremental stream stable across seeds; 130 training samples per
# class make every task's training set even, so two ranks leave no sample out and the DDP run is
# exactly the single-process run with twice the batch (up to floating-point rounding).
RUN = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.epochs_per_task=2",
       "--data.train_samples_per_class=130", "--model.optimizer=adam", "--model.lr=0.002", "--model.buffer_size=500",
       "--trainer.callbacks+=clframe.callbacks.ContinualEvaluation", "--trainer.callbacks.every_n_steps=5",
       "--trainer.callbacks.plots=false"]


@pytest.mark.slow
def test_two_process_ddp_run_matches_one_process_with_twice_the_batch(tmp_path):
    root, probe = tmp_path / "ddp", tmp_path / "probe"
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [sys.executable, "-m", "clframe.cli", "fit", f"--trainer.default_root_dir={root}", *RUN,
           "--trainer.strategy=ddp", "--trainer.devices=2", "--data.batch_size=10",
           "--trainer.callbacks+=tests.test_ddp.DDPProbe", f"--trainer.callbacks.out_dir={probe}"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]

    # results written once, by rank 0, into one log folder
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    assert [p.name for p in root.rglob("results.json")] == ["results.json"]
    assert len(list(root.rglob("continual_eval.csv"))) == 1
    ddp = json.loads((root / "lightning_logs" / "version_0" / "results.json").read_text())
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)

    # training: every (task, epoch) split into disjoint, equally long shards, and trained on as served
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 10
    for a, b in zip(ranks[0]["train"], ranks[1]["train"], strict=True):
        assert (a["task"], a["epoch"]) == (b["task"], b["epoch"])
        assert len(a["indices"]) == len(b["indices"]) == 130 and not set(a["indices"]) & set(b["indices"])
        for r in (a, b):
            assert r["seen"] == len(r["indices"]) and r["sum"] == r["expected_sum"]
    # identical replay buffers on both ranks after every task, filled with both ranks' samples
    assert ranks[0]["buffer"] == ranks[1]["buffer"]
    assert [b["seen"] for b in ranks[0]["buffer"]] == [2 * 260 * (k + 1) for k in range(5)]

    # evaluation: the shards cover each test set exactly once, and the reduced counts are the full sets
    assert len(ranks[0]["test"]) == len(ranks[1]["test"]) == 5
    for a, b in zip(ranks[0]["test"], ranks[1]["test"], strict=True):
        for j, size in enumerate(a["sizes"]):
            assert sorted(a["indices"][j] + b["indices"][j]) == list(range(size))
            assert a["local"][j] + b["local"][j] == size
        assert a["reduced"] == b["reduced"]
        assert a["reduced"][: len(a["sizes"])] == a["sizes"]
    assert sum(r["subset_size"] for r in ranks) == sum(ranks[0]["test"][-1]["sizes"])  # continual-eval subsets

    # the same stream in one process, with the global batch (2 x 10) as its batch
    single = run_cli(["fit", f"--trainer.default_root_dir={tmp_path / 'single'}", *RUN, "--trainer.devices=1",
                      "--data.batch_size=20"])
    assert single.trainer.global_step == ranks[0]["buffer"][-1]["step"]
    # Tolerance: DDP averages two 20-sample gradients where one process takes one 40-sample mean;
    # equal in exact arithmetic, they differ by float rounding (~1e-7 relative), which over ~130
    # steps may flip a borderline prediction or two (1 test sample = 1.4 points here), no more.
    matrix = torch.tensor([[math.nan if a is None else a for a in row] for row in ddp["accuracy_matrix"]])
    reference = torch.tensor(single.trainer.accuracy_matrix)
    assert matrix.shape == (5, 5) and torch.isnan(matrix).sum() == 10  # lower triangle only (no eval_all_tasks)
    assert torch.allclose(matrix, reference, atol=0.03, equal_nan=True), (matrix, reference)
    for key, value in single.trainer.continual_results["metrics"].items():
        assert ddp["metrics"][key] == pytest.approx(value, abs=0.03), key


class ViewGroupProbe(L.Callback):
    """Per rank: whether every training batch arrives as whole groups of R identical copies (the views of
    one sample stay on one rank, so the SSL term sees them together), and the buffer's hash per task."""

    def __init__(self, out_dir: str, views: int) -> None:
        self.out_dir, self.views = Path(out_dir), views
        self.record: dict[str, Any] = {"grouped": True, "batches": 0, "buffer": [], "ssl": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = batch[0].reshape(-1, self.views, *batch[0].shape[1:])
        self.record["grouped"] &= bool((x == x[:, :1]).all())
        self.record["batches"] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.view_batch.last_ssl is not None:
            self.record["ssl"].append(float(pl_module.view_batch.last_ssl))

    def on_train_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name in pl_module.buffer.fields:
            digest.update(pl_module.buffer._storage(name).cpu().numpy().tobytes())
        self.record["buffer"].append(digest.hexdigest())
        self.record["rank"] = trainer.global_rank
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def test_a_gloo_process_group_is_destroyed_at_exit_not_left_to_interpreter_shutdown(tmp_path, monkeypatch):
    """Left to interpreter finalisation, gloo's worker threads can abort the process (SIGABRT, "terminate
    called without an active exception"; pytorch/pytorch#179291). The trainer registers one atexit hook per
    process that destroys a non-NCCL group while the interpreter is still alive."""
    import torch.distributed as dist

    from clframe import trainer as trainer_module

    hooks: list = []
    monkeypatch.setattr(trainer_module.atexit, "register", hooks.append)
    monkeypatch.setattr(trainer_module, "_PROCESS_GROUP_EXIT_HOOK", False)
    trainer_module._release_process_group_at_exit()
    assert hooks == []  # no process group yet: nothing to release
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer_module._release_process_group_at_exit()
        trainer_module._release_process_group_at_exit()  # once per process
        assert hooks == [trainer_module._destroy_process_group]
        hooks[0]()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_view_batch_under_two_process_ddp(tmp_path):
    """The view-batch model under DDP: each rank's batches are whole view groups (the slice is cut from
    the global index list), the SSL term is computed on every rank, and both ranks keep the
    same buffer (anchors of the gathered global batch)."""
    root, probe = tmp_path / "ddp", tmp_path / "probe"
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [sys.executable, "-m", "clframe.cli", "fit", f"--trainer.default_root_dir={root}",
           "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.epochs_per_task=2",
           "--trainer.strategy=ddp", "--trainer.devices=2", "--data.n_tasks=2", "--data.batch_size=8",
           "--data.views_per_sample=2", "--data.train_samples_per_class=40", "--model.buffer_size=100",
           "--model.view_batch.noise=0.2", "--model.view_batch.ssl=true",
           "--trainer.callbacks+=tests.test_ddp.ViewGroupProbe", f"--trainer.callbacks.out_dir={probe}",
           "--trainer.callbacks.views=2"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["grouped"] and r["batches"] > 0 and r["ssl"] for r in ranks)
    assert ranks[0]["batches"] == ranks[1]["batches"]
    assert ranks[0]["buffer"] == ranks[1]["buffer"] and len(ranks[0]["buffer"]) == 2
    results = json.loads(next(root.rglob("results.json")).read_text())
    assert len(results["accuracy_matrix"]) == 2
