"""Cheap loader counters and the snapshots the detector, tuner and callbacks read.

Hot path cost: each worker thread owns one :class:`WorkerStats` that only it
writes (plain attribute increments, no lock); the consumer owns the consumer
counters. Readers sum the per-worker objects when they take a
:class:`TelemetrySnapshot`. A reader may see a worker's counters a few samples
stale; it never sees a torn value (each field is one object reference, which is
atomic also on free-threaded Python).

Snapshots are cumulative since the loader was created; a *window* is the
difference of two snapshots (:meth:`TelemetrySnapshot.delta`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

__all__ = ["GAUGES", "LoaderTelemetry", "TelemetrySnapshot", "TelemetryWindow", "WorkerStats"]


class WorkerStats:
    """Counters written by exactly one worker thread."""

    __slots__ = ("batches_collated", "collate_s", "current_index", "errors", "fetch_cpu_s",
                 "fetch_wall_s", "name", "retries", "samples", "skipped", "transfer_s")

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples = 0
        self.fetch_wall_s = 0.0
        self.fetch_cpu_s = 0.0
        self.collate_s = 0.0
        self.transfer_s = 0.0
        self.batches_collated = 0
        self.errors = 0
        self.retries = 0
        self.skipped = 0
        # The dataset index this worker is loading now (None when idle); read by
        # the stall watchdog from the consumer thread.
        self.current_index: object | None = None


# The per-worker counters a snapshot sums (and retire() folds into the retired totals).
_SUMMED = ("samples", "fetch_wall_s", "fetch_cpu_s", "collate_s", "transfer_s", "errors",
           "retries", "skipped")

GAUGES = frozenset(("threads", "prefetch", "queue_depth", "bytes_in_flight", "rss_bytes",
                    "busy_workers"))


@dataclass(frozen=True)
class _Counters:
    """The loader counters shared by snapshots (cumulative) and windows (differences).

    Fields (cumulative unless marked *gauge*):
        samples: samples loaded; fetch_wall_s / fetch_cpu_s: summed wall and
        thread-CPU seconds inside ``dataset[i]``; collate_s; transfer_s (host to
        device staging); batches / delivered: batches and samples handed to the
        consumer; wait_s: seconds the consumer spent blocked in ``next()``;
        consumer_s: seconds the consumer spent *outside* ``next()`` (its step
        time); errors / retries / skipped; throttle_events / throttled_s (memory
        governor); process_cpu_s: psutil user+system CPU of the process.
        Gauges (values at the end, see ``GAUGES``): threads (worker threads),
        prefetch (effective look-ahead in batches), queue_depth (batches ready),
        bytes_in_flight, rss_bytes, busy_workers (workers inside a sample now).
    """

    samples: int = 0
    fetch_wall_s: float = 0.0
    fetch_cpu_s: float = 0.0
    collate_s: float = 0.0
    transfer_s: float = 0.0
    batches: int = 0
    delivered: int = 0
    wait_s: float = 0.0
    consumer_s: float = 0.0
    errors: int = 0
    retries: int = 0
    skipped: int = 0
    throttle_events: int = 0
    throttled_s: float = 0.0
    process_cpu_s: float = 0.0
    threads: int = 0
    prefetch: int = 0
    queue_depth: int = 0
    bytes_in_flight: int = 0
    rss_bytes: int = 0
    busy_workers: int = 0


@dataclass(frozen=True)
class TelemetrySnapshot(_Counters):
    """Cumulative loader counters at ``time`` (monotonic seconds); see ``_Counters``."""

    time: float = 0.0

    def delta(self, earlier: TelemetrySnapshot) -> TelemetryWindow:
        """The window from ``earlier`` to ``self`` (gauges taken from ``self``)."""
        vals = {}
        for f in fields(_Counters):
            a, b = getattr(self, f.name), getattr(earlier, f.name)
            vals[f.name] = a if f.name in GAUGES else a - b
        return TelemetryWindow(duration_s=max(self.time - earlier.time, 0.0), **vals)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class TelemetryWindow(_Counters):
    """Counters over a window (differences), gauges at its end, and derived rates."""

    duration_s: float = 0.0

    @property
    def samples_per_sec(self) -> float:
        """Samples handed to the consumer per second (loaded samples if none were counted)."""
        n = self.delivered if self.delivered else self.samples
        return n / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def batches_per_sec(self) -> float:
        return self.batches / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def wait_fraction(self) -> float:
        """Share of the consumer's wall time spent blocked waiting for data."""
        total = self.wait_s + self.consumer_s
        return self.wait_s / total if total > 0 else 0.0

    @property
    def fetch_ms(self) -> float:
        return 1000.0 * self.fetch_wall_s / self.samples if self.samples else 0.0

    @property
    def cpu_per_sample_ms(self) -> float:
        return 1000.0 * self.fetch_cpu_s / self.samples if self.samples else 0.0

    @property
    def collate_ms(self) -> float:
        return 1000.0 * self.collate_s / self.batches if self.batches else 0.0

    @property
    def transfer_ms(self) -> float:
        return 1000.0 * self.transfer_s / self.batches if self.batches else 0.0

    @property
    def wait_ms(self) -> float:
        return 1000.0 * self.wait_s / self.batches if self.batches else 0.0

    @property
    def cpu_cores_used(self) -> float:
        """Process CPU seconds per wall second over the window."""
        return self.process_cpu_s / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def throttled_fraction(self) -> float:
        return self.throttled_s / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        for p in ("samples_per_sec", "batches_per_sec", "wait_fraction", "fetch_ms",
                  "cpu_per_sample_ms", "collate_ms", "transfer_ms", "wait_ms",
                  "cpu_cores_used", "throttled_fraction"):
            d[p] = getattr(self, p)
        return d


