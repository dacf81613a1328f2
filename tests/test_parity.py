"""Parity with ``torch.utils.data.DataLoader``: torch is the oracle.

Every case is a function ``case(make)`` written once and run twice by
:func:`on_both`: first with ``make`` building ``torch.utils.data.DataLoader``
(``num_workers=0`` unless the behaviour under test needs worker processes),
then with ``make`` building ``ThreadedDataLoader`` (parametrized over
``num_workers`` 0 and 2 threads where that makes sense). The case returns what
it observed (batches, ``len()``, attribute values and types, exceptions as
:class:`Err`), and the test asserts that ours observed the same thing as torch
in the same run (:func:`assert_same`: tensors by dtype, shape and
``torch.equal``, containers by exact type and recursively, exceptions by type:
ours may raise a subclass of torch's exception, so ``except KeyError`` code
keeps working). Nothing is hard-coded except where torch itself cannot observe
the behaviour (documented at the test).

The cases are ports of PyTorch's ``test/test_dataloader.py`` (read at commit
74436f9025609987bbc69c617564f98635b67807) that apply to a loader whose workers
are threads, plus the drop-in behaviours the thread loader promises. Tests
about worker *processes* are out of scope; :data:`EXCLUDED` names each torch
test that is not ported and why. Each ported test names its torch original in
its docstring.

Rules kept here: every loader of ours is closed (the autouse fixture in
``conftest.py`` fails a test that leaves an ``lts-*`` thread alive); no sleep
is used for synchronisation and nothing asserts on timing; every case is
deterministic (fixed generators, fixed global seeds, fixed data).
"""

from __future__ import annotations

import collections
import gc
import math
import multiprocessing
import os
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    ChainDataset,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data._utils.collate import default_collate, default_convert
from torch.utils.data.distributed import DistributedSampler

import lightning_threadsafe
from lightning_threadsafe import ThreadedDataLoader

# torch tests (class.test) of test/test_dataloader.py that are not ported, and why.
EXCLUDED: dict[str, str] = {
    # dataset classes alone
    "TestDatasetRandomSplit.*": "random_split on datasets alone; no loader involved",
    "TestTensorDataset.*": "TensorDataset alone; no loader involved",
    "TestStackDataset.*": "StackDataset alone; no loader involved",
    "TestConcatDataset.*": "ConcatDataset alone; no loader involved",
    # worker processes
    "TestDataLoader.test_fd_limit_exceeded": "worker processes pass tensors through shared-memory file descriptors",
    "TestDataLoader.test_segfault": "detects a worker process killed by a signal; threads share the process",
    "TestDataLoader.test_no_segfault": "fork of a worker process after set_num_threads",
    "TestDataLoader.test_large_sampler_indices": "index queues to worker processes blocking on large indices",
    "TestDataLoader.test_multiprocessing_contexts": "behaviour of the multiprocessing start methods",
    "TestDataLoader.test_multiprocessing_iterdatapipe": "pickling of datapipes for multiprocessing start methods",
    "TestDataLoader.test_multiprocessing_iterdatapipe_with_dill": "dill pickling for multiprocessing start methods",
    "TestDataLoader.test_worker_seed": "torch.initial_seed() differs per worker process; threads share one RNG",
    "TestDataLoader.test_worker_seed_reproducibility": "per-worker-process torch seeds",
    "TestDataLoader.test_multi_epochs_reproducibility": "get_worker_info() inside per-worker copies of an iterable dataset",
    "TestDataLoader.test_worker_init_fn": (
        "torch.manual_seed() in a worker process is invisible to the parent; in a thread it "
        "reseeds the whole process (the call contract is ported in test_worker_init_fn_*)"
    ),
    "TestDataLoader.test_get_worker_info": "get_worker_info() and pids of worker processes",
    "TestDataLoader.test_partial_workers": (
        "asserts worker processes exit; the thread analogue is the conftest leak check "
        "(batches of a partial epoch are ported in test_partial_epoch_then_full_epoch)"
    ),
    "TestDataLoader.test_proper_exit": "killing worker processes / the loader process and exit codes",
    "TestDataLoader.test_default_collate_shared_tensor": "collate into shared memory inside worker processes",
    "TestDataLoader.test_numpy_gen_state": "private seeding helper of worker processes (_generate_state)",
    "TestDataLoader.test_excessive_thread_creation_warning": (
        "warns when worker processes exceed the CPU count; ours counts threads"
    ),
    "TestDataLoaderPersistentWorkers.test_fd_limit_exceeded": "shared-memory file descriptors of worker processes",
    "TestDataLoaderPersistentWorkers.test_dataset_not_reset": "persistent worker processes keep their own dataset copy",
    "TestDataLoaderPersistentWorkers.test_early_exit": "subprocess with forked persistent workers and pin_memory",
    "TestIndividualWorkerQueue.test_ind_worker_queue": (
        "round-robin assignment of batches to worker processes with per-process dataset copies"
    ),
    "TestSetAffinity.test_set_affinity_in_worker_init": "CPU affinity of a worker process",
    "TestConvAfterFork.test_conv_after_fork": "convolution in a forked worker process",
    "IntegrationTestDataLoaderDataPipe.test_shuffler_iterdatapipe": (
        "IterDataPipe seeds shared across spawned worker processes"
    ),
    # samplers / collate functions alone
    "TestDataLoader.test_random_sampler": "RandomSampler statistics alone; no loader (its len cases are ported)",
    "TestDataLoader.test_distributed_sampler_invalid_rank": "DistributedSampler alone; no loader",
    "TestDataLoader.test_sampler_reproducibility": (
        "samplers alone; the loader-level global-RNG draw is ported in "
        "test_user_sampler_drawing_from_global_rng"
    ),
    "TestDataLoader.test_default_convert_mapping_keep_type": "default_convert alone (loader-level: test_collate_structures)",
    "TestDataLoader.test_default_convert_sequence_keep_type": "default_convert alone (loader-level: test_collate_structures)",
    "TestDataLoader.test_default_convert_sequence_dont_keep_type": "default_convert alone; no loader",
    "TestDataLoader.test_default_collate_dtype": "default_collate alone (loader-level: test_collate_structures)",
    "TestDataLoader.test_default_collate_mapping_keep_type": "default_collate alone (loader-level: test_collate_structures)",
    "TestDataLoader.test_default_collate_sequence_keep_type": "default_collate alone (loader-level: test_collate_structures)",
    "TestDataLoader.test_default_collate_sequence_dont_keep_type": "default_collate alone; no loader",
    "TestDataLoader.test_default_collate_numpy_memmap": "default_collate on a memmap alone; no loader",
    # CUDA (this suite runs on CPU-only torch)
    "TestDataLoader.test_sequential_pin_memory": "needs CUDA pinned memory",
    "TestDataLoader.test_shuffle_pin_memory": "needs CUDA pinned memory",
    "TestStringDataLoader.test_shuffle_pin_memory": "needs CUDA pinned memory (strings: test_collate_structures)",
    "TestDictDataLoader.test_pin_memory": "needs CUDA pinned memory",
    "TestDictDataLoader.test_pin_memory_device": "needs CUDA pinned memory",
    "TestDictDataLoader.test_pin_memory_with_only_device": "needs CUDA pinned memory",
    "TestCustomPinFn.test_custom_batch_pin": "needs CUDA pinned memory (custom collate: test_custom_collate_fn)",
    "TestCustomPinFn.test_custom_batch_pin_worker": "needs CUDA pinned memory",
}

