"""ThreadSafetyManager through the loader: memory budget (W6), resources, deadlock detection."""

from __future__ import annotations

import collections
import threading
import time

import pytest
import torch
from torch.utils.data import Dataset

from lightning_threadsafe import (
    PotentialDeadlockError,
    SampleLoadError,
    ThreadedDataLoader,
    ThreadLocalResource,
    ThreadSafeResource,
    ThreadSafetyManager,
)

MiB = 1024 * 1024


class BigSamples(Dataset):
    """64 MiB samples (allocated, not touched: counted in full, cheap to make)."""

    def __init__(self, n: int, size: int = 64 * MiB) -> None:
        self.n, self.size = n, size
        self._lock = threading.Lock()  # guards loaded
        self.loaded = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with self._lock:
            self.loaded += 1
        return {"index": torch.tensor(i), "payload": torch.empty(self.size, dtype=torch.uint8)}


def _wait_until(cond, deadline_s: float = 60.0) -> None:
    """Wait for a condition with a deadline (the loader's own progress, not a sleep-to-sync)."""
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.005)


def _run_w6(budget):
    ds = BigSamples(24)
    # batch_size=None: a batch is one 64 MiB sample, handed over without a collate copy.
    loader = ThreadedDataLoader(ds, batch_size=None, num_workers=4, prefetch_factor=32,
                                memory_budget=budget)
    it = iter(loader)
    # Admission runs at each next(): the first call learns the batch size, the second
    # admits as far ahead as the budget allows.
    head = [next(it), next(it)]
    gov = loader.thread_safety_manager.governor
    # Let the loader run ahead as far as it will: all samples, or until the governor holds it.
    _wait_until(lambda: ds.loaded == ds.n or (gov is not None and gov.throttled))
    seen = [int(b["index"]) for b in head] + [int(b["index"]) for b in it]
    report = loader.get_thread_safety_performance_report()
    return seen, report


def test_w6_memory_budget_bounds_bytes_in_flight_and_delivers_everything():
    seen, report = _run_w6("512MiB")
    assert collections.Counter(seen) == collections.Counter(range(24))
    mem = report["memory"]
    assert mem["budget_bytes"] == 512 * MiB
    assert mem["peak_bytes_in_flight"] <= 512 * MiB + 64 * MiB  # budget + one batch
    assert report["totals"]["throttle_events"] >= 1


def test_w6_without_a_binding_budget_holds_far_more_proving_the_bound_is_real():
    # The same run with a budget far above what it needs: the governor still measures,
    # and the peak is well above 512 MiB + one batch.
    seen, report = _run_w6("64GiB")
    assert collections.Counter(seen) == collections.Counter(range(24))
    assert report["memory"]["peak_bytes_in_flight"] > 2 * (512 * MiB + 64 * MiB)
    assert report["totals"]["throttle_events"] == 0


def test_w6_without_a_governor_delivers_everything():
    seen, report = _run_w6(None)
    assert collections.Counter(seen) == collections.Counter(range(24))
    assert report["memory"]["budget_bytes"] is None


class _Handle:
    def __init__(self) -> None:
        self.owner = threading.current_thread().name
        self.closed_by: str | None = None

    def close(self) -> None:
        self.closed_by = threading.current_thread().name


class HandleDataset(Dataset):
    def __init__(self) -> None:
        self.made: list[_Handle] = []
        self._lock = threading.Lock()  # guards made
        self.handles = ThreadLocalResource(self._make, name="handle")
        self.shared = ThreadSafeResource({"reads": 0}, name="shared-index")

    def _make(self) -> _Handle:
        h = _Handle()
        with self._lock:
            self.made.append(h)
        return h

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        h = self.handles.get()
        assert h.owner == threading.current_thread().name
        with self.shared as s:
            s["reads"] += 1
        return torch.tensor([i])


def test_thread_local_resources_are_per_worker_and_closed_on_their_thread_when_loading_stops():
    ds = HandleDataset()
    loader = ThreadedDataLoader(ds, batch_size=4, num_workers=3)
    assert sorted(b for batch in loader for b in batch.flatten().tolist()) == list(range(40))
    assert len(ds.made) <= 3 and len({h.owner for h in ds.made}) == len(ds.made)
    assert all(h.closed_by == h.owner for h in ds.made)  # closed by the worker that made it
    report = loader.get_thread_safety_performance_report()
    res = {r["name"]: r for r in report["resources"]}
    assert res["shared-index"]["acquisitions"] == 40
    assert res["handle"]["instances_open"] == 0


def test_debug_mode_reports_a_lock_order_inversion_naming_both_locks():
    a, b = ThreadSafeResource(1, name="volume"), ThreadSafeResource(2, name="labels")

    class Inverted(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            first, second = (a, b) if i % 2 == 0 else (b, a)
            with first, second:
                return torch.tensor([i])

    with pytest.raises(SampleLoadError) as info:
        list(ThreadedDataLoader(Inverted(), batch_size=2, num_workers=1, debug=True))
    cause = info.value.__cause__
    assert isinstance(cause, PotentialDeadlockError)
    assert {cause.first_lock, cause.second_lock} == {"volume", "labels"}
    assert cause.site and cause.conflicting_site and "test_manager.py" in cause.site
    # Without debug mode the same (single-threaded, so harmless) order runs unchecked.
    assert len(list(ThreadedDataLoader(Inverted(), batch_size=2, num_workers=1))) == 2


def test_manager_close_is_idempotent_and_reusable():
    ds = HandleDataset()
    with ThreadSafetyManager(memory_budget="1GiB", debug=True) as m:
        assert m.register_resources(ds) == 2
        assert m.report()["memory"]["budget_bytes"] == 1024**3
    m.close()
    m.close()
    loader = ThreadedDataLoader(ds, batch_size=8, num_workers=2)
    list(loader)
    loader.cleanup_thread_safety_resources()
    loader.cleanup_thread_safety_resources()
    assert len(list(loader)) == 5  # usable again after cleanup


def test_an_abandoned_iterator_gives_its_bytes_back_to_the_budget():
    loader = ThreadedDataLoader(BigSamples(12, size=MiB), batch_size=None, num_workers=2,
                                prefetch_factor=4, memory_budget="64MiB")
    gov = loader.thread_safety_manager.governor
    it = iter(loader)
    next(it), next(it)
    _wait_until(lambda: gov.bytes_in_flight > 0)  # batches are waiting in the ready buffer
    del it  # abandoned mid-epoch: its finalizer stops the workers
    assert gov.bytes_in_flight == 0
    assert len(list(loader)) == 12  # the next epoch is not throttled by phantom bytes
