"""The work split of one sampling step: chunks handed to workers as they free up, and taken back from a lost one.

Pure bookkeeping (no Ray): a chunk is owned by at most one worker at a time; a lost worker's chunks go back to
the front of the queue for the others; a result that arrives for a chunk already done (a worker reported lost
after it answered) is ignored, so no chunk is applied twice.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable


class ChunkQueue:
    def __init__(self, chunks: int, workers: list[Hashable], depth: int = 2):
        """`depth`: chunks in flight per worker, so a worker's next input travels while it computes."""
        self.todo = deque(range(chunks))
        self.owner: dict[int, Hashable] = {}  # chunk in flight -> worker
        self.done: set[int] = set()
        self.workers = list(workers)
        self.depth = max(1, int(depth))
        self.chunks = chunks

    @property
    def finished(self) -> bool:
        return len(self.done) == self.chunks

    def in_flight(self, worker: Hashable) -> list[int]:
        return [c for c, w in self.owner.items() if w == worker]

    def hand_out(self) -> list[tuple[int, Hashable]]:
        """(chunk, worker) pairs to send now: each live worker is topped up to `depth` chunks in flight, in turn,
        so chunks spread evenly."""
        sent = []
        while self.todo and self.workers:
            free = [w for w in self.workers if len(self.in_flight(w)) < self.depth]
            if not free:
                break
            for worker in free:
                if not self.todo:
                    break
                chunk = self.todo.popleft()
                self.owner[chunk] = worker
                sent.append((chunk, worker))
        return sent

    def complete(self, chunk: int, worker: Hashable) -> bool:
        """`worker`'s result for `chunk` came back; False when it is not wanted (the chunk is done already, or was
        taken back from that worker)."""
        if chunk in self.done or self.owner.get(chunk) != worker:
            return False
        del self.owner[chunk]
        self.done.add(chunk)
        return True

    def lose(self, worker: Hashable) -> list[int]:
        """`worker` is gone: its chunks in flight go back to the front of the queue; returns them."""
        if worker in self.workers:
            self.workers.remove(worker)
        taken = sorted(self.in_flight(worker))
        for chunk in taken:
            del self.owner[chunk]
        self.todo.extendleft(reversed(taken))
        return taken
