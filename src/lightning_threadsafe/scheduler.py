"""Priority work queue of per-sample tasks: the batch the consumer needs next goes first.

A batch of ``n`` indices becomes ``n`` tasks keyed ``(ordinal, position)``.
Workers always take the smallest key, so every free thread works on the
oldest unfinished batch before touching later ones: time to first batch is one
sample's latency times ``ceil(batch_size / threads)``, not a whole batch on one
worker, and one slow sample never holds up a worker's whole batch.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["CLOSED", "PriorityWorkQueue"]

T = TypeVar("T")


class _Closed:
    def __repr__(self) -> str:
        return "CLOSED"


CLOSED: Any = _Closed()


class PriorityWorkQueue(Generic[T]):
    """A min-heap of ``(ordinal, position, payload)`` tasks with a close signal.

    Guarantees:
        - ``get`` returns the task with the smallest ``(ordinal, position)``
          present (with up to ``max_items - 1`` following tasks of the same
          batch), ``None`` on timeout, or ``CLOSED`` once ``close()`` was called
          (remaining tasks are abandoned: the loader is stopping).
        - Every blocking wait has a timeout, so callers re-check their stop signal.
    """

    def __init__(self) -> None:
        # _cv's lock guards _heap and _closed. Producers (the consumer thread
        # admitting batches) hold it to push; workers hold it to pop and wait on
        # it for new tasks or close().
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int, T]] = []
        self._closed = False

    def put_batch(self, ordinal: int, positions: list[int], payload: T) -> None:
        """Add one task per position of batch ``ordinal`` and wake that many workers."""
        with self._cv:
            if self._closed:
                return
            for pos in positions:
                heapq.heappush(self._heap, (ordinal, pos, payload))
            self._cv.notify(len(positions))

    def get(self, timeout: float, *, max_items: Callable[[T], int] | None = None
            ) -> list[tuple[int, int, T]] | Any | None:
        """Take the smallest task, plus following tasks of the same batch.

        ``max_items(payload)`` caps how many consecutive tasks of that batch one
        call takes (default 1). Taking a share of a batch at once cuts the lock
        traffic for cheap samples; the cap (a fraction of the batch per worker)
        keeps the work of one batch spread over the workers.

        Returns a list of ``(ordinal, position, payload)`` (same ordinal,
        increasing positions), ``None`` on timeout, or ``CLOSED``.
        """
        with self._cv:
            if not self._heap and not self._closed:
                self._cv.wait(timeout)
            if self._closed:
                return CLOSED
            if not self._heap:
                return None
            first = heapq.heappop(self._heap)
            out = [first]
            limit = max_items(first[2]) if max_items is not None else 1
            while len(out) < limit and self._heap and self._heap[0][0] == first[0]:
                out.append(heapq.heappop(self._heap))
            return out

    def withdraw_untouched(self, size_of: Callable[[T], int]) -> list[T]:
        """Remove the tasks of every payload none of whose ``size_of(payload)`` tasks
        was taken yet; return those payloads (each once, by ordinal).

        Used to hand whole, unstarted batches to another executor: a batch with
        any task taken (or loaded elsewhere) stays.
        """
        with self._cv:
            counts: dict[int, int] = {}
            first: dict[int, tuple[int, T]] = {}
            for ordinal, _, payload in self._heap:
                key = id(payload)
                counts[key] = counts.get(key, 0) + 1
                first.setdefault(key, (ordinal, payload))
            whole = {key for key, n in counts.items() if n == size_of(first[key][1])}
            if not whole:
                return []
            self._heap = [t for t in self._heap if id(t[2]) not in whole]
            heapq.heapify(self._heap)
            return [payload for _, payload in sorted((first[k] for k in whole),
                                                     key=lambda op: op[0])]

    def wake_all(self) -> None:
        """Wake every waiting worker (e.g. so retiring workers notice at once)."""
        with self._cv:
            self._cv.notify_all()

    def close(self) -> None:
        """Wake every waiting worker; further ``get`` calls return ``CLOSED``."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._heap)
