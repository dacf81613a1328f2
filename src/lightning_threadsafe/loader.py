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

import dataclasses
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate, default_convert

from lightning_threadsafe._epoch import (
    BaseIterator,
    EpochSpec,
    LiveSettings,
    LoaderHooks,
    WorkerInit,
    batch_source,
)
from lightning_threadsafe._exec_inline import InlineIterator
from lightning_threadsafe._exec_iterable import IterableIterator
from lightning_threadsafe._exec_process import ProcessIterator
from lightning_threadsafe._exec_threads import ThreadIterator
from lightning_threadsafe._fetch import FetchPolicy
from lightning_threadsafe.config import (
    EXECUTORS,
    check_choice,
    check_int,
    check_loader_args,
    check_mp_context,
)
from lightning_threadsafe.manager import ThreadSafetyManager
from lightning_threadsafe.sampler import BatchPlan, DistributedInfo

__all__ = ["ThreadedDataLoader"]

T = TypeVar("T")

_STATE_VERSION = 1
_PROBE_SERIAL = 4  # samples the online probe loads alone when the concurrent ones are ambiguous
_PROBE_THREADS = 8  # at most this many provisional threads while the online probe runs
# torch's DataLoader refuses these once constructed (they shape the epoch's plan).
_NO_HOOKS = LoaderHooks(None)  # batches loaded outside an epoch tell the loader nothing
_FROZEN = frozenset(("batch_size", "batch_sampler", "sampler", "drop_last", "dataset",
                     "persistent_workers"))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


def _draw_seed(generator: torch.Generator | None = None) -> int:
    """torch's base-seed draw at ``iter()`` (one int64 from ``generator`` or the global RNG)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item()) & (
        (1 << 63) - 1
    )


def _static_settings(values: dict[str, Any]) -> dict[str, Any]:
    """"auto" settings decided by rule, when there is no pool to probe in: one worker
    per core, torch's prefetch of 2 per worker, threads unless processes were asked for."""
    nw = values["num_workers"]
    return {"executor": "thread" if values["executor"] == "auto" else values["executor"],
            "num_workers": _usable_cpus() if nw == "auto" else nw, "prefetch": 2,
            "evidence": {"reason": "settings needed before loading: one worker per core, "
                                   "2 batches in flight per worker"}}


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
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
    return dev


class _EpochHook:
    """Lightning calls ``loader.sampler.set_epoch(epoch)`` at each epoch start; the
    loader's default samplers forward it (weakly) so shuffles follow the trainer."""

    _loader: Callable[[], Any]

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)


class _SequentialSampler(_EpochHook, SequentialSampler):
    pass


class _RandomSampler(_EpochHook, RandomSampler):
    pass


class _InfiniteConstantSampler(torch.utils.data.Sampler):  # type: ignore[type-arg]
    """What torch's DataLoader reports as the sampler of an iterable-style dataset."""

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None


