"""Ownership of an epoch: what holds what, and what must never end an epoch early.

Each case here was a silent loss before the engine core was rebuilt (issue 11): the
loader held by nobody, a second ``iter()``, samples that must load together under the
default memory budget, and errors that changed type or ended the epoch. Every executor
is covered (inline, threads, processes; map-style and iterable datasets).
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref

import pytest
import torch
from _helpers import FailingDataset, RangeDataset
from torch.utils.data import Dataset, IterableDataset

from lightning_threadsafe import SampleLoadError, ThreadedDataLoader
from lightning_threadsafe._epoch import EpochSpec

MAP_CASES = [
    pytest.param({"num_workers": 0}, id="inline"),
    pytest.param({"num_workers": 2}, id="threads-2"),
    pytest.param({"num_workers": 8}, id="threads-8"),
    pytest.param({"num_workers": "auto", "executor": "auto"}, id="auto"),
    pytest.param({"num_workers": 2, "executor": "process"}, id="processes"),
]


class _Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(torch.arange(self.n).split(1))


def _lts_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lts-")]


def _flat(batches) -> list[int]:
    return [int(i) for b in batches for i in torch.as_tensor(b).flatten()]


@pytest.mark.parametrize("kwargs", MAP_CASES)
def test_a_loader_held_by_nobody_delivers_its_whole_epoch(kwargs):
    got = []
    for batch in ThreadedDataLoader(RangeDataset(37), batch_size=4, **kwargs):
        gc.collect()  # would collect the loader if anything depended on it
        got.extend(batch.flatten().tolist())
    assert sorted(got) == list(range(37))
    assert not _lts_threads()


@pytest.mark.parametrize("num_workers", [0, 2, 8])
def test_an_iterable_loader_held_by_nobody_delivers_every_sample(num_workers):
    got = []
    for batch in ThreadedDataLoader(_Stream(23), batch_size=4, num_workers=num_workers):
        gc.collect()
        got.extend(batch.flatten().tolist())
    assert got == list(range(23))
    assert not _lts_threads()


@pytest.mark.parametrize("kwargs", MAP_CASES)
def test_the_iterator_alone_knows_its_length(kwargs):
    it = iter(ThreadedDataLoader(RangeDataset(37), batch_size=4, **kwargs))
    gc.collect()
    assert len(it) == 10
    assert len(list(it)) == 10


@pytest.mark.parametrize("kwargs", MAP_CASES)
def test_three_live_iterators_of_one_loader_each_deliver_their_epoch(kwargs):
    loader = ThreadedDataLoader(RangeDataset(30), batch_size=4, **kwargs)
    its = [iter(loader) for _ in range(3)]
    got: list[list[int]] = [[], [], []]
    done = [False] * 3
    while not all(done):  # interleaved, one batch from each in turn
        for k, it in enumerate(its):
            if done[k]:
                continue
            try:
                got[k].extend(next(it).flatten().tolist())
            except StopIteration:
                done[k] = True
    assert got == [list(range(30))] * 3
    loader.close()
    assert not _lts_threads()


def test_an_abandoned_iterator_is_collected_and_stops_its_threads():
    loader = ThreadedDataLoader(RangeDataset(400), batch_size=4, num_workers=4)
    it = iter(loader)
    next(it)
    ref = weakref.ref(it)
    assert _lts_threads()
    del it
    gc.collect()
    assert ref() is None  # nothing (loader, threads) kept it alive
    assert not _lts_threads()
    assert len(list(loader)) == 100  # the loader goes on with a fresh epoch


def test_the_epoch_spec_is_immutable():
    it = iter(ThreadedDataLoader(RangeDataset(8), batch_size=4, num_workers=2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        it.spec.dataset = None  # type: ignore[misc]
    assert isinstance(it.spec, EpochSpec)
    it.close()


class _Barrier(Dataset):
    """Samples that can only complete together: each waits for all ``parties``."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=30)

    def __len__(self) -> int:
        return self.barrier.parties

    def __getitem__(self, i: int) -> torch.Tensor:
        self.barrier.wait()
        return torch.tensor([i])


