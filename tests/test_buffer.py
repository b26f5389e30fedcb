"""Tests for clframe.strategies.replay.buffer.ReplayBuffer: reservoir and class-balanced storage,
sampling, extra fields and checkpoint round trips.

Stored inputs are sample ids (``x = id``), so what the buffer keeps can be checked exactly.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from clframe.strategies.replay.buffer import ReplayBuffer
from clframe.strategies.replay.slots import draw_distinct

Z_P001 = 3.090  # one-sided standard-normal quantile for p = 0.001


def chi2_uniform(counts: torch.Tensor) -> tuple[float, float]:
    """Pearson's chi-square of ``counts`` against a uniform distribution, and a generous critical value
    (normal approximation of chi2 with k - 1 degrees of freedom at p = 0.001)."""
    counts = counts.double()
    expected = counts.sum() / len(counts)
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    return stat, dof + Z_P001 * math.sqrt(2 * dof)


def stream_ids(buffer: ReplayBuffer, ids: torch.Tensor, batch_size: int, labels: torch.Tensor | None = None) -> None:
    labels = ids % 10 if labels is None else labels
    for xb, yb in zip(ids.split(batch_size), labels.split(batch_size), strict=True):
        buffer.add(xb, yb, torch.zeros_like(yb))


def stored_ids(buffer: ReplayBuffer) -> torch.Tensor:
    return buffer.all()["x"]


# ---------------------------------------------------------------------------------------------- reservoir


@pytest.mark.parametrize("batch_size,n_seeds", [(10, 300), (1000, 300)], ids=["batches_of_10", "one_big_batch"])
def test_reservoir_keeps_a_uniform_sample(batch_size: int, n_seeds: int) -> None:
    """After 1000 insertions into 100 slots every id is kept with probability 0.1, whatever the batching
    (one batch of 1000 exercises the within-batch 'last write wins' rule)."""
    n_items, capacity = 1000, 100
    ids = torch.arange(n_items)
    counts = torch.zeros(n_items, dtype=torch.long)
    for seed in range(n_seeds):
        buf = ReplayBuffer(capacity, seed=seed)
        stream_ids(buf, ids, batch_size)
        kept = stored_ids(buf)
        assert len(buf) == capacity and len(kept) == capacity
        assert len(kept.unique()) == capacity, "a sample is stored twice"
        counts += torch.bincount(kept, minlength=n_items)
    assert int(counts.sum()) == n_seeds * capacity

    stat, critical = chi2_uniform(counts)
    assert stat < critical, f"retention counts are not uniform: chi2 = {stat:.0f} > {critical:.0f}"
    early, late = int(counts[: n_items // 2].sum()), int(counts[n_items // 2:].sum())
    assert abs(early / late - 1) < 0.05, f"early half kept {early} times, late half {late} times"
    # coarse bins too: a smooth bias (e.g. towards recent items) shows up here first
    bins = counts.view(10, -1).sum(1)
    stat_bins, critical_bins = chi2_uniform(bins)
    assert stat_bins < critical_bins, f"deciles kept {bins.tolist()}"


def test_reservoir_fill_phase_stores_in_order() -> None:
    buf = ReplayBuffer(100, seed=0)
    assert len(buf) == 0
    ids = torch.arange(100)
    seen = 0
    for xb in ids.split(7):  # batches that do not line up with the capacity
        buf.add(xb, xb % 10, torch.zeros_like(xb))
        seen += len(xb)
        assert len(buf) == seen
        assert torch.equal(stored_ids(buf), ids[:seen])
    assert torch.equal(buf.data_x, ids) and torch.equal(buf.data_y, ids % 10)
    assert int(buf.num_seen) == 100

    more = torch.arange(100, 400)
    stream_ids(buf, more, 13)
    assert len(buf) == 100 and int(buf.num_seen) == 400
    slot = torch.arange(100)
    # algorithm R: slot j still holds sample j or was overwritten by a sample that arrived after the fill
    assert bool(((buf.data_x == slot) | (buf.data_x >= 100)).all())
    assert bool((buf.data_x >= 100).any()), "nothing was replaced after 300 more samples"
    assert torch.equal(buf.data_y, buf.data_x % 10), "labels no longer match their inputs"


def test_batch_larger_than_capacity() -> None:
    buf = ReplayBuffer(10, seed=3)
    ids = torch.arange(1000)
    buf.add(ids, ids % 10, torch.ones_like(ids))
    kept = stored_ids(buf)
    assert len(buf) == 10 and int(buf.num_seen) == 1000
    assert len(kept.unique()) == 10 and bool((kept < 1000).all())
    assert torch.equal(buf.data_y, buf.data_x % 10) and bool((buf.data_t == 1).all())
    buf.add(torch.arange(1000, 1005), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    assert len(buf) == 10 and int(buf.num_seen) == 1005


def test_inputs_keep_their_dtype_and_shape() -> None:
    buf = ReplayBuffer(8)
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    buf.add(x, torch.arange(5), torch.zeros(5, dtype=torch.long))
    assert buf.data_x.dtype == torch.uint8 and buf.data_x.shape == (8, 1, 4, 4)
    assert buf.data_y.dtype == buf.data_t.dtype == torch.int64
    assert torch.equal(buf.all()["x"], x)


# ---------------------------------------------------------------------------------------------- class-balanced

# class 0 floods the stream; class 4 has fewer samples than its quota (capacity 100 // 5 classes = 20)
CLASS_SIZES = {0: 900, 1: 25, 2: 25, 3: 25, 4: 10}
QUOTA = 100 // len(CLASS_SIZES)


def imbalanced_stream(order: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.cat([torch.full((n,), c) for c, n in CLASS_SIZES.items()])
    ids = torch.arange(len(labels))
    if order == "shuffled":
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        ids, labels = ids[perm], labels[perm]
    return ids, labels


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_class_balanced_quotas(order: str) -> None:
    ids, labels = imbalanced_stream(order)
    label_of = torch.empty(len(ids), dtype=torch.long)
    label_of[ids] = labels
    buf = ReplayBuffer(100, "class_balanced", seed=0)
    stream_ids(buf, ids, 10, labels)

    y = buf.data_y
    assert bool(((y == -1) | ((y >= 0) & (y < len(CLASS_SIZES)))).all()), f"invalid labels in {y.tolist()}"
    kept = buf.all()
    assert bool((kept["y"] >= 0).all()), "all() returned an empty slot"
    assert torch.equal(label_of[kept["x"]], kept["y"]), "a slot's label does not belong to its input"
    assert len(kept["x"].unique()) == len(kept["x"]), "a sample is stored twice"
    for c, n in CLASS_SIZES.items():
        held = int((kept["y"] == c).sum())
        assert abs(held - min(n, QUOTA)) <= 1, f"class {c} ({n} seen) holds {held}, expected {min(n, QUOTA)}"
    assert len(buf) == len(kept["x"]) == sum(min(n, QUOTA) for n in CLASS_SIZES.values())
    assert buf.class_seen.tolist() == list(CLASS_SIZES.values())


def test_class_balanced_quota_shrinks_as_classes_arrive() -> None:
    buf = ReplayBuffer(60, "class_balanced", seed=1)
    for c in range(3):
        ids = torch.arange(100 * c, 100 * c + 100)
        stream_ids(buf, ids, 25, torch.full_like(ids, c))
        quota = 60 // (c + 1)
        held = torch.bincount(buf.all()["y"], minlength=c + 1)
        assert held.tolist() == [quota] * (c + 1), f"after class {c}: {held.tolist()}"
        assert bool(((buf.all()["x"] // 100) == buf.all()["y"]).all())


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_class_balanced_within_class_retention_is_uniform(order: str) -> None:
    """Each class's share is a uniform sample of that class's stream (here: the 900 samples of class 0),
    both when the class fills the buffer first and is then evicted down to its quota, and when classes mix."""
    n_seeds = 100 if order == "sequential" else 60
    n0 = CLASS_SIZES[0]
    counts = torch.zeros(n0, dtype=torch.long)  # retention of class 0's samples, by arrival rank within class 0
    for seed in range(n_seeds):
        ids, labels = imbalanced_stream(order, seed)
        rank = torch.empty(len(ids), dtype=torch.long)
        class0 = ids[labels == 0]  # class 0's ids in arrival order
        rank[class0] = torch.arange(n0)
        buf = ReplayBuffer(100, "class_balanced", seed=seed)
        stream_ids(buf, ids, 50, labels)
        kept = buf.all()
        mine = kept["x"][kept["y"] == 0]
        assert len(mine) == QUOTA
        counts += torch.bincount(rank[mine], minlength=n0)
    bins = counts.view(18, -1).sum(1)  # 18 bins of 50 consecutive class-0 samples
    stat, critical = chi2_uniform(bins)
    assert stat < critical, f"class 0 retention by arrival (bins of 50): {bins.tolist()}"
    early, late = int(counts[: n0 // 2].sum()), int(counts[n0 // 2:].sum())
    # per seed, the early half's share of the 20 kept is ~hypergeometric with variance <= 20 / 4
    sd = math.sqrt(4 * n_seeds * QUOTA / 4)
    assert abs(early - late) < 4.5 * sd, f"early half of class 0 kept {early} times, late half {late} times"


# ---------------------------------------------------------------------------------------------- sampling


def test_sample_draws_distinct_stored_slots() -> None:
    buf = ReplayBuffer(100, seed=0)
    stream_ids(buf, torch.arange(1000), 10)
    stored = set(stored_ids(buf).tolist())
    for n in (1, 30, 100):
        s = buf.sample(n)
        xs = s["x"].tolist()
        assert len(xs) == n and len(set(xs)) == n, "sample repeats a slot"
        assert set(xs) <= stored
        assert torch.equal(s["y"], s["x"] % 10)
    assert set(buf.sample(1000)["x"].tolist()) == stored  # capped at what is stored
    # repeated samples are not all the same draw
    assert len({tuple(buf.sample(10)["x"].tolist()) for _ in range(5)}) > 1


def test_sample_from_partially_filled_buffer() -> None:
    buf = ReplayBuffer(100, seed=0)
    stream_ids(buf, torch.arange(30), 10)
    s = buf.sample(50)
    assert sorted(s["x"].tolist()) == list(range(30))


def test_class_balanced_sample_skips_empty_slots() -> None:
    ids, labels = imbalanced_stream("sequential")
    buf = ReplayBuffer(100, "class_balanced", seed=0)
    stream_ids(buf, ids, 10, labels)
    assert bool((buf.data_y == -1).any())  # class 4 leaves part of its quota empty
    s = buf.sample(1000)
    assert len(s["y"]) == len(buf) and bool((s["y"] >= 0).all())
    assert set(s["x"].tolist()) == set(buf.all()["x"].tolist())


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_empty_buffer_sample_raises(policy: str) -> None:
    buf = ReplayBuffer(10, policy)
    assert len(buf) == 0
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(4)


# ---------------------------------------------------------------------------------------------- extras


def fake_logits(x: torch.Tensor) -> torch.Tensor:
    return x.float().unsqueeze(1) * torch.tensor([1.0, -1.0, 0.5])


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_extras_are_stored_and_sampled_with_their_inputs(policy: str) -> None:
    buf = ReplayBuffer(50, policy, seed=0)
    ids = torch.arange(400)
    for xb in ids.split(16):
        buf.add(xb, xb % 5, xb // 100, logits=fake_logits(xb))
    assert "logits" in buf.fields and buf.data_logits.shape == (50, 3)
    assert buf.data_logits.dtype == torch.float32
    for s in (buf.sample(20), buf.all()):
        assert set(s) == {"x", "y", "t", "logits"}
        assert torch.equal(s["logits"], fake_logits(s["x"]))
        assert torch.equal(s["y"], s["x"] % 5) and torch.equal(s["t"], s["x"] // 100)


# ---------------------------------------------------------------------------------------------- checkpoints


def filled_buffer(policy: str, capacity: int = 64) -> ReplayBuffer:
    buf = ReplayBuffer(capacity, policy, seed=7)
    ids = torch.arange(500)
    for xb in ids.split(20):
        buf.add(xb.to(torch.uint8).unsqueeze(1), xb % 6, xb // 100, logits=fake_logits(xb))
    buf.sample(5)  # advance the generator past its seed state
    return buf


def assert_same_storage(a: ReplayBuffer, b: ReplayBuffer) -> None:
    assert a.fields == b.fields
    for name in a.fields:
        sa, sb = getattr(a, f"data_{name}"), getattr(b, f"data_{name}")
        assert sa.dtype == sb.dtype and torch.equal(sa, sb), name
    assert torch.equal(a.num_seen, b.num_seen) and torch.equal(a.class_seen, b.class_seen)
    assert len(a) == len(b)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_state_dict_round_trip_into_fresh_buffer(policy: str) -> None:
    buf = filled_buffer(policy)
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    fresh = ReplayBuffer(64, policy)  # different seed, nothing stored yet
    assert len(fresh) == 0
    fresh.load_state_dict(torch.load(blob))

    assert_same_storage(buf, fresh)
    assert torch.equal(fresh.generator.get_state(), buf.generator.get_state())
    # the generator state came along: the next draws are identical
    s1, s2 = buf.sample(16), fresh.sample(16)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    # and so are later insertions
    more = torch.arange(500, 600)
    for b in (buf, fresh):
        b.add(more.to(torch.uint8).unsqueeze(1), more % 6, torch.full_like(more, 5), logits=fake_logits(more))
    assert_same_storage(buf, fresh)


def test_loading_a_different_capacity_raises() -> None:
    state = filled_buffer("reservoir", capacity=64).state_dict()
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(32).load_state_dict(state)
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(64, "class_balanced").load_state_dict(state)


def test_rejected_checkpoint_leaves_buffer_untouched() -> None:
    state = filled_buffer("reservoir", capacity=64).state_dict()
    buf = ReplayBuffer(32, seed=0)
    buf.add(torch.arange(5), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="capacity"):
        buf.load_state_dict(state)
    assert buf.data_x.shape == (32,) and int(buf.num_seen) == 5 and len(buf) == 5


@pytest.mark.parametrize("capacity", [0, -1, -100])
def test_invalid_capacity_raises(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity)


def test_unknown_policy_raises() -> None:
    with pytest.raises(ValueError, match="reservoir, class_balanced"):
        ReplayBuffer(10, "fifo")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- O(batch) per step


def test_draw_distinct_is_a_uniform_draw_without_replacement() -> None:
    """Every value is equally likely at every place of the draw (sparse path: rejection of repeats)."""
    gen = torch.Generator().manual_seed(0)
    size, count, n = 2000, 5, 2500
    hits = torch.zeros(count, 20, dtype=torch.long)  # per place: values in 20 bins of 100
    for _ in range(n):
        d = draw_distinct(size, count, gen)
        assert len(d.unique()) == count and bool(((d >= 0) & (d < size)).all())
        hits[torch.arange(count), d // 100] += 1
    for place in range(count):
        stat, critical = chi2_uniform(hits[place])
        assert stat < critical, f"place {place}: {hits[place].tolist()}"
    dense = draw_distinct(10, 8, gen)  # dense path: a permutation of the range
    assert len(dense.unique()) == 8


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_sample_cost_does_not_grow_with_the_store(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A draw of 32 from 5,000 stored samples never permutes the whole store, and is still distinct."""
    buf = ReplayBuffer(5000, policy, seed=0)
    ids = torch.arange(6000)
    stream_ids(buf, ids, 1000)
    sizes: list[int] = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: sizes.append(n) or real(n, *a, **k))
    for _ in range(20):
        s = buf.sample(32)
        assert len(s["x"].unique()) == 32 and torch.equal(s["y"], s["x"] % 10)
    assert not sizes or max(sizes) <= 64, f"randperm over {max(sizes)} items for a draw of 32"


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_sample_is_deterministic_given_the_generator(policy: str) -> None:
    a, b = filled_buffer(policy), filled_buffer(policy)
    state = a.generator.get_state()
    first = [a.sample(9)["x"] for _ in range(3)]
    assert all(torch.equal(x, y["x"]) for x, y in zip(first, [b.sample(9) for _ in range(3)], strict=True))
    a.generator.set_state(state)
    assert torch.equal(a.sample(9)["x"], first[0])


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_ranks_take_disjoint_shares_of_one_draw(policy: str) -> None:
    buf = filled_buffer(policy)
    state = buf.generator.get_state()
    shares = []
    for rank in range(3):
        buf.generator.set_state(state)  # every rank's generator is in the same state
        shares.append(buf.sample(7, rank=rank, world_size=3)["logits"][:, 0].tolist())  # the sample's id
    after = buf.generator.get_state()
    assert all(len(s) == 7 for s in shares)
    flat = [x for s in shares for x in s]
    assert len(set(flat)) == 21, "ranks replay the same slot"
    buf.generator.set_state(state)
    buf.sample(7, rank=0, world_size=3)
    assert torch.equal(buf.generator.get_state(), after)


