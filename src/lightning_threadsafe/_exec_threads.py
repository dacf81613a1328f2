"""The thread executor: one epoch loaded by a pool of worker threads.

Consumer side (the training loop's thread) owns admission, delivery order, the
epoch position and the governor's release; the workers touch only the
:class:`~lightning_threadsafe._worker.ThreadPool` (whose queues carry their own
locks), the batch states and the spec. Workers hold the pool and the spec, never
this iterator: when the iterator is collected its finalizer closes the pool.

With an :class:`~lightning_threadsafe.tuning.OnlineProbe` (``"auto"`` settings) the
pool starts on provisional threads; once the probe decides, the pool is resized,
or -- after its admitted batches are delivered and its threads joined -- the rest
of the epoch is handed over (:mod:`~lightning_threadsafe._handover`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_threadsafe._admission import Admission
from lightning_threadsafe._epoch import (
    EMPTY,
    BaseIterator,
    EpochSpec,
    LoaderTimeout,
    finish_batch,
)
from lightning_threadsafe._fetch import load_many
from lightning_threadsafe._handover import next_executor
from lightning_threadsafe._worker import POLL_S, BatchState, ThreadPool
from lightning_threadsafe.errors import LoaderStallError
from lightning_threadsafe.memory import MemoryGovernor
from lightning_threadsafe.telemetry import WorkerStats

if TYPE_CHECKING:
    from lightning_threadsafe.tuning import OnlineProbe

__all__ = ["ThreadIterator"]

T = TypeVar("T")

_FORK_PAUSE_S = 1.0  # longest wait for the workers to leave user code before an early fork
_JOIN_S = 10.0  # seconds close() waits for the pool's workers
_JOIN_STUCK_S = 0.5  # ... after a stall or a timeout (a worker stuck in user code)


def _make_pool(spec: EpochSpec, threads: int, in_order: bool, guarded: bool) -> ThreadPool:
    """The pool of one epoch; its callbacks hold the spec and the pool, never the iterator."""
    services = spec.services
    dataset, policy, epoch = spec.dataset, spec.policy, spec.epoch
    gov = services.governor
    pool_box: list[ThreadPool] = []  # the pool, once created

    def fetch_many(indices: list[Any], batch: BatchState, stats: WorkerStats,
                   stop: threading.Event) -> list[Any]:
        # A worker's share of a batch through the inline fast path (the policy on failures).
        return load_many(dataset, indices, epoch=epoch, policy=policy, stats=stats, stop=stop,
                         batch_indices=batch.indices, ordinal=batch.ordinal)

    def required(batch: BatchState) -> bool:
        pool = pool_box[0]
        return pool.needed == batch.ordinal if in_order else len(pool.ready) == 0

    def gate(batch: BatchState) -> None:
        if gov is not None and pool_box:
            gov.wait_for_room(batch.nbytes, required=lambda: required(batch),
                              stop=pool_box[0].stop)

    def finish(batch: BatchState, stats: WorkerStats) -> None:
        finish_batch(spec, batch, stats, gate=gate)

    pool = ThreadPool(
        num_workers=threads, fetch_many=fetch_many, finish=finish, telemetry=services.telemetry,
        in_order=in_order, on_progress=services.watchdog.progress,
        worker_init_fn=spec.worker_init.for_threads(), worker_context=services.worker_context,
        on_worker_exit=services.on_worker_exit, name="worker", guarded=guarded,
        on_needed=gov.wake_waiters if gov is not None else None,
    )
    pool_box.append(pool)
    services.attach_pool(pool)
    return pool


def _shut_pool(pool: ThreadPool, batches: dict[int, BatchState], gov: MemoryGovernor | None,
               timeout: list[float]) -> None:
    """Stop the pool and give the governor back the bytes of batches never delivered.

    Also the finalizer of an abandoned iterator (it holds the pool and the batch table,
    never the iterator), so a ``break`` does not leave phantom bytes in the budget.
    ``timeout``: a one-element cell, shortened by the consumer after a stall.
    """
    pool.close(timeout=timeout[0])
    for b in list(batches.values()):
        if gov is not None and b.nbytes and b.done:
            gov.release(b.nbytes)
            b.nbytes = 0
    batches.clear()


class ThreadIterator(BaseIterator[T]):
    """One epoch with worker threads (``num_workers >= 1``)."""

    def __init__(
        self,
        spec: EpochSpec,
        source: Iterator[tuple[int, list[Any]]],
        resumed: list[int],
        generator_state: list[int] | None,
        *,
        probe: OnlineProbe | None = None,
    ) -> None:
        super().__init__(spec, resumed, generator_state)
        # The online "auto" probe (consumer-owned reference; workers report to it through
        # pool.observer). Once it decides, the consumer applies the settings.
        self._probe = probe
        # "inline" or "process" once decided: admission stops; when the pool's admitted
        # batches are delivered it is shut and the rest of the epoch is handed over.
        self._switch: str | None = None
        self._handover: Iterator[tuple[int, list[Any]]] | None = None  # plan for the next
        self._next: BaseIterator[Any] | None = None  # the executor of the rest of the epoch
        self._source = source
        self._source_done = False
        self._in_order = spec.in_order
        self._admission = Admission(spec.settings, spec.services.governor)
        # Admitted-but-not-delivered ordinals, oldest first, and their states (consumer-owned).
        self._outstanding: collections.deque[int] = collections.deque()
        self._batches: dict[int, BatchState] = {}
        self._join_timeout = [_JOIN_S]
        spec.services.watchdog.arm()
        threads = probe.threads if probe is not None else spec.num_workers
        self._pool: ThreadPool | None = _make_pool(spec, threads, self._in_order,
                                                   guarded=probe is not None)
        if probe is not None:
            self._observe(probe, self._pool)
        # Last-resort cleanup when the iterator is abandoned (break, del, GC).
        self._finalizer = weakref.finalize(self, _shut_pool, self._pool, self._batches,
                                           spec.services.governor, self._join_timeout)

    @staticmethod
    def _observe(probe: OnlineProbe, pool: ThreadPool) -> None:
        observe = probe.observe
        probe.on_serial = lambda: pool.resize(1)  # under the probe's lock

        def observer(wid: int, wall: float, cpu: float, running: int, gil: float) -> None:
            observe(wid, wall_s=wall, cpu_s=cpu, live_workers=running, gil_wait_s=gil)
            if probe.result is not None:
                pool.ready.nudge()  # the consumer applies it at once

        pool.observer = observer

    def queue_depth(self) -> int:
        return len(self._pool.ready) if self._pool is not None else 0

    def position(self) -> dict[str, Any]:
        pos = super().position()
        if self._next is not None:
            pos["delivered"] = pos["delivered"] + list(self._next._delivered)
        return pos

    # -- admission (consumer thread only) -----------------------------------------

    def _admit(self) -> None:
        pool = self._pool
        if pool is None or self._switch is not None:
            return
        probing = self._probe is not None
        while not self._source_done and self._admission.may_start(
                (self._batches[o] for o in self._outstanding), len(self._outstanding),
                pool.target, probing=probing):
            try:
                ordinal, indices = next(self._source)
            except StopIteration:
                self._source_done = True
                break
            batch = BatchState(ordinal, list(indices))
            self._batches[ordinal] = batch
            self._outstanding.append(ordinal)
            pool.set_needed(self._outstanding[0])
            if batch.indices:
                pool.submit(batch, list(range(len(batch.indices))))
                continue
            # An empty batch (a user batch sampler's): nothing to load or collate.
            batch.payload = EMPTY
            with batch.lock:
                batch.done = True
            pool.ready.put(ordinal, batch)

    # -- the online probe (consumer thread only) -----------------------------------

    def _poll_probe(self) -> None:
        probe = self._probe
        if probe is not None and probe.result is not None:
            self._apply_probe_result(probe.result)

    def _apply_probe_result(self, result: Any, *, act: bool = True) -> None:
        """Store the decided settings; with ``act``, also resize or prepare a switch."""
        self._probe = None
        pool = self._pool
        if pool is not None:
            pool.observer = None
        settings = self.spec.settings
        settings.apply_probe(result.to_dict())
        if not act or pool is None or self._finished:
            return  # at the epoch's end: the settings are for the next epoch
        values = settings.values
        if values["executor"] == "process":
            # The rest of the plan goes to torch's worker processes -- including admitted
            # batches no thread has started -- once the threads finished the batches they
            # started (all earlier ordinals: workers take the oldest first).
            withdrawn = pool.tasks.withdraw_untouched(lambda b: len(b.indices))
            for b in withdrawn:
                self._outstanding.remove(b.ordinal)
                del self._batches[b.ordinal]
            pool.set_needed(self._outstanding[0] if self._outstanding else None)
            self._handover = itertools.chain(
                [(b.ordinal, b.indices) for b in withdrawn], self._source)
            self._switch = "process"
            # Start the processes now, while the threads finish their batches -- but fork
            # only with no worker inside user code (a dataset or allocator lock held by
            # a thread would stay locked in the children). Otherwise: after the drain.
            if self._outstanding and pool.pause(timeout=_FORK_PAUSE_S):
                try:
                    self._start_next()
                finally:
                    pool.resume()
        elif int(values["num_workers"]) == 0:
            self._switch = "inline"
            self._handover = self._source
        else:
            pool.resize(int(values["num_workers"]))
        if self._switch != "process" or self._next is not None:
            pool.guarded = False  # no fork ahead while these workers run

    def _start_next(self) -> None:
        assert self._handover is not None and self._switch is not None
        self._next = next_executor(self.spec, self._switch, self._handover)
        self._handover = None

    def _switch_over(self) -> None:
        """The pool's last batch was delivered: shut it, then hand the rest over."""
        if self._finalizer.alive:
            self._finalizer()  # joins the threads: safe to fork now
        self._pool = None
        if self._next is None:
            self._start_next()

    # -- next ---------------------------------------------------------------------

    def _next_item(self, entered: float) -> Any:
        if self._pool is None:
            assert self._next is not None
            return self._next._next_item(entered)
        try:
            return self._next_threaded(entered)
        except (LoaderStallError, LoaderTimeout):
            # A worker is stuck in user code and cannot be interrupted: do not wait for it
            # here; it exits (daemon) when its call returns.
            self._join_timeout[0] = _JOIN_STUCK_S
            raise

    def _next_threaded(self, entered: float) -> Any:
        pool = self._pool
        assert pool is not None
        timeout = self.spec.timeout
        watchdog = self._services.watchdog
        while True:
            self._poll_probe()
            self._admit()
            if not self._outstanding:
                if self._switch is not None:
                    self._switch_over()
                    return self._next_item(entered)
                if self._source_done:
                    if self._probe is not None:  # the epoch ended before the probe decided
                        self._apply_probe_result(self._probe.finish(), act=False)
                    raise StopIteration
            got = pool.ready.take(self._wanted, POLL_S)
            if pool.fatal is not None:
                raise pool.fatal
            if got is not None:
                return self._deliver(got[1])
            err = watchdog.check(pool.worker_snapshot(), outstanding=bool(self._outstanding))
            if err is not None:
                raise err
            if timeout > 0 and time.perf_counter() - entered > timeout:
                raise LoaderTimeout(f"DataLoader timed out after {timeout} seconds")

    def _wanted(self) -> list[int]:
        return list(self._outstanding) if not self._in_order else list(self._outstanding)[:1]

    def _deliver(self, batch: BatchState) -> Any:
        ordinal = batch.ordinal
        pool = self._pool
        assert pool is not None
        self._outstanding.remove(ordinal)
        del self._batches[ordinal]
        # Published before release() below wakes the workers waiting for room.
        pool.set_needed(self._outstanding[0] if self._outstanding else None)
        gov = self._services.governor
        if gov is not None and batch.nbytes:
            gov.release(batch.nbytes)
        self._delivered.append(ordinal)  # consumed, also when its failure is raised
        if batch.error is not None:
            raise batch.error
        self._telemetry.delivered += batch.samples
        payload = batch.payload
        stager = self.spec.stager
        if payload is EMPTY or stager is None:
            return payload
        t0 = time.perf_counter()
        payload = stager.handoff(payload)
        self._telemetry.transfer_s_consumer += time.perf_counter() - t0
        return payload

    def _shutdown(self) -> None:
        if self._next is not None:
            self._next.close()
        if self._finalizer.alive:
            self._finalizer()
        self._outstanding.clear()
