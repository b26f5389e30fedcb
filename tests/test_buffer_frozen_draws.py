"""The replay buffer keeps and replays exactly the same samples for the same seed as the
implementation these digests were recorded with (December 2026), so speeding up the insert or the
draw cannot silently change a seeded run's results.

Each scenario streams random batches (classes arriving over time, repeated labels within a batch,
an extra per-sample field, a batch larger than the store) with samples drawn in between, and hashes
the whole state: the stored tensors, the class-balanced bookkeeping, the generator and every draw.
If a change alters the draws on purpose, record the new digests with ``python tests/test_buffer_frozen_draws.py``
and say so in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from clframe.strategies.replay.buffer import ReplayBuffer

# (policy, capacity, batch size, classes, seed) -> sha256 of the run. Capacities 60 and 1000 divide
# evenly among the classes (the store ends with no free slot), 200 and 37 do not.
DIGESTS = {
    ('class_balanced', 60, 16, 10, 0): '98a75f645db0d865df04e835811987c4ac721c009086b6ed1851936206dfa2e7',
    ('class_balanced', 200, 32, 7, 1): 'c70a307b149ed311132ec0648e9a01c102d40e50530cf8d391dfd79b65105332',
    ('class_balanced', 1000, 128, 10, 2): '8b0171848c9e61b8d6a1f957d8112b9ca9bd9e630816e300e6f077878444fdd5',
    ('class_balanced', 37, 50, 5, 3): 'd3a94ecfc22b9d20fab9abd6b1c58f316dad03028956a0c68072818b1b305494',
    ('reservoir', 200, 32, 10, 4): '232ce4ab650779a521428fdc00ccab2c13ac99a92ee33b8caffcb13ea830e140',
}


def run_digest(policy: str, capacity: int, batch: int, classes: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(100 + seed)
    buf = ReplayBuffer(capacity, policy, seed=seed)
    h = hashlib.sha256()

    def put(t: torch.Tensor) -> None:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())

    for step in range(40):
        # classes arrive over the first steps; some batches hold a single class, some repeat a few
        top = min(classes, 1 + step // 3)
        n = batch if step % 7 else batch // 3 + 1
        y = torch.randint(0, top, (n,), generator=gen)
        if step % 5 == 4:
            y.fill_(int(y[0]))
        x = torch.randint(0, 256, (n, 1, 4, 3), dtype=torch.uint8, generator=gen)
        logits = torch.randn(n, 3, generator=gen)
        buf.add(x, y, torch.full_like(y, step // 10), logits=logits)
        if step % 3 == 2:
            for v in buf.sample(batch // 2 + 1).values():
                put(v)
    for name in buf.fields:
        put(buf._storage(name))
    put(buf.num_seen)
    put(buf.class_seen)
    put(buf.generator.get_state())
    if buf._slots is not None:
        state = buf._slots.state()
        n_labels = len(state["count"])
        put(state["count"])
        put(state["free"][: state["n_free"]])
        put(buf._slots.occupied())
        for c in range(n_labels):  # each class's slot list in order (the table's layout is free)
            put(buf._slots.slots_of(c))
        h.update(str((state["n_free"], state["quota"])).encode())
    return h.hexdigest()


@pytest.mark.parametrize("scenario", list(DIGESTS))
def test_draws_and_storage_match_the_recorded_run(scenario: tuple) -> None:
    assert run_digest(*scenario) == DIGESTS[scenario]


if __name__ == "__main__":
    print("DIGESTS = {")
    for s in DIGESTS:
        print(f"    {s!r}: {run_digest(*s)!r},")
    print("}")
