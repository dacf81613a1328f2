"""``ThreadedDataLoader``: a drop-in for ``torch.utils.data.DataLoader`` that loads with threads.

Data flow for one epoch (thread executor)::

    BatchPlan ──(ordinal, indices)──► admission (consumer thread; prefetch depth, MemoryGovernor)
        ──► PriorityWorkQueue of per-sample tasks ──► worker threads: dataset[i] under sample_rng
        ──► the worker finishing a batch collates (+ pins, + stages to CUDA) ──► ReadyBuffer
        ──► consumer: in sampler order (in_order=True) or as completed ──► training step

``num_workers=0`` loads in the calling thread (no threads at all, like torch);
``executor="process"`` delegates to torch's own multiprocessing DataLoader with
the same batch plan, sample seeding and error handling.

Guarantees (tested):
    - every index of the epoch's plan is delivered exactly once, or reported in
      the error record when ``on_error="skip"`` drops it;
    - with the same ``seed`` batches are bit-identical across thread counts,
      executors, ``in_order`` and resumes (as sets when ``in_order=False``);
    - no thread outlives its iterator: exhaustion, ``break``, an exception,
      ``del``, ``cleanup_thread_safety_resources()`` or the context manager
      stop and join every worker;
    - no call blocks forever: waits poll a stop signal, ``stall_timeout`` turns
      a stall into ``LoaderStallError``, ``timeout`` into ``RuntimeError``.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import IterableDataset
from torch.utils.data._utils.collate import default_collate, default_convert

from lightning_threadsafe._fetch import FetchPolicy, load_sample
from lightning_threadsafe._iterators import BaseIterator, IterableIterator, ThreadIterator
from lightning_threadsafe._process import ProcessIterator
from lightning_threadsafe.config import (
    ERROR_POLICIES,
    EXECUTORS,
    check_choice,
    check_int,
    check_timeout,
    parse_size,
)
from lightning_threadsafe.errors import SampleLoadError
from lightning_threadsafe.manager import ThreadSafetyManager
from lightning_threadsafe.sampler import BatchPlan, DistributedInfo
from lightning_threadsafe.telemetry import WorkerStats

__all__ = ["ThreadedDataLoader"]

T = TypeVar("T")

_STATE_VERSION = 1
# Samples the "auto" probe loads concurrently (at least, or the first batch up to the
# maximum), plus the few it loads serially only when the concurrent ones are ambiguous.
_PROBE_CONCURRENT = (8, 32)
_PROBE_SERIAL = 4
_PROBE_THREADS = 8  # at most this many provisional threads while the online probe runs


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


def _draw_seed(generator: torch.Generator | None = None) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item()) & (
        (1 << 63) - 1
    )


class _EpochSampler:
    """``loader.sampler``: the index order of the current epoch, with ``set_epoch``.

    Lightning calls ``loader.sampler.set_epoch(epoch)`` at each epoch start; this
    forwards it to the loader so its shuffles follow the trainer's epoch counter.
    """

    def __init__(self, loader: ThreadedDataLoader[Any]) -> None:
        self._loader = weakref.ref(loader)

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        loader = self._loader()
        if loader is None:
            return iter(())
        plan = loader._plan
        return (i for batch in plan.batches(loader._next_epoch) for i in batch)

    def __len__(self) -> int:
        loader = self._loader()
        if loader is None:
            return 0
        src = loader._plan.user_sampler if loader._plan.user_sampler is not None else loader.dataset
        return len(src)


class ThreadedDataLoader(Generic[T]):
    """Loads batches concurrently with threads; same arguments and semantics as torch's DataLoader.

    Arguments shared with ``torch.utils.data.DataLoader`` keep their meaning,
    except that ``num_workers`` counts worker *threads* (0 = load in the calling
    thread) and ``prefetch_factor`` bounds the batches in flight to
    ``prefetch_factor * num_workers`` (the memory governor may lower it).
    ``worker_init_fn`` is called once in each worker thread;
    ``torch.utils.data.get_worker_info()`` is ``None`` in threads.
    ``persistent_workers`` is accepted for compatibility: threads start in
    microseconds, so thread pools live for one epoch; with
    ``executor="process"`` it is passed to torch.

    Keyword-only extras:
        executor: ``"thread"`` (default), ``"process"`` (torch's multiprocessing
            workers; for GIL-bound datasets), or ``"auto"`` (an online probe picks while the
            first batches load).
        memory_budget: bytes, ``"4GiB"``, a fraction of available memory, ``"auto"``
            (half of available memory split among local ranks) or ``None``. Prefetch
            slows down instead of exceeding it (thread executor).
        on_error: ``"raise"`` (default) | ``"skip"`` (drop the sample, keep the batch,
            record the index) | ``"retry"`` (``max_retries`` with exponential backoff,
            then raise; or skip with ``skip_after_retries=True``).
        seed: base seed of shuffles and of ``sample_rng()``; drawn from torch's
            global RNG when ``None`` (so ``torch.manual_seed`` makes runs repeatable).
        device, cuda_streams: stage batches onto this CUDA device on side streams.
        stall_timeout: seconds without a completed sample before ``LoaderStallError``.
        debug: lock-order deadlock detection in worker threads.
        distributed: shard by rank when ``torch.distributed`` is initialised
            (``"auto"``), always (``True``) or never (``False``).

    Example::

        loader = ThreadedDataLoader(dataset, batch_size=32, shuffle=True, num_workers=16, seed=0)
        for batch in loader:
            ...
        print(loader.get_thread_safety_performance_report()["rates"])

    Raises:
        ValueError / TypeError: at construction, naming the argument, its value
            and what is allowed.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Iterable[Any] | None = None,
        batch_sampler: Iterable[list[Any]] | None = None,
        num_workers: int | str = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | str | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        executor: str = "thread",
        memory_budget: int | float | str | None = "auto",
        on_error: str = "raise",
        max_retries: int = 2,
        skip_after_retries: bool = False,
        seed: int | None = None,
        device: str | torch.device | None = None,
        cuda_streams: int = 2,
        stall_timeout: float | None = 300.0,
        debug: bool = False,
        distributed: bool | str = "auto",
    ) -> None:
        # ---- validation: every message names the argument, its value and what is allowed
        if dataset is None:
            raise TypeError("dataset=None must be a map-style dataset (with __getitem__) or an iterable")
        iterable = isinstance(dataset, IterableDataset) or (
            not hasattr(dataset, "__getitem__") and hasattr(dataset, "__iter__")
        )
        if not iterable and not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"dataset={type(dataset).__name__} must be a map-style dataset (with __getitem__) "
                "or an iterable-style dataset (with __iter__)"
            )
        if batch_size is not None:
            check_int("batch_size", batch_size, minimum=1, none=True)
        check_int("num_workers", num_workers, minimum=0, auto=True)
        if prefetch_factor is not None:
            check_int("prefetch_factor", prefetch_factor, minimum=1, auto=True)
        check_choice("executor", executor, EXECUTORS)
        check_choice("on_error", on_error, ERROR_POLICIES)
        check_int("max_retries", max_retries, minimum=0)
        check_int("cuda_streams", cuda_streams, minimum=1)
        check_timeout("timeout", timeout, none=False)
        check_timeout("stall_timeout", stall_timeout, zero=False)
        if seed is not None:
            check_int("seed", seed, minimum=0)
        for name, flag in (("pin_memory", pin_memory), ("drop_last", drop_last),
                           ("in_order", in_order), ("persistent_workers", persistent_workers),
                           ("debug", debug), ("skip_after_retries", skip_after_retries)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r} must be True or False")
        if shuffle is not None and not isinstance(shuffle, bool):
            raise TypeError(f"shuffle={shuffle!r} must be True, False or None")
        if not (isinstance(distributed, bool) or distributed == "auto"):
            raise ValueError(f"distributed={distributed!r} must be True, False or 'auto'")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn={collate_fn!r} must be callable or None")
        if worker_init_fn is not None and not callable(worker_init_fn):
            raise TypeError(f"worker_init_fn={worker_init_fn!r} must be callable or None")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r} must be a torch.Generator or None")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0 (got num_workers=0)")
        if iterable:
            if shuffle:
                raise ValueError(
                    f"shuffle={shuffle!r} is not allowed with an iterable-style dataset; "
                    "shuffle inside the dataset"
                )
            if sampler is not None:
                raise ValueError(f"sampler={sampler!r} is not allowed with an iterable-style dataset")
            if batch_sampler is not None:
                raise ValueError(
                    f"batch_sampler={batch_sampler!r} is not allowed with an iterable-style dataset"
                )
        if sampler is not None and shuffle:
            raise ValueError(
                f"shuffle={shuffle!r} must be False or None when a sampler is given "
                "(sampler and shuffle are mutually exclusive)"
            )
        if batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError(
                    "batch_sampler is mutually exclusive with batch_size, shuffle, sampler and "
                    f"drop_last (got batch_size={batch_size!r}, shuffle={shuffle!r}, "
                    f"sampler={sampler!r}, drop_last={drop_last!r})"
                )
            batch_size = None
        elif batch_size is None and drop_last:
            raise ValueError(
                "drop_last=True needs automatic batching; batch_size=None disables it"
            )
        if memory_budget != "auto":
            parse_size(memory_budget, name="memory_budget")
        dev = None
        if device is not None:
            try:
                dev = torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"device={device!r} must be a torch device such as 'cuda:0', 'cpu' or None"
                ) from None
            if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
                # Resolve now, in the constructing thread (the rank's own device under
                # DDP), not later in whichever worker thread first touches CUDA.
                dev = torch.device("cuda", torch.cuda.current_device())

        # ---- public attributes (torch names)
        self.dataset = dataset
        self.batch_size = batch_size if batch_sampler is None else None
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.pin_memory_device = pin_memory_device
        self.timeout = float(timeout)
        self.worker_init_fn = worker_init_fn
        self.multiprocessing_context = multiprocessing_context
        self.generator = generator
        self.persistent_workers = persistent_workers
        self.in_order = in_order
        self.executor = executor
        self.memory_budget = memory_budget
        self.on_error = on_error
        self.max_retries = max_retries
        self.device = dev
        self.cuda_streams = cuda_streams
        self.stall_timeout = stall_timeout
        self.debug = debug
        self.distributed = distributed
        self._iterable = iterable
        self._auto_collation = batch_size is not None or batch_sampler is not None
        if collate_fn is None:
            collate_fn = default_collate if self._auto_collation else default_convert
        self.collate_fn = collate_fn
        self.batch_sampler = batch_sampler

        self.seed = int(seed) if seed is not None else _draw_seed()
        self._policy = FetchPolicy(
            seed=self.seed, on_error=on_error, max_retries=max_retries,
            skip_after_retries=skip_after_retries,
        )
        self._plan = BatchPlan(
            dataset, batch_size=self.batch_size, shuffle=bool(shuffle), sampler=sampler,
            batch_sampler=batch_sampler, drop_last=drop_last, generator=generator, seed=self.seed,
        )
        self._user_sampler = sampler
        self.sampler: Any = sampler if sampler is not None else _EpochSampler(self)

        self._pin = pin_memory and torch.cuda.is_available()
        if pin_memory and not self._pin:
            warnings.warn(
                "pin_memory=True but no CUDA device is available: batches are not pinned",
                stacklevel=2,
            )
        self._manager = ThreadSafetyManager(
            memory_budget=memory_budget, stall_timeout=stall_timeout, debug=debug,
        )
        self._manager.register_resources(dataset)
        self._stager: Any = None  # CudaStreamScheduler, created on first use

        # ---- tunable settings: resolved on first iteration when "auto"
        self._settings: dict[str, Any] = {
            "num_workers": num_workers,
            "prefetch_factor": prefetch_factor if prefetch_factor is not None else 2,
            "executor": executor,
        }
        self._probe: dict[str, Any] | None = None
        self._tuner: Any = None
        self._detector: Any = None
        self._decisions: list[dict[str, Any]] = []
        self._window_start = None

        # ---- epoch and resume bookkeeping (consumer thread)
        self._next_epoch = 0
        self._resume: dict[str, Any] | None = None
        self._current: weakref.ReferenceType[BaseIterator] | None = None
        self._consumed_fn: Callable[[], int | None] | None = None

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        if self._iterable:
            length = len(self.dataset)  # type: ignore[arg-type]
            if self.batch_size is None:
                return length
            return length // self.batch_size if self.drop_last else math.ceil(length / self.batch_size)
        self._plan.distributed = self._distributed_info()
        return len(self._plan)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next iteration (Lightning calls this through ``loader.sampler``)."""
        check_int("epoch", epoch, minimum=0)
        if self._resume is not None:
            return  # a pending resume fixes the epoch it was saved in
        self._next_epoch = epoch

    @property
    def settings(self) -> dict[str, Any]:
        """Current (resolved or tuned) ``num_workers``, ``prefetch_factor`` and ``executor``."""
        return dict(self._settings)

    def _distributed_info(self) -> DistributedInfo:
        if self.distributed is False:
            return DistributedInfo()
        return DistributedInfo.detect()

    def _stager_for_use(self) -> Any:
        if self.device is None or self.device.type != "cuda":
            return None
        if self._stager is None:
            from lightning_threadsafe.cuda_stream import CudaStreamScheduler

            self._stager = CudaStreamScheduler(
                self.device, num_streams=self.cuda_streams, pin_memory=True
            )
        return self._stager

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[T]:
        current = self._current() if self._current is not None else None
        if current is not None:
            current.close()  # like torch: a new iteration replaces the old one
        # The epoch (and a pending resume) is only used up once this iterator delivers
        # or finishes (_epoch_started): Lightning calls iter() to probe a loader and
        # creates the first epoch's iterator before set_epoch(0); neither may skip an epoch.
        epoch = self._next_epoch
        resume = self._resume
        if resume is not None:
            epoch = int(resume["epoch"])
        self._plan.distributed = self._distributed_info()
        if resume is not None and resume.get("generator_state") is not None:
            self._plan.set_generator_state(resume["generator_state"])
        generator_state = self._plan.generator_state()
        if self.generator is not None:
            _draw_seed(self.generator)  # torch draws a base seed from the generator per iterator
        skip = set(resume["delivered"]) if resume is not None else set()
        source = self._source(epoch, skip)
        prefilled: dict[tuple[int, int], Any] = {}
        online = None
        if self._needs_probe():
            online = self._online_probe()
            if online is None and self._needs_probe():
                source, prefilled = self._probe_first_batches(source, epoch)
        executor = self._settings["executor"]
        it: BaseIterator
        if self._iterable:
            it = IterableIterator(self, epoch, resume)
        elif executor == "process" and int(self._settings["num_workers"]) > 0:
            it = ProcessIterator(self, epoch, source, sorted(skip), generator_state)
        else:
            it = ThreadIterator(self, epoch, source, sorted(skip), generator_state,
                                prefilled=prefilled, probe=online)
        self._current = weakref.ref(it)
        return it

    def _online_probe(self) -> Any:
        """An :class:`~lightning_threadsafe.autotune.OnlineProbe` when "auto" can be
        resolved inside a running thread pool (map-style data, threads possible).
        ``None`` when settings are needed before loading starts (explicit processes,
        ``num_workers=0``): the synchronous probe runs then (iterable datasets get
        default settings from it: a single producer has nothing to size); or when
        only ``prefetch_factor`` is "auto" (resolved here to 2 per worker)."""
        s = self._settings
        if self._iterable or s["executor"] == "process" or s["num_workers"] == 0:
            return None
        if s["num_workers"] != "auto" and s["executor"] != "auto":
            # Only prefetch_factor is "auto": nothing to measure (the probe's answer is
            # torch's default whatever the samples), and no reason to shrink the pool.
            self._apply_probe({"executor": s["executor"], "num_workers": s["num_workers"],
                               "prefetch": 2, "evidence": {
                                   "reason": "prefetch_factor='auto' with fixed workers and "
                                             "executor: 2 per worker (torch's default)"}})
            return None
        from lightning_threadsafe.autotune import OnlineProbe

        cpus = _usable_cpus()
        nw = s["num_workers"]
        threads = min(cpus, _PROBE_THREADS) if nw == "auto" else int(nw)
        return OnlineProbe(threads=threads, cpu_count=cpus, serial=_PROBE_SERIAL)

    def _epoch_started(self, epoch: int) -> None:
        """Called by an iterator at its first delivery (or when it ends empty)."""
        self._resume = None
        if self._next_epoch <= epoch:  # keep a later epoch set by set_epoch() meanwhile
            self._next_epoch = epoch + 1

    def _source(self, epoch: int, skip: set[int]) -> Iterator[tuple[int, list[Any]]]:
        for ordinal, indices in enumerate(self._plan.batches(epoch)):
            if ordinal not in skip:
                yield ordinal, indices

    def _needs_probe(self) -> bool:
        s = self._settings
        return "auto" in (s["num_workers"], s["prefetch_factor"], s["executor"])

    def _apply_probe(self, result: dict[str, Any]) -> None:
        s = self._settings
        self._probe = result
        if s["executor"] == "auto":
            s["executor"] = result["executor"]
        if s["num_workers"] == "auto":
            s["num_workers"] = int(result["num_workers"])
        if s["prefetch_factor"] == "auto":
            s["prefetch_factor"] = int(result["prefetch"])

    def _resolve_auto(self) -> None:
        """Resolve "auto" settings outside an epoch (probing the first few indices)."""
        if not self._needs_probe():
            return
        n = len(self.dataset) if hasattr(self.dataset, "__len__") and not self._iterable else 0
        count = _PROBE_CONCURRENT[0] + _PROBE_SERIAL
        source = iter([(0, list(range(min(n, count))))] if n else [])
        self._probe_first_batches(source, epoch=0)

    def _probe_first_batches(
        self, source: Iterator[tuple[int, list[Any]]], epoch: int
    ) -> tuple[Iterator[tuple[int, list[Any]]], dict[tuple[int, int], Any]]:
        """Resolve "auto" by probing the epoch's first samples, and keep what was loaded.

        The probe (:func:`~lightning_threadsafe.autotune.probe`) loads the epoch's
        first batch (at least 8 samples, at most 32) on up to one thread per core, and
        4 more serially only when the concurrent phase cannot tell a GIL-bound
        dataset from a waiting one. It loads under the real sample context, so
        the values are exactly what the workers would produce: they are returned
        as ``{(ordinal, position): sample}`` and the first batch is ready when
        the probe ends -- in the common case the probe costs the time to first
        batch nothing. A failing sample ends the probe (default settings apply)
        and is loaded again by the workers under the error policy.
        """
        from lightning_threadsafe.autotune import probe

        head: list[tuple[int, list[Any]]] = []
        slots: list[tuple[int, int, Any]] = []
        target = None
        if not self._iterable:
            for ordinal, indices in source:
                head.append((ordinal, indices))
                slots.extend((ordinal, pos, i) for pos, i in enumerate(indices))
                if target is None:  # the first batch, within the bounds
                    low, high = _PROBE_CONCURRENT
                    target = max(low, min(len(indices), high)) + _PROBE_SERIAL
                if len(slots) >= target:
                    break
        slots = slots[:target]
        rest = itertools.chain(head, source)
        loaded: dict[tuple[int, int], Any] = {}
        if len(slots) < 4:
            self._apply_probe({"executor": "thread", "num_workers": _usable_cpus(), "prefetch": 2,
                               "evidence": {"reason": "too few samples to probe"}})
            return rest, loaded
        strict = FetchPolicy(seed=self.seed, on_error="raise", max_retries=0)
        telemetry = self._manager.telemetry
        # One WorkerStats per probe thread (stats are single-writer); lock guards
        # `loaded` and `registered` (the probe loads on several threads).
        lock = threading.Lock()
        per_thread = threading.local()
        registered: list[WorkerStats] = []

        def load(k: int) -> None:
            stats = getattr(per_thread, "stats", None)
            if stats is None:
                stats = per_thread.stats = telemetry.register(threading.current_thread().name)
                with lock:
                    registered.append(stats)
            ordinal, pos, index = slots[k]
            value = load_sample(self.dataset, index, epoch=epoch, policy=strict, stats=stats)
            with lock:
                loaded[(ordinal, pos)] = value

        serial = min(_PROBE_SERIAL, len(slots) // 3)
        try:
            result = probe(load, range(len(slots)), cpu_count=_usable_cpus(),
                           serial=serial).to_dict()
        except SampleLoadError as exc:
            result = {"executor": "thread", "num_workers": _usable_cpus(), "prefetch": 2,
                      "evidence": {"reason": f"probe stopped by a failing sample: {exc}"}}
        finally:
            with lock:
                done = list(registered)
            for stats in done:
                telemetry.retire(stats)
        self._apply_probe(result)
        if self._settings["executor"] == "process":
            loaded = {}  # torch's workers load everything themselves
        return rest, loaded

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch and settings, as plain data (``torch.load(weights_only=True)``-safe).

        Keys: ``version``, ``epoch``, ``seed``, ``delivered`` (ordinals of the batches
        already consumed this epoch), ``batches_in_epoch``, ``generator_state``,
        ``settings`` (the tuned knobs), ``tuner``.
        """
        it = self._current() if self._current is not None else None
        if it is not None and not it.finished_cleanly:
            state = it.position()
            consumed = self._consumed_fn() if self._consumed_fn is not None else None
            if consumed is not None and 0 <= consumed < len(state["delivered"]):
                # The consumer fetched ahead (Lightning prefetches one batch): batches it
                # has not used yet are not part of the saved position.
                state["delivered"] = state["delivered"][:consumed]
            if not self._iterable and len(state["delivered"]) >= self._plan_length():
                # Every batch of the epoch was consumed: the position is the start of the
                # next epoch (Lightning resumes straight into it with this iterator).
                state = {"epoch": state["epoch"] + 1, "delivered": [],
                         "generator_state": self._plan.generator_state()}
        elif self._resume is not None:
            state = {k: self._resume[k] for k in ("epoch", "delivered", "generator_state")}
        else:
            # Between epochs: the next iteration starts epoch _next_epoch from scratch.
            state = {"epoch": self._next_epoch, "delivered": [],
                     "generator_state": self._plan.generator_state()}
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            **state,
            "settings": {k: v for k, v in self._settings.items()},
            "tuner": self._tuner.state_dict() if self._tuner is not None else None,
        }

    def _plan_length(self) -> float:
        try:
            return len(self._plan)
        except TypeError:  # a sampler without len(): the epoch's end is unknown here
            return float("inf")

    def bind_consumption(self, consumed: Callable[[], int | None] | None) -> None:
        """Tell the loader how many delivered batches of the epoch the consumer has used.

        A consumer that fetches ahead (Lightning's fit loop prefetches one batch)
        holds batches it has not trained on; ``state_dict()`` counts only the
        first ``consumed()`` delivered batches of the epoch, so a resume yields the
        others again. ``ThreadedDataModule`` and ``LoaderMonitor`` bind this to the
        fit loop's progress; ``None`` unbinds (every delivered batch counts).
        """
        if consumed is not None and not callable(consumed):
            raise TypeError(f"consumed={consumed!r} must be a callable returning an int, or None")
        self._consumed_fn = consumed

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches not yet delivered."""
        if not isinstance(state, dict) or "epoch" not in state or "delivered" not in state:
            raise ValueError(
                f"state={state!r} must be a dict produced by ThreadedDataLoader.state_dict()"
            )
        if state.get("version", _STATE_VERSION) > _STATE_VERSION:
            raise ValueError(f"state version={state['version']!r} is newer than this library's")
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._policy = FetchPolicy(
                seed=self.seed, on_error=self._policy.on_error, max_retries=self._policy.max_retries,
                skip_after_retries=self._policy.skip_after_retries,
            )
            self._plan.seed = self.seed
        settings = state.get("settings") or {}
        for k in ("num_workers", "prefetch_factor", "executor"):
            if k in settings and settings[k] != "auto":
                self._settings[k] = settings[k]
        if state.get("tuner") is not None:
            self._ensure_tuner()
            self._tuner.load_state_dict(state["tuner"])
        self._resume = {
            "epoch": int(state["epoch"]),
            "delivered": [int(o) for o in state["delivered"]],
            "generator_state": state.get("generator_state"),
        }
        self._next_epoch = int(state["epoch"])

    # ------------------------------------------------------------------ extras

    def load_batches_concurrently(self, batches_of_indices: Sequence[Sequence[Any]]) -> list[T]:
        """Load and collate arbitrary batches of indices concurrently; returned in the order given."""
        if self._iterable:
            raise TypeError("load_batches_concurrently needs a map-style dataset")
        batches = [list(b) for b in batches_of_indices]
        for b in batches:
            if not b:
                raise ValueError("batches_of_indices must not contain an empty batch")
        self._resolve_auto()
        source = iter(enumerate(batches))
        it = ThreadIterator(self, self._next_epoch, source, [], None, in_order=True)
        try:
            return list(it)
        finally:
            it.close()

    def get_thread_safety_performance_report(self) -> dict[str, Any]:
        """Plain-data report of the loader since creation.

        Keys: ``settings`` (num_workers, prefetch_factor, executor, in_order, seed,
        memory_budget), ``probe`` (the "auto" probe, if any), ``totals`` (cumulative
        counters, see :class:`TelemetrySnapshot`), ``rates`` (samples_per_sec,
        wait_fraction, fetch_ms, collate_ms, transfer_ms, wait_ms, cpu_cores_used,
        throttled_fraction), ``memory`` (governor stats: budget_bytes,
        bytes_in_flight, peak_bytes_in_flight, throttle_events, throttled_s,
        rss_bytes ...), ``errors`` (raised, skipped, retries, skipped_indices,
        records), ``resources`` (per-resource stats incl. lock contention),
        ``stalls``, ``deadlock_reports``, ``bottleneck`` (latest verdict) and
        ``tuning`` (decisions taken).
        """
        report = self._manager.report(**self._gauges())
        report["settings"] = {
            **self._settings, "in_order": self.in_order, "seed": self.seed,
            "memory_budget": self.memory_budget, "prefetch_depth": self._depth(),
        }
        report["probe"] = self._probe
        report["tuning"] = list(self._decisions)
        report["bottleneck"] = self._decisions[-1].get("verdict") if self._decisions else None
        return report

    def _ensure_tuner(self) -> None:
        if self._tuner is None:
            from lightning_threadsafe.autotune import HillClimbTuner
            from lightning_threadsafe.bottleneck import BottleneckDetector

            self._tuner = HillClimbTuner(cpu_count=_usable_cpus())
            self._detector = BottleneckDetector(cpu_count=_usable_cpus())

    def optimize_thread_safety_settings(self, *, apply: bool = True) -> dict[str, Any]:
        """Diagnose the last window and tune ``num_workers``/``prefetch_factor``/``executor``.

        Measures the window since the previous call (or since creation), asks the
        :class:`BottleneckDetector` for a verdict and the :class:`HillClimbTuner` for
        a change, and applies it at a safe point: prefetch depth at once (between
        batches), thread count and executor from the next epoch. Returns a plain
        dict: ``verdict``, ``changed`` ({knob: [old, new]}), ``settings``,
        ``reason``, ``throughput``.
        """
        self._resolve_auto()
        self._ensure_tuner()
        from lightning_threadsafe.autotune import Decision, Settings
        from lightning_threadsafe.bottleneck import Bottleneck

        snap = self._manager.snapshot(**self._gauges())
        start = self._window_start if self._window_start is not None else self._manager._created
        self._window_start = snap
        window = snap.delta(start)
        self._detector.reset()
        self._detector.update(window)
        verdict = self._detector.compute()
        current = Settings(
            num_workers=int(self._settings["num_workers"]),
            prefetch=int(self._settings["prefetch_factor"]),
            executor=str(self._settings["executor"]),
        )
        if current.num_workers == 0 and verdict.code != Bottleneck.IO:
            # Inline loading was chosen for samples too cheap to hand to threads; only
            # waiting on I/O (which threads overlap) is a reason to leave it.
            decision = Decision(current, current, {}, f"{verdict.name}: inline loading kept "
                                "(samples too cheap for worker threads)", "hold",
                                int(verdict.code), verdict.name, window.samples_per_sec)
        else:
            decision = self._tuner.step(window, verdict, current)
        out = decision.to_dict()
        out["verdict"] = verdict.to_dict()
        out["window"] = window.to_dict()
        if apply:
            self.apply_decision(out)
        return out

    def apply_decision(self, decision: dict[str, Any]) -> None:
        """Apply a decision from ``optimize_thread_safety_settings(apply=False)`` and record it.

        Used to apply rank zero's decision on every rank (``AutoTuner``).
        """
        after = decision["after"]
        self.apply_settings({"num_workers": int(after["num_workers"]),
                             "prefetch_factor": int(after["prefetch"]),
                             "executor": str(after["executor"])})
        decision["applied"] = True
        decision["settings"] = dict(self._settings)
        self._decisions.append(decision)

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Set ``num_workers``/``prefetch_factor``/``executor`` (validated).

        The prefetch depth changes at once (between batches); the thread count
        and the executor from the next epoch.
        """
        s = dict(settings)
        if "num_workers" in s:
            check_int("num_workers", s["num_workers"], minimum=0, auto=True)
        if "prefetch_factor" in s:
            check_int("prefetch_factor", s["prefetch_factor"], minimum=1, auto=True)
        if "executor" in s:
            check_choice("executor", s["executor"], EXECUTORS)
        for k in ("num_workers", "prefetch_factor", "executor"):
            if k in s:
                self._settings[k] = s[k]

    def _depth(self, workers: int | None = None) -> int:
        """Batches admitted ahead (prefetch x workers, within the memory budget).

        ``workers``: the live pool size while the online probe runs (settings may
        still say "auto"; an unresolved prefetch counts as torch's default 2).
        """
        nw = self._settings["num_workers"] if workers is None else workers
        pf = self._settings["prefetch_factor"]
        if nw == "auto" or (pf == "auto" and workers is None):
            return 0
        pf = 2 if pf == "auto" else pf
        depth = max(1, int(pf) * max(1, int(nw)))
        gov = self._manager.governor
        return gov.effective_prefetch(depth) if gov is not None else depth

    def _gauges(self) -> dict[str, int]:
        it = self._current() if self._current is not None else None
        nw = self._settings["num_workers"]
        # "threads" is the configured count the current/last epoch ran with, so a
        # window measured after the epoch ended still says how it was loaded.
        return {
            "threads": int(nw) if nw != "auto" else 0,
            "prefetch": self._depth() if nw != "auto" else 0,
            "queue_depth": it.queue_depth() if it is not None else 0,
        }

    def cleanup_thread_safety_resources(self) -> None:
        """Stop every worker of this loader and close its resources. Idempotent.

        The loader stays usable: the next iteration starts fresh threads.
        """
        it = self._current() if self._current is not None else None
        if it is not None:
            it.close()
        self._manager.close()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    close = cleanup_thread_safety_resources

    @property
    def thread_safety_manager(self) -> ThreadSafetyManager:
        return self._manager

    def __enter__(self) -> ThreadedDataLoader[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup_thread_safety_resources()

    def __repr__(self) -> str:
        return (
            f"ThreadedDataLoader(dataset={type(self.dataset).__name__}, batch_size={self.batch_size}, "
            f"num_workers={self._settings['num_workers']}, executor={self._settings['executor']!r}, "
            f"prefetch_factor={self._settings['prefetch_factor']}, in_order={self.in_order})"
        )


# ====================================================================== iterators


