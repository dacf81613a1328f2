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
import pickle
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from lightning_threadsafe._epoch import EMPTY, BaseIterator, Empty, EpochSpec
from lightning_threadsafe._fetch import FetchPolicy, Skipped, load_sample
from lightning_threadsafe.errors import LoaderStallError, SampleLoadError
from lightning_threadsafe.telemetry import WorkerStats

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
            return _Failure(str(err), index, err.attempts, tb, _pickled(cause))
        return _Loaded(value, stats.fetch_wall_s, stats.fetch_cpu_s, stats.retries, stats.errors)


class _Loaded:
    __slots__ = ("cpu", "errors", "retries", "value", "wall")

    def __init__(self, value: Any, wall: float, cpu: float, retries: int, errors: int) -> None:
        self.value, self.wall, self.cpu, self.retries, self.errors = value, wall, cpu, retries, errors


class _Failure:
    __slots__ = ("attempts", "cause", "index", "message", "traceback")

    def __init__(self, message: str, index: Any, attempts: int, traceback: str,
                 cause: bytes | None = None) -> None:
        self.message, self.index, self.attempts, self.traceback = message, index, attempts, traceback
        self.cause = cause  # the original exception, pickled (None when it cannot be)

    def original(self) -> BaseException:
        """The worker's exception (its type and args), with the remote traceback chained."""
        remote = _RemoteTraceback(f"\n{self.traceback}")
        if self.cause is not None:
            try:
                exc = pickle.loads(self.cause)
            except Exception:
                exc = None
            if isinstance(exc, BaseException):
                exc.__cause__ = remote
                return exc
        return remote


def _pickled(exc: BaseException | None) -> bytes | None:
    if exc is None:
        return None
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # an exception whose __init__ takes other args fails here
    except Exception:
        return None
    return blob


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
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    _pickled(exc)))
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

    def __init__(self, spec: EpochSpec, source: Iterator[tuple[int, list[Any]]],
                 resumed: list[int], generator_state: list[int] | None) -> None:
        super().__init__(spec, resumed, generator_state)
        keyed = [
            [(spec.epoch, ordinal, index, list(indices)) for index in indices]
            for ordinal, indices in source
        ]
        stall = spec.stall_timeout
        timeout = spec.timeout if spec.timeout > 0 else (stall or 0)
        timeout = min(timeout, 2_000_000.0)  # poll() takes int milliseconds (< 2**31)
        self._stall_timeout = stall if spec.timeout == 0 else None
        self._dl = torch.utils.data.DataLoader(
            _KeyedDataset(_ProcessDataset(spec.dataset, spec.policy)),
            batch_sampler=keyed,
            num_workers=spec.num_workers,
            collate_fn=_ProcessCollate(spec.collate_fn, spec.auto_collation),
            pin_memory=spec.pin,
            timeout=timeout,
            worker_init_fn=spec.worker_init.fn,
            multiprocessing_context=spec.multiprocessing_context,
            prefetch_factor=spec.settings.prefetch(),
            persistent_workers=False,
            in_order=spec.in_order,
        )
        self._it: Any = iter(self._dl)
        self._stats: WorkerStats | None = self._telemetry.register("lts-process")
        self._finalizer = weakref.finalize(self, _shutdown_torch_iter, self._it)

    def _next_item(self, entered: float) -> Any:
        try:
            d = next(self._it)  # StopIteration ends the epoch
        except RuntimeError as exc:
            # torch raises its timeout (which is our stall_timeout when the user set none)
            # as a plain RuntimeError in _get_data: known by where it was raised.
            if self._stall_timeout and _raised_in(exc, "_get_data"):
                raise LoaderStallError(
                    f"no batch arrived from the worker processes for {self._stall_timeout}s "
                    "(stall_timeout); process workers' stacks are not available in the "
                    "consumer -- use executor='thread' to see them",
                    stall_timeout=self._stall_timeout,
                ) from exc
            raise
        s = self._stats
        assert s is not None
        s.fetch_wall_s += d.wall
        s.fetch_cpu_s += d.cpu
        s.samples += d.samples
        s.collate_s += d.collate
        s.retries += d.retries
        s.errors += d.errors
        self._delivered.append(d.ordinal)
        if d.failure is not None:
            f = d.failure
            err = SampleLoadError(f.message, index=f.index, batch_indices=d.indices,
                                  batch_ordinal=d.ordinal, attempts=f.attempts)
            raise err from f.original()
        for sk in d.skipped:
            s.skipped += 1
            self._services.record_error(index=sk.index, batch=d.ordinal, error=sk.error,
                                        action="skipped", attempts=sk.attempts)
        self._telemetry.delivered += d.samples
        if isinstance(d.batch, Empty):
            return EMPTY
        batch = d.batch
        stager = self.spec.stager
        if stager is not None:
            t0 = time.perf_counter()
            batch = stager.stage_and_handoff(batch)
            s.transfer_s += time.perf_counter() - t0
        return batch

    def _shutdown(self) -> None:
        self._finalizer()
        if self._stats is not None:
            self._telemetry.retire(self._stats)
            self._stats = None


def _raised_in(exc: BaseException, function: str) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return code.co_name == function and code.co_filename == torch.utils.data.dataloader.__file__


def _shutdown_torch_iter(it: Any) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        with contextlib.suppress(Exception):
            shutdown()
