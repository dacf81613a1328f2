"""Tests for ``_worker``: the thread pool's share loading, batch-state locking, wake-ups.

Deterministic: the interleavings are forced with events and instrumented locks;
nothing sleeps to synchronise and no time is asserted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from lightning_threadsafe import sample_rng
from lightning_threadsafe._fetch import FetchPolicy, Skipped, load_many, load_sample
from lightning_threadsafe._worker import BatchState, ThreadPool
from lightning_threadsafe.errors import SampleLoadError
from lightning_threadsafe.telemetry import LoaderTelemetry, WorkerStats


class OwnedLock:
    """A lock that knows its holder and counts acquisitions (stands in for ``batch.lock``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the real mutual exclusion
        self.owner: int | None = None
        self.acquisitions = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self.owner = threading.get_ident()
            self.acquisitions += 1
        return ok

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held_here(self) -> bool:
        return self.owner == threading.get_ident()


class CheckedBatch(BatchState):
    """Records every write of ``done``/``error`` made without holding ``batch.lock``."""

    def __init__(self, ordinal: int, indices: list[Any], unlocked: list[str]) -> None:
        super().__init__(ordinal, indices)
        self.lock = OwnedLock()  # type: ignore[assignment]
        self._unlocked = unlocked

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("done", "error") and "_unlocked" in self.__dict__ \
                and not self.lock.held_here():
            self._unlocked.append(f"batch {self.ordinal}: {name}")
        super().__setattr__(name, value)


def _collect(b: BatchState, s: WorkerStats) -> None:
    b.payload = list(b.results)


def _pool(n: int = 1, *, fetch: Callable[..., Any] | None = None,
          finish: Callable[[BatchState, WorkerStats], None] = _collect, **kw: Any) -> ThreadPool:
    kw.setdefault("telemetry", LoaderTelemetry())
    if fetch is not None:
        kw["fetch"] = fetch
    return ThreadPool(num_workers=n, finish=finish, in_order=True,
                      on_progress=kw.pop("on_progress", lambda: None), name="wtest", **kw)


def _take(pool: ThreadPool, ordinal: int) -> BatchState:
    got = None
    while got is None:  # take() may return early (another batch landed, a nudge)
        got = pool.ready.take(lambda: [ordinal], timeout=60)
    return got[1]


# ------------------------------------------------------------ BatchState locking


def test_batch_done_and_error_are_written_under_the_batch_lock():
    unlocked: list[str] = []

    def fetch(index, batch, stats, stop):
        if index == 21:
            raise SampleLoadError(f"index={index}", index=index)
        return index

    def finish(batch, stats):
        if batch.ordinal == 1:
            raise RuntimeError("collate failed")
        batch.payload = list(batch.results)

    pool = _pool(2, fetch=fetch, finish=finish)
    try:
        batches = [CheckedBatch(o, [o * 10 + k for k in range(4)], unlocked) for o in range(3)]
        for b in batches:
            pool.submit(b, list(range(4)))
        ok, collate_failed, sample_failed = (_take(pool, o) for o in range(3))
        assert ok.payload == [0, 1, 2, 3] and ok.done and ok.error is None
        assert isinstance(collate_failed.error, RuntimeError) and collate_failed.done
        assert isinstance(sample_failed.error, SampleLoadError) and sample_failed.done
    finally:
        assert pool.close() == []
    assert unlocked == []


def test_fail_and_mark_done_take_the_lock_and_first_error_wins():
    unlocked: list[str] = []
    b = CheckedBatch(0, [1, 2], unlocked)
    assert b.fail(ValueError("first")) is True
    assert b.fail(ValueError("second")) is False
    assert str(b.error) == "first" and b.done
    c = CheckedBatch(1, [3], unlocked)
    c.mark_done()
    assert c.done and c.error is None
    c.mark_done(RuntimeError("late"))
    assert isinstance(c.error, RuntimeError)
    assert unlocked == []


# ----------------------------------------------------------- a share, one lock


def test_a_share_is_loaded_in_one_call_and_recorded_under_one_lock_acquisition():
    calls: list[list[int]] = []
    go = threading.Event()

    def fetch_many(indices, batch, stats, stop):
        go.wait(60)  # the whole batch is queued before the worker loads
        calls.append(list(indices))
        return [i * 2 for i in indices]

    unlocked: list[str] = []
    pool = _pool(1, fetch_many=fetch_many)
    try:
        batch = CheckedBatch(0, list(range(8)), unlocked)
        pool.submit(batch, list(range(8)))
        go.set()
        got = _take(pool, 0)
        assert got.payload == [i * 2 for i in range(8)]
        # one worker: shares of half the batch (the worker's first share is one sample
        # until it has timed a sample of this dataset)
        assert sum(len(c) for c in calls) == 8 and len(calls) <= 3
        # once per share recorded, plus once when the finished batch is marked done
        assert batch.lock.acquisitions == len(calls) + 1
    finally:
        assert pool.close() == []
    assert unlocked == []


def test_fetch_only_pools_load_each_index_through_fetch():
    seen: list[int] = []
    pool = _pool(1, fetch=lambda i, b, s, stop: seen.append(i) or -i)
    try:
        pool.submit(BatchState(0, [4, 5, 6]), [0, 1, 2])
        assert _take(pool, 0).payload == [-4, -5, -6]
        assert seen == [4, 5, 6]
    finally:
        pool.close()


def test_a_pool_needs_fetch_or_fetch_many():
    with pytest.raises(TypeError, match="fetch"):
        ThreadPool(num_workers=1, finish=_collect, telemetry=LoaderTelemetry(), in_order=True,
                   on_progress=lambda: None, name="wtest")


class Seeded:
    """``dataset[i]`` = (i, the first draw of sample_rng()) plus the index the loading
    worker's stats show at that moment (the watchdog's view)."""

    def __init__(self, telemetry: LoaderTelemetry) -> None:
        self.telemetry = telemetry
        self.current: list[object] = []

    def __getitem__(self, i: int) -> tuple[int, float]:
        me = threading.current_thread().name
        for w in self.telemetry.live_workers():
            if w.name == me:
                self.current.append(w.current_index)
        return i, float(sample_rng().random())


def _share_pool(ds: Any, policy: FetchPolicy, tel: LoaderTelemetry, n: int = 2,
                **kw: Any) -> ThreadPool:
    def fetch_many(indices, batch, stats, stop):
        return load_many(ds, indices, epoch=3, policy=policy, stats=stats, stop=stop,
                         batch_indices=batch.indices, ordinal=batch.ordinal)

    return _pool(n, fetch_many=fetch_many, telemetry=tel, **kw)


def test_shares_keep_per_sample_seeding_current_index_and_counters():
    tel = LoaderTelemetry()
    ds = Seeded(tel)
    policy = FetchPolicy(seed=11)
    serial = [load_sample(ds, i, epoch=3, policy=policy) for i in range(24)]
    ds.current.clear()
    pool = _share_pool(ds, policy, tel)
    try:
        for o in range(3):
            pool.submit(BatchState(o, list(range(o * 8, o * 8 + 8))), list(range(8)))
        got = [v for o in range(3) for v in _take(pool, o).payload]
    finally:
        assert pool.close() == []
    assert got == serial  # the same numbers whatever thread or share loaded them
    assert sorted(ds.current) == list(range(24))  # the index being loaded, per sample
    snap = tel.snapshot()
    assert snap.samples == 24 and snap.errors == 0 and snap.busy_workers == 0


class Failing:
    def __init__(self, bad: set[int], times: int | None = None) -> None:
        self.bad, self.times, self.tries = bad, times, {}

    def __getitem__(self, i: int) -> int:
        if i in self.bad:
            self.tries[i] = self.tries.get(i, 0) + 1
            if self.times is None or self.tries[i] <= self.times:
                raise KeyError(i)
        return i


def test_a_failing_sample_in_a_share_raises_naming_its_index_and_batch():
    tel = LoaderTelemetry()
    pool = _share_pool(Failing({13}), FetchPolicy(seed=0), tel, n=1)
    try:
        pool.submit(BatchState(0, list(range(10, 18))), list(range(8)))
        err = _take(pool, 0).error
    finally:
        pool.close()
    assert isinstance(err, SampleLoadError) and err.index == 13
    assert err.batch_indices == list(range(10, 18)) and err.batch_ordinal == 0
    assert "index=13" in str(err) and isinstance(err.__cause__, KeyError)


def test_skip_and_retry_policies_apply_per_sample_inside_a_share():
    tel = LoaderTelemetry()
    skip = _share_pool(Failing({2, 5}), FetchPolicy(seed=0, on_error="skip"), tel, n=1)
    try:
        skip.submit(BatchState(0, list(range(8))), list(range(8)))
        got = _take(skip, 0).payload
    finally:
        skip.close()
    assert [v if not isinstance(v, Skipped) else ("skip", v.index) for v in got] == \
        [0, 1, ("skip", 2), 3, 4, ("skip", 5), 6, 7]
    tel2 = LoaderTelemetry()
    retry = _share_pool(Failing({3}, times=1),
                        FetchPolicy(seed=0, on_error="retry", max_retries=2, backoff_s=0.0),
                        tel2, n=1)
    try:
        retry.submit(BatchState(0, list(range(6))), list(range(6)))
        assert _take(retry, 0).payload == list(range(6))
    finally:
        retry.close()
    snap = tel.snapshot()
    assert snap.skipped == 2 and snap.errors == 2 and snap.samples == 6
    snap2 = tel2.snapshot()
    assert snap2.retries == 1 and snap2.errors == 1 and snap2.samples == 6


def test_the_observer_hears_each_clean_sample_on_its_own():
    heard: list[tuple[int, float, float, int, float]] = []
    lock = threading.Lock()  # guards heard (workers call the observer)

    def observer(wid, wall, cpu, running, gil):
        with lock:
            heard.append((wid, wall, cpu, running, gil))

    tel = LoaderTelemetry()
    pool = _share_pool(Failing({5}), FetchPolicy(seed=0, on_error="skip"), tel, n=1)
    pool.observer = observer
    try:
        pool.submit(BatchState(0, list(range(4))), list(range(4)))
        _take(pool, 0)
        pool.submit(BatchState(1, list(range(4, 8))), list(range(4)))  # 5 is skipped
        _take(pool, 1)
    finally:
        pool.close()
    assert len(heard) == 7  # every clean load once, the skipped one never
    assert all(w == 0 and wall >= 0 and cpu >= 0 and running == 1 and gil >= 0
               for w, wall, cpu, running, gil in heard)
    assert sum(h[1] for h in heard) <= tel.snapshot().fetch_wall_s + 1e-12


def test_fork_barrier_holds_workers_out_of_user_code_while_paused():
    entered = threading.Semaphore(0)
    gate = threading.Event()

    def fetch_many(indices, batch, stats, stop):
        entered.release()
        gate.wait(60)
        return list(indices)

    pool = _pool(1, fetch_many=fetch_many, guarded=True)
    try:
        pool.submit(BatchState(0, [0]), [0])
        assert entered.acquire(timeout=60)  # the worker is inside user code
        gate.set()
        assert _take(pool, 0).payload == [0]
        assert pool.pause(timeout=60)  # nobody inside user code now
        pool.submit(BatchState(1, [1]), [0])
        assert not entered.acquire(blocking=False)  # parked before user code
        pool.resume()
        assert _take(pool, 1).payload == [1]
    finally:
        gate.set()
        pool.resume()
        pool.close()


# --------------------------------------------------------- the consumer's signals


def test_a_failing_worker_init_wakes_the_consumer_without_a_ready_entry():
    def boom(wid: int) -> None:
        raise OSError("no GPU for this worker")

    pool = _pool(1, fetch=lambda *a: 0, worker_init_fn=boom)
    try:
        pool.workers[0][0].join(timeout=60)  # it sets fatal, wakes the consumer, exits
        assert not pool.workers[0][0].is_alive()
        assert pool.fatal is not None and isinstance(pool.fatal.__cause__, OSError)
        assert len(pool.ready) == 0  # queue_depth sees no phantom batch
        assert pool.ready.take(lambda: [0], timeout=3600) is None  # the wake-up is kept
    finally:
        pool.close()


def test_set_needed_publishes_the_ordinal_before_calling_on_needed():
    seen: list[int | None] = []
    box: list[ThreadPool] = []
    pool = _pool(1, fetch=lambda *a: 0, on_needed=lambda: seen.append(box[0].needed))
    box.append(pool)
    try:
        assert pool.needed is None
        pool.set_needed(3)
        pool.set_needed(None)
        assert seen == [3, None] and pool.needed is None
    finally:
        pool.close()
    assert len(seen) == 3  # close() wakes the governor's waiters too, so they see stop


def test_close_joins_workers_and_is_idempotent():
    pool = _pool(3, fetch=lambda *a: 0)
    assert pool.running_workers() == 3
    assert pool.close() == []
    assert pool.close() == []
    assert pool.running_workers() == 0