def _torch_samplers(loader: Any, dataset: Any, iterable: bool, shuffle: Any, sampler: Any,
                    batch_sampler: Any, batch_size: int | None, drop_last: bool,
                    generator: torch.Generator | None) -> tuple[Any, Any]:
    """``loader.sampler`` and ``loader.batch_sampler`` as torch's DataLoader builds them.

    They describe the epoch's order (the batch plan draws its own per epoch, seeded
    as described in :mod:`~lightning_threadsafe.sampler`); the default ones forward
    ``set_epoch`` to the loader.
    """
    if sampler is None:
        if iterable:
            sampler = _InfiniteConstantSampler()
        else:
            sampler = _RandomSampler(dataset, generator=generator) if shuffle \
                else _SequentialSampler(dataset)
            sampler._loader = weakref.ref(loader)
    if batch_size is not None and batch_sampler is None:
        batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    return sampler, batch_sampler


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
        iterable = check_loader_args(dict(locals()))
        dev = _resolve_device(device)
        if batch_sampler is not None:
            batch_size, drop_last = None, False

        # ---- public attributes (torch names and values)
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.pin_memory_device = pin_memory_device
        self.timeout = timeout
        self.worker_init_fn = worker_init_fn
        self.multiprocessing_context = multiprocessing_context
        self.generator = generator
        self.persistent_workers = persistent_workers
        self.in_order = bool(in_order)
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
        self.sampler, self.batch_sampler = _torch_samplers(
            self, dataset, iterable, shuffle, sampler, batch_sampler, batch_size, drop_last,
            generator)

        # ---- seeds: an explicit seed fixes shuffles and sample_rng() for every epoch;
        # without one, each iter() draws them from torch's global RNG (or `generator`),
        # in torch's order, so torch.manual_seed(s) before an epoch reproduces it.
        self._user_seed = int(seed) if seed is not None else None
        self.seed: int | None = self._user_seed  # the seed of the latest epoch
        self._skip_after_retries = skip_after_retries
        self._plan = BatchPlan(
            dataset, batch_size=batch_size, shuffle=bool(shuffle), sampler=sampler,
            batch_sampler=batch_sampler, drop_last=drop_last, generator=generator,
            seed=self._user_seed,
        )
        self._pin = bool(pin_memory) and torch.cuda.is_available()
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
        self._worker_init = WorkerInit(worker_init_fn, persistent=bool(persistent_workers))

        # ---- tunable settings: resolved by the online probe when "auto"
        if prefetch_factor is None and num_workers != 0:
            prefetch_factor = 2  # torch's default with workers
        self._live = LiveSettings(num_workers, prefetch_factor, executor)
        self._settings = self._live.values
        self._tuner: Any = None
        self._detector: Any = None
        self._decisions: list[dict[str, Any]] = []
        self._window_start = None

        # ---- epochs (consumer thread). The loader holds its iterators weakly; each
        # iterator holds its epoch strongly (ownership: see _epoch.py).
        self._next_epoch = 0
        self._resume: dict[str, Any] | None = None
        self._iterators: weakref.WeakSet[BaseIterator[Any]] = weakref.WeakSet()
        self._current: weakref.ReferenceType[BaseIterator[Any]] | None = None
        self._consumed_fn: Callable[[], int | None] | None = None
        self._iterable_len_called: int | None = None  # len(loader) of an iterable dataset
        self.__dict__["_initialized"] = True

    # ------------------------------------------------------------------ torch attributes

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FROZEN and self.__dict__.get("_initialized", False):
            raise ValueError(f"{name} attribute should not be set after "
                             f"{type(self).__name__} is initialized")
        if name == "multiprocessing_context" and self.__dict__.get("_initialized", False):
            check_mp_context(value, self.num_workers)
        super().__setattr__(name, value)

    @property
    def num_workers(self) -> int | str:
        """Worker threads (or processes with ``executor="process"``); tuned values show here.

        Setting it takes effect at the next ``iter()``, as with torch.
        """
        return self._live.values["num_workers"]  # type: ignore[no-any-return]

    @num_workers.setter
    def num_workers(self, value: int | str) -> None:
        check_int("num_workers", value, minimum=0, auto=True)
        self._live.values["num_workers"] = value

    @property
    def prefetch_factor(self) -> int | str | None:
        """Batches in flight per worker, as given (``None`` without workers, 2 by default
        with workers, as with torch); tuned values show here."""
        value = self._live.values["prefetch_factor"]
        return None if value is None else value  # type: ignore[no-any-return]

    @prefetch_factor.setter
    def prefetch_factor(self, value: int | str | None) -> None:
        if value is not None:
            check_int("prefetch_factor", value, minimum=1, auto=True)
        self._live.values["prefetch_factor"] = value

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        length = self._batches_in_epoch()
        if self._iterable:
            # torch warns when an iterable dataset yields more than the length it reported.
            self._iterable_len_called = length
        return length

    def _batches_in_epoch(self) -> int:
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

    @property
    def _probe(self) -> dict[str, Any] | None:
        return self._live.probe

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

    def _policy(self, seed: int) -> FetchPolicy:
        return FetchPolicy(seed=seed, on_error=self.on_error, max_retries=self.max_retries,
                           skip_after_retries=self._skip_after_retries)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[T]:
        """A new, independent iterator over one epoch (earlier ones keep theirs, as in torch).

        The epoch (and a pending resume) is only used up once this iterator delivers
        or finishes (``_epoch_started``): Lightning calls ``iter()`` to probe a loader
        and creates the first epoch's iterator before ``set_epoch(0)``; neither may
        skip an epoch.
        """
        resume = self._resume
        epoch = int(resume["epoch"]) if resume is not None else self._next_epoch
        self._plan.distributed = self._distributed_info()
        if resume is not None and resume.get("generator_state") is not None:
            self._plan.set_generator_state(resume["generator_state"])
        generator_state = self._plan.generator_state()
        seed, shuffle_seed = self._epoch_seeds(resume)
        self.seed = seed
        skip = set(resume["delivered"]) if resume is not None else set()
        if self._iterable and self._live.needs_probe():
            # One producer whatever the data: nothing to size, no executor to choose.
            static = _static_settings(self._live.values)
            if self._live.values["num_workers"] == "auto":
                static["num_workers"] = 1
            self._live.apply_probe(static)
        spec = self._spec(epoch, seed)
        it: BaseIterator[Any]
        if self._iterable:
            it = IterableIterator(spec, resume)
        else:
            source = batch_source(self._plan, epoch, skip, shuffle_seed)
            it = self._executor_for(spec, source, sorted(skip), generator_state)
        it.shuffle_seed = shuffle_seed  # type: ignore[attr-defined]
        self._iterators.add(it)
        self._current = weakref.ref(it)
        return it  # type: ignore[return-value]

    def _epoch_seeds(self, resume: dict[str, Any] | None) -> tuple[int, int | None]:
        """This epoch's sample seed and, for a default shuffle without a seed, its order seed.

        torch's DataLoader draws a base seed at ``iter()`` (from ``generator`` if given,
        else the global RNG), then its ``RandomSampler`` draws the shuffle seed from the
        global RNG; the same draws, in the same order, happen here, and both are saved in
        ``state_dict()`` for an exact resume.
        """
        drawn = _draw_seed(self.generator)  # drawn on resume too: a user generator's
        # sequence must be where torch's would be
        if resume is not None and resume.get("seed") is not None:
            seed = int(resume["seed"])
            shuffle_seed = resume.get("shuffle_seed")
            if shuffle_seed is None and self._user_seed is None and self._plan.default_shuffle():
                shuffle_seed = seed  # a checkpoint without an order seed: deterministic still
            return seed, shuffle_seed
        seed = self._user_seed if self._user_seed is not None else drawn
        shuffle_seed = None
        if self._user_seed is None and self._plan.default_shuffle():
            shuffle_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        return seed, shuffle_seed

    def _spec(self, epoch: int, seed: int) -> EpochSpec:
        live = self._live.values
        nw = live["num_workers"]
        try:
            length: int | None = self._batches_in_epoch()
        except TypeError:
            length = None
        return EpochSpec(
            dataset=self.dataset, epoch=epoch, collate_fn=self.collate_fn,
            auto_collation=self._auto_collation, batch_size=self.batch_size,
            drop_last=self.drop_last, policy=self._policy(seed), plan=self._plan,
            in_order=self.in_order, timeout=float(self.timeout), pin=self._pin,
            stager=self._stager_for_use(), services=self._manager, settings=self._live,
            num_workers=0 if nw == 0 else (int(nw) if nw != "auto" else -1),
            executor=str(live["executor"]), worker_init=self._worker_init,
            multiprocessing_context=self.multiprocessing_context,
            stall_timeout=self.stall_timeout, hooks=LoaderHooks(self), length=length,
            reported_length=self._iterable_len_called,
        )

    def _executor_for(self, spec: EpochSpec, source: Iterator[tuple[int, list[Any]]],
                      resumed: list[int], generator_state: list[int] | None) -> BaseIterator[Any]:
        """The epoch's executor: inline, threads (with the online probe for "auto") or processes."""
        online = self._online_probe() if self._live.needs_probe() else None
        values = self._live.values
        if online is None and self._live.needs_probe():
            self._live.apply_probe(_static_settings(values))
        if online is not None:
            return ThreadIterator(spec, source, resumed, generator_state, probe=online)
        spec = dataclasses.replace(spec, num_workers=int(values["num_workers"]),
                                   executor=str(values["executor"]))
        if spec.num_workers == 0:
            if spec.timeout > 0 and self._live.probe is None and not self._decisions:
                # As torch (a bare AssertionError at iter()), in one line. Loading inline
                # because "auto" or the tuner chose it just cannot time out.
                raise ValueError(f"timeout={self.timeout!r} needs num_workers > 0 (got "
                                 "num_workers=0): loading in the calling thread cannot time out")
            return InlineIterator(spec, source, resumed, generator_state)
        if spec.executor == "process":
            return ProcessIterator(spec, source, resumed, generator_state)
        return ThreadIterator(spec, source, resumed, generator_state)

    def _online_probe(self) -> Any:
        """An :class:`~lightning_threadsafe.tuning.OnlineProbe` when "auto" is resolved
        inside a running thread pool (map-style data, threads possible); ``None`` when
        the settings follow from rules instead (explicit processes or ``num_workers=0``:
        one worker per core; only ``prefetch_factor`` "auto": 2 per worker)."""
        s = self._live.values
        if s["executor"] == "process" or s["num_workers"] == 0:
            return None
        if s["num_workers"] != "auto" and s["executor"] != "auto":
            return None
        from lightning_threadsafe.tuning import OnlineProbe

        cpus = _usable_cpus()
        nw = s["num_workers"]
        threads = min(cpus, _PROBE_THREADS) if nw == "auto" else int(nw)
        return OnlineProbe(threads=threads, cpu_count=cpus, serial=_PROBE_SERIAL)

    def _epoch_started(self, epoch: int) -> None:
        """Called by an iterator at its first delivery (or when it ends empty)."""
        self._resume = None
        if self._next_epoch <= epoch:  # keep a later epoch set by set_epoch() meanwhile
            self._next_epoch = epoch + 1

    def _latest(self) -> BaseIterator[Any] | None:
        return self._current() if self._current is not None else None

    def _resolve_auto(self) -> None:
        """Resolve "auto" settings outside an epoch, by the rules (nothing loaded yet)."""
        if self._live.needs_probe():
            self._live.apply_probe(_static_settings(self._live.values))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch and settings, as plain data (``torch.load(weights_only=True)``-safe).

        Keys: ``version``, ``epoch``, ``seed`` (the epoch's sample seed), ``shuffle_seed``
        (its order seed when drawn from the global RNG), ``delivered`` (ordinals of the
        batches already consumed this epoch), ``batches_in_epoch``, ``generator_state``,
        ``settings`` (the tuned knobs), ``tuner``. With several live iterators, the
        position is the latest one's.
        """
        it = self._latest()
        if it is not None and not it.finished_cleanly:
            state = it.position()
            state["seed"] = it.spec.policy.seed
            state["shuffle_seed"] = getattr(it, "shuffle_seed", None)
            consumed = self._consumed_fn() if self._consumed_fn is not None else None
            if consumed is not None and 0 <= consumed < len(state["delivered"]):
                # The consumer fetched ahead (Lightning prefetches one batch): batches it
                # has not used yet are not part of the saved position.
                state["delivered"] = state["delivered"][:consumed]
            if not self._iterable and len(state["delivered"]) >= self._plan_length():
                # Every batch of the epoch was consumed: the position is the start of the
                # next epoch (Lightning resumes straight into it with this iterator).
                state = {"epoch": state["epoch"] + 1, "delivered": [],
                         "generator_state": self._plan.generator_state(),
                         "seed": self._user_seed, "shuffle_seed": None}
        elif self._resume is not None:
            state = {k: self._resume.get(k) for k in
                     ("epoch", "delivered", "generator_state", "seed", "shuffle_seed")}
        else:
            # Between epochs: the next iteration starts epoch _next_epoch from scratch.
            state = {"epoch": self._next_epoch, "delivered": [],
                     "generator_state": self._plan.generator_state(),
                     "seed": self._user_seed, "shuffle_seed": None}
        return {
            "version": _STATE_VERSION,
            **state,
            "settings": dict(self._settings),
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
        settings = state.get("settings") or {}
        for k in ("num_workers", "prefetch_factor", "executor"):
            if k in settings and settings[k] != "auto":
                self._settings[k] = settings[k]
        if state.get("tuner") is not None:
            self._ensure_tuner()
            self._tuner.load_state_dict(state["tuner"])
        seed = state.get("seed")
        if seed is not None and self._user_seed is not None and int(seed) != self._user_seed:
            self._user_seed = int(seed)  # the checkpoint's seed rules its own epochs
            self._plan.seed = self._user_seed
        self._resume = {
            "epoch": int(state["epoch"]),
            "delivered": [int(o) for o in state["delivered"]],
            "generator_state": state.get("generator_state"),
            "seed": int(seed) if seed is not None else None,
            "shuffle_seed": state.get("shuffle_seed"),
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
        seed = self._user_seed if self._user_seed is not None else _draw_seed(self.generator)
        spec = dataclasses.replace(self._spec(self._next_epoch, seed), in_order=True,
                                   hooks=_NO_HOOKS, length=len(batches))
        it = self._executor_for(spec, iter(enumerate(batches)), [], None)
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
            from lightning_threadsafe.bottleneck import BottleneckDetector
            from lightning_threadsafe.tuning import HillClimbTuner

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
        from lightning_threadsafe.bottleneck import Bottleneck
        from lightning_threadsafe.tuning import Decision, Settings

        snap = self._manager.snapshot(**self._gauges())
        start = self._window_start if self._window_start is not None else self._manager._created
        self._window_start = snap
        window = snap.delta(start)
        self._detector.reset()
        self._detector.update(window)
        verdict = self._detector.compute()
        current = Settings(
            num_workers=int(self._settings["num_workers"]),
            prefetch=self._live.prefetch(),
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

    def _depth(self) -> int:
        """Batches admitted ahead (prefetch x workers, within the memory budget)."""
        return self._live.depth(self._manager.governor)

    def _gauges(self) -> dict[str, int]:
        it = self._latest()
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
        for it in list(self._iterators):
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
