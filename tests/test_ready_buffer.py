"""Tests for ``ReadyBuffer``: ordering, nudges that are never lost, gauges without sentinels."""

from __future__ import annotations

import threading

from lightning_threadsafe.ready_buffer import ReadyBuffer


def test_in_order_takes_exactly_the_wanted_ordinal():
    buf = ReadyBuffer(in_order=True)
    buf.put(1, "b")
    assert buf.take(lambda: [0], timeout=0) is None
    buf.put(0, "a")
    assert buf.take(lambda: [0], timeout=0) == (0, "a")
    assert buf.take(lambda: [1], timeout=0) == (1, "b")
    assert len(buf) == 0


def test_as_completed_takes_the_oldest_ready():
    buf = ReadyBuffer(in_order=False)
    buf.put(3, "d")
    buf.put(2, "c")
    assert buf.take(lambda: [1, 2, 3], timeout=0) == (2, "c")


def test_a_nudge_before_take_is_not_lost():
    """A worker's news (its init failed, the probe decided) may come just before the
    consumer waits: the next take() must return at once, not after its timeout."""
    buf = ReadyBuffer(in_order=True)
    buf.nudge()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(buf.take(lambda: [0], timeout=3600)),
                         name="test-ready-consumer", daemon=True)
    t.start()
    try:
        t.join(timeout=60)  # returns at once when correct; the bound ends a failure
        assert not t.is_alive(), "the nudge was lost: take() sleeps its whole timeout"
        assert got == [None] and len(buf) == 0  # a nudge is no entry
    finally:
        buf.close()
        t.join(timeout=10)


def test_a_nudge_wakes_one_take_only():
    buf = ReadyBuffer(in_order=True)
    buf.nudge()
    assert buf.take(lambda: [0], timeout=0) is None
    buf.put(0, "a")  # the next take finds the batch, not a stale nudge
    assert buf.take(lambda: [0], timeout=0) == (0, "a")


def test_close_wakes_a_waiting_take_and_drain_empties():
    buf = ReadyBuffer(in_order=True)
    buf.put(5, "x")
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(buf.take(lambda: [0], timeout=3600)),
                         name="test-ready-consumer", daemon=True)
    t.start()
    buf.close()
    t.join(timeout=60)
    assert not t.is_alive() and got == [None]
    assert buf.drain() == ["x"] and len(buf) == 0
