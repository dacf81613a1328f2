"""One epoch's immutable spec, the hooks back to the loader, and the base iterator.

Ownership (the rule every executor follows; see docs/CONTRIBUTING.md):

- an iterator holds its :class:`EpochSpec` strongly: the dataset, collate, policy,
  plan, stager, services and a settings cell -- everything its epoch needs, so the
  epoch is delivered whole whether or not anybody still holds the loader;
- the loader holds its iterators weakly (a ``WeakSet``), so several live
  iterators of one loader each deliver their own epoch, and an abandoned one is
  collected;
- worker threads hold the pool and the spec, never the iterator, so collecting
  an iterator runs its finalizer, which stops its threads.

The spec reaches the loader only through :class:`LoaderHooks`, a weak link used
for notifications that cannot change what the epoch delivers (the loader's epoch
counter). Nothing here ends an epoch because an object was collected.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from weakref import ref

import torch

from lightning_threadsafe._fetch import FetchPolicy, Skipped
from lightning_threadsafe.errors import SampleLoadError, as_raised
from lightning_threadsafe.memory import MemoryGovernor
from lightning_threadsafe.sampler import BatchPlan

if TYPE_CHECKING:
    from lightning_threadsafe._worker import BatchState
    from lightning_threadsafe.manager import ThreadSafetyManager
    from lightning_threadsafe.telemetry import WorkerStats

__all__ = [
    "EMPTY",
    "BaseIterator",
    "Empty",
    "EpochSpec",
    "LiveSettings",
    "LoaderHooks",
    "LoaderTimeout",
    "WorkerInit",
    "batch_source",
    "finish_batch",
]

T = TypeVar("T")


class Empty:
    """Payload of a batch whose every sample was skipped: counted as delivered, not yielded."""


EMPTY = Empty()


class LoaderTimeout(RuntimeError):
    """``timeout`` elapsed without a batch (torch's ``RuntimeError`` and message).

    A class of its own so the loader recognises it by type, never by its words.
    """


class LiveSettings:
    """The tunable knobs, shared by a loader and its iterators (not by worker threads).

    ``values``: ``num_workers``, ``prefetch_factor``, ``executor`` (``"auto"`` until
    resolved; ``prefetch_factor`` is ``None`` without workers, as in torch). ``probe``: the online probe's result, once there is one. Written and
    read on the consumer thread (the training loop, where the tuner and the probe's
    decision are applied); an epoch snapshots ``num_workers`` and ``executor`` when it
    starts, while a new ``prefetch_factor`` takes effect at the next admission.
    """

    def __init__(self, num_workers: int | str, prefetch_factor: int | str, executor: str) -> None:
        self.values: dict[str, Any] = {
            "num_workers": num_workers, "prefetch_factor": prefetch_factor, "executor": executor,
        }
        self.probe: dict[str, Any] | None = None

    def needs_probe(self) -> bool:
        return "auto" in self.values.values()

    def apply_probe(self, result: dict[str, Any]) -> None:
        """Resolve the knobs still ``"auto"`` from a probe result (explicit ones stay)."""
        self.probe = result
        s = self.values
        if s["executor"] == "auto":
            s["executor"] = result["executor"]
        if s["num_workers"] == "auto":
            s["num_workers"] = int(result["num_workers"])
        if s["prefetch_factor"] == "auto":
            s["prefetch_factor"] = int(result["prefetch"])

    def prefetch(self) -> int:
        """The prefetch factor in force (torch's default 2 while unset or ``"auto"``)."""
        pf = self.values["prefetch_factor"]
        return 2 if pf in ("auto", None) else int(pf)

    def depth(self, governor: MemoryGovernor | None, workers: int | None = None) -> int:
        """Batches admitted ahead: prefetch x workers, within the memory budget.

        ``workers``: the live pool size while the online probe runs (settings may
        still say ``"auto"``; an unresolved prefetch counts as torch's default 2).
        """
        nw = self.values["num_workers"] if workers is None else workers
        if nw == "auto" or (self.values["prefetch_factor"] == "auto" and workers is None):
            return 0
        depth = max(1, self.prefetch() * max(1, int(nw)))
        return governor.effective_prefetch(depth) if governor is not None else depth


class WorkerInit:
    """Calls the user's ``worker_init_fn`` in a worker, once per id while workers persist.

    With ``persistent_workers=True`` torch runs ``worker_init_fn(i)`` once per worker
    for the loader's lifetime; thread pools live for one epoch, so the ids already
    initialised are remembered here (one object per loader). ``_lock`` guards
    ``_done``; workers of one pool call concurrently.
    """

    def __init__(self, fn: Callable[[int], None] | None, *, persistent: bool) -> None:
        self.fn = fn
        self.persistent = persistent
        self._done: set[int] = set()
        self._lock = threading.Lock()

    def __call__(self, worker_id: int) -> None:
        if self.fn is None:
            return
        if self.persistent:
            with self._lock:
                if worker_id in self._done:
                    return
                self._done.add(worker_id)
        self.fn(worker_id)

    def for_threads(self) -> Callable[[int], None] | None:
        """What worker *threads* run.

        Lightning (``seed_everything(workers=True)``) installs ``pl_worker_init_function``
        on any loader with a ``worker_init_fn`` slot. It reseeds the *global* RNGs from
        per-process seeds, which in threads is wrong (threads share the global RNG) and
        crashes (its seed arithmetic assumes a worker process). Per-sample seeding
        (``sample_rng()``) replaces it, so threads skip it; processes still run it.
        """
        target = getattr(self.fn, "func", self.fn)
        if self.fn is None or getattr(target, "__name__", "") == "pl_worker_init_function":
            return None
        return self


class LoaderHooks:
    """The weak link from an epoch back to its loader, for notifications only.

    If the loader is gone nobody can read its epoch counter, so dropping the
    notification changes nothing an iterator delivers.
    """

    def __init__(self, loader: Any) -> None:
        self._loader: Callable[[], Any] = ref(loader) if loader is not None else (lambda: None)

    def epoch_started(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader._epoch_started(epoch)


@dataclass(frozen=True)
class EpochSpec:
    """Everything one epoch needs, fixed when its iterator is created.

    ``settings`` is the loader's live cell (the tuner may change the prefetch depth
    mid-epoch); ``num_workers``/``executor`` are this epoch's snapshot of it.
    """

    dataset: Any
    epoch: int
    collate_fn: Callable[[Any], Any]
    auto_collation: bool
    batch_size: int | None
    drop_last: bool
    policy: FetchPolicy
    plan: BatchPlan
    in_order: bool
    timeout: float
    pin: bool
    stager: Any
    services: ThreadSafetyManager
    settings: LiveSettings
    num_workers: int
    executor: str
    worker_init: WorkerInit
    multiprocessing_context: Any
    stall_timeout: float | None
    hooks: LoaderHooks
    length: int | None  # batches in this epoch on this rank; None when unknowable
    reported_length: int | None = None  # len(loader) as a caller saw it (iterable datasets)

    def collate(self, values: list[Any]) -> Any:
        return self.collate_fn(values) if self.auto_collation else self.collate_fn(values[0])


def batch_source(plan: BatchPlan, epoch: int, skip: set[int],
                 shuffle_seed: int | None) -> Iterator[tuple[int, list[Any]]]:
    """``(ordinal, indices)`` of the epoch's batches, without those in ``skip`` (a resume)."""
    for ordinal, indices in enumerate(plan.batches(epoch, shuffle_seed=shuffle_seed)):
        if ordinal not in skip:
            yield ordinal, indices


def finish_batch(spec: EpochSpec, batch: BatchState, stats: WorkerStats | None, *,
                 account: bool = True, gate: Callable[[BatchState], None] | None = None) -> None:
    """Collate (+ pin, + stage) a completed batch in place; records skipped samples.

    ``gate(batch)`` (worker threads) blocks until the batch fits in the memory budget
    or is the one the consumer needs next, before its bytes enter the ready buffer.
    ``account=False``: the batch is handed over at once (inline), nothing is held.

    Raises:
        SampleLoadError: collate, pin or staging failed (the cause chained).
    """
    services = spec.services
    values = []
    for v in batch.results:
        if isinstance(v, Skipped):
            services.record_error(index=v.index, batch=batch.ordinal, error=v.error,
                                  action="skipped", attempts=v.attempts)
        else:
            values.append(v)
    batch.results = []  # drop sample references early
    batch.samples = len(values)
    if not values:
        batch.payload = EMPTY
        return
    t0 = time.perf_counter()
    try:
        payload = spec.collate(values)
    except Exception as exc:
        raise SampleLoadError(
            f"collate_fn failed for batch {batch.ordinal} (indices {batch.indices}): {exc!r}",
            index=None, batch_indices=batch.indices, batch_ordinal=batch.ordinal,
        ) from exc
    stager = spec.stager
    try:
        if stager is not None:
            payload = stager.pin(payload)  # pins inside the target device's context
        elif spec.pin:
            payload = torch.utils.data._utils.pin_memory.pin_memory(payload)
        if stats is not None:
            stats.collate_s += time.perf_counter() - t0
            stats.batches_collated += 1
        gov = services.governor
        if gov is not None and account:
            batch.nbytes = MemoryGovernor.nbytes_of(payload)
            gov.observe_batch(batch.nbytes)
            if gate is not None:
                gate(batch)
            gov.add(batch.nbytes)
    except Exception as exc:
        raise SampleLoadError(
            f"the result of collate_fn for batch {batch.ordinal} (indices {batch.indices}) "
            f"could not be pinned or measured: {exc!r}",
            index=None, batch_indices=batch.indices, batch_ordinal=batch.ordinal,
        ) from exc
    if stager is not None:
        payload = stager.stage(payload, batch.ordinal)
        if stats is not None:
            stats.transfer_s += float(getattr(payload, "transfer_s", 0.0))
    batch.payload = payload


class BaseIterator(Iterator[T]):
    """Consumer-side bookkeeping shared by every executor: position, timing, errors, close.

    Subclasses implement :meth:`_next_item` (the next payload, :data:`EMPTY` for a
    batch whose samples were all skipped, or raise ``StopIteration``) and
    :meth:`_shutdown`. A sample's or collate's failure is raised to the consumer
    as its original type (:func:`~lightning_threadsafe.errors.as_raised`) and the
    epoch goes on with the next batch, as with torch's DataLoader; a stall, a
    timeout, a worker that could not start, or ``KeyboardInterrupt`` ends it.
    """

    def __init__(self, spec: EpochSpec, resumed: list[int],
                 generator_state: list[int] | None) -> None:
        self.spec = spec
        self.epoch = spec.epoch
        self._services = spec.services
        self._telemetry = spec.services.telemetry
        # Ordinals consumed this epoch, in delivery order (resumed prefix first); a
        # batch whose failure was raised to the consumer counts as consumed.
        self._delivered: list[int] = list(resumed)
        self._generator_state = generator_state
        self._finished = False
        self.finished_cleanly = False
        self._started = False  # delivered a batch (or ended): the loader's epoch moved on
        self._rewound = False
        self._last_exit: float | None = None

    # -- subclass interface ----------------------------------------------------------

    @abstractmethod
    def _next_item(self, entered: float) -> Any:
        """The next payload, :data:`EMPTY`, or ``StopIteration`` at the epoch's end."""

    @abstractmethod
    def _shutdown(self) -> None:
        """Stop what this executor started (idempotent)."""

    # -- position ------------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "delivered": list(self._delivered),
                "generator_state": self._generator_state}

    def queue_depth(self) -> int:
        return 0

    # -- next ------------------------------------------------------------------------

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        entered = self._enter()
        try:
            while True:
                item = self._next_item(entered)
                if item is not EMPTY:
                    break
        except StopIteration:
            self._finish(clean=True)
            raise
        except SampleLoadError as exc:
            err = self._failed(exc)
        except BaseException:
            self._finish(clean=False)
            raise
        else:
            self._exit(entered)
            return item  # type: ignore[no-any-return]
        # Raised outside the handler (no __context__ back to frames that hold this
        # iterator) and without this frame's `self`: a caller keeping the exception
        # (pytest.raises, a logged traceback) must not keep the epoch's threads alive.
        del self
        raise err

    def _failed(self, exc: SampleLoadError) -> BaseException:
        """Record a failure; return what the consumer sees. One batch's failure of an
        ``Exception`` lets the epoch go on (torch does); anything else ends it."""
        self._record_raised(exc)
        cause = exc.__cause__
        if exc.batch_ordinal is None or (cause is not None and not isinstance(cause, Exception)):
            self._finish(clean=False)
        else:
            self._mark_started()
            self._last_exit = time.perf_counter()
        # Its traceback runs through this iterator's frames: drop it (the cause, with the
        # user's traceback, stays chained).
        exc.with_traceback(None)
        return as_raised(exc)

    def _record_raised(self, exc: SampleLoadError) -> None:
        self._services.record_error(index=exc.index, batch=exc.batch_ordinal, error=str(exc),
                                    action="raised", attempts=exc.attempts)

    # -- timing ----------------------------------------------------------------------

    def _enter(self) -> float:
        now = time.perf_counter()
        if self._last_exit is not None:
            self._telemetry.consumer_s += now - self._last_exit
        return now

    def _exit(self, entered: float) -> None:
        self._mark_started()
        now = time.perf_counter()
        self._telemetry.wait_s += now - entered
        self._telemetry.batches += 1
        self._last_exit = now

    def _mark_started(self) -> None:
        if not self._started:
            self._started = True
            self.spec.hooks.epoch_started(self.epoch)

    def _rewind_if_unstarted(self) -> None:
        """An iterator closed before delivering anything (Lightning's probing ``iter()``)
        gives back the user generator's draws, so the next iterator shuffles as torch would."""
        if not self._started and not self._rewound and self._generator_state is not None:
            self._rewound = True
            self.spec.plan.set_generator_state(self._generator_state)

    # -- end -------------------------------------------------------------------------

    def _finish(self, clean: bool) -> None:
        if clean:
            self._mark_started()
        self._finished = True
        self.finished_cleanly = clean
        self.close()

    def close(self) -> None:
        """Stop this epoch's workers and release what it holds. Idempotent."""
        self._rewind_if_unstarted()
        self._finished = True
        self._shutdown()

    def __iter__(self) -> Iterator[T]:
        return self

    def __len__(self) -> int:
        if self.spec.length is None:
            raise TypeError("this loader's length is unknown (its sampler has no len())")
        return self.spec.length