pytestmark = pytest.mark.timeout(60)  # a hang fails one test, not the whole run

N = 20  # default dataset length: not divisible by the batch sizes used (3, 7)


# =========================================================================== harness


@dataclass(frozen=True)
class Err:
    """An exception observed in place of a value (compared by type: ours may subclass)."""

    type: type[BaseException]

    def __repr__(self) -> str:
        return f"Err({self.type.__name__})"


def assert_same(want: Any, got: Any, path: str = "result") -> None:
    """Assert ``got`` (ours) equals ``want`` (torch): same types, values, nesting."""
    if isinstance(want, Err):
        assert isinstance(got, Err) and issubclass(got.type, want.type), (
            f"{path}: torch raised {want.type.__name__}, ours gave {got!r}"
        )
        return
    assert not isinstance(got, Err), f"{path}: torch gave {want!r}, ours raised {got.type.__name__}"
    assert type(got) is type(want), f"{path}: torch type {type(want)!r}, ours {type(got)!r}"
    if isinstance(want, torch.Tensor):
        assert got.is_nested == want.is_nested, f"{path}: nested {want.is_nested} vs {got.is_nested}"
        if want.is_nested:
            assert_same(list(want.unbind()), list(got.unbind()), f"{path}.unbind()")
            return
        assert (got.dtype, got.shape) == (want.dtype, want.shape), (
            f"{path}: torch {want.dtype}{list(want.shape)}, ours {got.dtype}{list(got.shape)}"
        )
        assert torch.equal(got, want), f"{path}: torch {want!r}, ours {got!r}"
    elif isinstance(want, np.ndarray):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{path}: {want!r} vs {got!r}"
        assert np.array_equal(got, want), f"{path}: torch {want!r}, ours {got!r}"
    elif isinstance(want, Mapping):
        assert list(got.keys()) == list(want.keys()), f"{path}: keys {list(want)} vs {list(got)}"
        for k in want:
            assert_same(want[k], got[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: torch len {len(want)}, ours len {len(got)}"
        for i, (w, g) in enumerate(zip(want, got)):
            assert_same(w, g, f"{path}[{i}]")
    elif isinstance(want, (type, types.FunctionType, types.BuiltinFunctionType)):
        assert got is want, f"{path}: torch {want!r}, ours {got!r}"
    elif hasattr(want, "__dict__") and not callable(want):
        assert_same(vars(want), vars(got), f"{path}.__dict__")
    else:
        assert got == want, f"{path}: torch {want!r}, ours {got!r}"


class Make:
    """``make(dataset, **kwargs)`` builds one side's loader (torch's or ours).

    ``num_workers`` defaults to the side's count unless the case passes one.
    Torch worker processes (only where a case needs them) use the fork context.
    Every loader built is closed when the case ends (torch's have no ``close``).
    """

    def __init__(self, name: str, cls: type, num_workers: int) -> None:
        self.name = name
        self.cls = cls
        self.num_workers = num_workers
        self.made: list[Any] = []

    def __call__(self, dataset: Any, **kwargs: Any) -> Any:
        if "num_workers" not in kwargs:
            kwargs["num_workers"] = self.num_workers
            if self.name == "torch" and self.num_workers > 0:
                kwargs.setdefault("multiprocessing_context", "fork")
        loader = self.cls(dataset, **kwargs)
        self.made.append(loader)
        return loader

    def close(self) -> None:
        for loader in self.made:
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        self.made.clear()


def on_both(case: Callable[[Make], Any], *, nw: int = 0, torch_nw: int = 0) -> tuple[Any, Any]:
    """Run ``case`` on torch (``torch_nw`` worker processes) and on ours (``nw`` threads)."""
    results = []
    for make in (Make("torch", DataLoader, torch_nw), Make("ours", ThreadedDataLoader, nw)):
        try:
            results.append(case(make))
        finally:
            make.close()
            if make.name == "torch" and make.num_workers > 0:
                # A torch iterator kept alive by a reference cycle (an exception's traceback)
                # goes now, shutting its worker processes (and queue feeder threads) down.
                gc.collect()
    return results[0], results[1]


def check(case: Callable[[Make], Any], *, nw: int = 0, torch_nw: int = 0) -> None:
    want, got = on_both(case, nw=nw, torch_nw=torch_nw)
    assert_same(want, got)


def drive(iterator: Iterator[Any], limit: int = 500) -> list[Any]:
    """Everything an iterator yields until StopIteration, exceptions recorded as Err (and continued)."""
    out: list[Any] = []
    for _ in range(limit):
        try:
            out.append(next(iterator))
        except StopIteration:
            return out
        except Exception as e:
            out.append(Err(type(e)))
    raise AssertionError(f"iterator did not end within {limit} steps: {out[-5:]!r}")


def length(obj: Any) -> Any:
    try:
        return len(obj)
    except Exception as e:
        return Err(type(e))


def epochs(dl: Any, n: int = 2) -> list[Any]:
    """``len(dl)`` and ``n`` full epochs."""
    return [length(dl), *(list(dl) for _ in range(n))]


@pytest.fixture(params=[0, 2], ids=["ours-nw0", "ours-nw2"])
def nw(request) -> int:
    """Our num_workers (threads); torch's oracle uses num_workers=0."""
    return request.param


# =========================================================================== datasets


def tensor_dataset(n: int = N) -> TensorDataset:
    """Like torch's setUp dataset (data, labels), but deterministic."""
    data = torch.arange(n * 6, dtype=torch.float32).view(n, 2, 3)
    labels = torch.arange(n).remainder(7)
    return TensorDataset(data, labels)


class Counting(Dataset):
    """``dataset[i] == i`` (a plain int)."""

    def __init__(self, n: int = N) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i


class FnDataset(Dataset):
    """``dataset[i] == fn(i)``."""

    def __init__(self, fn: Callable[[int], Any], n: int = 6) -> None:
        self.fn = fn
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.fn(i)


class CountingIterable(IterableDataset):
    """Yields ``0..n-1``; with ``__len__``."""

    def __init__(self, n: int = N) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class CountingIterableNoLen(IterableDataset):
    """Yields ``0..n-1``; no ``__len__``."""

    def __init__(self, n: int = N) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


class LyingLengthIterable(IterableDataset):
    """Says it has ``length`` items but yields ``actual``."""

    def __init__(self, length: int, actual: int) -> None:
        self.length = length
        self.actual = actual

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.actual))


class CustomError(Exception):
    """A user exception class the loader does not know."""


class FailAt(Dataset):
    """``dataset[i] == tensor([i])``, but raises ``exc`` at the indices in ``bad``."""

    def __init__(self, n: int, bad: set[int], exc: type[BaseException]) -> None:
        self.n = n
        self.bad = set(bad)
        self.exc = exc

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.bad:
            raise self.exc(f"cannot load {i}")
        return torch.tensor([i])


