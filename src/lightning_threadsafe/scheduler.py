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

    def close(self) -> None:
        """Wake every waiting worker; further ``get`` calls return ``CLOSED``."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._heap)
