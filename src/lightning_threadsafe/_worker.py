"""Worker threads of the thread executor: take a share of a batch, load it, finish the batch.

A worker takes a *share* per queue visit -- consecutive positions of the oldest
unfinished batch (see :mod:`~lightning_threadsafe.scheduler`) -- loads it through
one call of the fast path (``fetch_many``, normally :func:`~lightning_threadsafe.
_fetch.load_many`: one sample context per index, the error policy only on
failures; one call per sample while the online probe observes, so that it
times each sample) and records the share's results under one acquisition of
the batch's lock. The worker that records the last sample of a batch collates it (and pins
and stages it when asked) and puts it in the ready buffer, so the consumer
thread never collates.

Share size (:meth:`ThreadPool.share_size`, from the pool's running estimate of
the time per sample): at least half an even split of the batch over the workers
(so one batch spreads over at least half of them) or ``_SHARE_FLOOR_S`` of work,
whichever is more -- splitting less work than that costs more in wake-ups and
hand-offs than it gains -- and at most ``_SHARE_BUDGET_S`` of work (one sample
until one was timed). So cheap samples go in large shares (a whole batch of
trivial samples is one share, like a batch-granular pool) and per-sample costs
(queue, lock, progress, barrier) are paid per share, while slow samples go one
by one, so the stall watchdog, the fork barrier and time to first batch see
each sample.

Ownership: workers hold the :class:`ThreadPool` (shared state) and never the
loader's iterator, so an abandoned iterator is garbage-collected, its
finalizer closes the pool, and every worker exits at its next poll.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from lightning_threadsafe._intraop import limit_intra_op_threads
from lightning_threadsafe.errors import SampleLoadError
from lightning_threadsafe.ready_buffer import ReadyBuffer
from lightning_threadsafe.scheduler import CLOSED, PriorityWorkQueue
from lightning_threadsafe.telemetry import LoaderTelemetry, WorkerStats

__all__ = ["POLL_S", "BatchState", "ThreadPool"]

POLL_S = 0.1  # every blocking wait re-checks the stop signal at least this often
_SHARE_BUDGET_S = 0.002  # a share holds at most about this much work (estimated) ...
_SHARE_FLOOR_S = 0.0002  # ... and at least this much, or half an even split if more
_EST_GROWTH = 1.25  # most the per-sample estimate grows per share (see ThreadPool.sample_s)

Fetch = Callable[[Any, "BatchState", WorkerStats, threading.Event], Any]
FetchMany = Callable[[list[Any], "BatchState", WorkerStats, threading.Event], list[Any]]


class BatchState:
    """A batch being loaded: one slot per index, filled by any worker.

    ``lock`` guards ``results``, ``remaining``, ``error`` and ``done``: every write of
    those holds it (use :meth:`fail` / :meth:`mark_done` from outside the pool).
    Workers hold it once per share they record; the consumer never waits on it for
    long. ``payload``, ``nbytes`` and ``samples`` are written by the one worker (or
    the consumer) finishing the batch, before it goes to the ready buffer, whose
    lock publishes them to the consumer.

    Guarantees: ``remaining`` counts the empty slots; exactly one worker sees it
    reach 0 (under ``lock``) and finishes the batch; once ``error`` is set the
    batch is put in the ready buffer exactly once and its other tasks are dropped.
    ``done`` and ``error`` may be read without the lock as one reference each (a
    stale read only delays the reader's decision: dropping tasks, counting pending
    batches).
    """

    __slots__ = ("done", "error", "indices", "lock", "nbytes", "ordinal", "payload",
                 "remaining", "results", "samples")

    def __init__(self, ordinal: int, indices: list[Any]) -> None:
        self.ordinal = ordinal
        self.indices = indices
        self.results: list[Any] = [None] * len(indices)
        self.remaining = len(indices)
        # Guards results/remaining/error/done (see the class docstring): held by the
        # workers recording a share or failing the batch, and by fail()/mark_done().
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.done = False  # set once the batch went (or is going) to the ready buffer
        self.payload: Any = None
        self.nbytes = 0
        self.samples = 0  # samples in the collated batch (skipped ones excluded)

    def fail(self, error: BaseException) -> bool:
        """Record ``error`` as the batch's outcome unless it already has one.

        Returns ``True`` when this call settled the batch: the caller then puts it
        in the ready buffer (exactly one caller does).
        """
        with self.lock:
            if self.error is not None or self.done:
                return False
            self.error = error
            self.done = True
            return True

    def mark_done(self, error: BaseException | None = None) -> None:
        """The batch is finished (with ``error`` if given and none was recorded yet)."""
        with self.lock:
            if error is not None and self.error is None:
                self.error = error
            self.done = True


def _noop_context() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _per_index(fetch: Fetch) -> FetchMany:
    """A share loader for pools given only a per-sample ``fetch``."""

    def fetch_many(indices: list[Any], batch: BatchState, stats: WorkerStats,
                   stop: threading.Event) -> list[Any]:
        out = []
        try:
            for index in indices:
                stats.current_index = index
                out.append(fetch(index, batch, stats, stop))
        finally:
            stats.current_index = None
        return out

    return fetch_many


class ThreadPool:
    """The worker threads of one epoch and the queues they share.

    Args:
        num_workers: number of threads (>= 1).
        fetch: ``fetch(index, batch, stats, stop_event) -> sample`` (raises
            SampleLoadError): one sample. Used when ``fetch_many`` is not given.
        fetch_many: ``fetch_many(indices, batch, stats, stop_event) -> samples``: a
            share of ``batch`` (its ``indices`` are consecutive positions), e.g.
            ``load_many(dataset, indices, epoch=..., policy=..., stats=stats,
            stop=stop, batch_indices=batch.indices, ordinal=batch.ordinal)``. It sets
            ``stats.current_index`` per sample and keeps ``stats`` counters. At least
            one of ``fetch`` and ``fetch_many`` is required.
        finish: ``finish(batch, stats)`` collates/pins/stages ``batch.payload`` in place.
        on_progress: called after each share (stall watchdog).
        worker_init_fn: called once in each worker thread with its id (ids are unique
            within the pool; a pool the online probe resized has ids past its size).
        worker_context: a context manager factory entered around each worker's loop
            (deadlock-detector activation), may be a no-op.
        on_worker_exit: called in the worker thread as it exits (closes thread-local resources).
        on_needed: called (any thread) after :meth:`set_needed` published a new ordinal,
            and when the pool closes -- e.g. ``MemoryGovernor.wake_waiters``, so that
            workers waiting for memory room re-check whether their batch is needed.
        name: thread name prefix (``lts-<name>-<n>``).
        guarded: workers take part in the fork barrier (:meth:`pause`) from the start.

    Raises:
        TypeError: neither ``fetch`` nor ``fetch_many`` given.
        ValueError: ``num_workers < 1``.
    """

    def __init__(
        self,
        *,
        num_workers: int,
        finish: Callable[[BatchState, WorkerStats], None],
        telemetry: LoaderTelemetry,
        in_order: bool,
        on_progress: Callable[[], None],
        fetch: Fetch | None = None,
        fetch_many: FetchMany | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        worker_context: Callable[[], contextlib.AbstractContextManager[Any]] = _noop_context,
        on_worker_exit: Callable[[], None] | None = None,
        on_needed: Callable[[], None] | None = None,
        name: str = "worker",
        guarded: bool = False,
    ) -> None:
        if fetch_many is None:
            if fetch is None:
                raise TypeError("ThreadPool needs fetch=<one sample> or fetch_many=<a share>; "
                                "got neither")
            fetch_many = _per_index(fetch)
        self.tasks: PriorityWorkQueue[BatchState] = PriorityWorkQueue()
        # Seconds per sample (None: none timed yet); sizes the shares. Low-biased: it
        # follows a faster share at once and a slower one by at most _EST_GROWTH per share,
        # because a share's wall time also holds the time its worker waited for the GIL or
        # a core (contention, not sample cost). Written by any worker after a share and
        # read by workers and the consumer without a lock: one float reference store/load
        # is the publication idiom; a lost update between two workers only leaves a
        # slightly older value.
        self.sample_s: float | None = None
        self.ready = ReadyBuffer(in_order=in_order)
        # Set once by close(); workers check it after every share and every poll.
        self.stop = threading.Event()
        self._fetch_many = fetch_many
        self._finish = finish
        self._on_progress = on_progress
        self._worker_init_fn = worker_init_fn
        self._worker_context = worker_context
        self._on_worker_exit = on_worker_exit
        self._on_needed = on_needed
        self._name = name
        self.telemetry = telemetry
        # A failure outside any sample (worker_init_fn): written once by the failing
        # worker (one reference store) before it nudges the ready buffer, whose lock
        # orders the store before the consumer's read after its take() returns.
        self.fatal: BaseException | None = None
        # The ordinal the consumer needs next (in-order delivery). Written by the consumer
        # only, through set_needed(); read by workers without a lock (waiting for memory
        # room): one reference store/load is the publication idiom, and on_needed's lock
        # (the governor's) orders the store before the waiters' re-check.
        self.needed: int | None = None
        # Called by workers after each clean sample while set (the online "auto" probe):
        # observer(worker_id, wall_s, cpu_s, running_workers, gil_wait_s). While it is
        # set, a share is loaded one sample at a time so each is timed on its own (still
        # recorded under one lock). Set/cleared by the consumer; one reference
        # store/load is the publication idiom (read once per share).
        self.observer: Callable[[int, float, float, int, float], None] | None = None
        # _lock guards workers, _live, _running and _next_id, serialises writes of target
        # and _retiring, and is the fork barrier's lock (below). Held by resize/close/
        # pause/resume (consumer), by exiting workers, and per share by guarded workers.
        # target (an int) and _retiring (a frozenset, replaced, never mutated) are also
        # read without the lock as one reference load each: a stale target only sizes a
        # share or an admission depth; a stale _retiring retires a worker one turn later.
        # Invariants: `workers` only grows (every thread ever started, so close() joins
        # them all); a worker whose id is in _retiring exits at its next loop turn, never
        # while holding tasks; threads start under _lock and never once `stop` is set
        # (set under _lock by close()).
        self._lock = threading.Lock()
        self.workers: list[tuple[threading.Thread, WorkerStats]] = []
        self._retiring: frozenset[int] = frozenset()
        self._live: list[int] = []  # ids of started workers that are not retiring, in order
        self._running = 0  # workers started and not yet exited (retiring ones included)
        # Fork barrier (pause/resume): while _paused, no worker *enters* user code
        # (dataset, collate_fn, pin); _in_user counts those inside it. Both guarded by
        # _lock; _quiet (on _lock) is notified when _in_user drops to 0 or on resume;
        # pause() waits on it for _in_user == 0, guarded workers wait on it while paused.
        # The barrier costs two lock round-trips per share, so workers only take part
        # while `guarded` is True (set before any worker starts when the online probe
        # may fork; cleared by the consumer once it no longer will: a worker that reads
        # False can no longer meet a pause). One reference store/load, read without the
        # lock (the publication idiom).
        self.guarded = guarded
        self._paused = False
        self._in_user = 0
        self._quiet = threading.Condition(self._lock)
        self._next_id = 0
        self.target = 0
        self.resize(num_workers)

    def resize(self, num_workers: int) -> None:
        """Grow or shrink to ``num_workers`` threads (any thread; no-op once closed).

        Growing starts threads with new ids; shrinking marks the newest workers
        as retiring: each exits after the share it holds, at its next loop turn
        (idle ones are woken). Their queued work stays for the others.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} must be >= 1 for a thread pool")
        with self._lock:
            if self.stop.is_set():
                return
            self.target = num_workers
            shrinking = len(self._live) > num_workers
            if shrinking:
                gone = self._live[num_workers:]
                del self._live[num_workers:]
                self._retiring = self._retiring | frozenset(gone)
            while len(self._live) < num_workers:
                wid = self._next_id
                self._next_id += 1
                stats = self.telemetry.register(f"lts-{self._name}-{wid}")
                t = threading.Thread(target=_worker_main, args=(self, wid, stats),
                                     name=stats.name, daemon=True)
                # Started under _lock (start() only waits for the thread to exist, never
                # for this lock), so close() -- which sets stop under _lock -- sees every
                # thread that will ever run, already started.
                t.start()
                self.workers.append((t, stats))
                self._live.append(wid)
                self._running += 1
        if shrinking:
            self.tasks.wake_all()  # idle retiring workers re-check at once

    def pause(self, timeout: float) -> bool:
        """Stop workers from entering user code and wait until none is inside it.

        Returns ``True`` when no worker is inside user code (the caller may then fork
        safely: no dataset or allocator lock is held by a worker), ``False`` after
        ``timeout`` (a share still running; the pool is resumed). Call
        :meth:`resume` after a ``True``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._paused = True
            while self._in_user > 0 and not self.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._paused = False
                    self._quiet.notify_all()
                    return False
                self._quiet.wait(min(left, POLL_S))
            return not self.stop.is_set() or self._in_user == 0

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._quiet.notify_all()

    def _user_begin(self) -> None:
        """A worker is about to run user code: wait while the pool is paused."""
        with self._lock:
            while self._paused and not self.stop.is_set():
                self._quiet.wait(POLL_S)
            self._in_user += 1

    def _user_end(self) -> None:
        with self._lock:
            self._in_user -= 1
            if self._in_user == 0:
                self._quiet.notify_all()

    def share_size(self, batch: BatchState) -> int:
        """Most consecutive samples of ``batch`` one queue visit takes (module docstring)."""
        n = len(batch.indices)
        est = self.sample_s
        if est is None:
            return 1
        split = max(1, n // (2 * max(1, self.target)))
        if est <= 0.0:
            return max(n, 1)
        floor = int(_SHARE_FLOOR_S / est)
        ceiling = max(1, int(_SHARE_BUDGET_S / est))
        return max(1, min(ceiling, max(split, floor)))

    def _timed_share(self, samples: int, seconds: float) -> None:
        """A worker loaded ``samples`` in ``seconds``: update the estimate (any worker)."""
        if samples <= 0:
            return
        per = seconds / samples
        est = self.sample_s
        self.sample_s = per if est is None or per < est else min(per, est * _EST_GROWTH)

    def set_needed(self, ordinal: int | None) -> None:
        """Publish the ordinal the consumer needs next, then call ``on_needed``.

        Consumer thread. Workers waiting for memory room with a batch that just became
        the needed one are woken (through ``on_needed``) instead of sleeping a poll.
        """
        if self.needed == ordinal:
            return  # unchanged (most admissions): nobody to wake
        self.needed = ordinal  # one reference store: the publication idiom (see __init__)
        if self._on_needed is not None:
            self._on_needed()

    def worker_snapshot(self) -> list[tuple[threading.Thread, WorkerStats]]:
        """The worker threads still running, with their stats (for the stall watchdog)."""
        with self._lock:
            return [(t, st) for t, st in self.workers if t.is_alive()]

    def running_workers(self) -> int:
        """Worker threads started and not yet exited (retiring ones included)."""
        with self._lock:
            return self._running

    def submit(self, batch: BatchState, positions: list[int]) -> None:
        """Queue the samples of ``batch`` at ``positions`` (the others are already loaded);
        wakes as many idle workers as the batch has shares, not more."""
        size = self.share_size(batch)
        self.tasks.put_batch(batch.ordinal, positions, batch,
                             shares=-(-len(positions) // size))

    def close(self, timeout: float = 10.0) -> list[str]:
        """Stop and join the workers (idempotent). Returns names of threads still alive.

        A worker blocked inside user code (``dataset[i]``) cannot be interrupted;
        it exits as soon as that call returns. Such threads are daemons, reported
        here and by the stall watchdog, and never block interpreter exit.
        """
        with self._lock:
            self.stop.set()
        self.tasks.close()
        self.ready.close()
        if self._on_needed is not None:
            self._on_needed()  # workers waiting for memory room see `stop` now
        me = threading.current_thread()
        alive = []
        deadline = time.monotonic() + timeout  # one deadline for the pool, not per thread
        with self._lock:  # stop is set: no worker starts after this snapshot
            workers = list(self.workers)
        for t, _ in workers:
            if t is me:
                continue
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                alive.append(t.name)
        self.ready.drain()
        return alive


def _worker_main(pool: ThreadPool, wid: int, stats: WorkerStats) -> None:
    try:
        limit_intra_op_threads()  # like torch's worker processes (see _intraop)
        if pool._worker_init_fn is not None:
            pool._worker_init_fn(wid)
        with pool._worker_context():
            _worker_loop(pool, wid, stats)
    except BaseException as exc:
        # worker_init_fn (or the framework) failed: the consumer raises it instead of
        # waiting. Woken by a nudge, which adds no entry to the ready buffer.
        err = SampleLoadError(f"worker thread {stats.name} failed: {exc!r}")
        err.__cause__ = exc
        pool.fatal = err  # one reference store, published by the nudge's lock
        pool.ready.nudge()
    finally:
        stats.current_index = None
        with pool._lock:
            pool._retiring = pool._retiring - {wid}
            if wid in pool._live:
                pool._live.remove(wid)
            pool._running -= 1
        if pool._on_worker_exit is not None:
            with contextlib.suppress(Exception):
                pool._on_worker_exit()
        pool.telemetry.retire(stats)


def _worker_loop(pool: ThreadPool, wid: int, stats: WorkerStats) -> None:
    stop = pool.stop
    share = pool.share_size
    get_share = pool.tasks.get_share
    while not stop.is_set():
        if wid in pool._retiring:  # one reference load (see ThreadPool.__init__)
            return
        got = get_share(POLL_S, share)
        if got is CLOSED:
            return
        if got is None:
            continue
        if stop.is_set():
            return
        _run_share(pool, wid, stats, stop, *got)


def _run_share(pool: ThreadPool, wid: int, stats: WorkerStats, stop: threading.Event,
               batch: BatchState, positions: list[int]) -> None:
    """Load ``positions`` of ``batch`` in one ``fetch_many`` call (per sample while the
    online probe observes), record them under one acquisition of ``batch.lock``; the
    worker recording the last sample finishes the batch."""
    if batch.error is not None:  # one reference load: the batch failed, drop its tasks
        return
    indices = batch.indices
    share = [indices[p] for p in positions]
    observer = pool.observer  # one reference load per share (see ThreadPool.__init__)
    guarded = pool.guarded
    if guarded:
        pool._user_begin()
    try:
        if observer is None:
            t0 = time.perf_counter()
            values = pool._fetch_many(share, batch, stats, stop)
            spent = time.perf_counter() - t0
        else:
            values, spent = _load_observed(pool, observer, wid, stats, stop, batch, share)
    except BaseException as exc:
        if guarded:
            pool._user_end()
        pool._on_progress()
        if batch.fail(exc):
            pool.ready.put(batch.ordinal, batch)
        return
    if guarded:
        pool._user_end()
    pool._timed_share(len(share), spent)
    pool._on_progress()
    with batch.lock:
        if batch.error is not None:
            return
        results = batch.results
        for pos, value in zip(positions, values):
            results[pos] = value
        batch.remaining -= len(positions)
        complete = batch.remaining == 0
    if complete:
        _finish_batch(pool, stats, batch)


def _load_observed(pool: ThreadPool, observer: Callable[[int, float, float, int, float], None],
                   wid: int, stats: WorkerStats, stop: threading.Event, batch: BatchState,
                   share: list[Any]) -> tuple[list[Any], float]:
    """The share one sample at a time, each clean load reported to the online probe:
    ``observer(worker_id, wall_s, cpu_s, running_workers, gil_wait_s)``. Returns the
    values and the seconds spent loading (the reports excluded)."""
    fetch_many, perf = pool._fetch_many, time.perf_counter
    values: list[Any] = []
    spent = 0.0
    for index in share:
        wall, cpu, redone = stats.fetch_wall_s, stats.fetch_cpu_s, stats.skipped + stats.retries
        t0 = perf()
        values.extend(fetch_many([index], batch, stats, stop))
        spent += perf() - t0
        if stats.skipped + stats.retries == redone:  # clean: no skip, no retry backoff
            g0 = perf()
            time.sleep(0)  # yield the GIL once: how long until it comes back?
            observer(wid, stats.fetch_wall_s - wall, stats.fetch_cpu_s - cpu,
                     pool.running_workers(), perf() - g0)
    return values, spent


def _finish_batch(pool: ThreadPool, stats: WorkerStats, batch: BatchState) -> None:
    """Collate/pin/stage a complete batch (user code: inside the fork barrier) and hand
    it to the consumer."""
    guarded = pool.guarded
    if guarded:
        pool._user_begin()
    error: BaseException | None = None
    try:
        pool._finish(batch, stats)
    except BaseException as exc:
        error = exc
    finally:
        if guarded:
            pool._user_end()
    batch.mark_done(error)
    pool.ready.put(batch.ordinal, batch)