class NoGetItem(Dataset):
    """torch's ErrorDataset: Dataset.__getitem__ raises NotImplementedError."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class LenError(Exception):
    pass


class RaisingLen(Dataset):
    """``__len__`` raises; items load fine."""

    def __len__(self) -> int:
        raise LenError("no length")

    def __getitem__(self, i: int) -> int:
        return i


class GeneratorFailsAt(IterableDataset):
    """A generator that raises at item ``k`` (a generator is dead after raising)."""

    def __init__(self, n: int, k: int) -> None:
        self.n = n
        self.k = k

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            if i == self.k:
                raise ValueError(f"cannot produce {i}")
            yield i


class IteratorFailsAt(IterableDataset):
    """An iterator object that raises once at item ``k`` and then goes on."""

    def __init__(self, n: int, k: int) -> None:
        self.n = n
        self.k = k

    def __iter__(self) -> Iterator[int]:
        return _FailOnceIterator(self.n, self.k)


class _FailOnceIterator:
    def __init__(self, n: int, k: int) -> None:
        self.i = 0
        self.n = n
        self.k = k
        self.failed = False

    def __iter__(self) -> _FailOnceIterator:
        return self

    def __next__(self) -> int:
        if self.i == self.k and not self.failed:
            self.failed = True
            raise ValueError(f"cannot produce {self.i}")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return self.i - 1


class IterRaises(IterableDataset):
    """torch's ErrorIterableDataset."""

    def __iter__(self) -> Iterator[int]:
        raise RuntimeError("Error in __iter__")


class BulkLoading(Dataset):
    """torch's BulkLoadingDataset: ``dataset[list_of_indices]`` loads them at once."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, indices: list[int]) -> torch.Tensor:
        assert isinstance(indices, (list, tuple))
        return torch.as_tensor(indices)


class ChunkSampler(Sampler):
    """Yields fixed chunks of indices (lists), like torch's BulkLoadingSampler but deterministic."""

    def __init__(self, n: int, chunk: int) -> None:
        self.n = n
        self.chunk = chunk

    def __iter__(self) -> Iterator[list[int]]:
        order = [(7 * i) % self.n for i in range(self.n)]  # a fixed permutation (n prime to 7)
        for s in range(0, self.n, self.chunk):
            yield order[s:s + self.chunk]

    def __len__(self) -> int:
        return math.ceil(self.n / self.chunk)


class NoLenSampler(Sampler):
    """A sampler without ``__len__``."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class NoLenBatchSampler(Sampler):
    """A batch sampler without ``__len__``."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =========================================================================== 1. batches


BATCH_KWARGS = {
    "default": {},
    "bs1": {"batch_size": 1},
    "bs3": {"batch_size": 3},
    "bs3-drop": {"batch_size": 3, "drop_last": True},
    "bs3-nodrop": {"batch_size": 3, "drop_last": False},
    "bs7-drop": {"batch_size": 7, "drop_last": True},
    "bs-all": {"batch_size": N},
    "bs-over-drop": {"batch_size": N + 1, "drop_last": True},
    "bs-none": {"batch_size": None},
    "shuffle-false": {"batch_size": 3, "shuffle": False},
}


@pytest.mark.parametrize("kwargs", BATCH_KWARGS.values(), ids=BATCH_KWARGS.keys())
def test_sequential_batches_and_len(kwargs, nw):
    """Ports test_sequential_batch, test_sequential_nonbatch, test_sequential_workers,
    test_seqential_batch_workers, test_len, TestDataLoader._test_sequential."""
    check(lambda make: epochs(make(tensor_dataset(), **kwargs)), nw=nw)


@pytest.mark.parametrize("batch_size", [None, 2], ids=["bs-none", "bs2"])
def test_builtin_collection_conversion(batch_size, nw):
    """Ports test_builtin_collection_conversion (map-style part): ints stay ints without
    auto-collation and become tensors with it."""
    check(lambda make: epochs(make(Counting(), batch_size=batch_size)), nw=nw)


@pytest.mark.parametrize(
    "options", [{"prefetch_factor": 1}, {"prefetch_factor": 3}, {"persistent_workers": True}],
    ids=["prefetch1", "prefetch3", "persistent"],
)
def test_worker_options_do_not_change_batches(options):
    """Ports test_seqential_batch_workers_prefetch and the TestDataLoaderPersistentWorkers
    reruns: options of workers change nothing in the batches (torch: num_workers=0)."""

    def case(make):
        kw = dict(options, num_workers=2) if make.name == "ours" else {}
        return epochs(make(tensor_dataset(), batch_size=3, **kw), n=3)

    check(case)


SAMPLERS = {
    # ports test_sampler / _test_sampler (a plain iterable as sampler)
    "range": (lambda ds: range(2, 12), {"batch_size": 2}),
    "list": (lambda ds: [5, 3, 1, 18, 0, 7, 7], {"batch_size": 3}),
    "sequential-obj": (lambda ds: SequentialSampler(ds), {"batch_size": 4}),
    "subset-random": (lambda ds: SubsetRandomSampler(range(10), generator=gen(42)), {"batch_size": 3}),
    # ports test_random_sampler_len_with_replacement / _without_replacement
    "random-replacement-bs1": (
        lambda ds: RandomSampler(ds, replacement=True, num_samples=len(ds) + 5, generator=gen(1)),
        {"batch_size": 1},
    ),
    "random-replacement-bs6": (
        lambda ds: RandomSampler(ds, replacement=True, num_samples=len(ds) + 5, generator=gen(1)),
        {"batch_size": 6},
    ),
    "random-noreplacement-bs6": (
        lambda ds: RandomSampler(ds, replacement=False, num_samples=len(ds) + 5, generator=gen(2)),
        {"batch_size": 6},
    ),
    "weighted": (
        lambda ds: WeightedRandomSampler([0.1, 0.9, 0.4, 0.7, 3.0, 0.6], 8, generator=gen(3)),
        {"batch_size": 3, "drop_last": True},
    ),
    "no-len": (lambda ds: NoLenSampler([4, 2, 0, 19, 1]), {"batch_size": 2}),
    "bs-none": (lambda ds: [9, 8, 1], {"batch_size": None}),
}


@pytest.mark.parametrize("sampler_fn, kwargs", SAMPLERS.values(), ids=SAMPLERS.keys())
def test_custom_sampler(sampler_fn, kwargs, nw):
    """Ports test_sampler, test_random_sampler_len_with_replacement,
    test_random_sampler_len_without_replacement: len() and two epochs with a user sampler."""

    def case(make):
        ds = tensor_dataset()
        return epochs(make(ds, sampler=sampler_fn(ds), **kwargs))

    check(case, nw=nw)


def _uneven_batches() -> list[tuple[int, ...]]:
    # [(0, 1), (2, 3, 4), (5, 6), (7, 8, 9), ...] as in torch's _test_batch_sampler
    out: list[tuple[int, ...]] = []
    for i in range(0, 20, 5):
        out.append(tuple(range(i, i + 2)))
        out.append(tuple(range(i + 2, i + 5)))
    return out


BATCH_SAMPLERS = {
    "list-of-tuples": lambda ds: _uneven_batches(),
    "batchsampler-drop": lambda ds: BatchSampler(SequentialSampler(ds), 3, drop_last=True),
    "batchsampler-random": lambda ds: BatchSampler(RandomSampler(ds, generator=gen(5)), 4, False),
    "no-len": lambda ds: NoLenBatchSampler([[3, 1], [0], [19, 18, 17]]),
}


@pytest.mark.parametrize("make_bs", BATCH_SAMPLERS.values(), ids=BATCH_SAMPLERS.keys())
def test_custom_batch_sampler(make_bs, nw):
    """Ports test_batch_sampler / _test_batch_sampler."""

    def case(make):
        ds = tensor_dataset()
        return epochs(make(ds, batch_sampler=make_bs(ds)))

    check(case, nw=nw)


def test_bulk_loading_without_auto_collation(nw):
    """Ports test_bulk_loading_nobatch: batch_size=None with a sampler yielding lists of
    indices hands each list to ``dataset[...]`` as is."""
    check(lambda make: epochs(make(BulkLoading(35), batch_size=None, sampler=ChunkSampler(35, 4))),
          nw=nw)


