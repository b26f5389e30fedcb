"""The view-batch model: the sampler's properties from the paper, the view-batch SSL term, buffer
view-batches, the switch on ER / DER / DER++, and a run from the command line (scikit-learn digits)."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from clframe import ContinualDataModule, ContinualTrainer
from clframe.cli import run_cli
from clframe.data.scenarios import ScenarioError
from clframe.data.view_batch import ViewBatchLoader, ViewBatchSampler, task_epoch_offset
from clframe.errors import ConfigError
from clframe.strategies import DER, ER, DERpp
from clframe.strategies.replay.view_batch import ViewBatch, ViewBatchConfig, crop_flip, random_affine, view_kl
from tests.conftest import QUIET_TRAINER


def group_batches(sampler: ViewBatchSampler, group: int = 0) -> list[list[list[int]]]:
    """The batches of every epoch of one epoch group."""
    out = []
    for k in range(sampler.views):
        sampler.set_epoch(sampler.epoch_offset + group * sampler.views + k)
        out.append(list(sampler))
    return out


# ---------------------------------------------------------------------- sampler
@pytest.mark.parametrize("size, batch, views", [(103, 32, 4), (128, 32, 4), (100, 8, 2), (37, 12, 3), (50, 8, 1)])
def test_each_sample_once_per_group_as_views_in_one_batch(size, batch, views):
    sampler = ViewBatchSampler(size, batch, views, seed=3, task=1)
    epochs = group_batches(sampler)
    seen: Counter[int] = Counter()
    for batches in epochs:
        for b in batches:
            assert len(b) <= batch and len(b) % views == 0
            runs = [b[i: i + views] for i in range(0, len(b), views)]
            assert all(len(set(r)) == 1 for r in runs)  # R consecutive copies of one sample
            distinct = [r[0] for r in runs]
            assert len(set(distinct)) == len(distinct)  # grouped by sample id, no sample twice in a batch
            seen.update(distinct)
    assert sorted(seen) == list(range(size)) and set(seen.values()) == {1}  # every sample, once per group


@pytest.mark.parametrize("size, batch, views", [(103, 32, 4), (128, 32, 4), (1000, 32, 4), (45, 12, 3), (37, 12, 3), (97, 16, 4)])
def test_same_steps_as_the_baseline(size, batch, views):
    sampler = ViewBatchSampler(size, batch, views)
    baseline = math.ceil(size / batch)
    for batches in group_batches(sampler):
        assert len(batches) == baseline
    sampler.set_epoch(2)
    assert len(sampler) == len(list(sampler)) == baseline
    # full batches hold B / R distinct samples; only the last batch of an epoch is smaller (unless N mod B < R)
    assert size % batch and size % batch < views or all(len(b) == batch for batches in group_batches(sampler) for b in batches[:-1])


def test_uneven_tiny_task_still_covers_every_sample_once():
    sampler = ViewBatchSampler(10, 4, 4)  # N mod B = 2 < R: some epochs of the group run one step less
    epochs = group_batches(sampler)
    assert sorted(b[0] for batches in epochs for b in batches) == list(range(10))
    assert all(math.ceil(10 / 4) - 1 <= len(b) <= math.ceil(10 / 4) for b in epochs)


def test_recall_gap_is_r_times_the_baseline():
    """A sample comes back once per R epochs (baseline: once per epoch): the gap in steps grows R-fold."""
    size, batch, views = 256, 32, 4
    sampler = ViewBatchSampler(size, batch, views)
    steps, positions = 0, {}
    for group in range(3):
        for batches in group_batches(sampler, group):
            for b in batches:
                positions.setdefault(b[0], []).append(steps)
                steps += 1
    gaps = [q - p for pos in positions.values() for p, q in zip(pos, pos[1:], strict=False)]
    baseline_gap = size / batch
    assert sum(gaps) / len(gaps) == pytest.approx(views * baseline_gap, rel=0.15)


def test_seeded_by_seed_task_and_group():
    def first_group(**kw):
        return group_batches(ViewBatchSampler(200, 16, 4, **kw))

    assert first_group(seed=1, task=2) == first_group(seed=1, task=2)  # reproducible
    assert first_group(seed=1, task=2) != first_group(seed=2, task=2)  # run seeds differ
    assert first_group(seed=1, task=2) != first_group(seed=1, task=3)  # tasks differ
    s = ViewBatchSampler(200, 16, 4, seed=1)
    assert group_batches(s, 0) != group_batches(s, 1)  # a new permutation every epoch group
    # the R epochs of a group share one permutation: their samples are disjoint slices of it
    firsts = [{b[0] for b in batches} for batches in group_batches(s, 1)]
    assert all(not (firsts[i] & firsts[j]) for i in range(4) for j in range(i + 1, 4))


def test_groups_count_from_the_task_start():
    late = ViewBatchSampler(200, 16, 4, seed=5, task=1, epoch_offset=10)
    late.set_epoch(10)
    early = ViewBatchSampler(200, 16, 4, seed=5, task=1)
    early.set_epoch(0)
    assert list(late) == list(early)
    trainer = SimpleNamespace(epochs_per_task=6, steps_per_task=None, fit_loop=SimpleNamespace(max_epochs=18))
    assert task_epoch_offset(trainer) == 12 and task_epoch_offset(None) == 0


def test_ddp_shares_keep_views_together_and_are_disjoint():
    ranks = [ViewBatchSampler(103, 8, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    ids = []
    for s in ranks:
        for batches in group_batches(s):
            for b in batches:
                assert all(len(set(b[i: i + 4])) == 1 for i in range(0, len(b), 4))
                ids += b[::4]
    assert len(ids) == len(set(ids)) == 102  # disjoint; one sample left out for equal shares


def test_resume_mid_epoch_yields_the_remaining_batches():
    s = ViewBatchSampler(200, 16, 4, seed=0)
    s.set_epoch(5)
    full = list(s)
    s.resume_at(5, 3)
    assert list(s) == full[3:]


def test_invalid_batch_size_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        ViewBatchSampler(100, 10, 4)
    with pytest.raises(ScenarioError, match="views_per_sample"):
        ContinualDataModule(source="digits", batch_size=10, views_per_sample=4)


# ---------------------------------------------------------------------- SSL term
def test_kl_is_zero_for_identical_views_and_points_from_anchor_to_views():
    torch.manual_seed(0)
    anchor = torch.randn(3, 1, 5)
    assert view_kl(anchor.expand(3, 4, 5).reshape(12, 5), 4) == pytest.approx(0.0, abs=1e-7)
    logits = torch.randn(6, 5, requires_grad=True)  # 3 groups of 2 views
    loss = view_kl(logits, 2)
    groups = logits.detach().view(3, 2, 5)
    expected = F.kl_div(F.log_softmax(groups[:, 1], -1), F.softmax(groups[:, 0], -1), reduction="mean")
    reverse = F.kl_div(F.log_softmax(groups[:, 0], -1), F.softmax(groups[:, 1], -1), reduction="mean")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(reverse.item(), rel=1e-3)
    loss.backward()
    assert logits.grad[0::2].abs().sum() == 0 and logits.grad[1::2].abs().sum() > 0  # stop-gradient on the anchor
    assert view_kl(logits.detach(), 2, "batchmean").item() == pytest.approx(5 * loss.item(), rel=1e-5)


def _fake_module(epoch: int, views: int = 4):
    trainer = SimpleNamespace(current_epoch=epoch, epochs_per_task=4, steps_per_task=None,
                              fit_loop=SimpleNamespace(max_epochs=8), datamodule=SimpleNamespace(
                                  hparams=SimpleNamespace(views_per_sample=views)))
    return SimpleNamespace(_trainer=trainer)


def test_ssl_warm_up_counts_task_epochs():
    vb = ViewBatch(ViewBatchConfig(ssl=True, warmup_epochs=2))
    assert [vb.ssl_active(_fake_module(e)) for e in range(4, 8)] == [False, False, True, True]  # task 2: epochs 4..7
    assert not ViewBatch(ViewBatchConfig(ssl=False)).ssl_active(_fake_module(7))
    assert not vb.ssl_active(_fake_module(7, views=1))
    with pytest.raises(ConfigError, match="views_per_sample"):
        ViewBatch(ViewBatchConfig(views=2)).views(_fake_module(0, views=4))


# ---------------------------------------------------------------------- views and buffer views
def test_augmentations_are_per_row_and_keep_anchors():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 1, 12, 12), dtype=torch.uint8)
    same = x[:1].expand(8, 1, 12, 12)
    assert len({t.tobytes() for t in crop_flip(same).numpy()}) > 1  # independent draws per row
    assert len({t.tobytes() for t in random_affine(same.float()).numpy()}) > 1
    views = ViewBatch(ViewBatchConfig(noise=0.2, strong_aug="affine")).augment(same.clone(), 4)
    assert torch.equal(views[::4], same[::4].float() / 255)  # anchors untouched
    assert not torch.equal(views[1], views[0]) and not torch.equal(views[2], views[1])


def _module(cls=ER, **kw):
    return cls(backbone="mlp", backbone_kwargs={"hidden_sizes": [16]}, num_classes=4, input_shape=(1, 8, 8),
               scenario="class", buffer_size=50, view_batch=ViewBatchConfig(views=4, noise=0.2, ssl=True), **kw)


@pytest.mark.parametrize("cls", [ER, DER, DERpp])
def test_buffer_batches_are_view_batches_and_only_anchors_are_stored(cls):
    torch.manual_seed(0)
    model = _module(cls)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    batch = (x.repeat_interleave(4, 0), y.repeat_interleave(4), torch.zeros(16, dtype=torch.long))
    with pytest.warns(Warning):  # self.log outside a trainer
        loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    stored = model.buffer.all()["x"]
    assert len(stored) == 4 and sorted(s.numpy().tobytes() for s in stored) == sorted(s.numpy().tobytes() for s in x)
    replay = model.replay_batch(16)
    assert len(replay["y"]) == 16 and replay["x"].is_floating_point()
    assert all(len(set(replay["y"][i: i + 4].tolist())) == 1 for i in range(0, 16, 4))
    assert torch.equal(replay["x"][::4] * 255, replay["x"][::4].mul(255).round())  # anchors: the stored images
    assert not torch.equal(replay["x"][1], replay["x"][0])  # other views: augmented


# ---------------------------------------------------------------------- end to end
def test_same_steps_with_and_without_views(tmp_path):
    steps = {}
    for views in (1, 4):
        L.seed_everything(0)
        data = ContinualDataModule(source="digits", n_tasks=2, batch_size=16, views_per_sample=views,
                                   train_samples_per_class=30)
        model = ER(backbone="mlp", backbone_kwargs={"hidden_sizes": [32]}, buffer_size=50, lr=0.05,
                   view_batch=ViewBatchConfig(noise=0.2, ssl=True))
        trainer = ContinualTrainer(epochs_per_task=4, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
        trainer.fit(model, datamodule=data)
        steps[views] = trainer.global_step
        if views > 1:
            assert isinstance(data.train_dataloader(), ViewBatchLoader)
    sizes = [len(t.train) for t in data.stream]
    assert steps[1] == steps[4] == sum(4 * math.ceil(n / 16) for n in sizes)


def test_switched_on_from_the_command_line(tmp_path):
    cli = run_cli(["fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                   "--trainer.epochs_per_task=2", "--data.n_tasks=2", "--data.batch_size=16", "--data.views_per_sample=4",
                   "--data.train_samples_per_class=60",
                   "--model=DERpp", "--model.view_batch.ssl=true", "--model.view_batch.noise=0.2",
                   "--model.view_batch.warmup_epochs=1"])
    assert isinstance(cli.model, DERpp) and cli.model.view_batch.config.ssl
    assert cli.model.view_batch.views(cli.model) == 4
    assert len(cli.trainer.accuracy_matrix) == 2 and cli.trainer.accuracy_matrix[-1][0] > 0.5
    logged = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/view_ssl" in logged


def test_icarl_merges_each_exemplar_once_per_group_as_r_views(tmp_path):
    """iCaRL (the reference code's base): over every R-epoch group of a task, each exemplar joins exactly
    one batch, as R consecutive views of one image; the SSL term runs; the step count stays the baseline's."""
    from clframe.strategies import ICaRL

    L.seed_everything(0)
    views = 2
    data = ContinualDataModule(source="digits", n_tasks=2, batch_size=16, views_per_sample=views,
                               train_samples_per_class=30)
    model = ICaRL(backbone="mlp", backbone_kwargs={"hidden_sizes": [32]}, buffer_size=40, lr=0.05,
                  view_batch=ViewBatchConfig(noise=0.2, ssl=True))
    taken: list[tuple[int, int, list[int]]] = []  # (task epoch, batch, slots)
    original_take = model.memory.take

    def spy(slots):
        epoch = model.trainer.current_epoch - task_epoch_offset(model.trainer)
        taken.append((epoch, model._batch_idx, slots.tolist()))
        return original_take(slots)

    model.memory.take = spy
    trainer = ContinualTrainer(epochs_per_task=4, default_root_dir=tmp_path, logger=False, **QUIET_TRAINER)
    original_views = model.view_batch.replay_views
    rows = []
    model.view_batch.replay_views = lambda module, drawn: rows.append(r := original_views(module, drawn)) or r
    trainer.fit(model, datamodule=data)
    stored = len(model.memory)  # 40 exemplars after task 0 (the memory is refilled only at the task end)
    training = [t for t in taken if t[2]]
    for group in (0, 1):
        slots = [s for epoch, _, ss in training if epoch // views == group for s in ss]
        assert sorted(slots) == list(range(stored)), f"group {group}: every exemplar exactly once"
    for replay in rows:  # R views of one image in a row: one label per group
        y = replay["y"].view(-1, views)
        assert (y == y[:, :1]).all()
    assert trainer.global_step == sum(4 * math.ceil(len(t.train) / 16) for t in data.stream)
    assert model.view_batch.last_ssl is not None and len(trainer.accuracy_matrix) == 2
