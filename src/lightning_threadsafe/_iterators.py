"""Consumer-side iterators of one epoch: worker threads, inline loading, iterable datasets.

The consumer thread (the training loop) owns everything here except what the
worker threads touch through :class:`~lightning_threadsafe._worker.ThreadPool`
(whose queues carry their own locks). Admission of new batches, delivery
order, the epoch position and the governor's release happen on the consumer.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lightning_threadsafe._fetch import Skipped, load_many, load_sample
from lightning_threadsafe._worker import POLL_S, BatchState, ThreadPool
from lightning_threadsafe.errors import LoaderStallError, SampleLoadError
from lightning_threadsafe.memory import MemoryGovernor
from lightning_threadsafe.telemetry import WorkerStats

if TYPE_CHECKING:
    from lightning_threadsafe.autotune import OnlineProbe
    from lightning_threadsafe.loader import ThreadedDataLoader

__all__ = ["EMPTY", "BaseIterator", "Empty", "IterableIterator", "ThreadIterator", "finish_batch"]

T = TypeVar("T")


class BaseIterator(Iterator[T]):
    """Shared consumer-side bookkeeping: epoch position, timing, close."""

    def __init__(self, loader: ThreadedDataLoader[T], epoch: int, resumed: list[int],
                 generator_state: list[int] | None) -> None:
        self._loader_ref = weakref.ref(loader)
        self.epoch = epoch
        self._manager = loader._manager
        self._telemetry = loader._manager.telemetry
        # Ordinals consumed this epoch, in delivery order (resumed prefix first).
        self._delivered: list[int] = list(resumed)
        self._generator_state = generator_state
        self._finished = False
        self.finished_cleanly = False
        self._started = False  # delivered a batch (or ended): the loader's epoch moved on
        self._rewound = False
        self._last_exit: float | None = None

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "delivered": list(self._delivered),
                "generator_state": self._generator_state}

    def queue_depth(self) -> int:
        return 0

    def _enter(self) -> float:
        now = time.perf_counter()
        if self._last_exit is not None:
            self._telemetry.consumer_s += now - self._last_exit
        return now

    def _rewind_if_unstarted(self) -> None:
        """An iterator closed before delivering anything (Lightning's probing ``iter()``)
        gives back the user generator's draws, so the next iterator shuffles as torch would."""
        if not self._started and not self._rewound and self._generator_state is not None:
            self._rewound = True
            loader = self._loader_ref()
            if loader is not None:
                loader._plan.set_generator_state(self._generator_state)

    def _mark_started(self) -> None:
        if not self._started:
            self._started = True
            loader = self._loader_ref()
            if loader is not None:
                loader._epoch_started(self.epoch)

    def _exit(self, entered: float) -> None:
        self._mark_started()
        now = time.perf_counter()
        self._telemetry.wait_s += now - entered
        self._telemetry.batches += 1
        self._last_exit = now

    def _finish(self, clean: bool) -> None:
        if clean:
            self._mark_started()
        self._finished = True
        self.finished_cleanly = clean
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        self._rewind_if_unstarted()
        self._finished = True

    def __iter__(self) -> Iterator[T]:
        return self

    def __len__(self) -> int:
        loader = self._loader_ref()
        return len(loader) if loader is not None else 0


def finish_batch(loader: ThreadedDataLoader[Any], batch: BatchState, stats: WorkerStats | None,
                 stager: Any, *, account: bool = True,
                 gate: Callable[[BatchState], None] | None = None) -> None:
    """Collate (+ pin, + stage) a completed batch in place; records skipped samples.

    ``gate(batch)`` (worker threads) blocks until the batch fits in the memory budget
    or is the one the consumer needs next, before its bytes enter the ready buffer.
    """
    values = []
    for v in batch.results:
        if isinstance(v, Skipped):
            loader._manager.record_error(index=v.index, batch=batch.ordinal, error=v.error,
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
        payload = loader.collate_fn(values) if loader._auto_collation else loader.collate_fn(values[0])
    except Exception as exc:
        raise SampleLoadError(
            f"collate_fn failed for batch {batch.ordinal} (indices {batch.indices}): {exc!r}",
            index=None, batch_indices=batch.indices, batch_ordinal=batch.ordinal,
        ) from exc
    try:
        if stager is not None:
            payload = stager.pin(payload)  # pins inside the target device's context
        elif loader._pin:
            payload = torch.utils.data._utils.pin_memory.pin_memory(payload)
        t1 = time.perf_counter()
        if stats is not None:
            stats.collate_s += t1 - t0
            stats.batches_collated += 1
        gov = loader._manager.governor
        if gov is not None and account:  # inline batches are handed over at once: nothing held
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


def _thread_init_fn(fn: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """The ``worker_init_fn`` to run in worker *threads*.

    Lightning (``seed_everything(workers=True)``) installs
    ``pl_worker_init_function`` on any loader with a ``worker_init_fn`` slot. It
    reseeds the *global* RNGs from per-process seeds, which in threads is both
    wrong (threads share the global RNG) and crashes (its seed arithmetic assumes
    a worker process). Per-sample seeding (``sample_rng()``) replaces it, so it is
    skipped for threads; the process executor still passes it to torch.
    """
    target = getattr(fn, "func", fn)
    if getattr(target, "__name__", "") == "pl_worker_init_function":
        return None
    return fn


_NOTHING = object()  # "no prefilled sample here" (None is a valid sample)
_HANDED_OVER = object()  # "the process executor delivers the rest of the epoch"
_FORK_PAUSE_S = 1.0  # longest wait for the workers to leave user code before an early fork


class Empty:
    """Payload of a batch whose every sample was skipped: counted as delivered, not yielded."""


EMPTY = Empty()


class ThreadIterator(BaseIterator[T]):
    """One epoch with worker threads (``num_workers >= 1``) or inline (``num_workers == 0``).

    With an :class:`~lightning_threadsafe.autotune.OnlineProbe` (``"auto"`` settings) the
    pool starts on provisional threads; once the probe decides, the pool is resized,
    or -- after its admitted batches are delivered and its threads joined -- the rest
    of the epoch loads inline or through a process-executor delegate.
    """

    def __init__(
        self,
        loader: ThreadedDataLoader[T],
        epoch: int,
        source: Iterator[tuple[int, list[Any]]],
        resumed: list[int],
        generator_state: list[int] | None,
        *,
        in_order: bool | None = None,
        prefilled: dict[tuple[int, int], Any] | None = None,
        probe: OnlineProbe | None = None,
    ) -> None:
        super().__init__(loader, epoch, resumed, generator_state)
        # The online "auto" probe (consumer-owned reference; workers report to it through
        # pool.observer). Once it decides, the consumer applies the settings: resize the
        # pool, or switch the rest of the epoch to inline loading or to processes.
        self._probe = probe
        # "inline" or "process" once decided: admission stops; when the pool's admitted
        # batches are delivered it is shut and the rest of the epoch loads that way. The
        # processes may start earlier, at the pool's pause barrier (no worker inside user
        # code while torch forks), or else once the threads are joined.
        self._switch: str | None = None
        self._handover: Iterator[tuple[int, list[Any]]] | None = None  # plan left for processes
        self._delegate: BaseIterator[Any] | None = None  # process executor for the rest
        # Samples the "auto" probe already loaded: {(ordinal, position): sample}.
        self._prefilled = dict(prefilled or {})
        self._source = source
        self._source_done = False
        self._in_order = loader.in_order if in_order is None else in_order
        self._num_workers = (probe.threads if probe is not None
                             else int(loader._settings["num_workers"]))
        self._timeout = loader.timeout
        self._stager = loader._stager_for_use()
        # Admitted-but-not-delivered ordinals, oldest first (consumer-owned).
        self._outstanding: collections.deque[int] = collections.deque()
        self._batches: dict[int, BatchState] = {}
        self._pool: ThreadPool | None = None
        self._inline_stats: WorkerStats | None = None
        self._finalizer: weakref.finalize | None = None
        self._join_timeout = 10.0  # seconds close() waits for each worker
        manager = self._manager
        watchdog = manager.watchdog
        watchdog.arm()
        if self._num_workers > 0:
            policy = loader._policy
            dataset = loader.dataset
            stager = self._stager
            loader_ref = weakref.ref(loader)
            epoch_ = epoch

            def fetch(index: Any, batch: BatchState, stats: WorkerStats,
                      stop: threading.Event) -> Any:
                return load_sample(dataset, index, epoch=epoch_, policy=policy, stats=stats,
                                   stop=stop, batch_indices=batch.indices, ordinal=batch.ordinal)

            pool_box: list[ThreadPool] = []  # the pool, once created (workers hold it anyway)
            in_order_ = self._in_order

            def required(batch: BatchState) -> bool:
                pool = pool_box[0]
                return pool.needed == batch.ordinal if in_order_ else len(pool.ready) == 0

            def gate(batch: BatchState) -> None:
                gov = manager.governor
                if gov is not None and pool_box:
                    gov.wait_for_room(batch.nbytes, required=lambda: required(batch),
                                      stop=pool_box[0].stop)

            def finish(batch: BatchState, stats: WorkerStats) -> None:
                ld = loader_ref()
                if ld is None:
                    raise RuntimeError("the loader was garbage-collected during loading")
                finish_batch(ld, batch, stats, stager, gate=gate)

            self._pool = ThreadPool(
                num_workers=self._num_workers, fetch=fetch, finish=finish,
                telemetry=manager.telemetry, in_order=self._in_order,
                on_progress=watchdog.progress, worker_init_fn=_thread_init_fn(loader.worker_init_fn),
                worker_context=manager.worker_context, on_worker_exit=manager.on_worker_exit,
                name="worker", guarded=probe is not None,  # the probe may fork mid-epoch
            )
            pool_box.append(self._pool)
            manager.attach_pool(self._pool)
            if probe is not None:
                observe = probe.observe
                pool = self._pool
                probe.on_serial = lambda: pool.resize(1)  # under the probe's lock

                def observer(wid: int, wall: float, cpu: float, running: int,
                             gil: float) -> None:
                    observe(wid, wall_s=wall, cpu_s=cpu, live_workers=running, gil_wait_s=gil)
                    if probe.result is not None:
                        pool.ready.nudge()  # the consumer applies it at once

                self._pool.observer = observer
            # Last-resort cleanup when the iterator is abandoned (break, del, GC).
            self._finalizer = weakref.finalize(self, _shut_pool, self._pool, self._batches,
                                               manager.governor, self._join_timeout)
        else:
            self._inline_stats = manager.telemetry.register("lts-inline")

    # -- gauges -----------------------------------------------------------------

    def queue_depth(self) -> int:
        return len(self._pool.ready) if self._pool is not None else 0

    # -- admission (consumer thread only) -----------------------------------------

    def _admit(self) -> None:
        loader = self._loader_ref()
        if loader is None or self._pool is None or self._switch is not None:
            return
        depth = loader._depth(self._pool.target if self._probe is not None else None)
        gov = self._manager.governor
        while not self._source_done and len(self._outstanding) < depth:
            required = not self._outstanding
            if gov is not None and not required:
                pending = sum(1 for o in self._outstanding if not self._batches[o].done)
                if not gov.admit(pending_batches=pending, required=False):
                    break
            try:
                ordinal, indices = next(self._source)
            except StopIteration:
                self._source_done = True
                break
            batch = BatchState(ordinal, list(indices))
            self._batches[ordinal] = batch
            self._outstanding.append(ordinal)
            self._pool.needed = self._outstanding[0]
            missing = self._fill_prefilled(batch)
            if missing:
                self._pool.submit(batch, missing)
            else:  # empty, or fully loaded by the probe: finish it here
                if batch.indices:
                    self._finish_here(batch)
                else:
                    batch.payload = EMPTY
                batch.done = True
                self._pool.ready.put(ordinal, batch)

    def _fill_prefilled(self, batch: BatchState) -> list[int]:
        """Put the probe's samples of ``batch`` in place; return the positions still to load."""
        if not self._prefilled:
            return list(range(len(batch.indices)))
        missing = []
        for pos in range(len(batch.indices)):
            value = self._prefilled.pop((batch.ordinal, pos), _NOTHING)
            if value is _NOTHING:
                missing.append(pos)
            else:
                batch.results[pos] = value
                batch.remaining -= 1
        return missing

    def _finish_here(self, batch: BatchState) -> None:
        loader = self._loader_ref()
        if loader is None:
            raise StopIteration
        try:
            finish_batch(loader, batch, None, self._stager)
        except SampleLoadError as exc:
            batch.error = exc

    # -- the online probe (consumer thread only) -----------------------------------

    def _poll_probe(self) -> None:
        """Apply the online probe's decision once there is one (the serial phase's
        shrink needs nothing here: the probe does it through ``on_serial``)."""
        probe = self._probe
        if probe is None or self._pool is None:
            return
        result = probe.result
        if result is not None:
            self._apply_probe_result(result)

    def _apply_probe_result(self, result: Any, *, act: bool = True) -> None:
        """Store the decided settings; with ``act``, also resize or prepare a switch."""
        self._probe = None
        pool = self._pool
        if pool is not None:
            pool.observer = None
        loader = self._loader_ref()
        if loader is None:
            return
        loader._apply_probe(result.to_dict())
        if not act or pool is None or self._finished:
            return  # at the epoch's end: the settings are for the next epoch
        settings = loader._settings
        if settings["executor"] == "process":
            # The rest of the plan goes to torch's worker processes -- including admitted
            # batches no thread has started -- once the threads finished the batches they
            # started (all earlier ordinals: workers take the oldest first).
            withdrawn = pool.tasks.withdraw_untouched(lambda b: len(b.indices))
            for b in withdrawn:
                self._outstanding.remove(b.ordinal)
                del self._batches[b.ordinal]
            pool.needed = self._outstanding[0] if self._outstanding else None
            self._handover = itertools.chain(
                [(b.ordinal, b.indices) for b in withdrawn], self._source)
            self._switch = "process"
            # Start the processes now, while the threads finish their batches -- but fork
            # only with no worker inside user code (a dataset or allocator lock held by
            # a thread would stay locked in the children). Otherwise: after the drain.
            if self._outstanding and pool.pause(timeout=_FORK_PAUSE_S):
                try:
                    self._start_delegate(loader)
                finally:
                    pool.resume()
        elif int(settings["num_workers"]) == 0:
            self._switch = "inline"
        else:
            pool.resize(int(settings["num_workers"]))
        if self._switch != "process" or self._delegate is not None:
            pool.guarded = False  # no fork ahead while these workers run

    def _start_delegate(self, loader: ThreadedDataLoader[Any]) -> None:
        from lightning_threadsafe._process import ProcessIterator

        assert self._handover is not None
        delegate: BaseIterator[Any] = ProcessIterator(loader, self.epoch, self._handover, [], None)
        delegate._started = True
        self._handover = None
        self._delegate = delegate

    def _switch_over(self) -> None:
        """The pool's last batch was delivered: shut it, then load the rest another way."""
        pool = self._pool
        if pool is None:
            return
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer.detach()
        _shut_pool(pool, self._batches, self._manager.governor, self._join_timeout)
        self._pool = None
        loader = self._loader_ref()
        if self._switch == "process":
            if self._delegate is None and loader is not None:
                self._start_delegate(loader)  # threads joined: safe to fork
            if self._delegate is not None:
                self._delegate._last_exit = self._last_exit  # consumer time stays accounted
        else:
            self._inline_stats = self._manager.telemetry.register("lts-inline")

    def position(self) -> dict[str, Any]:
        pos = super().position()
        if self._delegate is not None:
            pos["delivered"] = pos["delivered"] + list(self._delegate._delivered)
        return pos

    def _next_delegate(self) -> T:
        assert self._delegate is not None
        try:
            item = next(self._delegate)
        except StopIteration:
            self._finish(clean=True)
            raise
        except BaseException:
            self._finish(clean=False)
            raise
        self._mark_started()
        return item

    # -- next ---------------------------------------------------------------------

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        if self._delegate is not None and self._pool is None:
            return self._next_delegate()
        entered = self._enter()
        try:
            while True:
                if self._pool is None:
                    item = self._next_inline()
                else:
                    item = self._next_threaded(entered)
                if item is _HANDED_OVER or item is not EMPTY:
                    break
        except StopIteration:
            self._finish(clean=True)
            raise
        except BaseException as exc:
            if isinstance(exc, SampleLoadError):
                self._manager.record_error(index=exc.index, batch=exc.batch_ordinal,
                                           error=str(exc), action="raised", attempts=exc.attempts)
            if isinstance(exc, LoaderStallError) or "timed out" in str(exc):
                # A worker is stuck in user code and cannot be interrupted: do not
                # wait for it here; it exits (daemon) when its call returns, and
                # cleanup_thread_safety_resources() joins it then.
                self._join_timeout = 0.5
            self._finish(clean=False)
            raise
        if item is _HANDED_OVER:  # the processes deliver from here (their own timing)
            self._telemetry.wait_s += time.perf_counter() - entered
            self._last_exit = None
            return self._next_delegate()
        self._exit(entered)
        return item  # type: ignore[return-value]

    def _next_inline(self) -> Any:
        loader = self._loader_ref()
        if loader is None:
            raise StopIteration
        try:
            ordinal, indices = next(self._source)
        except StopIteration:
            raise StopIteration from None
        batch = BatchState(ordinal, list(indices))
        assert self._inline_stats is not None
        missing = self._fill_prefilled(batch)
        if len(missing) == len(batch.indices):
            batch.results = load_many(loader.dataset, batch.indices, epoch=self.epoch,
                                      policy=loader._policy, stats=self._inline_stats,
                                      ordinal=ordinal)
        else:
            for pos, value in zip(missing, load_many(
                    loader.dataset, [batch.indices[p] for p in missing], epoch=self.epoch,
                    policy=loader._policy, stats=self._inline_stats, ordinal=ordinal)):
                batch.results[pos] = value
        finish_batch(loader, batch, self._inline_stats, self._stager, account=False)
        return self._deliver(batch)

    def _next_threaded(self, entered: float) -> Any:
        pool = self._pool
        assert pool is not None
        while True:
            self._poll_probe()
            self._admit()
            if not self._outstanding:
                if self._switch is not None:
                    self._switch_over()
                    if self._delegate is not None:
                        return _HANDED_OVER
                    return self._next_inline()
                if self._source_done:
                    if self._probe is not None:  # the epoch ended before the probe decided
                        self._apply_probe_result(self._probe.finish(), act=False)
                    raise StopIteration
            got = pool.ready.take(self._wanted, POLL_S)
            if pool.fatal is not None:
                raise pool.fatal
            if got is not None:
                _, batch = got
                return self._deliver(batch)
            err = self._manager.watchdog.check(pool.worker_snapshot(),
                                               outstanding=bool(self._outstanding))
            if err is not None:
                raise err
            if self._timeout > 0 and time.perf_counter() - entered > self._timeout:
                raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds")

    def _wanted(self) -> list[int]:
        return list(self._outstanding) if not self._in_order else list(self._outstanding)[:1]

    def _deliver(self, batch: BatchState) -> Any:
        ordinal = batch.ordinal
        if self._pool is not None:
            self._outstanding.remove(ordinal)
            del self._batches[ordinal]
            # Published before release() below wakes the workers waiting for room.
            self._pool.needed = self._outstanding[0] if self._outstanding else None
        gov = self._manager.governor
        if gov is not None and batch.nbytes:
            gov.release(batch.nbytes)
        if batch.error is not None:
            raise batch.error
        self._delivered.append(ordinal)
        self._telemetry.delivered += batch.samples
        payload = batch.payload
        if payload is EMPTY:
            return EMPTY
        if self._stager is not None:
            t0 = time.perf_counter()
            payload = self._stager.handoff(payload)
            self._telemetry.transfer_s_consumer += time.perf_counter() - t0
        return payload

    def close(self) -> None:
        """Stop and join the workers; release buffered memory. Idempotent."""
        self._rewind_if_unstarted()
        self._finished = True
        if self._delegate is not None:
            self._delegate.close()
        if self._pool is not None:
            if self._finalizer is not None and self._finalizer.alive:
                self._finalizer.detach()
                _shut_pool(self._pool, self._batches, self._manager.governor, self._join_timeout)
            self._outstanding.clear()
        if self._inline_stats is not None:
            self._telemetry.retire(self._inline_stats)
            self._inline_stats = None


def _shut_pool(pool: ThreadPool, batches: dict[int, BatchState], gov: MemoryGovernor | None,
               timeout: float) -> None:
    """Stop the pool and give the governor back the bytes of batches never delivered.

    Also the finalizer of an abandoned iterator (it holds the pool and the batch table,
    never the iterator), so a ``break`` does not leave phantom bytes in the budget.
    """
    pool.close(timeout=timeout)
    for b in list(batches.values()):
        if gov is not None and b.nbytes and b.done:
            gov.release(b.nbytes)
            b.nbytes = 0
    batches.clear()


class IterableIterator(BaseIterator[T]):
    """Iterable-style datasets: a single producer (the calling thread), batched in order.

    Samples of an iterable dataset come from one Python iterator, which cannot be
    shared between threads safely, so they are produced serially; collate runs
    in the same thread. Resume skips the batches already delivered by
    re-iterating the dataset (the dataset must be deterministic for exact resume).
    """

    def __init__(self, loader: ThreadedDataLoader[T], epoch: int,
                 resume: dict[str, Any] | None) -> None:
        delivered = list(resume["delivered"]) if resume else []
        super().__init__(loader, epoch, delivered, None)
        set_epoch = getattr(loader.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self._it = iter(loader.dataset)
        self._ordinal = 0
        self._stats = self._telemetry.register("lts-inline")
        skip = len(delivered)
        while self._ordinal < skip:
            if self._read_batch() is None:
                break
            self._ordinal += 1

    def _read_batch(self) -> list[Any] | None:
        loader = self._loader_ref()
        assert loader is not None
        n = loader.batch_size or 1
        out: list[Any] = []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                v = next(self._it)
            except StopIteration:
                break
            finally:
                self._stats.fetch_wall_s += time.perf_counter() - t0
            self._stats.samples += 1
            out.append(v)
        if not out or (loader.drop_last and len(out) < n):
            return None
        return out

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        loader = self._loader_ref()
        if loader is None:
            raise StopIteration
        entered = self._enter()
        try:
            values = self._read_batch()
        except BaseException as exc:
            self._finish(clean=False)
            raise SampleLoadError(
                f"iterable dataset raised while producing batch {self._ordinal}: {exc!r}",
                batch_ordinal=self._ordinal,
            ) from exc
        if values is None:
            self._finish(clean=True)
            raise StopIteration
        t0 = time.perf_counter()
        batch = loader.collate_fn(values) if loader._auto_collation else loader.collate_fn(values[0])
        self._stats.collate_s += time.perf_counter() - t0
        self._delivered.append(self._ordinal)
        self._telemetry.delivered += len(values)
        self._ordinal += 1
        self._exit(entered)
        return batch

    def close(self) -> None:
        self._finished = True
        if self._stats is not None:
            self._telemetry.retire(self._stats)
            self._stats = None  # type: ignore[assignment]


# ---------------------------------------------------------------- process executor