def test_distributed_sampler_with_drop_last(nw):
    """Ports test_duplicating_data_with_drop_last (a tensor as the dataset; explicit ranks)."""

    def case(make):
        data = torch.IntTensor(range(9))
        out = []
        for rank in range(4):
            sampler = DistributedSampler(data, num_replicas=4, rank=rank)
            dl = make(data, batch_size=2, drop_last=True, sampler=sampler)
            for epoch in range(2):
                sampler.set_epoch(epoch)
                out.append(list(dl))
        return out

    check(case, nw=nw)


def test_growing_dataset_len():
    """Ports test_growing_dataset: len() follows a dataset that grows after construction."""

    def case(make):
        dataset = [torch.ones(4) * i for i in range(4)]
        seq = make(dataset, shuffle=False)
        shuffled = make(dataset, shuffle=True)
        dataset.append(torch.ones(4) * 4)
        return len(seq), len(shuffled), list(seq)

    check(case)


def test_typing():
    """Ports test_typing: the loader class is subscriptable like a generic."""
    assert DataLoader[list[torch.Tensor]] is not None
    assert ThreadedDataLoader[list[torch.Tensor]] is not None


# --------------------------------------------------------------------------- collate


class CustomDict(dict):
    pass


class CustomList(list):
    pass


Point = collections.namedtuple("Point", ["data", "label", "tensor"])
Pair = collections.namedtuple("Pair", ["positive", "negative"])

SAMPLES = {
    "tensor": lambda i: torch.full((2,), float(i)),
    "int": lambda i: i,
    "float": lambda i: i / 2,
    "bool": lambda i: i % 2 == 0,
    "str": lambda i: str(i),
    "tuple": lambda i: (torch.tensor(i), i, str(i)),
    "list": lambda i: [i, i + 1],
    # ports TestDictDataLoader.test_sequential_batch
    "dict": lambda i: {"a_tensor": torch.empty(4, 2).fill_(i), "another_dict": {"a_number": i}},
    # ports TestNamedTupleDataLoader.test_dataloader_with_namedtuple
    "namedtuple": lambda i: Point(Pair(i, -i), str(i), torch.full((3,), float(i))),
    "custom-dict": lambda i: CustomDict(a=i, b=torch.tensor([i])),
    "custom-list": lambda i: CustomList([i, 2 * i]),
    # ports test_numpy
    "numpy-array": lambda i: np.ones((2, 3, 4)) * i,
    # ports test_numpy_scalars
    "np-float64": lambda i: np.float64(i),
    "np-float32": lambda i: np.float32(i),
    "np-float16": lambda i: np.float16(i),
    "np-int64": lambda i: np.int64(i),
    "np-int32": lambda i: np.int32(i),
    "np-int16": lambda i: np.int16(i),
    "np-int8": lambda i: np.int8(i),
    "np-uint8": lambda i: np.uint8(i),
    "np-bool": lambda i: np.bool_(i % 2),
}


@pytest.mark.parametrize("batch_size", [2, None], ids=["bs2", "bs-none"])
@pytest.mark.parametrize("sample", SAMPLES.values(), ids=SAMPLES.keys())
def test_collate_structures(sample, batch_size, nw):
    """Samples of every structure through default_collate (bs2) / default_convert (bs-none).
    Ports test_numpy, test_numpy_scalars, TestDictDataLoader.test_sequential_batch,
    TestNamedTupleDataLoader.test_dataloader_with_namedtuple and, through the loader,
    the default_collate/default_convert keep-type tests."""
    check(lambda make: list(make(FnDataset(sample), batch_size=batch_size)), nw=nw)


COLLATE_ERRORS = {
    # ports test_default_collate_bad_sequence_type
    "unequal-lists": lambda i: ["X"] * (1 + i % 2),
    # ports test_default_collate_bad_numpy_types
    "numpy-str-array": lambda i: np.array([["a", "b", "c"]]),
    "numpy-object-array": lambda i: np.array([object(), object()]),
    "none": lambda i: None,
    "unequal-tensors": lambda i: torch.zeros(1 + i % 2),
}


@pytest.mark.parametrize("sample", COLLATE_ERRORS.values(), ids=COLLATE_ERRORS.keys())
def test_default_collate_rejects(sample, nw):
    """Samples default_collate cannot batch: the same exception, batch after batch."""
    check(lambda make: drive(iter(make(FnDataset(sample), batch_size=2))), nw=nw)


class Summary:
    """A custom batch object (like torch's SimpleCustomBatch)."""

    def __init__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        data, labels = zip(*batch)
        self.inp = torch.stack(data, 0)
        self.tgt = torch.stack(labels, 0)


def _summary_tuple(batch: Any) -> tuple[str, int, int]:
    return ("n", len(batch), int(sum(int(x[1]) for x in batch)))


CUSTOM_COLLATES = {"object": (Summary, 3), "tuple": (_summary_tuple, 3),
                   "per-sample": (lambda s: ("one", int(s[1])), None)}


@pytest.mark.parametrize("collate_fn, batch_size", CUSTOM_COLLATES.values(), ids=CUSTOM_COLLATES.keys())
def test_custom_collate_fn(collate_fn, batch_size, nw):
    """A user collate_fn gets the list of samples (or each sample with batch_size=None).
    Ports the collate side of TestCustomPinFn (collate into a custom batch class)."""
    check(lambda make: epochs(make(tensor_dataset(), batch_size=batch_size, collate_fn=collate_fn)),
          nw=nw)


def _clone_all(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.clone() for x in batch]


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors are a prototype API
@pytest.mark.parametrize("collate_fn", [_clone_all, None], ids=["clone-collate", "default-collate"])
def test_nested_tensors(collate_fn, nw):
    """Ports test_nested_tensor_multiprocessing without the start methods: a custom collate
    passes nested tensors through; default_collate rejects them."""

    def case(make):
        data = [torch.nested.nested_tensor([torch.arange(5.0) + i]) for i in range(6)]
        return drive(iter(make(data, batch_size=1, collate_fn=collate_fn)))

    check(case, nw=nw)


def test_collate_fn_set_after_construction_applies_next_epoch(nw):
    """torch reads ``loader.collate_fn`` when an iterator starts: setting it is allowed
    and the next epoch uses it."""

    def case(make):
        dl = make(tensor_dataset(), batch_size=4)
        first = list(dl)
        dl.collate_fn = _summary_tuple
        return first, list(dl)

    check(case, nw=nw)


# --------------------------------------------------------------------------- shuffling / RNG


@pytest.mark.parametrize("batch_size", [1, 4, None], ids=["bs1", "bs4", "bs-none"])
def test_shuffle_with_generator(batch_size, nw):
    """Ports test_shuffle_reproducibility, test_shuffle, test_shuffle_batch,
    test_shuffle_batch_none, test_shuffle_workers, test_shuffle_batch_workers,
    test_shuffle_batch_workers_prefetch: the same order as torch for the same generator
    seed, epoch after epoch (torch draws from the generator at each iter())."""
    check(lambda make: epochs(make(tensor_dataset(), batch_size=batch_size, shuffle=True,
                                   generator=gen(42)), n=3), nw=nw)


