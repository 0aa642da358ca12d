"""Several 'ranks' inside one process: threads joined by an all-reduce with a barrier.

The engine accepts any group object with ``all_reduce(tensor)``; this one sums the ranks' buffers in
rank order, so simulated layouts can be checked against the dense reference without processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class ThreadGroup:
    def __init__(self, size: int):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=60)
        self._slots: list[torch.Tensor | None] = [None] * size
        self.calls = 0

    def handle(self, rank: int) -> _Handle:
        return _Handle(self, rank)


class _Handle:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank = group, rank

    def all_reduce(self, buf: torch.Tensor) -> None:
        g = self.group
        g._slots[self.rank] = buf.clone()
        g._barrier.wait()
        total = g._slots[0].clone()
        for other in g._slots[1:]:
            total += other
        g._barrier.wait()
        if self.rank == 0:
            g.calls += 1
        buf.copy_(total)


def run_ranks(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run fn(rank) for every rank in its own thread; re-raise the first failure."""
    out: list[object] = [None] * n
    errors: list[BaseException] = []

    def target(r):
        try:
            out[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return out
