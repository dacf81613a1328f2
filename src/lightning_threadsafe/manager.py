"""``ThreadSafetyManager``: everything one loader owns besides its data.

One manager per loader, no global singletons. It owns the loader's thread
pools (the executor), the registered per-thread/shared resources, the memory
governor, the stall watchdog, the optional deadlock detector, the telemetry
and the error record, and it builds the performance report.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from lightning_threadsafe.deadlock import DeadlockDetector
from lightning_threadsafe.memory import MemoryGovernor
from lightning_threadsafe.resources import ThreadLocalResource, ThreadSafeResource, find_resources
from lightning_threadsafe.telemetry import LoaderTelemetry, TelemetrySnapshot
from lightning_threadsafe.watchdog import StallWatchdog

__all__ = ["ThreadSafetyManager"]

_MAX_ERROR_RECORDS = 1000  # individual records kept; counts are always exact


class ThreadSafetyManager:
    """Owns one loader's executor, resources, memory governor, watchdog, detector and errors.

    Args:
        memory_budget: see :class:`MemoryGovernor` (``None`` disables the governor).
        stall_timeout: seconds without a completed sample before ``LoaderStallError``
            (``None`` disables the watchdog).
        debug: enable the lock-order :class:`DeadlockDetector` in worker threads.
        device_budget: CUDA bytes the governor may let staged batches hold.
        clock: injectable monotonic clock.

    Guarantees:
        - ``close()`` is idempotent, stops every pool it started and closes every
          registered resource; afterwards no ``lts-*`` thread of this manager runs.
          The manager stays usable (new pools may be attached later).
        - The manager holds pools weakly: a pool lives as long as its iterator.

    Example::

        with ThreadSafetyManager(memory_budget="1GiB", debug=True) as m:
            m.register_resources(dataset)   # finds ThreadLocalResource/ThreadSafeResource attributes
            ...
            print(m.report()["errors"])
    """

    def __init__(
        self,
        *,
        memory_budget: int | float | str | None = "auto",
        stall_timeout: float | None = 300.0,
        debug: bool = False,
        device_budget: int | float | str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.telemetry = LoaderTelemetry()
        self.governor: MemoryGovernor | None = (
            MemoryGovernor(memory_budget, device_budget=device_budget)
            if memory_budget is not None or device_budget is not None
            else None
        )
        self.detector: DeadlockDetector | None = DeadlockDetector() if debug else None
        self.watchdog = StallWatchdog(stall_timeout, clock=clock)
        # _lock guards _resources, _errors, _error_counts and _pools. Taken by workers
        # only when they record an error (never per successful sample).
        self._lock = threading.Lock()
        self._resources: list[ThreadLocalResource[Any] | ThreadSafeResource[Any]] = []
        self._errors: list[dict[str, Any]] = []
        self._error_counts = {"raised": 0, "skipped": 0}
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._closed = False
        # Baseline of the first window (process CPU and throttling counted from here).
        self._created: TelemetrySnapshot = self.snapshot()

    # -- resources ---------------------------------------------------------------

    def register(self, resource: ThreadLocalResource[Any] | ThreadSafeResource[Any]) -> None:
        """Register a resource to be closed/reported with this loader."""
        with self._lock:
            if all(r is not resource for r in self._resources):
                self._resources.append(resource)

    def register_resources(self, obj: Any) -> int:
        """Find and register the resources held by ``obj`` (a dataset). Returns how many."""
        found = find_resources(obj)
        for r in found:
            self.register(r)
        return len(found)

    def _thread_local_resources(self) -> list[ThreadLocalResource[Any]]:
        with self._lock:
            return [r for r in self._resources if isinstance(r, ThreadLocalResource)]

    def on_worker_exit(self) -> None:
        """Called in each exiting worker thread: close its per-thread instances there."""
        for r in self._thread_local_resources():
            with contextlib.suppress(Exception):
                r.close_current_thread()

    @contextlib.contextmanager
    def worker_context(self) -> Iterator[None]:
        """Entered around each worker's loop: activates the deadlock detector in debug mode."""
        if self.detector is None:
            yield
        else:
            with self.detector.activate():
                yield

    # -- pools ---------------------------------------------------------------------

    def attach_pool(self, pool: Any) -> None:
        with self._lock:
            self._closed = False
            self._pools.add(pool)

    # -- errors --------------------------------------------------------------------

    def record_error(self, *, index: Any, batch: int | None, error: str, action: str,
                     attempts: int = 1) -> None:
        with self._lock:
            self._error_counts[action] = self._error_counts.get(action, 0) + 1
            if len(self._errors) < _MAX_ERROR_RECORDS:
                self._errors.append({"index": index, "batch": batch, "error": error,
                                     "action": action, "attempts": attempts})

    @property
    def skipped_indices(self) -> list[Any]:
        with self._lock:
            return [e["index"] for e in self._errors if e["action"] == "skipped"]

    # -- report --------------------------------------------------------------------

    def snapshot(self, **gauges: float | int) -> TelemetrySnapshot:
        g = dict(gauges)
        if self.governor is not None:
            s = self.governor.stats()
            g.setdefault("bytes_in_flight", int(s.get("bytes_in_flight") or 0))
            g.setdefault("rss_bytes", int(s.get("rss_bytes") or 0))
            g.setdefault("throttle_events", int(s.get("throttle_events") or 0))
            g.setdefault("throttled_s", float(s.get("throttled_s") or 0.0))
        else:
            g.setdefault("rss_bytes", _rss())
        g.setdefault("process_cpu_s", _process_cpu())
        return self.telemetry.snapshot(**g)

    def report(self, **gauges: float | int) -> dict[str, Any]:
        """Plain-data report: totals, rates since creation, memory, errors, resources, stalls."""
        snap = self.snapshot(**gauges)
        window = snap.delta(self._created)
        with self._lock:
            errors = {
                "raised": self._error_counts.get("raised", 0),
                "skipped": self._error_counts.get("skipped", 0),
                "retries": snap.retries,
                "skipped_indices": [e["index"] for e in self._errors if e["action"] == "skipped"],
                "records": [dict(e) for e in self._errors],
            }
            resources = [r.stats() for r in self._resources]
        return {
            "totals": snap.to_dict(),
            "rates": {k: v for k, v in window.to_dict().items()
                      if k in ("samples_per_sec", "batches_per_sec", "wait_fraction", "fetch_ms",
                               "cpu_per_sample_ms", "collate_ms", "transfer_ms", "wait_ms",
                               "cpu_cores_used", "throttled_fraction", "duration_s")},
            "memory": self.governor.stats() if self.governor is not None else {"budget_bytes": None},
            "errors": errors,
            "resources": resources,
            "stalls": list(self.watchdog.stalls),
            "deadlock_reports": [str(e) for e in self.detector.reports] if self.detector else [],
        }

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop every pool and close every resource. Safe to call twice.

        The loader stays usable: a later iteration starts new threads, and
        per-thread resources are re-created lazily.
        """
        with self._lock:
            self._closed = True
            pools = list(self._pools)
            self._pools = weakref.WeakSet()
            resources = list(self._resources)
        for p in pools:
            p.close()
        for r in resources:
            if isinstance(r, ThreadLocalResource):
                with contextlib.suppress(Exception):
                    r.close_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ThreadSafetyManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil unavailable on exotic platforms
        return 0


def _process_cpu() -> float:
    try:
        import psutil

        t = psutil.Process().cpu_times()
        return float(t.user + t.system)
    except Exception:  # pragma: no cover
        return 0.0
