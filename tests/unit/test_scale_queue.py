"""The work split of a spread sampling step (core/scale/queue): every chunk applied exactly once, whoever is lost."""
import itertools

import numpy as np

from longedit.core.scale.queue import ChunkQueue


def drain(queue: ChunkQueue, lose_at: dict[int, str], rng) -> list[tuple[int, str]]:
    """Run the queue to the end, answering in-flight chunks in a random order; worker `lose_at[n]` is lost
    after the n-th answer (its answers still in flight arrive late, and must be refused)."""
    applied, late, flight = [], [], []
    for n in itertools.count():
        flight += queue.hand_out()
        if queue.finished:
            return applied
        if n in lose_at:
            gone = lose_at[n]
            late += [f for f in flight if f[1] == gone]
            flight = [f for f in flight if f[1] != gone]
            queue.lose(gone)
        if not flight:
            assert not queue.workers, "chunks left in flight nowhere while workers remain"
            return applied
        chunk, worker = flight.pop(rng.integers(len(flight)))
        if queue.complete(chunk, worker):
            applied.append((chunk, worker))
        for chunk, worker in late:  # a lost worker's answers that come after it was given up
            assert not queue.complete(chunk, worker)
        late = []


def test_every_chunk_is_applied_once_and_spread_over_the_workers():
    queue = ChunkQueue(11, ["a", "b", "c"], depth=2)
    applied = drain(queue, {}, np.random.default_rng(0))
    assert sorted(c for c, _ in applied) == list(range(11))
    counts = {w: sum(1 for _, x in applied if x == w) for w in "abc"}
    assert all(c >= 2 for c in counts.values()), counts


def test_a_lost_workers_chunks_go_to_the_others_and_nothing_is_applied_twice():
    for seed, lost_after in itertools.product(range(5), (0, 1, 4)):
        queue = ChunkQueue(9, ["a", "b", "c"], depth=2)
        applied = drain(queue, {lost_after: "b", lost_after + 2: "c"}, np.random.default_rng(seed))
        assert sorted(c for c, _ in applied) == list(range(9)), (seed, lost_after)
        assert queue.finished and queue.workers == ["a"]


def test_with_every_worker_lost_the_queue_is_not_finished():
    queue = ChunkQueue(5, ["a", "b"], depth=1)
    applied = drain(queue, {0: "a", 1: "b"}, np.random.default_rng(1))
    assert not queue.finished and not queue.workers and len(applied) < 5


def test_dispatch_chunks_give_every_worker_several_but_never_exceed_memory():
    from longedit.core.scale.pool import dispatch_frames

    for left, workers, memory in ((9996, 2, 400), (9996, 8, 5000), (16, 2, 3), (5, 4, 100), (1, 3, 7)):
        chunk = dispatch_frames(left, workers, memory)
        assert 1 <= chunk <= memory
        chunks = -(-left // chunk)
        assert chunk == memory or chunks >= min(left, 4 * workers), (left, workers, memory, chunk, chunks)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    import sys

    import pytest

    from longedit.core.errors import LongEditError
    from longedit.core.scale.pool import ScaleOptions, connect

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(LongEditError, match=r"pip install longedit\[ray\]"):
        connect(ScaleOptions(workers=2))
    with pytest.raises(LongEditError, match="gpus must be at least 1"):
        ScaleOptions(workers=0)