@pytest.mark.parametrize("batch_size", [1, 4, None], ids=["bs1", "bs4", "bs-none"])
def test_shuffle_with_global_seed(batch_size, nw):
    """No generator, no seed: torch draws the shuffle from the global RNG at each iter().
    Seeding before iter() gives torch's order; reseeding reproduces it; two epochs after one
    seed give torch's two epochs."""

    def case(make):
        dl = make(tensor_dataset(), batch_size=batch_size, shuffle=True)
        torch.manual_seed(1234)
        first = list(dl)
        torch.manual_seed(1234)
        again = list(dl)
        torch.manual_seed(99)
        two_epochs = [list(dl), list(dl)]
        return first, again, two_epochs

    want, got = on_both(case, nw=nw)
    assert_same(want, got)
    assert_same(got[0], got[1], "reseeded epoch")


@pytest.mark.parametrize("shuffle", [False, True], ids=["sequential", "shuffled"])
def test_global_rng_stream_matches(shuffle, nw):
    """After ``torch.manual_seed``, building a loader and running an epoch leaves the global
    RNG exactly where torch leaves it (code drawing from it afterwards sees the same numbers)."""

    def case(make):
        torch.manual_seed(7)
        dl = make(tensor_dataset(), batch_size=4, shuffle=shuffle)
        after_build = torch.rand(2)
        batches = list(dl)
        return after_build, batches, torch.rand(3)

    check(case, nw=nw)


SAMPLERS_GLOBAL_RNG = {
    "random-replacement": lambda ds: RandomSampler(ds, num_samples=5, replacement=True),
    "random": lambda ds: RandomSampler(ds, replacement=False),
    "weighted": lambda ds: WeightedRandomSampler([0.1, 0.9, 0.4, 0.7, 3.0, 0.6], 5),
    "subset-random": lambda ds: SubsetRandomSampler(range(10)),
}


@pytest.mark.parametrize("sampler_fn", SAMPLERS_GLOBAL_RNG.values(), ids=SAMPLERS_GLOBAL_RNG.keys())
def test_user_sampler_drawing_from_global_rng(sampler_fn, nw):
    """Ports the loader side of test_sampler_reproducibility: a user sampler without a
    generator draws from the global RNG when the epoch starts, as under torch."""

    def case(make):
        ds = tensor_dataset()
        dl = make(ds, sampler=sampler_fn(ds), batch_size=2)
        torch.manual_seed(0)
        return [list(dl), list(dl)]

    check(case, nw=nw)


# --------------------------------------------------------------------------- iterable-style


ITERABLE_KWARGS = {
    "default": {},
    "bs3": {"batch_size": 3},
    "bs3-drop": {"batch_size": 3, "drop_last": True},
    "bs7": {"batch_size": 7},
    "bs7-drop": {"batch_size": 7, "drop_last": True},
    "bs-over-drop": {"batch_size": N + 1, "drop_last": True},
    "bs-none": {"batch_size": None},
}

ITERABLES = {
    "with-len": lambda: CountingIterable(),
    "no-len": lambda: CountingIterableNoLen(),
    "chain": lambda: ChainDataset([CountingIterable(12), CountingIterable(8)]),
    "added": lambda: CountingIterable(15) + CountingIterable(5),
}


@pytest.mark.parametrize("kwargs", ITERABLE_KWARGS.values(), ids=ITERABLE_KWARGS.keys())
@pytest.mark.parametrize("make_ds", ITERABLES.values(), ids=ITERABLES.keys())
def test_iterable_dataset(make_ds, kwargs, nw):
    """Ports test_iterable_style_dataset (single-process parts), test_iterabledataset_len,
    test_chain_iterable_style_dataset, test_builtin_collection_conversion (iterable part).
    Ours with 2 threads must give torch's num_workers=0 batches (one shared stream)."""
    check(lambda make: epochs(make(make_ds(), **kwargs)), nw=nw)


def test_iterable_len_exceeded_warns(nw):
    """Ports the warning part of test_iterable_style_dataset: after ``len(loader)`` was taken,
    each item beyond the reported length warns (UserWarning '... samples have been fetched')."""

    def case(make):
        dl = make(LyingLengthIterable(length=5, actual=8), batch_size=None)
        reported = len(dl)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = list(dl)
        fetched = [w for w in caught if "samples have been fetched" in str(w.message)]
        return reported, items, [w.category for w in fetched]

    check(case, nw=nw)


# --------------------------------------------------------------------------- empty


EMPTY_KWARGS = {
    "bs1": {},
    "bs3": {"batch_size": 3},
    "bs3-drop": {"batch_size": 3, "drop_last": True},
    "bs-none": {"batch_size": None},
}


@pytest.mark.parametrize("kwargs", EMPTY_KWARGS.values(), ids=EMPTY_KWARGS.keys())
@pytest.mark.parametrize("style", ["map", "iterable"])
def test_empty_dataset(style, kwargs, nw):
    """A dataset of length 0: len() is 0 and every epoch is empty."""
    check(lambda make: epochs(make(Counting(0) if style == "map" else CountingIterable(0), **kwargs)),
          nw=nw)


# =========================================================================== 2. iterators


@pytest.mark.parametrize("style", ["map", "iterable"])
def test_first_iterator_survives_a_new_iter(style, nw):
    """``it1 = iter(dl); next(it1); list(iter(dl)); list(it1)``: the first iterator still
    yields the rest of its own epoch (torch iterators are independent)."""

    def case(make):
        ds = tensor_dataset() if style == "map" else CountingIterable()
        dl = make(ds, batch_size=3)
        it1 = iter(dl)
        head = next(it1)
        rest = list(iter(dl))
        return head, rest, list(it1)

    check(case, nw=nw)


@pytest.mark.parametrize("count", [2, 3])
def test_interleaved_iterators(count, nw):
    """``count`` live iterators of one loader advanced in turn each yield their whole epoch."""

    def case(make):
        dl = make(tensor_dataset(), batch_size=3)
        its = [iter(dl) for _ in range(count)]
        seen: list[list[Any]] = [[] for _ in range(count)]
        live = set(range(count))
        while live:
            for k in sorted(live):
                try:
                    seen[k].append(next(its[k]))
                except StopIteration:
                    live.discard(k)
        return seen

    check(case, nw=nw)


def test_multiple_dataloaders(nw):
    """Ports test_multiple_dataloaders: iterators of two loaders interleaved."""

    def case(make):
        it1 = iter(make(tensor_dataset(), batch_size=2))
        it2 = iter(make(tensor_dataset(12), batch_size=5))
        order = [it1, it1, it2, it2, it1, it2, it1]
        return [next(it) for it in order], list(it1), list(it2)

    check(case, nw=nw)


def test_partial_epoch_then_full_epoch(nw):
    """Ports the batch side of test_partial_workers: leaving an epoch early, then a new
    epoch starts from the beginning."""

    def case(make):
        dl = make(tensor_dataset(), batch_size=2)
        partial = []
        for i, b in enumerate(dl):
            partial.append(b)
            if i == 3:
                break
        return partial, list(dl)

    check(case, nw=nw)


@pytest.mark.parametrize("threads", [0, 2, 8], ids=["ours-nw0", "ours-nw2", "ours-nw8"])
@pytest.mark.parametrize("style", ["map", "iterable"])
def test_unreferenced_loader_yields_whole_epoch(style, threads):
    """``for b in Loader(...)`` with nobody holding the loader and ``gc.collect()`` in the
    body: the epoch is complete, as with torch (not run through Make: it would hold the loader)."""

    def dataset():
        return tensor_dataset() if style == "map" else CountingIterable()

    want = []
    for b in DataLoader(dataset(), batch_size=5):
        gc.collect()
        want.append(b)
    got = []
    for b in ThreadedDataLoader(dataset(), batch_size=5, num_workers=threads):
        gc.collect()
        got.append(b)
    assert_same(want, got)


