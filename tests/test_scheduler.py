"""Tests for ``PriorityWorkQueue``: order, shares, and waking only as many workers as needed.

Deterministic: worker threads sleep in the queue with an hour-long timeout, so every
wake-up seen is one the queue gave; the test waits for states, never for time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from lightning_threadsafe.scheduler import CLOSED, PriorityWorkQueue


class _Item:
    def __init__(self, ordinal: int, size: int) -> None:
        self.ordinal, self.indices = ordinal, list(range(size))


def _until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a state another thread reaches (a bounded spin on a condition, not a sleep)."""
    done = threading.Event()
    for _ in range(600_000):
        if predicate():
            return
        done.wait(0.0001)
    raise AssertionError(f"never reached: {what}")


def test_smallest_ordinal_first_with_consecutive_positions():
    q: PriorityWorkQueue[_Item] = PriorityWorkQueue()
    b, a = _Item(1, 4), _Item(0, 4)
    q.put_batch(1, [0, 1, 2, 3], b)
    q.put_batch(0, [3, 1, 0, 2], a)
    assert q.get_share(0, lambda it: 3) == (a, [0, 1, 2])
    assert q.get(0, max_items=lambda it: 3) == [(0, 3, a)]
    assert q.get_share(0, lambda it: 8, cap=2) == (b, [0, 1])
    assert len(q) == 2
    q.close()
    assert q.get_share(0) is CLOSED and len(q) == 0


def test_a_new_batch_wakes_only_as_many_idle_workers_as_it_has_shares():
    q: PriorityWorkQueue[_Item] = PriorityWorkQueue()
    hold = threading.Event()  # keeps workers that got a share from coming back
    got: list[tuple[_Item, list[int]]] = []
    lock = threading.Lock()  # guards got

    def worker() -> None:
        while True:
            share = q.get_share(3600, lambda it: 4)
            if share is CLOSED:
                return
            if share is not None:
                with lock:
                    got.append(share)
                hold.wait(60)

    threads = [threading.Thread(target=worker, name=f"test-sched-{k}", daemon=True)
               for k in range(4)]
    for t in threads:
        t.start()
    try:
        _until(lambda: q.idle_workers() == 4, "four idle workers")
        item = _Item(0, 8)
        q.put_batch(0, list(range(8)), item, shares=2)
        # put_batch took exactly two sleepers off the list; the other two were not woken
        # (the old queue notified one worker per task: all four)
        assert q.idle_workers() == 2
        _until(lambda: len(got) == 2, "both shares taken")
        assert sorted(p for _, ps in got for p in ps) == list(range(8))
        assert q.idle_workers() == 2 and len(q) == 0
    finally:
        hold.set()
        q.close()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)


def test_work_left_behind_wakes_one_more_worker():
    """The share size shrank after the batch was queued (more shares than wake-ups):
    a worker leaving tasks behind wakes another idle one."""
    q: PriorityWorkQueue[_Item] = PriorityWorkQueue()
    hold = threading.Event()
    got: list[list[int]] = []
    lock = threading.Lock()  # guards got

    def worker() -> None:
        while True:
            share = q.get_share(3600, lambda it: 2)
            if share is CLOSED:
                return
            if share is not None:
                with lock:
                    got.append(share[1])
                hold.wait(60)

    threads = [threading.Thread(target=worker, name=f"test-sched-{k}", daemon=True)
               for k in range(3)]
    for t in threads:
        t.start()
    try:
        _until(lambda: q.idle_workers() == 3, "three idle workers")
        q.put_batch(0, [0, 1, 2, 3], _Item(0, 4), shares=1)  # told 1 share; there are 2
        _until(lambda: len(got) == 2, "the second share taken by a chained wake-up")
        assert sorted(p for ps in got for p in ps) == [0, 1, 2, 3]
        assert q.idle_workers() == 1
    finally:
        hold.set()
        q.close()
        for t in threads:
            t.join(timeout=60)


def test_withdraw_untouched_keeps_started_batches():
    q: PriorityWorkQueue[_Item] = PriorityWorkQueue()
    a, b, c = _Item(0, 2), _Item(1, 2), _Item(2, 2)
    for it in (a, b, c):
        q.put_batch(it.ordinal, [0, 1], it)
    assert q.get_share(0) == (a, [0])
    assert q.withdraw_untouched(lambda it: len(it.indices)) == [b, c]
    assert len(q) == 1 and q.withdraw_untouched(lambda it: len(it.indices)) == []