def recount(buf: ReplayBuffer) -> None:
    """The class-balanced bookkeeping against a brute-force recount of the stored labels."""
    book = buf._slots
    y = buf.data_y
    occupied = (y >= 0).nonzero().flatten()
    assert len(buf) == len(occupied)
    assert torch.equal(buf.valid_slots(), occupied)
    counts = torch.bincount(y[occupied], minlength=len(book.count))
    assert torch.equal(book.count, counts[: len(book.count)]) and int(counts[len(book.count):].sum()) == 0
    for c in range(len(book.count)):
        assert bool((y[book.slots_of(c)] == c).all()), f"class {c}'s list holds other slots"
    free = book.free[: book.n_free]
    assert torch.equal(free.sort().values, (y < 0).nonzero().flatten())
    assert bool((free[:-1] > free[1:]).all()), "free stack out of order"
    seen = int((buf.class_seen > 0).sum())
    if seen:
        assert int(book.count.max()) <= buf.capacity // seen


@pytest.mark.parametrize("seed", range(4))
def test_class_balanced_bookkeeping_matches_a_recount(seed: int) -> None:
    """Random batch sizes and label ranges (classes arriving over time, a batch larger than the buffer)."""
    gen = torch.Generator().manual_seed(seed)
    buf = ReplayBuffer(37, "class_balanced", seed=seed)
    next_id = 0
    for step in range(60):
        n = int(torch.randint(1, 90 if step % 17 == 5 else 12, (1,), generator=gen))
        top = 1 + min(9, step // 5)
        y = torch.randint(0, top, (n,), generator=gen)
        x = torch.arange(next_id, next_id + n)
        next_id += n
        buf.add(x, y, torch.zeros_like(y))
        recount(buf)
        assert torch.equal(buf.all()["y"], buf.data_y[buf.data_y >= 0])
        s = buf.sample(8)
        assert bool((s["y"] >= 0).all()) and len(s["x"].unique()) == len(s["x"])
    assert int(buf.class_seen.sum()) == next_id


def test_class_balanced_resumes_bit_exactly() -> None:
    """After a state_dict round trip, a long run of inserts and draws matches the uninterrupted one."""
    gen = torch.Generator().manual_seed(5)
    a = ReplayBuffer(50, "class_balanced", seed=3)
    stream = [(torch.arange(i * 16, i * 16 + 16), torch.randint(0, 2 + i // 8, (16,), generator=gen)) for i in range(60)]
    for x, y in stream[:20]:
        a.add(x, y, torch.zeros_like(y))
        a.sample(10)
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = ReplayBuffer(50, "class_balanced", seed=99)
    b.load_state_dict(torch.load(blob, weights_only=True))
    for x, y in stream[20:]:
        for buf in (a, b):
            buf.add(x, y, torch.zeros_like(y))
        assert torch.equal(a.sample(10)["x"], b.sample(10)["x"])
    assert_same_storage(a, b)
    assert torch.equal(a._slots.table, b._slots.table)


def test_checkpoint_without_bookkeeping_is_rebuilt_from_the_labels() -> None:
    """Checkpoints written before the bookkeeping was saved load, and the buffer goes on correctly."""
    buf = filled_buffer("class_balanced")
    state = buf.state_dict()
    del state["_extra_state"]["slots"]
    fresh = ReplayBuffer(64, "class_balanced")
    fresh.load_state_dict(state)
    recount(fresh)
    assert_same_storage(buf, fresh)
    more = torch.arange(500, 700)
    fresh.add(more.to(torch.uint8).unsqueeze(1), more % 8, torch.zeros_like(more), logits=fake_logits(more))
    recount(fresh)


def test_reservoir_insert_counts_on_the_host_and_reloads_the_count():
    """The stream position is kept on the host (no device read-back per step) and restored on load."""
    a = ReplayBuffer(8, seed=0)
    for i in range(5):
        a.add(torch.full((3, 2), i), torch.arange(3), torch.zeros(3))
    b = ReplayBuffer(8, seed=0)
    b.load_state_dict(a.state_dict())
    assert len(b) == len(a) == 8 and b._seen_on_host == 15 == int(b.num_seen)
    x = torch.randn(4, 2)
    a.add(x, torch.arange(4), torch.zeros(4))
    b.add(x, torch.arange(4), torch.zeros(4))
    assert torch.equal(a.data_x, b.data_x) and int(a.num_seen) == int(b.num_seen) == 19
