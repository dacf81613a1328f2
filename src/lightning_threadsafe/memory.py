"""``MemoryGovernor``: keeps the bytes held inside the loader within a budget.

The threaded loader prefetches batches. The governor counts the bytes that sit
in the loader's buffers (``add``/``release``), learns how big a batch is
(``observe_batch``) and answers one question for the consumer before it starts
another batch (``admit``): does that batch still fit under the high watermark?
When it does not, prefetching slows down (backpressure) instead of the process
running out of memory. The batch the consumer needs next is always admitted, so
the governor can slow the loader but never deadlock it.

Design choices:

* **Batch-size estimate = maximum of the last 16 observed batches**, not an EMA.
  The guarantee is "the buffer never exceeds the budget by more than one
  batch"; an estimate below the real size breaks it (an EMA lags behind a large
  batch by design), one above it only costs a little prefetch depth. The window
  lets the estimate come down again when batches shrink (variable crops,
  ragged batches, the short last batch).
* **System memory is read with psutil at a low rate, inside** ``admit()``,
  ``effective_prefetch()`` and ``stats()`` — at most once per
  ``sample_interval`` seconds of the injected clock, never per sample, and with
  no lock held during the read. No thread is started, so ``close()`` has
  nothing to stop or join; it only ends the reads.
* **Prefetch depth is multiplicative-decrease / multiplicative-increase**: on
  each reading that finds the loader over its *hard* budget (or system/device
  memory below its floor) the depth divisor doubles; on each reading that finds
  it back under the low watermark with memory to spare, it halves again.

CUDA state is touched only when ``device_budget`` is set (and then only through
``device_reader``, by default ``torch.cuda.mem_get_info``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_threadsafe.config import parse_size

__all__ = ["MemoryGovernor", "MemoryReading"]

_MiB = 1024**2
_AUTO_FLOOR_FRACTION = 0.05  # "auto" floor: 5% of total memory ...
_AUTO_FLOOR_CAP = 512 * _MiB  # ... or 512 MiB, whichever is smaller
_ESTIMATE_WINDOW = 16  # batches the size estimate looks back over
_MAX_DIVISOR = 1 << 16  # prefetch divisor cap (the effective depth is floored at 1 anyway)


@dataclass(frozen=True)
class MemoryReading:
    """One reading of host memory, in bytes.

    Attributes:
        rss_bytes: resident set size of this process.
        available_bytes: memory the system can give without swapping
            (``psutil.virtual_memory().available``).
        total_bytes: physical memory of the system.
    """

    rss_bytes: int
    available_bytes: int
    total_bytes: int


class _PsutilReader:
    """Default ``memory_reader``: this process's RSS and the system's memory."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()

    def __call__(self) -> MemoryReading:
        vm = self._psutil.virtual_memory()
        return MemoryReading(
            rss_bytes=int(self._process.memory_info().rss),
            available_bytes=int(vm.available),
            total_bytes=int(vm.total),
        )


def _is_auto(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _check_count(name: str, value: object, what: str = "number of bytes") -> int:
    """Return ``value`` as an int >= 0 (numpy ints accepted), else raise naming ``name``."""
    allowed = f"{name}={value!r} must be a non-negative int {what}"
    if isinstance(value, bool):
        raise TypeError(allowed)
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(allowed) from None
    if n < 0:
        raise ValueError(allowed)
    return n


def _local_world_size(value: int | None) -> int:
    if value is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None or env.strip() == "":
            return 1
        try:
            n = int(env)
        except ValueError:
            raise ValueError(
                f"LOCAL_WORLD_SIZE={env!r} (environment) must be a positive int"
            ) from None
        if n < 1:
            raise ValueError(f"LOCAL_WORLD_SIZE={env!r} (environment) must be a positive int")
        return n
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"local_world_size={value!r} must be a positive int or None")
    return value


def _parse_or_auto(value: object, name: str) -> int | float | None:
    """``parse_size`` for an argument that also accepts ``"auto"`` (said in the message)."""
    try:
        return parse_size(value, name=name)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc}, or 'auto'") from None


def _resolve_floor(name: str, value: int | float | str | None, total: int) -> int | None:
    """Resolve a free-memory floor: ``"auto"`` = min(5% of total, 512 MiB)."""
    if _is_auto(value):
        return int(min(_AUTO_FLOOR_FRACTION * total, _AUTO_FLOOR_CAP))
    parsed = _parse_or_auto(value, name)
    if isinstance(parsed, float):
        return int(parsed * total)  # a fraction of *total* memory
    return parsed