# =========================================================================== 3. exceptions


@pytest.mark.parametrize("bad", [{3}, {0, 9}], ids=["middle", "first-and-last"])
@pytest.mark.parametrize("exc", [KeyError, ValueError, IndexError, CustomError],
                         ids=lambda e: e.__name__)
def test_dataset_error_then_next_batches(exc, bad, nw):
    """A sample raising: the same exception type (``except KeyError`` still catches it), and
    iterating on yields the following batches exactly as torch does."""
    check(lambda make: drive(iter(make(FailAt(10, bad, exc), batch_size=2))), nw=nw)


def test_dataset_error_pytest_raises(nw):
    """``pytest.raises(KeyError)`` around ``next()``, as a user would write it."""
    for make in (Make("torch", DataLoader, 0), Make("ours", ThreadedDataLoader, nw)):
        try:
            it = iter(make(FailAt(6, {2}, KeyError), batch_size=2))
            next(it)
            with pytest.raises(KeyError):
                next(it)
        finally:
            make.close()


def test_every_batch_fails(nw):
    """Ports test_error and test_error_workers: NotImplementedError from Dataset.__getitem__,
    one per batch, then the epoch ends."""
    check(lambda make: drive(iter(make(NoGetItem(41), batch_size=2, shuffle=True,
                                       generator=gen(0)))), nw=nw)


def test_ours_extra_sample_load_error_names_index(nw):
    """OUR EXTRA, not a parity case: the exception is also a
    ``lightning_threadsafe.SampleLoadError`` whose ``index`` names the failing index."""
    with ThreadedDataLoader(FailAt(10, {3}, KeyError), batch_size=2, num_workers=nw) as dl:
        it = iter(dl)
        next(it)
        with pytest.raises(KeyError) as info:
            next(it)
    assert isinstance(info.value, lightning_threadsafe.SampleLoadError)
    assert info.value.index == 3


def _collate_failing_on_4(batch: list[torch.Tensor]) -> torch.Tensor:
    stacked = default_collate(batch)
    if 4 in stacked.flatten().tolist():
        raise ValueError("cannot collate a batch holding 4")
    return stacked


def test_collate_error_then_next_batches(nw):
    """A collate_fn raising: the same exception type, then the following batches."""
    check(lambda make: drive(iter(make(FnDataset(torch.tensor, n=10), batch_size=3,
                                       collate_fn=_collate_failing_on_4))), nw=nw)


@pytest.mark.parametrize("kwargs", [{}, {"batch_size": 3}, {"batch_size": None}, {"shuffle": True}],
                         ids=["default", "bs3", "bs-none", "shuffle"])
def test_len_of_dataset_that_raises(kwargs):
    """``len()`` of a dataset whose ``__len__`` raises: construction and ``len(loader)``
    behave as torch's (RandomSampler asks for the length at construction)."""

    def case(make):
        try:
            dl = make(RaisingLen(), **kwargs)
        except Exception as e:
            return "construct", Err(type(e))
        return "len", length(dl)

    check(case)


@pytest.mark.parametrize("style", ["generator", "iterator"])
def test_iterable_error_mid_stream(style, nw):
    """An iterable dataset raising at item 5: a generator is dead after raising (torch ends
    the epoch), an iterator object goes on (torch continues with the next items)."""

    def case(make):
        ds = GeneratorFailsAt(12, 5) if style == "generator" else IteratorFailsAt(12, 5)
        return drive(iter(make(ds, batch_size=2)))

    check(case, nw=nw)


def test_error_in_dataset_iter(nw):
    """Ports test_error_in_init (``__iter__`` raising)."""

    def case(make):
        dl = make(IterRaises())
        with pytest.raises(RuntimeError, match="Error in __iter__") as info:
            list(iter(dl))
        return Err(type(info.value))

    check(case, nw=nw)


# =========================================================================== 4. attributes


def _dataset_for(kind: str) -> Any:
    return CountingIterable() if kind == "iterable" else tensor_dataset()


def _init_fn(worker_id: int) -> None:
    pass


ATTRIBUTE_CASES = {
    "default": ("map", {}),
    "shuffle": ("map", {"shuffle": True}),
    "shuffle-generator": ("map", {"shuffle": True, "generator": "GEN"}),
    "user-sampler": ("map", {"sampler": "SAMPLER", "batch_size": 4}),
    "user-batch-sampler": ("map", {"batch_sampler": "BATCH_SAMPLER"}),
    "bs-none": ("map", {"batch_size": None}),
    "bs3-drop": ("map", {"batch_size": 3, "drop_last": True}),
    "workers2": ("map", {"num_workers": 2}),
    "workers2-prefetch3": ("map", {"num_workers": 2, "prefetch_factor": 3}),
    "workers2-persistent": ("map", {"num_workers": 2, "persistent_workers": True}),
    "timeout-int": ("map", {"timeout": 1}),
    "timeout-float": ("map", {"timeout": 0.5}),
    "worker-init-fn": ("map", {"num_workers": 2, "worker_init_fn": _init_fn}),
    "pin-memory-1": ("map", {"pin_memory": 1}),
    "collate-fn": ("map", {"collate_fn": _summary_tuple}),
    "iterable": ("iterable", {}),
    "iterable-bs-none": ("iterable", {"batch_size": None}),
    "iterable-bs3-drop": ("iterable", {"batch_size": 3, "drop_last": True}),
}


def _torch_kind(obj: Any, classes: tuple[type, ...]) -> type:
    """The first of torch's ``classes`` that ``obj`` is an instance of (a subclass counts)."""
    return next((c for c in classes if isinstance(obj, c)), type(obj))


def _describe(dl: Any, ds: Any, user: dict[str, Any], iterable: bool) -> dict[str, Any]:
    """Everything torch exposes after construction, as (type, value) or identity facts."""

    def tv(v: Any) -> Any:
        return (type(v), v)

    d: dict[str, Any] = {
        "dataset is ds": dl.dataset is ds,
        "batch_size": tv(dl.batch_size),
        "drop_last": tv(dl.drop_last),
        "num_workers": tv(dl.num_workers),
        "timeout": tv(dl.timeout),
        "prefetch_factor": tv(dl.prefetch_factor),
        "pin_memory": tv(dl.pin_memory),
        "pin_memory_device": tv(dl.pin_memory_device),
        "persistent_workers": tv(dl.persistent_workers),
        "in_order": tv(dl.in_order),
        "multiprocessing_context": tv(dl.multiprocessing_context),
        "generator is user's": dl.generator is user.get("generator"),
        "generator": None if dl.generator is None else "a generator",
        "worker_init_fn": dl.worker_init_fn,
        "collate_fn": dl.collate_fn,
    }
    if "sampler" in user:
        d["sampler"] = "the user's" if dl.sampler is user["sampler"] else repr(dl.sampler)
    elif not iterable:
        d["sampler"] = _torch_kind(dl.sampler, (RandomSampler, SequentialSampler, Sampler))
        d["len(sampler)"] = len(dl.sampler)
        if isinstance(dl.sampler, SequentialSampler):
            d["sampler.data_source is ds"] = dl.sampler.data_source is ds
            d["list(sampler)"] = list(dl.sampler)
        if isinstance(dl.sampler, RandomSampler):
            d["sampler.data_source is ds"] = dl.sampler.data_source is ds
            d["sampler.replacement"] = dl.sampler.replacement
            d["sampler.num_samples"] = dl.sampler.num_samples
            d["sampler.generator is loader's"] = dl.sampler.generator is dl.generator
    bs = dl.batch_sampler
    if "batch_sampler" in user:
        d["batch_sampler"] = "the user's" if bs is user["batch_sampler"] else repr(bs)
    elif bs is None:
        d["batch_sampler"] = None
    else:
        d["batch_sampler"] = _torch_kind(bs, (BatchSampler, Sampler))
        d["batch_sampler.batch_size"] = bs.batch_size
        d["batch_sampler.drop_last"] = bs.drop_last
        if not iterable:
            d["batch_sampler.sampler is loader's"] = bs.sampler is dl.sampler
    return d


