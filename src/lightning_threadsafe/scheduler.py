"""Priority work queue of per-sample tasks: the batch the consumer needs next goes first.

A batch of ``n`` indices becomes ``n`` tasks keyed ``(ordinal, position)``.
Workers always take the smallest key, so every free thread works on the
oldest unfinished batch before touching later ones: time to first batch is one
sample's latency times ``ceil(batch_size / threads)``, not a whole batch on one
worker, and one slow sample never holds up a worker's whole batch.

A worker takes a *share* per visit: the smallest task plus the following tasks
of the same batch, up to a cap. Tasks are stored per batch (a heap of batches,
each with its queued positions in order), so a share costs one heap operation,
not one per sample. A new batch wakes only as many idle workers as it has
shares, never every worker.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["CLOSED", "PriorityWorkQueue"]

T = TypeVar("T")


class _Closed:
    def __repr__(self) -> str:
        return "CLOSED"


CLOSED: Any = _Closed()


class _Entry(Generic[T]):
    """The queued positions of one batch (ascending), guarded by the queue's lock."""

    __slots__ = ("ordinal", "payload", "positions")

    def __init__(self, ordinal: int, payload: T) -> None:
        self.ordinal = ordinal
        self.payload = payload
        self.positions: deque[int] = deque()


class PriorityWorkQueue(Generic[T]):
    """A queue of ``(ordinal, position, payload)`` tasks, smallest key first, with a close signal.

    Guarantees:
        - ``get``/``get_share`` return tasks of the smallest ordinal present, the
          smallest positions first (with up to ``max_items - 1`` following tasks of
          that batch), ``None`` on timeout, or ``CLOSED`` once ``close()`` was
          called (remaining tasks are abandoned: the loader is stopping).
        - ``put_batch`` wakes at most as many idle workers as it was told the batch
          has shares (default: one per task); a worker that takes a share and leaves
          tasks behind wakes one more idle worker when no woken one is on its way,
          so queued work never waits on a sleeping worker's poll while one is idle.
        - Every blocking wait has a timeout, so callers re-check their stop signal.
    """

    def __init__(self) -> None:
        # _lock guards _heap, _entries, _count, _sleepers, _woken and _closed. Producers
        # (the consumer thread admitting batches) hold it to push; workers hold it to pop,
        # and release it to sleep on their own sleeper lock (below).
        self._lock = threading.Lock()
        self._heap: list[tuple[int, _Entry[T]]] = []  # one entry per ordinal: keys never tie
        self._entries: dict[int, _Entry[T]] = {}  # ordinal -> its entry in _heap
        self._count = 0  # tasks queued over all entries
        # Idle workers, oldest first: each sleeps on its own lock (acquired before it is
        # listed), which a waker releases after taking it off this list. A listed sleeper
        # is idle and not yet woken; _woken counts sleepers woken that have not yet
        # re-taken _lock -- so "who is already on the way" is exact (a plain Condition
        # cannot tell a notified waiter from one whose timeout raced the notify).
        self._sleepers: deque[threading.Lock] = deque()
        self._woken = 0
        self._closed = False

    # -- producers ----------------------------------------------------------------

    def put_batch(self, ordinal: int, positions: list[int], payload: T, *,
                  shares: int | None = None) -> None:
        """Add one task per position of batch ``ordinal``; wake up to ``shares`` idle workers.

        ``shares``: how many workers the batch can occupy (``ceil(tasks / share size)``);
        default one per task. Positions already queued for ``ordinal`` are merged.
        """
        if not positions:
            return
        with self._lock:
            if self._closed:
                return
            entry = self._entries.get(ordinal)
            if entry is None:
                entry = _Entry(ordinal, payload)
                entry.positions.extend(sorted(positions))
                self._entries[ordinal] = entry
                heapq.heappush(self._heap, (ordinal, entry))
            else:  # rare: more tasks of a queued batch
                entry.positions = deque(sorted((*entry.positions, *positions)))
            self._count += len(positions)
            self._wake_locked(len(positions) if shares is None else max(1, shares))

    def _wake_locked(self, n: int) -> None:
        """Wake up to ``n`` idle workers, oldest first (caller holds ``_lock``)."""
        sleepers = self._sleepers
        while n > 0 and sleepers:
            sleepers.popleft().release()
            self._woken += 1
            n -= 1

    # -- workers ------------------------------------------------------------------

    def _sleep_locked(self, timeout: float) -> None:
        """Release ``_lock`` until woken or ``timeout``; returns holding it again."""
        # This worker's sleeper lock: acquired here, listed in _sleepers; it waits to
        # acquire it again, which succeeds once a waker (holding _lock) releases it.
        me = threading.Lock()
        me.acquire()
        self._sleepers.append(me)
        self._lock.release()
        try:
            me.acquire(timeout=max(0.0, timeout))
        finally:
            self._lock.acquire()
            try:
                self._sleepers.remove(me)  # still listed: nobody woke it (timeout)
            except ValueError:
                self._woken -= 1  # a waker took it off the list: it is here now

    def _take(self, timeout: float, max_items: Callable[[T], int] | None,
              cap: int | None) -> tuple[int, T, list[int]] | Any | None:
        with self._lock:
            if not self._heap and not self._closed:
                self._sleep_locked(timeout)
            if self._closed:
                return CLOSED
            if not self._heap:
                return None
            entry = self._heap[0][1]
            limit = max_items(entry.payload) if max_items is not None else 1
            if cap is not None and cap < limit:
                limit = cap
            queued = entry.positions
            if limit >= len(queued):
                taken = list(queued)
                heapq.heappop(self._heap)
                del self._entries[entry.ordinal]
            else:
                popleft = queued.popleft
                taken = [popleft() for _ in range(max(1, limit))]
            self._count -= len(taken)
            if self._heap and self._woken == 0:
                self._wake_locked(1)  # work is left and no woken worker is on its way
            return entry.ordinal, entry.payload, taken

    def get_share(self, timeout: float, max_items: Callable[[T], int] | None = None,
                  cap: int | None = None) -> tuple[T, list[int]] | Any | None:
        """Take the smallest task plus following tasks of its batch: ``(payload, positions)``.

        The share holds at most ``max_items(payload)`` tasks (default 1; evaluated
        under the queue's lock, so it must not call back into the queue) and at most
        ``cap`` when given (the caller's own limit, e.g. from its sample times);
        positions are increasing. Returns ``None`` on timeout, or ``CLOSED``.
        """
        got = self._take(timeout, max_items, cap)
        if got is None or got is CLOSED:
            return got
        return got[1], got[2]

    def get(self, timeout: float, *, max_items: Callable[[T], int] | None = None
            ) -> list[tuple[int, int, T]] | Any | None:
        """Like :meth:`get_share`, as a list of ``(ordinal, position, payload)`` tasks.

        ``max_items(payload)`` caps how many consecutive tasks of that batch one
        call takes (default 1). Returns the list (same ordinal, increasing
        positions), ``None`` on timeout, or ``CLOSED``.
        """
        got = self._take(timeout, max_items, None)
        if got is None or got is CLOSED:
            return got
        ordinal, payload, positions = got
        return [(ordinal, pos, payload) for pos in positions]

    # -- the consumer ---------------------------------------------------------------

    def withdraw_untouched(self, size_of: Callable[[T], int]) -> list[T]:
        """Remove the tasks of every payload none of whose ``size_of(payload)`` tasks
        was taken yet; return those payloads (each once, by ordinal).

        Used to hand whole, unstarted batches to another executor: a batch with
        any task taken (or loaded elsewhere) stays. ``size_of`` runs under the
        queue's lock: it must not call back into the queue.
        """
        with self._lock:
            whole = [e for _, e in self._heap if len(e.positions) == size_of(e.payload)]
            if not whole:
                return []
            gone = {e.ordinal for e in whole}
            self._heap = [item for item in self._heap if item[0] not in gone]
            heapq.heapify(self._heap)
            for e in whole:
                del self._entries[e.ordinal]
                self._count -= len(e.positions)
            return [e.payload for e in sorted(whole, key=lambda e: e.ordinal)]

    def wake_all(self) -> None:
        """Wake every waiting worker (e.g. so retiring workers notice at once)."""
        with self._lock:
            self._wake_locked(len(self._sleepers))

    def close(self) -> None:
        """Wake every waiting worker; further ``get`` calls return ``CLOSED``."""
        with self._lock:
            self._closed = True
            self._heap.clear()
            self._entries.clear()
            self._count = 0
            self._wake_locked(len(self._sleepers))

    def idle_workers(self) -> int:
        """Workers waiting for tasks now and not yet woken (for tests and gauges)."""
        with self._lock:
            return len(self._sleepers)

    def __len__(self) -> int:
        with self._lock:
            return self._count
