"""Contenders: how each loader under test is built, iterated and torn down.

Three families appear in every table:

* ``torch`` -- ``torch.utils.data.DataLoader`` at a given ``num_workers``
  (processes, the platform's default start method) and ``prefetch_factor``.
* ``torchdata`` -- ``torchdata.nodes``: ``SamplerWrapper`` ->
  ``ParallelMapper(dataset.__getitem__, method="thread")`` (per-sample work) ->
  ``Batcher`` -> ``Mapper(collate)`` -> ``Prefetcher`` -> ``Loader``; the usual
  map-style recipe from torchdata's documentation. Skipped when torchdata is not
  importable.
* ``ours`` -- ``lightning_threadsafe.ThreadedDataLoader`` with ``"auto"``
  settings or a static setting. Skipped with the import error when the loader
  is not importable (the harness still measures the peers).

References (family ``reference``) beside them: bare threads calling the dataset
(W1's ceiling) and the bare batch-granular ``ThreadPoolExecutor`` (O1's floor).

Every measurement opens a *fresh* loader (:meth:`Contender.open`) and closes it
afterwards (:meth:`LoaderHandle.close`), which stops torch's worker processes,
torchdata's threads, or calls ``cleanup_thread_safety_resources()`` on ours, so
that no contender keeps burning CPU while the next one is measured.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, Dataset, SequentialSampler, default_collate

__all__ = [
    "Contender",
    "LoaderHandle",
    "LoaderSpec",
    "bare_threads",
    "batch_pool",
    "ours",
    "ours_unavailable",
    "torch_dl",
    "torchdata_nodes",
    "torchdata_unavailable",
]

Collate = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class LoaderSpec:
    """What every contender loads: the same dataset, batch size and collate function.

    Samples are visited in index order (``shuffle=False``) by every contender;
    the datasets draw their randomness from the index, so the work is identical.
    """

    dataset: Dataset
    batch_size: int
    collate_fn: Collate | None = None

    @property
    def collate(self) -> Collate:
        return self.collate_fn if self.collate_fn is not None else default_collate


class LoaderHandle:
    """An open loader. ``iter()`` starts an epoch; ``close()`` releases everything.

    Args:
        iterable: the loader (anything ``iter()`` accepts).
        close: releases the loader's own resources (called once, after the iterators').
        report: returns the loader's performance report (ours) or ``None``.
        close_iterator: releases one iterator (torch worker processes).
    """

    def __init__(self, iterable: Any, *, close: Callable[[], None] | None = None,
                 report: Callable[[], dict[str, Any] | None] | None = None,
                 close_iterator: Callable[[Any], None] | None = None) -> None:
        self.iterable = iterable
        self._close = close
        self._report = report
        self._close_iterator = close_iterator
        self._iterators: list[Any] = []
        self._closed = False

    def iter(self) -> Iterator[Any]:
        it = iter(self.iterable)
        self._iterators.append(it)
        return it

    def report(self) -> dict[str, Any] | None:
        return self._report() if self._report is not None else None

    def close(self) -> None:
        """Idempotent: stop every iterator, then the loader."""
        if self._closed:
            return
        self._closed = True
        iterators, self._iterators = self._iterators, []
        if self._close_iterator is not None:
            for it in iterators:
                self._close_iterator(it)
        del iterators
        if self._close is not None:
            self._close()

    def __enter__(self) -> LoaderHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Contender:
    """One loader configuration in a table.

    Attributes:
        name: the row label (unique within a workload).
        family: ``"torch"``, ``"torchdata"``, ``"ours"`` or ``"reference"``.
        params: the knobs, recorded in the JSON.
        build: ``spec -> LoaderHandle``.
        workers: concurrency used for the physical limit (``None``: read it from
            the loader's report after the run).
        unavailable: why the contender cannot run here, or ``None``.
    """

    name: str
    family: str
    params: dict[str, Any]
    build: Callable[[LoaderSpec], LoaderHandle] = field(repr=False, compare=False)
    workers: int | None = None
    unavailable: str | None = None

    def open(self, spec: LoaderSpec) -> LoaderHandle:
        return self.build(spec)


# --------------------------------------------------------------------------- torch


def _shutdown_torch_iterator(it: Any) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def torch_dl(num_workers: int, prefetch_factor: int | None = None) -> Contender:
    """``torch.utils.data.DataLoader`` with ``num_workers`` worker processes."""
    pf = prefetch_factor if num_workers > 0 else None
    name = f"torch nw={num_workers}" + (f" pf={pf}" if prefetch_factor is not None and pf else "")

    def build(spec: LoaderSpec) -> LoaderHandle:
        loader = DataLoader(spec.dataset, batch_size=spec.batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=spec.collate,
                            prefetch_factor=pf, persistent_workers=False)
        return LoaderHandle(loader, close_iterator=_shutdown_torch_iterator)

    params: dict[str, Any] = {"num_workers": num_workers, "prefetch_factor": pf if pf else 2}
    return Contender(name, "torch", params, build, workers=max(1, num_workers))


# ----------------------------------------------------------------------- torchdata


def torchdata_unavailable() -> str | None:
    """``None`` when ``torchdata.nodes`` imports, else the reason."""
    try:
        importlib.import_module("torchdata.nodes")
    except ImportError as exc:
        return f"torchdata.nodes is not importable ({exc})"
    return None


def _shutdown_nodes(root: Any) -> None:
    """Stop the threads of a torchdata.nodes chain (outermost node first).

    Each node that runs threads keeps its iterator in ``_it`` (``ParallelMapper``
    nests one more level); those iterators have ``_shutdown()``, which sets
    their stop event and joins their threads with a timeout.
    """
    node, seen = root, set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        obj = node
        for _ in range(3):
            obj = getattr(obj, "_it", None)
            if obj is None:
                break
            shutdown = getattr(obj, "_shutdown", None)
            if callable(shutdown):
                shutdown()
                break
        node = getattr(node, "source", None)


def torchdata_nodes(threads: int, prefetch: int = 4) -> Contender:
    """torchdata.nodes ``ParallelMapper(method="thread")`` + ``Batcher`` + ``Prefetcher``."""
    reason = torchdata_unavailable()

    def build(spec: LoaderSpec) -> LoaderHandle:
        from torchdata import nodes as tn

        node: Any = tn.SamplerWrapper(SequentialSampler(spec.dataset))
        node = tn.ParallelMapper(node, map_fn=spec.dataset.__getitem__, num_workers=threads,
                                 method="thread", in_order=True)
        node = tn.Batcher(node, batch_size=spec.batch_size, drop_last=False)
        node = tn.Mapper(node, spec.collate)
        node = tn.Prefetcher(node, prefetch_factor=prefetch)
        root = node
        return LoaderHandle(tn.Loader(root), close=lambda: _shutdown_nodes(root))

    return Contender(f"torchdata threads={threads}", "torchdata",
                     {"threads": threads, "prefetch": prefetch}, build, workers=threads,
                     unavailable=reason)


# ----------------------------------------------------------------------- reference


class _BareThreads:
    """``threads`` threads calling ``dataset[i]`` in a loop, nothing else: no collate, no
    ordering, no hand-off per sample. Each batch is a token tensor of ``batch_size``
    entries; the rate is the dataset's own throughput ceiling on this machine."""

    def __init__(self, dataset: Dataset, batch_size: int, threads: int) -> None:
        self.dataset, self.batch_size, self.threads = dataset, batch_size, threads

    def __iter__(self) -> Iterator[Any]:
        import itertools
        import queue
        import threading
        import time

        import torch

        from lightning_threadsafe._intraop import limit_intra_op_threads

        n = len(self.dataset)  # type: ignore[arg-type]
        counter = itertools.count()
        counter_lock = threading.Lock()  # guards counter (shared by the threads)
        done: queue.SimpleQueue[int] = queue.SimpleQueue()  # one entry per finished batch
        stop = threading.Event()

        def run() -> None:
            limit_intra_op_threads()  # what every loader's worker does
            loaded = 0
            while not stop.is_set():
                with counter_lock:
                    i = next(counter)
                if i >= n:
                    return
                self.dataset[i]
                loaded += 1
                if loaded == self.batch_size:
                    done.put(loaded)
                    loaded = 0

        workers = [threading.Thread(target=run, name=f"bench-bare-{k}", daemon=True)
                   for k in range(self.threads)]
        for t in workers:
            t.start()
        try:
            for _ in range(n // self.batch_size):
                yield torch.empty(done.get(timeout=120))
        finally:
            stop.set()
            deadline = time.monotonic() + 30.0  # one deadline for all: never hang the run
            for t in workers:
                t.join(max(0.0, deadline - time.monotonic()))


def bare_threads(threads: int) -> Contender:
    """The no-loader ceiling: ``threads`` threads calling the dataset directly (reference)."""
    return Contender(f"bare threads={threads} (no loader)", "reference", {"threads": threads},
                     lambda spec: LoaderHandle(_BareThreads(spec.dataset, spec.batch_size,
                                                            threads)),
                     workers=threads)


class _BatchPool:
    """The bare batch-granular pool (O1's reference): one
    ``concurrent.futures.ThreadPoolExecutor`` task per batch, each calling ``dataset[i]``
    for the batch's indices and collating them; ``2 * threads`` batches in flight, taken
    in order. No seeding context, error policy, memory budget or telemetry: the least a
    thread loader must do, per sample and per batch."""

    def __init__(self, dataset: Dataset, batch_size: int, collate: Collate, threads: int) -> None:
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.threads = threads

    def __iter__(self) -> Iterator[Any]:
        import collections
        import concurrent.futures

        ds, bs, collate = self.dataset, self.batch_size, self.collate
        n = len(ds)  # type: ignore[arg-type]
        starts = iter(range(0, n, bs))

        def load(start: int) -> Any:
            return collate([ds[i] for i in range(start, min(start + bs, n))])

        pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="bench-pool")
        in_flight: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        try:
            for start in itertools.islice(starts, 2 * self.threads):
                in_flight.append(pool.submit(load, start))
            while in_flight:
                batch = in_flight.popleft().result(timeout=120)
                for start in itertools.islice(starts, 1):
                    in_flight.append(pool.submit(load, start))
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def batch_pool(threads: int) -> Contender:
    """The bare batch-granular ``ThreadPoolExecutor`` (reference for O1)."""
    return Contender(f"bare pool threads={threads}", "reference", {"threads": threads},
                     lambda spec: LoaderHandle(_BatchPool(spec.dataset, spec.batch_size,
                                                          spec.collate, threads)),
                     workers=threads)


# ---------------------------------------------------------------------------- ours


def ours_unavailable() -> str | None:
    """``None`` when ``lightning_threadsafe.ThreadedDataLoader`` imports, else why not."""
    try:
        module = importlib.import_module("lightning_threadsafe")
        getattr(module, "ThreadedDataLoader")  # noqa: B009 (the AttributeError is the point)
    except (ImportError, AttributeError) as exc:
        return (f"lightning_threadsafe.ThreadedDataLoader is not importable "
                f"({type(exc).__name__}: {exc}); ours skipped")
    return None


def _ours_label(kwargs: dict[str, Any]) -> str:
    if all(kwargs.get(k) == "auto" for k in ("num_workers", "prefetch_factor", "executor")):
        return "ours auto"
    parts = [f"nw={kwargs.get('num_workers')}", f"pf={kwargs.get('prefetch_factor')}",
             str(kwargs.get("executor", "thread"))]
    return "ours static (" + ", ".join(parts) + ")"


def ours(label: str | None = None, **kwargs: Any) -> Contender:
    """``ThreadedDataLoader`` with ``kwargs`` (e.g. ``num_workers="auto"``).

    ``workers`` is read from the loader's report (``settings.num_workers``) after
    each run, so "auto" rows get the limit of what the loader actually chose.
    """
    reason = ours_unavailable()
    name = label or _ours_label(kwargs)

    def build(spec: LoaderSpec) -> LoaderHandle:
        from lightning_threadsafe import ThreadedDataLoader

        loader = ThreadedDataLoader(spec.dataset, batch_size=spec.batch_size, shuffle=False,
                                    collate_fn=spec.collate_fn, **kwargs)
        return LoaderHandle(loader, close=loader.cleanup_thread_safety_resources,
                            report=loader.get_thread_safety_performance_report)

    workers = kwargs.get("num_workers")
    return Contender(name, "ours", dict(kwargs), build,
                     workers=workers if isinstance(workers, int) else None, unavailable=reason)