def test_samples_that_must_load_together_do_under_the_default_budget():
    """Start-up concurrency is num_workers samples whatever the budget (batch_size=1)."""
    loader = ThreadedDataLoader(_Barrier(4), batch_size=1, num_workers=4)  # memory_budget="auto"
    assert sorted(_flat(loader)) == [0, 1, 2, 3]  # a BrokenBarrierError after 30 s otherwise


@pytest.mark.parametrize("kwargs", MAP_CASES[:3] + MAP_CASES[4:])
@pytest.mark.parametrize("exc_type", [KeyError, ValueError, IndexError, OSError])
def test_a_failing_sample_raises_its_own_type_and_the_epoch_goes_on(kwargs, exc_type):
    ds = FailingDataset(20, {5}, exc=exc_type)
    it = iter(ThreadedDataLoader(ds, batch_size=4, **kwargs))
    got, errors = [], []
    while True:
        try:
            got.append(next(it).flatten().tolist())
        except StopIteration:
            break
        except exc_type as err:
            errors.append(err)
    assert got == [[0, 1, 2, 3], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    (err,) = errors
    assert isinstance(err, SampleLoadError) and err.index == 5 and err.batch_ordinal == 1
    assert "index=5" in err.detail
    assert not _lts_threads()


def test_a_failure_kept_by_the_caller_does_not_keep_threads_alive():
    it = iter(ThreadedDataLoader(FailingDataset(40, {0}), batch_size=4, num_workers=3))
    with pytest.raises(ValueError) as info:
        next(it)
    del it
    gc.collect()
    assert info.value.index == 0  # still held here ...
    assert not _lts_threads()  # ... yet the iterator was collected and its pool joined


class _RaisesStopIteration(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 3:
            raise StopIteration  # would end a for loop silently if it leaked as itself
        return torch.tensor([i])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_iteration_from_a_sample_is_an_error_not_the_end(num_workers):
    loader = ThreadedDataLoader(_RaisesStopIteration(), batch_size=2, num_workers=num_workers)
    got = []
    with pytest.raises(SampleLoadError) as info:
        for b in loader:
            got.append(b.flatten().tolist())
    assert not isinstance(info.value, StopIteration) and info.value.index == 3
    assert got == [[0, 1]]


def test_global_seed_before_each_epoch_reproduces_torch_order():
    ds = RangeDataset(50)
    torch_loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)
    ours = ThreadedDataLoader(ds, batch_size=5, shuffle=True, num_workers=2)
    for s in (0, 1, 0):
        torch.manual_seed(s)
        expected = _flat(torch_loader)
        torch.manual_seed(s)
        assert _flat(ours) == expected


def test_a_resume_without_a_seed_replays_the_drawn_order():
    ds = RangeDataset(40)
    torch.manual_seed(7)
    loader = ThreadedDataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    it = iter(loader)
    head = [next(it).flatten().tolist() for _ in range(4)]
    state = loader.state_dict()
    rest = [b.flatten().tolist() for b in it]
    torch.manual_seed(123)  # another global RNG state: the checkpoint decides the order
    other = ThreadedDataLoader(ds, batch_size=4, shuffle=True, num_workers=3)
    other.load_state_dict(state)
    assert [b.flatten().tolist() for b in other] == rest
    assert sorted(i for b in head + rest for i in b) == list(range(40))


def test_frozen_attributes_cannot_be_set_and_others_take_effect():
    loader = ThreadedDataLoader(RangeDataset(8), batch_size=4)
    for name in ("batch_size", "sampler", "batch_sampler", "drop_last", "dataset",
                 "persistent_workers"):
        with pytest.raises(ValueError, match=f"{name} attribute should not be set"):
            setattr(loader, name, getattr(loader, name))
    loader.num_workers = 2  # allowed, as in torch, and used from the next iter()
    it = iter(loader)
    assert it.spec.num_workers == 2 and _lts_threads()
    assert _flat(it) == list(range(8))
