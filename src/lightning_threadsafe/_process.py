"""The process executor: torch's own multiprocessing DataLoader over our batch plan.

Nothing here writes a process pool: ``torch.utils.data.DataLoader`` runs the
workers. We give it a batch sampler of ``(epoch, ordinal, index)`` keys, a
dataset wrapper that loads each key with the same sample seeding and error
policy as the thread executor, and a collate wrapper that carries the batch's
ordinal, per-sample timings, skips and failures back as data -- so a failure
names its index and keeps its original traceback text.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lightning_threadsafe._fetch import FetchPolicy, Skipped, load_sample
from lightning_threadsafe._iterators import EMPTY, BaseIterator, Empty
from lightning_threadsafe.errors import LoaderStallError, SampleLoadError
from lightning_threadsafe.telemetry import WorkerStats

if TYPE_CHECKING:
    from lightning_threadsafe.loader import ThreadedDataLoader

__all__ = ["ProcessIterator"]

T = TypeVar("T")


class _ProcessDataset(torch.utils.data.Dataset):
    """Runs in torch's worker processes: loads ``(epoch, ordinal, index)`` keys with our policy.

    Failures come back as data (never raised), so the consumer can name the index
    and keep the original traceback text.
    """

    def __init__(self, dataset: Any, policy: FetchPolicy) -> None:
        self.dataset = dataset
        self.policy = policy

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, Any, list[Any]]) -> Any:
        epoch, ordinal, index, batch_indices = key
        stats = WorkerStats("process")
        try:
            value = load_sample(self.dataset, index, epoch=epoch, policy=self.policy, stats=stats,
                                batch_indices=batch_indices, ordinal=ordinal)
        except SampleLoadError as err:
            import traceback

            cause = err.__cause__
            tb = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)) \
                if cause is not None else ""
            return _Failure(str(err), index, err.attempts, tb)
        return _Loaded(value, stats.fetch_wall_s, stats.fetch_cpu_s, stats.retries, stats.errors)


class _Loaded:
    __slots__ = ("cpu", "errors", "retries", "value", "wall")

    def __init__(self, value: Any, wall: float, cpu: float, retries: int, errors: int) -> None:
        self.value, self.wall, self.cpu, self.retries, self.errors = value, wall, cpu, retries, errors


class _Failure:
    __slots__ = ("attempts", "index", "message", "traceback")

    def __init__(self, message: str, index: Any, attempts: int, traceback: str) -> None:
        self.message, self.index, self.attempts, self.traceback = message, index, attempts, traceback


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (as text)."""


