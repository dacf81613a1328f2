"""Bounded buffer of finished batches, handed out in sampler order or as completed.

The bound is enforced upstream: the consumer admits a batch only while
``admitted - delivered < depth`` (and the memory governor agrees), so the
buffer never holds more than the depth in force when those batches were
admitted (a depth that shrinks -- the online probe retiring threads, a lower
memory budget -- stops admission until the excess is delivered).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ReadyBuffer"]


class ReadyBuffer:
    """Finished batches keyed by ordinal.

    Guarantees:
        - ``take`` with ``in_order=True`` returns exactly the batch with the
          ordinal asked for; with ``in_order=False`` the smallest ready ordinal
          among those asked for (completion order, oldest first).
        - ``take`` waits at most ``timeout`` and wakes on ``put``, ``nudge`` or
          ``close``; a ``nudge`` that came before it makes it return at once.
        - ``len`` counts finished batches only (a nudge is not an entry).
    """

    def __init__(self, *, in_order: bool) -> None:
        self.in_order = in_order
        # _cv's lock guards _items, _nudged and _closed. Workers hold it to put a finished
        # batch or nudge; the consumer holds it to take one and waits on it (its only waiter).
        self._cv = threading.Condition(threading.Lock())
        self._items: dict[int, Any] = {}
        self._nudged = False  # a nudge no take() has returned for yet (so none is lost)
        self._closed = False

    def put(self, ordinal: int, item: Any) -> None:
        with self._cv:
            self._items[ordinal] = item
            self._cv.notify_all()

    def nudge(self) -> None:
        """Wake a waiting ``take`` early (it returns ``None`` if nothing is ready), so
        the consumer acts on news that is not a batch (the online probe decided, a
        worker's init failed and set ``pool.fatal``). Adds no entry (``len`` is
        unchanged). A nudge while no ``take`` waits makes the next ``take`` return
        without waiting: it is never lost."""
        with self._cv:
            self._nudged = True
            self._cv.notify_all()

    def take(self, wanted: Callable[[], list[int]], timeout: float) -> tuple[int, Any] | None:
        """Take a batch among ``wanted()`` (ordinals outstanding, oldest first).

        ``wanted`` is evaluated under the lock after each wake-up, so the caller's
        view of what is outstanding cannot race with ``put``.
        """
        with self._cv:
            got = self._pick(wanted())
            if got is None and not self._closed and not self._nudged:
                self._cv.wait(timeout)
                got = self._pick(wanted())
            self._nudged = False
            return got

    def _pick(self, wanted: list[int]) -> tuple[int, Any] | None:
        if not wanted or not self._items:
            return None
        if self.in_order:
            key = wanted[0]
            if key in self._items:
                return key, self._items.pop(key)
            return None
        for key in wanted:  # oldest ready first
            if key in self._items:
                return key, self._items.pop(key)
        return None

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)

    def drain(self) -> list[Any]:
        """Remove and return everything (used at shutdown to release memory)."""
        with self._cv:
            items = list(self._items.values())
            self._items.clear()
            return items

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