class MemoryGovernor:
    """Memory budget with high/low watermarks and backpressure for the loader.

    The loader reports bytes entering its buffers (``add``) and leaving them
    (``release``), the size of each completed batch (``observe_batch``), and
    asks before it starts another batch (``admit``). A non-required batch is
    admitted while::

        bytes_in_flight + (pending_batches + 1) * estimated_batch_bytes
            <= high_watermark * budget_bytes

    Once a batch is refused the governor is *throttled* and stays throttled
    until that projection falls below ``low_watermark * budget_bytes``
    (hysteresis, so admission does not flap batch by batch). Low system memory
    (``available < min_available``) and, when a device budget is set, device
    bytes over ``device_budget`` or low device free memory throttle as well.

    Guarantees:
        * ``admit(required=True)`` is always ``True``: the batch the consumer
          needs next is never held back, so the loader cannot deadlock.
        * Without the required batch, ``bytes_in_flight`` at admission time plus
          every admitted batch (at the estimated size) stays under the high
          watermark; so the buffer exceeds the budget by at most one batch
          (the required one) when the estimate is not below the real size.
        * ``bytes_in_flight == sum(add) - sum(release) >= 0`` at all times.
        * No thread is started; psutil is read at most once per
          ``sample_interval`` (injected clock), never with the lock held.

    Args:
        budget: host bytes the loader may hold: an int, ``"4GiB"``/``"512MB"``,
            a fraction of available memory (``0.25`` or ``"25%"``), ``"auto"``
            (half of available memory) or ``None`` (unlimited). ``"auto"`` and
            fractions are divided among the local ranks.
        high_watermark: share of the budget above which admissions stop.
        low_watermark: share of the budget below which they resume.
        min_available: system available-memory floor; below it, throttle
            regardless of the budget. ``"auto"`` = 5% of total memory or
            512 MiB, whichever is smaller; a fraction means of total memory;
            ``None`` disables the floor.
        sample_interval: seconds (of ``clock``) between memory readings.
        clock: monotonic clock in seconds (injected in tests).
        memory_reader: returns a :class:`MemoryReading`; default psutil.
        local_world_size: ranks on this machine; default the
            ``LOCAL_WORLD_SIZE`` environment variable, or 1.
        device_budget: CUDA bytes (int, size string, or a fraction of device
            total memory); ``None`` = no device budget. Not divided among ranks
            (each rank has its own device).
        device_reader: returns ``(free, total)`` device bytes; default
            ``torch.cuda.mem_get_info`` (only used when ``device_budget`` is set).
        min_device_free: device free-memory floor, same forms as
            ``min_available`` (fraction of device total); only with a device budget.

    Raises:
        ValueError / TypeError: naming the argument, its value and what is allowed.

    Example::

        gov = MemoryGovernor("2GiB")
        if gov.admit(pending_batches=len(pending), required=not outstanding):
            start_batch()
        # in the worker, after collate:
        n = MemoryGovernor.nbytes_of(batch); gov.add(n); gov.observe_batch(n)
        # when the consumer takes it:
        gov.release(n)

    ``stats()`` keys: budget_bytes, high_watermark_bytes, low_watermark_bytes,
    bytes_in_flight, peak_bytes_in_flight, estimated_batch_bytes, throttled
    (0/1), throttle_events, throttled_s, low_memory (0/1), rss_bytes,
    peak_rss_bytes, available_bytes, total_bytes, min_available_bytes,
    effective_prefetch_scale (1 / divisor), device_budget_bytes,
    device_bytes_in_flight, device_peak_bytes_in_flight, device_free_bytes,
    device_total_bytes, min_device_free_bytes.
    """

    def __init__(
        self,
        budget: int | float | str | None = "auto",
        *,
        high_watermark: float = 0.9,
        low_watermark: float = 0.7,
        min_available: int | float | str | None = "auto",
        sample_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        memory_reader: Callable[[], MemoryReading] | None = None,
        local_world_size: int | None = None,
        device_budget: int | float | str | None = None,
        device_reader: Callable[[], tuple[int, int]] | None = None,
        min_device_free: int | float | str | None = "auto",
    ) -> None:
        for wname, w in (("high_watermark", high_watermark), ("low_watermark", low_watermark)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise TypeError(f"{wname}={w!r} must be a number with 0 < low_watermark < high_watermark <= 1")
        if not (0 < low_watermark < high_watermark <= 1):
            raise ValueError(
                f"high_watermark={high_watermark!r}, low_watermark={low_watermark!r}: "
                "must satisfy 0 < low_watermark < high_watermark <= 1"
            )
        if (
            isinstance(sample_interval, bool)
            or not isinstance(sample_interval, (int, float))
            or not math.isfinite(sample_interval)
            or sample_interval < 0
        ):
            raise ValueError(f"sample_interval={sample_interval!r} must be a number of seconds >= 0")
        if not callable(clock):
            raise TypeError(f"clock={clock!r} must be a callable returning seconds")
        if memory_reader is not None and not callable(memory_reader):
            raise TypeError(f"memory_reader={memory_reader!r} must be a callable returning a MemoryReading or None")
        if device_reader is not None and not callable(device_reader):
            raise TypeError(f"device_reader={device_reader!r} must be a callable returning (free, total) or None")

        self._clock = clock
        self._high = float(high_watermark)
        self._low = float(low_watermark)
        self._interval = float(sample_interval)
        self.local_world_size = _local_world_size(local_world_size)
        self._memory_reader: Callable[[], MemoryReading] = memory_reader or _PsutilReader()
        reading = self._read_host()

        # Host budget.
        if _is_auto(budget):
            self.budget_bytes: int | None = max(1, reading.available_bytes // 2 // self.local_world_size)
        else:
            parsed = _parse_or_auto(budget, "budget")
            if isinstance(parsed, float):
                parsed = max(1, int(parsed * reading.available_bytes) // self.local_world_size)
            self.budget_bytes = parsed
        self.min_available_bytes = _resolve_floor("min_available", min_available, reading.total_bytes)

        # Device budget: CUDA is touched only from here on, and only when asked for.
        self.device_budget_bytes: int | None = None
        self.min_device_free_bytes: int | None = None
        self._device_reader: Callable[[], tuple[int, int]] | None = None
        device_free = device_total = None
        if _is_auto(device_budget):
            raise ValueError(
                f"device_budget={device_budget!r} must be bytes as a positive int, a size string "
                "like '4GiB', a fraction of device memory in (0, 1], or None ('auto' is not supported)"
            )
        parsed_device = parse_size(device_budget, name="device_budget")
        if parsed_device is not None:
            if device_reader is None:
                if not torch.cuda.is_available():
                    raise ValueError(
                        f"device_budget={device_budget!r} needs a CUDA device "
                        "(torch.cuda.is_available() is False) or an explicit device_reader"
                    )
                device_reader = torch.cuda.mem_get_info
            self._device_reader = device_reader
            device_free, device_total = self._read_device()
            if isinstance(parsed_device, float):
                parsed_device = max(1, int(parsed_device * device_total))
            self.device_budget_bytes = parsed_device
            self.min_device_free_bytes = _resolve_floor("min_device_free", min_device_free, device_total)

        # _lock guards every attribute below. Held by add/release/observe (worker
        # threads), admit/effective_prefetch (consumer) and stats (any thread),
        # only for O(1) bookkeeping; never held while calling a reader, clock or callback.
        # Invariants under the lock:
        #   _bytes_in_flight == sum(add) - sum(release) >= 0, likewise for device;
        #   _peak >= _bytes_in_flight;
        #   _throttled == (_throttle_start is not None);
        #   total throttled time == _throttled_s + (now - _throttle_start if _throttled);
        #   _sampling is True for at most one thread, the one reading memory now.
        self._lock = threading.Lock()
        # Same lock: workers finishing a batch that would push the buffer past the budget
        # wait here (wait_for_room) until release() makes room or their batch becomes the
        # one the consumer needs next; release() and wake_waiters() (the consumer, when
        # the needed batch changes or the loader stops) notify. No callback ever runs
        # under this lock, so it is a leaf: nothing is acquired while holding it.
        self._room = threading.Condition(self._lock)
        # Counts release()/wake_waiters() calls (under _lock): a waiter that read it before
        # calling required() does not wait when it changed since, so no wake-up is lost.
        self._changes = 0
        self._bytes_in_flight = 0
        self._peak = 0
        self._device_bytes_in_flight = 0
        self._device_peak = 0
        self._recent: deque[int] = deque(maxlen=_ESTIMATE_WINDOW)
        self._estimate: int | None = None
        self._throttled = False
        self._throttle_start: float | None = None
        self._throttle_events = 0
        self._throttled_s = 0.0
        self._divisor = 1
        self._reading = reading
        self._peak_rss = reading.rss_bytes
        self._device_free = device_free
        self._device_total = device_total
        self._low_memory = self._is_low_memory(reading, device_free)
        self._last_sample = self._clock()
        self._sampling = False
        self._closed = False

    # ----------------------------------------------------------------- readers

    def _read_host(self) -> MemoryReading:
        reading = self._memory_reader()
        if not isinstance(reading, MemoryReading):
            raise TypeError(f"memory_reader returned {reading!r}; expected a MemoryReading")
        return reading

    def _read_device(self) -> tuple[int, int]:
        reader = self._device_reader
        if reader is None:  # pragma: no cover - callers check first
            raise RuntimeError("no device_reader configured")
        free, total = reader()
        return int(free), int(total)

    def _is_low_memory(self, reading: MemoryReading, device_free: int | None) -> bool:
        if self.min_available_bytes is not None and reading.available_bytes < self.min_available_bytes:
            return True
        return (
            device_free is not None
            and self.min_device_free_bytes is not None
            and device_free < self.min_device_free_bytes
        )

    def _maybe_sample(self, now: float) -> None:
        """Read host (and device) memory if ``sample_interval`` has passed.

        Exactly one thread reads at a time (``_sampling``), with the lock
        released, so a slow psutil call never blocks ``add``/``release``.
        Reader exceptions propagate to the caller (never swallowed).
        """
        with self._lock:
            if self._closed or self._sampling or now - self._last_sample < self._interval:
                return
            self._sampling = True
            self._last_sample = now
        try:
            reading = self._read_host()
            device_free = device_total = None
            if self._device_reader is not None:
                device_free, device_total = self._read_device()
        except BaseException:
            with self._lock:
                self._sampling = False
            raise
        with self._lock:
            self._sampling = False
            self._reading = reading
            self._peak_rss = max(self._peak_rss, reading.rss_bytes)
            if device_free is not None:
                self._device_free, self._device_total = device_free, device_total
            self._low_memory = self._is_low_memory(reading, device_free)
            self._adjust_prefetch_locked()

    def _adjust_prefetch_locked(self) -> None:
        """One multiplicative step of the prefetch divisor, per memory reading."""
        over = self._low_memory
        calm = not self._low_memory
        if self.budget_bytes is not None:
            over = over or self._bytes_in_flight > self.budget_bytes
            calm = calm and self._bytes_in_flight < self._low * self.budget_bytes
        if self.device_budget_bytes is not None:
            over = over or self._device_bytes_in_flight > self.device_budget_bytes
            calm = calm and self._device_bytes_in_flight < self._low * self.device_budget_bytes
        if over:
            self._divisor = min(self._divisor * 2, _MAX_DIVISOR)
        elif calm and self._divisor > 1:
            self._divisor //= 2

    # ---------------------------------------------------------- byte accounting

    def add(self, nbytes: int) -> None:
        """Record ``nbytes`` entering the loader's buffers (any thread)."""
        n = _check_count("nbytes", nbytes)
        with self._lock:
            self._bytes_in_flight += n
            if self._bytes_in_flight > self._peak:
                self._peak = self._bytes_in_flight

    def release(self, nbytes: int) -> None:
        """Record ``nbytes`` leaving the loader (handed to the consumer); any thread.

        Raises:
            ValueError: if more bytes are released than are in flight (a loader bug).
        """
        n = _check_count("nbytes", nbytes)
        with self._lock:
            if n > self._bytes_in_flight:
                raise ValueError(
                    f"nbytes={n!r} released but only {self._bytes_in_flight} bytes are in flight"
                )
            self._bytes_in_flight -= n
            self._changes += 1
            self._room.notify_all()

    def wait_for_room(self, nbytes: int, *, required: Callable[[], bool],
                      stop: threading.Event, poll: float = 0.1) -> None:
        """Block a worker until ``nbytes`` more fit in the budget, or the batch is required.

        Admission works on an estimate of the batch size; when batches grow, batches
        admitted at the old size would land in the buffer past the budget. The worker
        that finished such a batch waits here instead. It never deadlocks: the batch the
        consumer needs next is ``required()`` and passes at once, and workers always
        load the oldest unfinished batch first, so that batch completes.

        ``required`` is called without the governor's lock held (it may take other
        locks, e.g. the ready buffer's), after every wake-up: :meth:`release` and
        :meth:`wake_waiters` wake the waiters, and a wake-up that lands between a
        ``required()`` call and the wait is not lost. Waits also re-check at least
        every ``poll`` seconds (``stop`` is only seen then, or at a wake-up).
        """
        n = _check_count("nbytes", nbytes)
        budget = self.budget_bytes
        if budget is None:
            return
        with self._room:
            if self._has_room_locked(n, budget):
                return
            seen = self._changes
        while True:
            if stop.is_set() or required():  # outside the lock: no callback under it
                return
            with self._room:
                if self._changes == seen and not self._has_room_locked(n, budget):
                    self._room.wait(poll)  # woken by release()/wake_waiters(), or the poll
                if self._has_room_locked(n, budget):
                    return
                seen = self._changes

    def _has_room_locked(self, n: int, budget: int) -> bool:
        return self._bytes_in_flight + n <= budget or self._bytes_in_flight == 0

    def wake_waiters(self) -> None:
        """Wake the workers waiting in :meth:`wait_for_room` so they re-check ``required()``.

        The consumer calls it after the batch it needs next changed (the thread pool's
        ``set_needed`` does, through its ``on_needed`` hook) and when the loader stops.
        Any thread; never blocks for long.
        """
        with self._room:
            self._changes += 1
            self._room.notify_all()

    def add_device(self, nbytes: int) -> None:
        """Record ``nbytes`` staged onto the device by the loader (any thread)."""
        n = _check_count("nbytes", nbytes)
        with self._lock:
            self._device_bytes_in_flight += n
            if self._device_bytes_in_flight > self._device_peak:
                self._device_peak = self._device_bytes_in_flight

    def release_device(self, nbytes: int) -> None:
        """Record ``nbytes`` of device memory handed to the consumer (any thread).

        Raises:
            ValueError: if more bytes are released than are on the device.
        """
        n = _check_count("nbytes", nbytes)
        with self._lock:
            if n > self._device_bytes_in_flight:
                raise ValueError(
                    f"nbytes={n!r} released but only {self._device_bytes_in_flight} "
                    "device bytes are in flight"
                )
            self._device_bytes_in_flight -= n

    def observe_batch(self, nbytes: int) -> None:
        """Record the size of one completed batch; the estimate is the max of the last 16."""
        n = _check_count("nbytes", nbytes)
        with self._lock:
            self._recent.append(n)
            self._estimate = max(self._recent)

    @property
    def bytes_in_flight(self) -> int:
        with self._lock:
            return self._bytes_in_flight

    @property
    def throttled(self) -> bool:
        with self._lock:
            return self._throttled

    # --------------------------------------------------------------- decisions

    def admit(self, *, pending_batches: int, required: bool) -> bool:
        """May the consumer start one more batch?

        Args:
            pending_batches: batches admitted but not yet collated (their bytes
                are not in ``add`` yet).
            required: ``True`` for the batch the consumer needs next; always admitted.

        Returns:
            ``True`` to start the batch, ``False`` to wait (backpressure).

        Before any batch has been observed, nothing beyond the required batch is
        admitted when a host or device budget is set (its size is unknown).
        Refusals for that reason are not counted as throttling.
        """
        pending = _check_count("pending_batches", pending_batches, "count of batches")
        now = self._clock()
        self._maybe_sample(now)
        with self._lock:
            if required:
                return True
            budgeted = self.budget_bytes is not None or self.device_budget_bytes is not None
            if budgeted and self._estimate is None:
                return False
            ok = not self._low_memory
            if ok and self.budget_bytes is not None:
                projected = self._bytes_in_flight + (pending + 1) * self._estimate
                ok = self._fits(projected, self.budget_bytes)
            if ok and self.device_budget_bytes is not None:
                # The device stage's depth is bounded by the stream scheduler, so
                # host-side pending batches do not all land on the device; what
                # must fit is the next staged batch.
                projected = self._device_bytes_in_flight + self._estimate
                ok = self._fits(projected, self.device_budget_bytes)
            if ok:
                if self._throttled:
                    self._throttled_s += now - self._throttle_start
                    self._throttled = False
                    self._throttle_start = None
                return True
            if not self._throttled:
                self._throttled = True
                self._throttle_start = now
                self._throttle_events += 1
            return False

    def _fits(self, projected: int, budget: int) -> bool:
        # Hysteresis: enter throttling above the high watermark, leave it only
        # once the projection is strictly below the low watermark.
        if self._throttled:
            return projected < self._low * budget
        return projected <= self._high * budget

    def effective_prefetch(self, configured: int) -> int:
        """Prefetch depth to use now: ``configured`` divided while under pressure.

        On each memory reading (every ``sample_interval``) that finds the loader
        over its hard budget, or host/device memory below its floor, the depth
        halves (floor 1); on each reading that finds it below the low watermark
        with memory to spare, it doubles back, up to ``configured``.

        Raises:
            ValueError: if ``configured`` is not a positive int.
        """
        if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
            raise ValueError(f"configured={configured!r} must be a positive int")
        self._maybe_sample(self._clock())
        with self._lock:
            # Halving below depth 1 is meaningless; clamping the divisor there
            # lets recovery start at the first calm reading after a long squeeze.
            self._divisor = min(self._divisor, 1 << (configured.bit_length() - 1))
            return max(1, configured // self._divisor)

    def stats(self) -> dict[str, float | int | None]:
        """A snapshot of the governor's gauges and counters (keys in the class docstring)."""
        now = self._clock()
        self._maybe_sample(now)
        with self._lock:
            throttled_s = self._throttled_s
            if self._throttle_start is not None:
                throttled_s += now - self._throttle_start
            budget = self.budget_bytes
            return {
                "budget_bytes": budget,
                "high_watermark_bytes": None if budget is None else int(self._high * budget),
                "low_watermark_bytes": None if budget is None else int(self._low * budget),
                "bytes_in_flight": self._bytes_in_flight,
                "peak_bytes_in_flight": self._peak,
                "estimated_batch_bytes": self._estimate,
                "throttled": int(self._throttled),
                "throttle_events": self._throttle_events,
                "throttled_s": throttled_s,
                "low_memory": int(self._low_memory),
                "rss_bytes": self._reading.rss_bytes,
                "peak_rss_bytes": self._peak_rss,
                "available_bytes": self._reading.available_bytes,
                "total_bytes": self._reading.total_bytes,
                "min_available_bytes": self.min_available_bytes,
                "effective_prefetch_scale": 1.0 / self._divisor,
                "device_budget_bytes": self.device_budget_bytes,
                "device_bytes_in_flight": self._device_bytes_in_flight,
                "device_peak_bytes_in_flight": self._device_peak,
                "device_free_bytes": self._device_free,
                "device_total_bytes": self._device_total,
                "min_device_free_bytes": self.min_device_free_bytes,
            }

    def close(self) -> None:
        """Stop reading memory. Idempotent; there is no thread to stop or join."""
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return (
            f"MemoryGovernor(budget_bytes={self.budget_bytes}, "
            f"device_budget_bytes={self.device_budget_bytes}, "
            f"high_watermark={self._high}, low_watermark={self._low})"
        )

    # ------------------------------------------------------------------ sizing

    @staticmethod
    def nbytes_of(obj: object) -> int:
        """Bytes of the tensors and arrays inside ``obj``.

        Walks dicts (values), lists, tuples (namedtuples included), sets and
        dataclass instances; counts ``torch.Tensor`` (``numel * element_size``,
        indices + values for sparse COO), ``np.ndarray``/numpy scalars
        (``nbytes``), and ``bytes``/``bytearray``/``memoryview`` (their length).
        Anything else counts 0. Each object is counted once, however often it is
        referenced, and cycles are safe.

        Example::

            >>> MemoryGovernor.nbytes_of({"x": np.zeros(4, np.float32), "y": [b"ab"]})
            18
        """
        total = 0
        seen: set[int] = set()
        stack: list[Any] = [obj]
        while stack:
            o = stack.pop()
            if o is None or isinstance(o, (str, int, float, bool)):
                continue
            if id(o) in seen:
                continue
            seen.add(id(o))
            if isinstance(o, torch.Tensor):
                if o.layout == torch.sparse_coo:
                    stack.append(o._indices())
                    stack.append(o._values())
                else:
                    total += o.numel() * o.element_size()
            elif isinstance(o, (np.ndarray, np.generic)):
                total += int(o.nbytes)
            elif isinstance(o, (bytes, bytearray)):
                total += len(o)
            elif isinstance(o, memoryview):
                total += o.nbytes
            elif isinstance(o, Mapping):
                stack.extend(o.values())
            elif isinstance(o, (list, tuple, set, frozenset, deque)):
                stack.extend(o)
            elif dataclasses.is_dataclass(o) and not isinstance(o, type):
                stack.extend(getattr(o, f.name) for f in dataclasses.fields(o))
        return total