class _Delivered:
    """A batch from a process worker with its ordinal and per-sample bookkeeping."""

    def __init__(self, ordinal: int, indices: list[Any], batch: Any = None,
                 failure: _Failure | None = None, skipped: list[Skipped] | None = None,
                 wall: float = 0.0, cpu: float = 0.0, collate: float = 0.0, samples: int = 0,
                 retries: int = 0, errors: int = 0) -> None:
        self.ordinal, self.indices, self.batch, self.failure = ordinal, indices, batch, failure
        self.skipped = skipped or []
        self.wall, self.cpu, self.collate, self.samples = wall, cpu, collate, samples
        self.retries, self.errors = retries, errors

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by the worker's queue feeder thread, where an error would only be
        # printed and the batch lost: pickle the batch here and ship a failure instead.
        from multiprocessing.reduction import ForkingPickler

        fields = (self.ordinal, self.indices, None, self.failure, self.skipped, self.wall, self.cpu,
                  self.collate, self.samples, self.retries, self.errors)
        try:
            blob = bytes(ForkingPickler.dumps(self.batch))
        except Exception as exc:
            import traceback

            failure = _Failure(
                f"collate_fn's result for batch {self.ordinal} (indices {self.indices}) cannot be "
                f"pickled to leave the worker process: {exc!r}", None, 1,
                "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            return (_rebuild_delivered, ((*fields[:3], failure, *fields[4:]), None))
        return (_rebuild_delivered, (fields, blob))

    def pin_memory(self) -> _Delivered:  # called by torch's pin-memory thread
        if self.batch is not None:
            self.batch = torch.utils.data._utils.pin_memory.pin_memory(self.batch)
        return self


def _rebuild_delivered(fields: tuple[Any, ...], blob: bytes | None) -> _Delivered:
    from multiprocessing.reduction import ForkingPickler

    d = _Delivered(*fields)
    if blob is not None:
        d.batch = ForkingPickler.loads(blob)
    return d


class _ProcessCollate:
    def __init__(self, collate_fn: Callable[[list[Any]], Any], auto: bool) -> None:
        self.collate_fn, self.auto = collate_fn, auto

    def __call__(self, items: list[Any]) -> _Delivered:
        # items: list of (key, result) produced by _ProcessDataset for one batch
        ordinal = items[0][0][1]
        indices = [k[2] for k, _ in items]
        values, skipped = [], []
        wall = cpu = 0.0
        retries = errors = 0
        for _, r in items:
            if isinstance(r, _Failure):
                return _Delivered(ordinal, indices, failure=r)
            wall += r.wall
            cpu += r.cpu
            retries += r.retries
            errors += r.errors
            if isinstance(r.value, Skipped):
                skipped.append(r.value)
            else:
                values.append(r.value)
        t0 = time.perf_counter()
        batch: Any = EMPTY
        if values:
            try:
                batch = self.collate_fn(values) if self.auto else self.collate_fn(values[0])
            except Exception as exc:
                import traceback

                return _Delivered(ordinal, indices, failure=_Failure(
                    f"collate_fn failed for batch {ordinal} (indices {indices}): {exc!r}", None, 1,
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
        return _Delivered(ordinal, indices, batch=batch, skipped=skipped, wall=wall, cpu=cpu,
                          collate=time.perf_counter() - t0, samples=len(values), retries=retries,
                          errors=errors)


class _KeyedDataset(torch.utils.data.Dataset):
    """Pairs each key with its result so the collate sees the ordinal and indices."""

    def __init__(self, inner: _ProcessDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: Any) -> Any:
        return key, self.inner[key]


class ProcessIterator(BaseIterator[T]):
    """One epoch with torch's multiprocessing DataLoader over the same batch plan."""

    def __init__(self, loader: ThreadedDataLoader[T], epoch: int,
                 source: Iterator[tuple[int, list[Any]]], resumed: list[int],
                 generator_state: list[int] | None) -> None:
        super().__init__(loader, epoch, resumed, generator_state)
        keyed = [
            [(epoch, ordinal, index, list(indices)) for index in indices]
            for ordinal, indices in source
        ]
        settings = loader._settings
        stall = loader.stall_timeout
        timeout = loader.timeout if loader.timeout > 0 else (stall or 0)
        timeout = min(timeout, 2_000_000.0)  # poll() takes int milliseconds (< 2**31)
        self._stall_timeout = stall if loader.timeout == 0 else None
        self._dl = torch.utils.data.DataLoader(
            _KeyedDataset(_ProcessDataset(loader.dataset, loader._policy)),
            batch_sampler=keyed,
            num_workers=int(settings["num_workers"]),
            collate_fn=_ProcessCollate(loader.collate_fn, loader._auto_collation),
            pin_memory=loader._pin,
            timeout=timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=int(settings["prefetch_factor"]),
            persistent_workers=False,
            in_order=loader.in_order,
        )
        self._it: Any = iter(self._dl)
        self._stats = self._telemetry.register("lts-process")
        self._stager = loader._stager_for_use()
        self._finalizer = weakref.finalize(self, _shutdown_torch_iter, self._it)

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        entered = self._enter()
        loader = self._loader_ref()
        while True:
            try:
                d = next(self._it)
            except StopIteration:
                self._finish(clean=True)
                raise
            except RuntimeError as exc:
                self._finish(clean=False)
                if self._stall_timeout and "timed out" in str(exc):
                    raise LoaderStallError(
                        f"no batch arrived from the worker processes for {self._stall_timeout}s "
                        "(stall_timeout); process workers' stacks are not available in the "
                        "consumer -- use executor='thread' to see them",
                        stall_timeout=self._stall_timeout,
                    ) from exc
                raise
            except BaseException:
                self._finish(clean=False)
                raise
            s = self._stats
            s.fetch_wall_s += d.wall
            s.fetch_cpu_s += d.cpu
            s.samples += d.samples
            s.collate_s += d.collate
            s.retries += d.retries
            s.errors += d.errors
            if d.failure is not None:
                f = d.failure
                self._manager.record_error(index=f.index, batch=d.ordinal, error=f.message,
                                           action="raised", attempts=f.attempts)
                self._finish(clean=False)
                err = SampleLoadError(f.message, index=f.index, batch_indices=d.indices,
                                      batch_ordinal=d.ordinal, attempts=f.attempts)
                raise err from _RemoteTraceback(f"\n{f.traceback}")
            for sk in d.skipped:
                s.skipped += 1
                self._manager.record_error(index=sk.index, batch=d.ordinal, error=sk.error,
                                           action="skipped", attempts=sk.attempts)
            self._delivered.append(d.ordinal)
            self._telemetry.delivered += d.samples
            if isinstance(d.batch, Empty):
                continue
            batch = d.batch
            if self._stager is not None and loader is not None:
                t0 = time.perf_counter()
                batch = self._stager.stage_and_handoff(batch)
                s.transfer_s += time.perf_counter() - t0
            self._exit(entered)
            return batch

    def close(self) -> None:
        self._rewind_if_unstarted()
        self._finished = True
        self._finalizer()
        if self._stats is not None:
            self._telemetry.retire(self._stats)
            self._stats = None  # type: ignore[assignment]


def _shutdown_torch_iter(it: Any) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        with contextlib.suppress(Exception):
            shutdown()


