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
          present, ``None`` on timeout, or ``CLOSED`` once ``close()`` was called
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

    def put_batch(self, ordinal: int, payloads: list[T]) -> None:
        """Add one task per payload (position = list position) and wake that many workers."""
        with self._cv:
            if self._closed:
                return
            for pos, p in enumerate(payloads):
                heapq.heappush(self._heap, (ordinal, pos, p))
            self._cv.notify(len(payloads))

    def get(self, timeout: float) -> tuple[int, int, T] | Any | None:
        with self._cv:
            if not self._heap and not self._closed:
                self._cv.wait(timeout)
            if self._closed:
                return CLOSED
            if not self._heap:
                return None
            return heapq.heappop(self._heap)

    def close(self) -> None:
        """Wake every waiting worker; further ``get`` calls return ``CLOSED``."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._heap)