@pytest.mark.parametrize("kind, kwargs", ATTRIBUTE_CASES.values(), ids=ATTRIBUTE_CASES.keys())
def test_attributes_after_construction(kind, kwargs):
    """``sampler``, ``batch_sampler``, ``batch_size``, ``drop_last``, ``dataset``,
    ``num_workers``, ``timeout``, ``prefetch_factor``, ``pin_memory``, ``generator``,
    ``collate_fn``, ``persistent_workers``, ``worker_init_fn``...: same values and types."""

    def case(make):
        ds = _dataset_for(kind)
        user: dict[str, Any] = {}
        kw = dict(kwargs)
        if kw.get("generator") == "GEN":
            kw["generator"] = user["generator"] = gen(0)
        if kw.get("sampler") == "SAMPLER":
            kw["sampler"] = user["sampler"] = SequentialSampler(ds)
        if kw.get("batch_sampler") == "BATCH_SAMPLER":
            kw["batch_sampler"] = user["batch_sampler"] = BatchSampler(SequentialSampler(ds), 3, False)
        return _describe(make(ds, **kw), ds, user, kind == "iterable")

    want, got = on_both(case)
    diffs = {}
    for key in [*want, *(k for k in got if k not in want)]:
        try:
            assert_same(want.get(key, "<missing>"), got.get(key, "<missing>"), key)
        except AssertionError as e:
            diffs[key] = str(e).splitlines()[0]
    assert not diffs, "attributes differ from torch's:\n" + "\n".join(diffs.values())


FROZEN = {
    "batch_size": lambda ds: 5,
    "sampler": lambda ds: SequentialSampler(ds),
    "batch_sampler": lambda ds: BatchSampler(SequentialSampler(ds), 2, False),
    "drop_last": lambda ds: True,
    "dataset": lambda ds: tensor_dataset(4),
    "persistent_workers": lambda ds: True,
}


@pytest.mark.parametrize("same_value", [False, True], ids=["new-value", "same-value"])
@pytest.mark.parametrize("attr", FROZEN.keys())
def test_assigning_frozen_attribute_raises(attr, same_value):
    """Ports test_invalid_assign_after_init: ValueError, and the attribute keeps its value."""

    def case(make):
        ds = tensor_dataset()
        dl = make(ds)
        before = getattr(dl, attr)
        value = before if same_value else FROZEN[attr](ds)
        try:
            setattr(dl, attr, value)
            outcome: Any = "accepted"
        except Exception as e:
            outcome = Err(type(e))
        return outcome, getattr(dl, attr) is before

    check(case)


ASSIGNABLE = {
    "num_workers": 3,
    "timeout": 2.5,
    "prefetch_factor": 4,
    "pin_memory": True,
    "collate_fn": _summary_tuple,
    "worker_init_fn": _init_fn,
    "generator": "GEN",
}


@pytest.mark.parametrize("attr, value", ASSIGNABLE.items(), ids=ASSIGNABLE.keys())
def test_assigning_other_attribute_is_allowed(attr, value):
    """Other attributes can be set after construction (torch reads them per iterator)."""

    def case(make):
        dl = make(tensor_dataset())
        v = gen(0) if value == "GEN" else value
        try:
            setattr(dl, attr, v)
        except Exception as e:
            return Err(type(e))
        return getattr(dl, attr) is v

    check(case)


# =========================================================================== 5. constructor


def _mp_context_name() -> str:
    return multiprocessing.get_all_start_methods()[-1]


