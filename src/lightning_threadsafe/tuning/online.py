"""The ``"auto"`` probe, run inside the live worker pool: no start-up phase.

:class:`OnlineProbe` watches the samples the loader's provisional worker threads
complete (:meth:`OnlineProbe.observe`) and, once it has seen enough, publishes a
:class:`~lightning_threadsafe.tuning.ProbeResult` that the consumer applies (the
loader's settings, a larger pool, or a switch of executor). The decision rules are
pure functions in :mod:`~lightning_threadsafe.tuning.rules`; this module only
collects the measurements, phase by phase.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lightning_threadsafe.tuning.rules import ProbeResult, _ConcurrentState, _Rules
from lightning_threadsafe.tuning.settings import check_int

__all__ = ["OnlineProbe"]


class OnlineProbe:
    """The ``"auto"`` probe run inside the live worker pool: no start-up phase.

    The loader starts loading at once with ``threads`` provisional worker
    threads; each worker reports every completed sample (:meth:`observe`) until
    a decision is made, by the rules of :mod:`~lightning_threadsafe.tuning.rules`:

    1. *Warm-up*: until each of the first ``threads`` workers finished one sample
       (first samples pay cold starts: thread start, allocator, caches).
    2. *Concurrent window*: the next ``window`` samples (default ``max(4, 2 *
       threads)``) -- the CPU they burnt over the window in cores (``P``), thread CPU per
       sample, thread-seconds per sample (the window also closes after two
       samples once it lasted ``enough_s``). ``P`` sums the workers' thread CPU (the
       training loop runs meanwhile and must not count). Tiny samples: inline; ``P >= 1.3`` or
       ``P < 0.7``: threads, sized; otherwise (about one core busy) the workers' GIL
       waits decide when they are clear (GIL-bound: processes; GIL free: threads), else:
    3. *Serial*: :attr:`wanted_workers` drops to 1 (the consumer retires the
       others); once one worker is left, ``serial`` samples (or two, once they
       took ``enough_s``) timed alone tell
       GIL-bound (processes) from waiting (threads). With one provisional thread
       (one core) the window's samples only size the threads.

    With the GIL disabled (free-threaded Python) step 2's GIL wait and step 3 do not
    apply: nothing is GIL-bound, the window's samples size the threads.

    Thread-safety: :meth:`observe` is called by any worker thread, concurrently;
    every field is guarded by ``_lock``. :attr:`result` (set once) and
    :attr:`wanted_workers` are published by single reference stores under the
    lock and read without it: the reporting worker shrinks the pool for the
    serial phase at once; the consumer applies the result (the loader's
    settings, a larger pool, or a switch of executor).

    Args:
        threads: provisional worker threads the pool started with (>= 1).
        cpu_count: usable cores (default: this process's affinity mask).
        max_workers: cap on the thread count (default ``min(64, 8 * cpu_count)``).
        batch_size: the loader's batch size, to size a total prefetch.
        prefetch_per_worker: whether ``prefetch`` counts batches per worker (default)
            or in total.
        window: samples in the concurrent window (>= 2).
        serial: samples timed alone when the window is ambiguous (>= 1).
        enough_s: a phase also ends after 2 samples once it has lasted this long
            (window: wall time; serial: summed sample time), so slow samples are
            not measured longer than needed.
        clock: the wall clock (injectable for tests).
        on_serial: called once, from the reporting worker, when the serial phase starts
            (the loader shrinks its pool to one thread there).

    Raises:
        ValueError: for an argument out of range, naming it.
    """

    def __init__(self, *, threads: int, cpu_count: int | None = None,
                 max_workers: int | None = None, batch_size: int | None = None,
                 prefetch_per_worker: bool = True, window: int | None = None, serial: int = 4,
                 enough_s: float = 0.03,
                 clock: Callable[[], float] = time.perf_counter,
                 on_serial: Callable[[], None] | None = None) -> None:
        check_int("threads", threads, 1)
        self._rules = _Rules.checked(cpu_count, max_workers, batch_size, prefetch_per_worker)
        if window is None:
            window = max(4, 2 * threads)
        check_int("window", window, 2)
        check_int("serial", serial, 1)
        if not isinstance(enough_s, (int, float)) or isinstance(enough_s, bool) or enough_s <= 0:
            raise ValueError(f"enough_s={enough_s!r} must be a positive number of seconds")
        self.threads = threads
        self.result: ProbeResult | None = None
        self.wanted_workers = threads
        self._window = window
        self._serial = serial
        self._enough_s = enough_s
        self._clock = clock
        # Called once, under _lock, as the serial phase starts (the pool shrinks to one
        # worker there and then: a result cannot be published meanwhile, so a stale
        # shrink can never undo the consumer's resize to the decided size).
        self.on_serial = on_serial
        # Guards every field below, and the publication of result / wanted_workers.
        self._lock = threading.Lock()
        self._warm: set[int] = set()  # ids of workers that finished their first sample
        self._start: float | None = None  # wall clock at the window's start
        self._walls: list[float] = []  # per-sample wall / thread CPU: the window, then serial
        self._cpus: list[float] = []
        self._gil: list[float] | None = []  # GIL waits in the window (None: not measured)
        self._state: _ConcurrentState | None = None  # set when the serial phase starts
        self._serial_open = False  # one worker left: the serial samples count from now

    def observe(self, worker: int, *, wall_s: float, cpu_s: float, live_workers: int,
                gil_wait_s: float | None = None) -> None:
        """A worker finished a sample that took ``wall_s`` / ``cpu_s`` (thread CPU).

        Args:
            worker: the reporting worker's id.
            wall_s: the sample's wall time.
            cpu_s: the sample's thread CPU time.
            live_workers: workers still running in the pool.
            gil_wait_s: how long the worker then waited to get the GIL back after
                yielding it once (``time.sleep(0)``), or ``None`` if not measured.
        """
        if self.result is not None:
            return
        with self._lock:
            if self.result is not None:
                return
            if self._state is None:
                self._observe_concurrent(worker, wall_s, cpu_s, gil_wait_s)
            elif live_workers <= 1:
                if not self._serial_open:
                    # samples that started while other workers ran do not count
                    self._serial_open = True
                    return
                self._walls.append(wall_s)
                self._cpus.append(cpu_s)
                n = len(self._walls)
                if n >= self._serial or (n >= 2 and sum(self._walls) >= self._enough_s):
                    self._publish(self._rules.after_serial(self._state, self._walls, self._cpus))

    def _observe_concurrent(self, worker: int, wall_s: float, cpu_s: float,
                            gil_wait_s: float | None) -> None:
        """Warm-up, then the window's samples (caller holds ``_lock``)."""
        if self._start is None:
            self._warm.add(worker)
            if len(self._warm) >= self.threads:
                self._start = self._clock()
            return
        self._walls.append(wall_s)
        self._cpus.append(cpu_s)
        if self._gil is not None:
            if gil_wait_s is None:
                self._gil = None
            else:
                self._gil.append(gil_wait_s)
        n = len(self._walls)
        if n >= self._window or (n >= 2 and self._clock() - self._start >= self._enough_s):
            self._close_window()

    def _close_window(self) -> None:
        """Decide from the window, or start the serial phase (caller holds ``_lock``)."""
        assert self._start is not None
        if self.threads == 1:
            self._publish(self._rules.one_core(self._walls, self._cpus))
            return
        elapsed = self._clock() - self._start
        # The workers' own thread CPU, not the process's: the training loop runs meanwhile
        # and would make a GIL-bound pool look parallel.
        cores = sum(self._cpus) / elapsed if elapsed > 0 else float(self.threads)
        state = self._rules.concurrent(self.threads, samples=len(self._walls), elapsed_s=elapsed,
                                       cpu_s=sum(self._cpus), process_cores=cores)
        if self._gil:
            # About one core busy: the GIL, or waits of 1 - 1/threads. Yielding the GIL
            # once after each sample tells them apart without a serial phase.
            result = self._rules.from_gil_wait(state, sum(self._gil) / len(self._gil),
                                               sum(self._cpus) / len(self._cpus))
            if result is not None:
                self._publish(result)
                return
        if state.needs_serial:
            self._state = state
            self._walls, self._cpus = [], []
            self.wanted_workers = 1
            if self.on_serial is not None:
                self.on_serial()
        else:
            self._publish(self._rules.decide(state))

    def _publish(self, result: ProbeResult) -> None:
        """Publish the decision (caller holds ``_lock``): the pool's size, then the result."""
        result.evidence["online"] = True
        if result.executor == "thread" and result.num_workers > 0:
            self.wanted_workers = result.num_workers
        self.result = result

    def finish(self) -> ProbeResult:
        """Decide with what was seen so far (the epoch ended before a decision).

        Returns:
            The result (the same one on every call once decided).
        """
        with self._lock:
            if self.result is None:
                if self._state is not None:
                    self._publish(self._rules.after_serial(self._state, self._walls, self._cpus)
                                  if self._walls else self._rules.decide(self._state))
                elif self._start is not None and self._walls:
                    self._close_window()
                    if self.result is None:  # would need a serial phase: no samples left
                        assert self._state is not None
                        self._publish(self._rules.decide(self._state))
                else:
                    cores = self._rules.cpu_count
                    self._publish(ProbeResult("thread", min(cores, self._rules.max_workers), 2, {
                        "reason": "too few samples to probe: one thread per core",
                        "cpu_count": cores}))
            assert self.result is not None
            return self.result
