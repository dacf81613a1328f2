"""Worker threads of the thread executor: take a sample task, load it, finish the batch.

The worker that completes the last sample of a batch collates it (and pins and
stages it when asked) and puts it in the ready buffer, so the consumer thread
never collates.

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

__all__ = ["BatchState", "ThreadPool"]

POLL_S = 0.1  # every blocking wait re-checks the stop signal at least this often


class BatchState:
    """A batch being loaded: one slot per index, filled by any worker.

    Guarantees: ``remaining`` counts the empty slots; exactly one worker sees it
    reach 0 (under ``lock``) and finishes the batch; once ``error`` is set the
    batch is put in the ready buffer exactly once and its other tasks are dropped.
    """

    __slots__ = ("done", "error", "indices", "lock", "nbytes", "ordinal", "payload",
                 "remaining", "results", "samples")

    def __init__(self, ordinal: int, indices: list[Any]) -> None:
        self.ordinal = ordinal
        self.indices = indices
        self.results: list[Any] = [None] * len(indices)
        self.remaining = len(indices)
        # Guards results/remaining/error/done between the workers loading this batch.
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.done = False  # set once the batch went to the ready buffer
        self.payload: Any = None
        self.nbytes = 0
        self.samples = 0  # samples in the collated batch (skipped ones excluded)


def _noop_context() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


class ThreadPool:
    """The worker threads of one epoch and the queues they share.

    Args:
        num_workers: number of threads (>= 1).
        fetch: ``fetch(index, batch, stats, stop_event) -> sample`` (raises SampleLoadError).
        finish: ``finish(batch, stats)`` collates/pins/stages ``batch.payload`` in place.
        on_progress: called after each completed sample (stall watchdog).
        worker_init_fn: called once in each worker thread with its id (ids are unique
            within the pool; a pool the online probe resized has ids past its size).
        worker_context: a context manager factory entered around each worker's loop
            (deadlock-detector activation), may be a no-op.
        on_worker_exit: called in the worker thread as it exits (closes thread-local resources).
        name: thread name prefix (``lts-<name>-<n>``).
        guarded: workers take part in the fork barrier (:meth:`pause`) from the start.
    """

    def __init__(
        self,
        *,
        num_workers: int,
        fetch: Callable[[Any, BatchState, WorkerStats, threading.Event], Any],
        finish: Callable[[BatchState, WorkerStats], None],
        telemetry: LoaderTelemetry,
        in_order: bool,
        on_progress: Callable[[], None],
        worker_init_fn: Callable[[int], None] | None = None,
        worker_context: Callable[[], contextlib.AbstractContextManager[Any]] = _noop_context,
        on_worker_exit: Callable[[], None] | None = None,
        name: str = "worker",
        guarded: bool = False,
    ) -> None:
        self.tasks: PriorityWorkQueue[BatchState] = PriorityWorkQueue()
        # A worker takes up to this many consecutive samples of a batch per queue visit:
        # half of an even share, so cheap samples cost fewer lock round-trips while a
        # batch still spreads over at least half the workers.
        self.share: Callable[[BatchState], int] = (
            lambda b: max(1, len(b.indices) // (2 * max(1, self.target))))
        self.ready = ReadyBuffer(in_order=in_order)
        # Set once by close(); workers check it after every task and every poll.
        self.stop = threading.Event()
        self._fetch = fetch
        self._finish = finish
        self._on_progress = on_progress
        self._worker_init_fn = worker_init_fn
        self._worker_context = worker_context
        self._on_worker_exit = on_worker_exit
        self._name = name
        self.telemetry = telemetry
        # A failure outside any sample (worker_init_fn): written once by the failing
        # worker before it wakes the consumer through the ready buffer.
        self.fatal: BaseException | None = None
        # The ordinal the consumer needs next (in-order delivery), written by the consumer
        # only (one reference store, atomic), read by workers waiting for memory room.
        self.needed: int | None = None
        # Called by each worker after each sample while set (the online "auto" probe):
        # observer(worker_id, wall_s, cpu_s, running_workers, gil_wait_s). Set/cleared by
        # the consumer.
        self.observer: Callable[[int, float, float, int, float], None] | None = None
        # _lock guards workers, _retiring, _live, _running and _next_id, and serialises
        # writes of target (an int read without the lock as one reference: a stale read
        # only sizes a task share or an admission depth). Invariants: `workers` only
        # grows (every thread ever started, so close() joins them all); a worker whose id
        # is in _retiring exits at its next loop turn, never while holding tasks; threads
        # start under _lock and never once `stop` is set (set under _lock by close()).
        self._lock = threading.Lock()
        self.workers: list[tuple[threading.Thread, WorkerStats]] = []
        self._retiring: set[int] = set()
        self._live: list[int] = []  # ids of started workers that are not retiring, in order
        self._running = 0  # workers started and not yet exited (retiring ones included)
        # Fork barrier (pause/resume): while _paused, no worker *enters* user code
        # (dataset, collate_fn, pin); _in_user counts those inside it. Both guarded by
        # _lock; _quiet (on _lock) is notified when _in_user drops to 0 or on resume.
        # The barrier costs two lock round-trips per sample, so workers only take part
        # while `guarded` is True (set before any worker starts when the online probe
        # may fork; cleared by the consumer once it no longer will: a worker that reads
        # False can no longer meet a pause). One reference store, read without the lock.
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
        as retiring: each exits after the tasks it holds, at its next loop turn
        (idle ones are woken). Their queued work stays for the others.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} must be >= 1 for a thread pool")
        with self._lock:
            if self.stop.is_set():
                return
            self.target = num_workers
            shrinking = len(self._live) > num_workers
            while len(self._live) > num_workers:
                self._retiring.add(self._live.pop())
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
        ``timeout`` (a sample still running; the pool is resumed). Call
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

    def worker_snapshot(self) -> list[tuple[threading.Thread, WorkerStats]]:
        """The worker threads still running, with their stats (for the stall watchdog)."""
        with self._lock:
            return [(t, st) for t, st in self.workers if t.is_alive()]

    def running_workers(self) -> int:
        """Worker threads started and not yet exited (retiring ones included)."""
        with self._lock:
            return self._running

    def _retiring_now(self, wid: int) -> bool:
        # Read without _lock (a per-turn lock on the hot path): set membership is atomic,
        # with or without the GIL; a stale answer only retires the worker one turn later.
        return wid in self._retiring

    def submit(self, batch: BatchState, positions: list[int]) -> None:
        """Queue the samples of ``batch`` at ``positions`` (the others are already loaded)."""
        self.tasks.put_batch(batch.ordinal, positions, batch)

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
        # worker_init_fn (or the framework) failed: surface it through the ready
        # buffer as a batch error so the consumer raises instead of waiting.
        err = SampleLoadError(f"worker thread {stats.name} failed: {exc!r}")
        err.__cause__ = exc
        pool.fatal = err  # read by the consumer after each wake-up
        pool.ready.put(-1, None)  # wake the consumer
    finally:
        stats.current_index = None
        with pool._lock:
            pool._retiring.discard(wid)
            if wid in pool._live:
                pool._live.remove(wid)
            pool._running -= 1
        if pool._on_worker_exit is not None:
            with contextlib.suppress(Exception):
                pool._on_worker_exit()
        pool.telemetry.retire(stats)


def _worker_loop(pool: ThreadPool, wid: int, stats: WorkerStats) -> None:
    stop = pool.stop
    share = pool.share
    while not stop.is_set():
        if pool._retiring_now(wid):
            return
        tasks = pool.tasks.get(POLL_S, max_items=share)
        if tasks is CLOSED:
            return
        if tasks is None:
            continue
        for _, pos, batch in tasks:
            if stop.is_set():
                return
            observer = pool.observer
            if observer is None:
                _run_task(pool, stats, stop, pos, batch)
                continue
            wall, cpu, redone = stats.fetch_wall_s, stats.fetch_cpu_s, stats.skipped + stats.retries
            # only clean loads are timings of the workload (no skip, no retry backoff)
            if _run_task(pool, stats, stop, pos, batch) and \
                    stats.skipped + stats.retries == redone:
                g0 = time.perf_counter()
                time.sleep(0)  # yield the GIL once: how long until it comes back?
                observer(wid, stats.fetch_wall_s - wall, stats.fetch_cpu_s - cpu,
                         pool.running_workers(), time.perf_counter() - g0)


def _run_task(pool: ThreadPool, stats: WorkerStats, stop: threading.Event, pos: int,
              batch: BatchState) -> bool:
    """Load one sample of ``batch``; the worker completing the batch finishes it.

    Returns whether a sample was loaded (``False``: dropped with its failed batch,
    or it raised) -- only loaded samples are reported to the online probe.
    """
    with batch.lock:
        if batch.error is not None:  # batch already failed: drop its other tasks
            return False
    index = batch.indices[pos]
    stats.current_index = index
    guarded = pool.guarded
    if guarded:
        pool._user_begin()
    try:
        value = pool._fetch(index, batch, stats, stop)
    except BaseException as exc:
        if guarded:
            pool._user_end()
        stats.current_index = None
        pool._on_progress()
        with batch.lock:
            first = batch.error is None and not batch.done
            if first:
                batch.error = exc
                batch.done = True
        if first:
            pool.ready.put(batch.ordinal, batch)
        return False
    if guarded:
        pool._user_end()
    stats.current_index = None
    pool._on_progress()
    with batch.lock:
        if batch.error is not None:
            return True
        batch.results[pos] = value
        batch.remaining -= 1
        complete = batch.remaining == 0
    if complete:
        guarded = pool.guarded
        if guarded:
            pool._user_begin()
        try:
            pool._finish(batch, stats)
        except BaseException as exc:
            batch.error = exc
        finally:
            if guarded:
                pool._user_end()
        batch.done = True
        pool.ready.put(batch.ordinal, batch)
    return True