CTOR_CASES: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "num_workers=-1": ("map", lambda ds: {"num_workers": -1}),
    "timeout=-1": ("map", lambda ds: {"timeout": -1}),
    "timeout=-0.5": ("map", lambda ds: {"timeout": -0.5}),
    "timeout=5-no-workers": ("map", lambda ds: {"timeout": 5}),
    "prefetch-no-workers": ("map", lambda ds: {"prefetch_factor": 2}),
    "prefetch-workers": ("map", lambda ds: {"num_workers": 2, "prefetch_factor": 2}),
    "persistent-no-workers": ("map", lambda ds: {"persistent_workers": True}),
    "persistent-workers": ("map", lambda ds: {"num_workers": 2, "persistent_workers": True}),
    "mp-context-no-workers": ("map", lambda ds: {"multiprocessing_context": _mp_context_name()}),
    "mp-context-bad-name": ("map", lambda ds: {"num_workers": 1, "multiprocessing_context": "bad"}),
    "mp-context-bad-type": ("map", lambda ds: {"num_workers": 1, "multiprocessing_context": object()}),
    "iterable-shuffle-true": ("iterable", lambda ds: {"shuffle": True}),
    "iterable-shuffle-3": ("iterable", lambda ds: {"shuffle": 3}),
    "iterable-shuffle-false": ("iterable", lambda ds: {"shuffle": False}),
    "iterable-sampler": ("iterable", lambda ds: {"sampler": SequentialSampler(ds)}),
    "iterable-sampler-3": ("iterable", lambda ds: {"sampler": 3}),
    "iterable-batch-sampler": (
        "iterable", lambda ds: {"batch_sampler": BatchSampler(SequentialSampler(ds), 3, False)}),
    "iterable-batch-sampler-3": ("iterable", lambda ds: {"batch_sampler": 3}),
    "sampler+shuffle": ("map", lambda ds: {"batch_size": 11, "sampler": SequentialSampler(ds),
                                           "shuffle": True}),
    "sampler+shuffle-false": ("map", lambda ds: {"sampler": SequentialSampler(ds), "shuffle": False}),
    "batch-sampler+sampler+shuffle": ("map", lambda ds: {
        "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False),
        "sampler": SequentialSampler(ds), "shuffle": True}),
    "batch-sampler+sampler+shuffle-3": ("map", lambda ds: {
        "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False),
        "sampler": SequentialSampler(ds), "shuffle": 3}),
    "batch-sampler+batch-size": ("map", lambda ds: {
        "batch_size": 11, "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False)}),
    "batch-sampler+batch-size-none": ("map", lambda ds: {
        "batch_size": None, "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False)}),
    "batch-sampler+shuffle": ("map", lambda ds: {
        "shuffle": True, "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False)}),
    "batch-sampler+sampler": ("map", lambda ds: {
        "sampler": SequentialSampler(ds), "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False)}),
    "batch-sampler+drop-last": ("map", lambda ds: {
        "drop_last": True, "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False)}),
    "batch-sampler+drop-last-3": ("map", lambda ds: {
        "drop_last": 3, "batch_sampler": BatchSampler(SequentialSampler(ds), 3, False)}),
    "batch-size-none+drop-last": ("map", lambda ds: {"batch_size": None, "drop_last": True}),
    "shuffle=1": ("map", lambda ds: {"shuffle": 1}),
    "pin_memory=1": ("map", lambda ds: {"pin_memory": 1}),
    "drop_last=1": ("map", lambda ds: {"batch_size": 2, "drop_last": 1}),
    "batch_size=0": ("map", lambda ds: {"batch_size": 0}),
    "batch_size=-1": ("map", lambda ds: {"batch_size": -1}),
    "shuffle-empty-dataset": ("empty", lambda ds: {"shuffle": True}),
    "generator": ("map", lambda ds: {"shuffle": True, "generator": gen(0)}),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # e.g. pin_memory without an accelerator
@pytest.mark.parametrize("kind, kwargs_fn", CTOR_CASES.values(), ids=CTOR_CASES.keys())
def test_constructor_judgement(kind, kwargs_fn):
    """Ports test_invalid_ctor_args_combinations plus the other checks torch makes at
    construction: the same combinations are accepted, the rest rejected with the same type."""

    def case(make):
        ds = {"map": tensor_dataset, "iterable": CountingIterable, "empty": lambda: Counting(0)}[kind]()
        try:
            make(ds, **kwargs_fn(ds))
        except Exception as e:
            return Err(type(e))
        return "accepted"

    check(case)


# =========================================================================== 6. worker_init_fn


class InitRecorder:
    """A worker_init_fn recording the worker ids it is called with (thread-safe).

    In torch's worker processes each process has its own copy; the dataset holding
    the recorder reports, with each sample, its process id and that copy's calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[int] = []

    def __call__(self, worker_id: int) -> None:
        with self._lock:
            self.calls.append(worker_id)


class ReportsInit(Dataset):
    def __init__(self, n: int, recorder: InitRecorder) -> None:
        self.n = n
        self.recorder = recorder

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pid": os.getpid(), "calls": tuple(self.recorder.calls), "i": i}


class ReportsInitIterable(IterableDataset):
    def __init__(self, n: int, recorder: InitRecorder) -> None:
        self.n = n
        self.recorder = recorder

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.n):
            yield {"pid": os.getpid(), "calls": tuple(self.recorder.calls), "i": i}


def _as_list(batch: list[Any]) -> list[Any]:
    return list(batch)


def _init_calls(recorder: InitRecorder, batches: list[list[dict[str, Any]]]) -> list[int]:
    """All worker_init_fn calls: this process's (threads) plus those reported by samples
    from other processes (torch's workers: the longest report of each process)."""
    per_pid: dict[int, tuple[int, ...]] = {}
    for batch in batches:
        for s in batch:
            if s["pid"] != os.getpid() and len(s["calls"]) >= len(per_pid.get(s["pid"], ())):
                per_pid[s["pid"]] = s["calls"]
    return sorted([*recorder.calls, *(c for calls in per_pid.values() for c in calls)])


def test_worker_init_fn_not_called_without_workers():
    """num_workers=0: worker_init_fn is never called."""

    def case(make):
        rec = InitRecorder()
        batches = list(make(ReportsInit(8, rec), batch_size=2, num_workers=0, worker_init_fn=rec,
                            collate_fn=_as_list))
        return _init_calls(rec, batches)

    check(case)


@pytest.mark.parametrize("persistent", [False, True], ids=["per-epoch", "persistent"])
def test_worker_init_fn_once_per_worker(persistent):
    """Map-style, num_workers=2, two epochs: called once per worker with ids 0..1 per
    epoch, or once per worker for the loader's life with persistent_workers=True.
    torch runs 2 worker processes; ours 2 threads."""

    def case(make):
        rec = InitRecorder()
        dl = make(ReportsInit(16, rec), batch_size=2, worker_init_fn=rec, collate_fn=_as_list,
                  persistent_workers=persistent)
        batches = list(dl) + list(dl)
        return _init_calls(rec, batches)

    check(case, nw=2, torch_nw=2)


def test_worker_init_fn_iterable_dataset():
    """Iterable dataset, num_workers=2: torch calls worker_init_fn once in each of its 2
    worker processes (each iterating its own copy). Ours feeds one shared stream, so we
    assert less: it is called at least once, only with ids torch uses (0..1), never
    twice with the same id."""

    def case(make):
        rec = InitRecorder()
        dl = make(ReportsInitIterable(6, rec), batch_size=2, worker_init_fn=rec, collate_fn=_as_list)
        return _init_calls(rec, list(dl))

    torch_calls, our_calls = on_both(case, nw=2, torch_nw=2)
    assert torch_calls == [0, 1]  # the oracle: once per worker process
    assert our_calls, "worker_init_fn was never called"
    assert set(our_calls) <= set(torch_calls), our_calls
    assert len(our_calls) == len(set(our_calls)), our_calls


def _raise_in_init(worker_id: int) -> None:
    raise RuntimeError("Error in worker_init_fn")


def test_error_in_worker_init_fn():
    """Ports test_error_in_init (worker_init_fn raising): RuntimeError reaches the consumer.
    torch runs one worker process (each one whose init failed costs torch a 5 s join at
    shutdown); ours two threads."""

    def case(make):
        dl = make(tensor_dataset(), worker_init_fn=_raise_in_init)
        with pytest.raises(RuntimeError, match="Error in worker_init_fn") as info:
            list(iter(dl))
        return Err(type(info.value))

    check(case, nw=2, torch_nw=1)


# =========================================================================== 7. timeout


class BlocksAt(Dataset):
    """``dataset[i] == i``; index ``at`` waits on ``release`` (bounded, so a loader that
    never times out fails the test instead of hanging it)."""

    def __init__(self, n: int, at: int, release: Any, bound: float) -> None:
        self.n = n
        self.at = at
        self.release = release
        self.bound = bound

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.at:
            self.release.wait(self.bound)
        return i


def test_timeout_raises_runtime_error():
    """Ports test_timeout: a sample blocking longer than ``timeout=0.2`` (num_workers=2)
    raises RuntimeError('DataLoader timed out after ...'). The sample waits on an event
    released in ``finally`` (torch's worker is a process: a fork-context Event there,
    a threading.Event for ours)."""

    def case(make):
        if make.name == "ours":
            release: Any = threading.Event()
        else:
            release = multiprocessing.get_context("fork").Event()
        dl = make(BlocksAt(8, 0, release, bound=5.0), timeout=0.2)
        it = iter(dl)
        try:
            next(it)
            outcome: Any = "no timeout"
        except RuntimeError as e:
            outcome = (Err(type(e)), str(e).startswith("DataLoader timed out after"))
        finally:
            release.set()
        del it  # torch: shuts its worker processes down now that they are released
        return outcome, dl.timeout

    check(case, nw=2, torch_nw=2)


def test_timeout_without_workers():
    """torch applies ``timeout`` only to worker processes: with num_workers=0 it accepts
    ``timeout=0.2`` at construction but refuses to iterate (a bare AssertionError at iter()).
    Ours refuses it in one line (ValueError naming ``timeout``, also at iter()): the parity
    asserted is that both accept the construction and refuse to load."""

    def case(make):
        try:
            return list(make(Counting(4), timeout=0.2, num_workers=0))
        except (AssertionError, ValueError):
            return "refused"

    check(case)
    with pytest.raises(ValueError, match=r"timeout=0\.2"):
        iter(ThreadedDataLoader(Counting(4), timeout=0.2, num_workers=0))


def test_default_collate_is_torchs():
    """Sanity: the functions compared by identity in the attribute tests are torch's."""
    assert DataLoader(Counting()).collate_fn is default_collate
    assert DataLoader(Counting(), batch_size=None).collate_fn is default_convert