class LoaderTelemetry:
    """Registry of per-worker counters plus the consumer's own counters.

    Locks: ``_lock`` guards the list of registered workers and the retired totals.
    Held by ``register``/``retire`` (a worker starting or exiting), ``live_workers``
    and ``snapshot`` (any reader, for the whole sum); never taken per sample, nobody
    waits on it for long.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._lock = threading.Lock()  # guards _workers/_retired (see the class docstring)
        self._workers: list[WorkerStats] = []
        self._retired = WorkerStats("retired")  # counters of workers that exited
        # Consumer-owned counters (written only by the thread iterating the loader).
        self.batches = 0
        self.delivered = 0
        self.wait_s = 0.0
        self.consumer_s = 0.0
        self.transfer_s_consumer = 0.0  # waiting on staged batches' CUDA events at hand-off

    def register(self, name: str) -> WorkerStats:
        stats = WorkerStats(name)
        with self._lock:
            self._workers.append(stats)
        return stats

    def retire(self, stats: WorkerStats) -> None:
        """Fold an exited worker's counters into the retired totals."""
        with self._lock:
            if stats in self._workers:
                self._workers.remove(stats)
                r = self._retired
                for name in (*_SUMMED, "batches_collated"):
                    setattr(r, name, getattr(r, name) + getattr(stats, name))

    def live_workers(self) -> list[WorkerStats]:
        with self._lock:
            return list(self._workers)

    def snapshot(self, **gauges: float | int) -> TelemetrySnapshot:
        """Sum the counters; ``gauges`` supplies the gauge and governor fields."""
        tot = dict.fromkeys(_SUMMED, 0)
        # Summed under _lock: retire() moves a worker's counters into _retired under the
        # same lock, so every worker is counted exactly once -- live or retired, never both
        # (a worker retiring between a copy of the list and the sums was counted twice).
        # A few dozen attribute reads; workers never take this lock per sample.
        with self._lock:
            busy = sum(1 for w in self._workers if w.current_index is not None)
            for w in (*self._workers, self._retired):
                for k in _SUMMED:
                    tot[k] += getattr(w, k)
        tot["transfer_s"] += self.transfer_s_consumer
        gauges.setdefault("busy_workers", busy)
        return TelemetrySnapshot(
            time=self.clock(), batches=self.batches, delivered=self.delivered, wait_s=self.wait_s,
            consumer_s=self.consumer_s, **tot, **gauges,
        )
