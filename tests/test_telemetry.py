"""Tests for ``LoaderTelemetry``: snapshots stay consistent while workers register and retire.

Deterministic: the interleaving is forced through the telemetry's own lock (a stand-in
that runs a hook right after a release), never by sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from lightning_threadsafe.telemetry import LoaderTelemetry


class _HookLock:
    """Stands in for ``LoaderTelemetry._lock``: runs ``hook`` once, right after the next
    release -- i.e. at the first moment another thread could take the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the real mutual exclusion; held by the telemetry's callers
        self.hook: Callable[[], None] | None = None

    def __enter__(self) -> _HookLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()


def test_a_worker_retiring_mid_snapshot_is_counted_once():
    tel = LoaderTelemetry(clock=lambda: 0.0)
    a, b = tel.register("lts-a"), tel.register("lts-b")
    a.samples, a.fetch_wall_s, a.errors = 3, 0.25, 1
    b.samples, b.fetch_wall_s, b.errors = 5, 0.5, 2
    lock = _HookLock()
    tel._lock = lock  # white-box: the only way to interleave a retire inside snapshot()
    lock.hook = lambda: tel.retire(b)  # b retires as soon as snapshot() first lets go
    snap = tel.snapshot()
    assert (snap.samples, snap.fetch_wall_s, snap.errors) == (8, 0.75, 3)
    after = tel.snapshot()  # b is now in the retired totals, counted once
    assert (after.samples, after.fetch_wall_s, after.errors) == (8, 0.75, 3)
    assert tel.live_workers() == [a]


def test_snapshot_counts_busy_workers_and_gauges():
    tel = LoaderTelemetry(clock=lambda: 7.0)
    a, b = tel.register("lts-a"), tel.register("lts-b")
    a.current_index = 4
    tel.batches, tel.delivered = 2, 16
    snap = tel.snapshot(threads=2, queue_depth=1)
    assert snap.busy_workers == 1 and snap.threads == 2 and snap.queue_depth == 1
    assert snap.batches == 2 and snap.delivered == 16 and snap.time == 7.0
    tel.retire(b)
    tel.retire(b)  # idempotent: folded once
    assert tel.snapshot().busy_workers == 1


def test_retire_folds_every_counter():
    tel = LoaderTelemetry()
    w = tel.register("lts-w")
    for name in ("samples", "fetch_wall_s", "fetch_cpu_s", "collate_s", "transfer_s",
                 "errors", "retries", "skipped"):
        setattr(w, name, 2)
    before = tel.snapshot()
    tel.retire(w)
    after = tel.snapshot()
    for name in ("samples", "fetch_wall_s", "fetch_cpu_s", "collate_s", "transfer_s",
                 "errors", "retries", "skipped"):
        assert getattr(after, name) == getattr(before, name) == 2, name
