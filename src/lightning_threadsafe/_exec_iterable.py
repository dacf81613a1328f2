"""Iterable-style datasets: one producer, batched in order.

Samples of an iterable dataset come from one Python iterator, which cannot be
shared between threads safely, so they are produced by one thread: the caller
with ``num_workers=0``, else one worker thread (``lts-worker-0``) that runs
``worker_init_fn(0)``, iterates the dataset, collates, and keeps up to
``prefetch_factor`` batches ready ahead of the consumer. Unlike torch's worker
*processes*, which each iterate their own copy of the dataset, every sample is
produced once. Resume skips the batches already delivered by re-iterating the
dataset (the dataset must be deterministic for exact resume).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from lightning_threadsafe._epoch import BaseIterator, EpochSpec, LoaderTimeout
from lightning_threadsafe._worker import POLL_S
from lightning_threadsafe.errors import SampleLoadError
from lightning_threadsafe.telemetry import WorkerStats

__all__ = ["IterableIterator"]

T = TypeVar("T")

_END = ("end",)


def _read_batch(spec: EpochSpec, it: Iterator[Any], stats: WorkerStats,
                ordinal: int) -> list[Any] | None:
    """The next batch's samples (``None`` at the end of the data)."""
    n = spec.batch_size or 1
    out: list[Any] = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            v = next(it)
        except StopIteration:
            break
        except Exception as exc:
            raise SampleLoadError(
                f"iterable dataset raised while producing batch {ordinal}: {exc!r}",
                batch_ordinal=ordinal,
            ) from exc
        finally:
            stats.fetch_wall_s += time.perf_counter() - t0
        stats.samples += 1
        out.append(v)
    if not out or (spec.drop_last and len(out) < n):
        return None
    return out


def _collate(spec: EpochSpec, values: list[Any], stats: WorkerStats, ordinal: int) -> Any:
    t0 = time.perf_counter()
    try:
        batch = spec.collate(values)
    except Exception as exc:
        raise SampleLoadError(f"collate_fn failed for batch {ordinal}: {exc!r}",
                              batch_ordinal=ordinal) from exc
    stats.collate_s += time.perf_counter() - t0
    return batch


def _start(spec: EpochSpec) -> Iterator[Any]:
    set_epoch = getattr(spec.dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(spec.epoch)
    return iter(spec.dataset)


def _produce(spec: EpochSpec, out: queue.Queue[tuple[Any, ...]], stop: threading.Event,
             skip: int, stats: WorkerStats) -> None:
    """The producer thread: holds the spec, its queue and stop event, never the iterator."""

    def put(item: tuple[Any, ...]) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        init = spec.worker_init.for_threads()
        if init is not None:
            init(0)
        it = _start(spec)
        ordinal = 0
        while ordinal < skip and _read_batch(spec, it, stats, ordinal) is not None:
            ordinal += 1
        while not stop.is_set():
            try:
                values = _read_batch(spec, it, stats, ordinal)
                if values is None:
                    put(_END)
                    return
                item: tuple[Any, ...] = ("batch", ordinal, _collate(spec, values, stats, ordinal),
                                         len(values))
            except SampleLoadError as exc:
                item = ("error", ordinal, exc)
            if not put(item):
                return
            ordinal += 1
    except BaseException as exc:  # worker_init_fn or iter(dataset): the epoch cannot start
        err = SampleLoadError(f"worker thread {stats.name} failed: {exc!r}")
        err.__cause__ = exc
        put(("error", None, err))
    finally:
        spec.services.telemetry.retire(stats)
        with contextlib.suppress(Exception):
            spec.services.on_worker_exit()


def _stop_producer(stop: threading.Event, thread: threading.Thread, timeout: float) -> None:
    stop.set()
    if thread is not threading.current_thread():
        thread.join(timeout)


class IterableIterator(BaseIterator[T]):
    """One epoch of an iterable-style dataset, produced inline or by one worker thread."""

    def __init__(self, spec: EpochSpec, resume: dict[str, Any] | None) -> None:
        delivered = list(resume["delivered"]) if resume else []
        super().__init__(spec, delivered, None)
        self._ordinal = len(delivered)
        self._thread: threading.Thread | None = None
        self._finalizer: Callable[[], Any] | None = None
        if spec.num_workers == 0:
            self._stats: WorkerStats | None = self._telemetry.register("lts-inline")
            self._it = _start(spec)
            for ordinal in range(len(delivered)):
                if _read_batch(spec, self._it, self._stats, ordinal) is None:
                    break
            return
        self._stats = None
        # Batches produced ahead of the consumer (producer puts, consumer takes; both
        # with a timeout that re-checks `_stop`).
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(
            maxsize=spec.settings.prefetch())
        # Set by close() or the finalizer; the producer checks it between batches.
        self._stop = threading.Event()
        stats = self._telemetry.register("lts-worker-0")
        self._thread = threading.Thread(
            target=_produce, args=(spec, self._queue, self._stop, len(delivered), stats),
            name=stats.name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_producer, self._stop, self._thread, 10.0)

    def _next_item(self, entered: float) -> Any:
        batch = self._next_inline() if self._thread is None else self._next_produced(entered)
        reported = self.spec.reported_length
        if reported is not None and len(self._delivered) > reported:
            warnings.warn(  # torch's words: its users search for them
                f"Length of IterableDataset {self.spec.dataset} was reported to be {reported} "
                f"(when accessing len(dataloader)), but {len(self._delivered)} samples have "
                "been fetched. ", stacklevel=3)
        return batch

    def _next_produced(self, entered: float) -> Any:
        deadline = entered + self.spec.timeout if self.spec.timeout > 0 else None
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the iterable dataset's producer thread ended without "
                                       "finishing the epoch") from None
                if deadline is not None and time.perf_counter() > deadline:
                    raise LoaderTimeout(
                        f"DataLoader timed out after {self.spec.timeout} seconds") from None
        if item is _END:
            raise StopIteration
        kind, ordinal = item[0], item[1]
        if kind == "error":
            if ordinal is not None:
                self._delivered.append(ordinal)
            raise item[2]
        self._delivered.append(ordinal)
        self._telemetry.delivered += item[3]
        return item[2]

    def _next_inline(self) -> Any:
        assert self._stats is not None
        ordinal = self._ordinal
        self._ordinal += 1
        values = _read_batch(self.spec, self._it, self._stats, ordinal)
        if values is None:
            raise StopIteration
        batch = _collate(self.spec, values, self._stats, ordinal)
        self._delivered.append(ordinal)
        self._telemetry.delivered += len(values)
        return batch

    def _shutdown(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        if self._stats is not None:
            self._telemetry.retire(self._stats)
            self._stats = None
