"""Tests for ``MemoryGovernor``: budgets, admission, hysteresis, backpressure, sizing.

Deterministic: an injected clock and memory reader stand in for time and psutil;
no sleeps, no timing thresholds.
"""

from __future__ import annotations

import random
import threading
from collections import deque, namedtuple
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lightning_threadsafe.memory import MemoryGovernor, MemoryReading

KiB = 1024
MiB = 1024**2
GiB = 1024**3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeMemory:
    """A mutable host-memory reading; counts how often it is read."""

    def __init__(self, available: int = 16 * GiB, total: int = 32 * GiB, rss: int = 1 * GiB) -> None:
        self.available, self.total, self.rss = available, total, rss
        self.reads = 0

    def __call__(self) -> MemoryReading:
        self.reads += 1
        return MemoryReading(rss_bytes=self.rss, available_bytes=self.available, total_bytes=self.total)


class FakeDevice:
    def __init__(self, free: int = 70 * GiB, total: int = 80 * GiB) -> None:
        self.free, self.total = free, total
        self.reads = 0

    def __call__(self) -> tuple[int, int]:
        self.reads += 1
        return self.free, self.total


def make(budget=1000, **kw) -> tuple[MemoryGovernor, FakeClock, FakeMemory]:
    clock = kw.pop("clock", FakeClock())
    mem = kw.pop("memory_reader", FakeMemory())
    kw.setdefault("local_world_size", 1)
    kw.setdefault("min_available", None)
    gov = MemoryGovernor(budget, clock=clock, memory_reader=mem, **kw)
    return gov, clock, mem


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("budget", "lws", "expected"),
    [
        ("auto", 1, 8 * GiB),  # half of 16 GiB available
        ("auto", 4, 2 * GiB),  # ... split among four local ranks
        (0.25, 1, 4 * GiB),
        (0.25, 2, 2 * GiB),
        ("25%", 2, 2 * GiB),
        ("512MiB", 4, 512 * MiB),  # explicit sizes are per rank, not divided
        ("512MB", 1, 512 * 1000**2),
        (12345, 8, 12345),
        (None, 1, None),
        ("none", 1, None),
    ],
)
def test_budget_parsing(budget, lws, expected):
    gov, _, _ = make(budget, local_world_size=lws)
    assert gov.budget_bytes == expected
    assert gov.stats()["budget_bytes"] == expected


def test_auto_budget_reads_local_world_size_from_env(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    gov = MemoryGovernor("auto", clock=FakeClock(), memory_reader=FakeMemory(available=16 * GiB))
    assert gov.local_world_size == 8
    assert gov.budget_bytes == 1 * GiB
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    gov = MemoryGovernor("auto", clock=FakeClock(), memory_reader=FakeMemory(available=16 * GiB))
    assert gov.budget_bytes == 8 * GiB


def test_min_available_auto_is_5_percent_or_512mib():
    small = MemoryGovernor(None, memory_reader=FakeMemory(available=1 * GiB, total=4 * GiB), local_world_size=1)
    assert small.min_available_bytes == int(0.05 * 4 * GiB)
    big = MemoryGovernor(None, memory_reader=FakeMemory(total=256 * GiB), local_world_size=1)
    assert big.min_available_bytes == 512 * MiB
    off = MemoryGovernor(None, memory_reader=FakeMemory(), min_available=None, local_world_size=1)
    assert off.min_available_bytes is None
    explicit = MemoryGovernor(None, memory_reader=FakeMemory(), min_available="2GiB", local_world_size=1)
    assert explicit.min_available_bytes == 2 * GiB


def test_default_psutil_reader_and_no_cuda_touched():
    gov = MemoryGovernor()  # real psutil, "auto" budget
    s = gov.stats()
    assert s["rss_bytes"] > 0 and s["available_bytes"] > 0 and s["total_bytes"] >= s["available_bytes"]
    assert 0 < gov.budget_bytes <= s["total_bytes"]
    assert s["device_budget_bytes"] is None and s["device_free_bytes"] is None
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()
    gov.close()
    gov.close()  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"budget": -5}, ValueError, "budget=-5"),
        ({"budget": "lots"}, ValueError, "budget='lots'"),
        ({"budget": "150%"}, ValueError, "budget='150%'"),
        ({"budget": True}, TypeError, "budget=True"),
        ({"budget": [1]}, TypeError, "budget=[1]"),
        ({"high_watermark": 0.5, "low_watermark": 0.7}, ValueError, "high_watermark=0.5"),
        ({"high_watermark": 1.5}, ValueError, "0 < low_watermark < high_watermark <= 1"),
        ({"low_watermark": 0.0}, ValueError, "low_watermark=0.0"),
        ({"low_watermark": "low"}, TypeError, "low_watermark='low'"),
        ({"sample_interval": -1}, ValueError, "sample_interval=-1"),
        ({"local_world_size": 0}, ValueError, "local_world_size=0"),
        ({"min_available": "x"}, ValueError, "min_available='x'"),
        ({"device_budget": "auto"}, ValueError, "device_budget='auto'"),
        ({"device_budget": "-1GB", "device_reader": FakeDevice()}, ValueError, "device_budget='-1GB'"),
        ({"memory_reader": 42}, TypeError, "memory_reader=42"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, exc, needle):
    kwargs.setdefault("memory_reader", FakeMemory())
    kwargs.setdefault("local_world_size", 1)
    with pytest.raises(exc) as info:
        MemoryGovernor(**kwargs)
    assert needle in str(info.value)
    assert "must" in str(info.value)


def test_bad_env_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two'"):
        MemoryGovernor(memory_reader=FakeMemory())


def test_bad_call_arguments_raise():
    gov, _, _ = make()
    with pytest.raises(ValueError, match="nbytes=-1"):
        gov.add(-1)
    with pytest.raises(TypeError, match=r"nbytes=1\.5"):
        gov.add(1.5)
    with pytest.raises(ValueError, match="nbytes=10 released but only 0"):
        gov.release(10)
    with pytest.raises(ValueError, match="pending_batches=-1"):
        gov.admit(pending_batches=-1, required=False)
    with pytest.raises(ValueError, match="configured=0"):
        gov.effective_prefetch(0)
    gov.add(np.int64(3))  # numpy ints are fine
    assert gov.bytes_in_flight == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_device_budget_without_cuda_or_reader_raises():
    with pytest.raises(ValueError, match="device_budget='1GiB' needs a CUDA device"):
        MemoryGovernor(None, device_budget="1GiB", memory_reader=FakeMemory(), local_world_size=1)


# ------------------------------------------------------------------------ admission


def test_required_batch_is_always_admitted():
    gov, clock, mem = make(1000, min_available="1GiB")
    # Unknown size, far over budget and low on system memory: still admitted.
    assert gov.admit(pending_batches=0, required=True)
    gov.add(5000)
    gov.observe_batch(5000)
    mem.available = 1
    clock.advance(1.0)
    assert gov.admit(pending_batches=100, required=True)
    assert not gov.admit(pending_batches=0, required=False)


def test_nothing_beyond_required_before_size_is_known():
    gov, _, _ = make(10 * GiB)
    assert not gov.admit(pending_batches=0, required=False)
    assert gov.admit(pending_batches=0, required=True)
    s = gov.stats()
    assert s["estimated_batch_bytes"] is None
    assert s["throttle_events"] == 0 and s["throttled"] == 0  # not memory pressure
    gov.observe_batch(1 * MiB)
    assert gov.admit(pending_batches=0, required=False)


def test_unlimited_budget_admits_without_size():
    gov, _, _ = make(None)
    assert gov.admit(pending_batches=1000, required=False)


def test_watermark_hysteresis():
    gov, _, _ = make(1000, high_watermark=0.9, low_watermark=0.5)
    gov.observe_batch(100)
    # Projection = in_flight + (pending + 1) * 100 against 900 (high).
    assert gov.admit(pending_batches=8, required=False)  # 900 <= 900
    assert not gov.admit(pending_batches=9, required=False)  # 1000 > 900 -> throttled
    assert gov.throttled
    # Below high but not below low (500): stays throttled.
    assert not gov.admit(pending_batches=5, required=False)  # 600
    assert not gov.admit(pending_batches=4, required=False)  # 500, not strictly below
    assert gov.throttled
    assert gov.admit(pending_batches=3, required=False)  # 400 < 500 -> resumes
    assert not gov.throttled
    # Back to the high watermark for entering again.
    assert gov.admit(pending_batches=8, required=False)
    # Bytes in flight count too.
    gov.add(850)
    assert not gov.admit(pending_batches=0, required=False)  # 950 > 900
    gov.release(400)
    assert not gov.admit(pending_batches=0, required=False)  # 450 + 100 = 550, not below 500
    gov.release(100)
    assert gov.admit(pending_batches=0, required=False)  # 350 + 100 = 450 < 500


def test_estimate_is_max_of_recent_batches():
    gov, _, _ = make(1000)
    for n in (100, 300, 200):
        gov.observe_batch(n)
    assert gov.stats()["estimated_batch_bytes"] == 300
    for _ in range(16):  # the window forgets the big one after 16 smaller batches
        gov.observe_batch(50)
    assert gov.stats()["estimated_batch_bytes"] == 50


def test_throttle_events_and_throttled_seconds():
    gov, clock, _ = make(1000, high_watermark=0.9, low_watermark=0.5)
    gov.observe_batch(100)
    gov.add(900)
    assert not gov.admit(pending_batches=0, required=False)  # event 1 begins at t0
    clock.advance(2.0)
    assert not gov.admit(pending_batches=0, required=False)  # same event
    assert gov.admit(pending_batches=0, required=True)  # required does not end it
    s = gov.stats()
    assert s["throttle_events"] == 1 and s["throttled"] == 1
    assert s["throttled_s"] == pytest.approx(2.0)  # ongoing time is included
    clock.advance(1.0)
    gov.release(900)
    assert gov.admit(pending_batches=0, required=False)  # resumes after 3 s
    clock.advance(10.0)  # unthrottled time does not count
    s = gov.stats()
    assert s["throttle_events"] == 1 and s["throttled"] == 0
    assert s["throttled_s"] == pytest.approx(3.0)
    gov.add(900)
    assert not gov.admit(pending_batches=0, required=False)  # event 2
    clock.advance(0.5)
    gov.release(900)
    assert gov.admit(pending_batches=0, required=False)
    s = gov.stats()
    assert s["throttle_events"] == 2
    assert s["throttled_s"] == pytest.approx(3.5)


def test_low_system_memory_throttles_regardless_of_budget():
    gov, clock, mem = make(None, min_available="1GiB", sample_interval=0.5)
    assert gov.admit(pending_batches=0, required=False)
    mem.available = 512 * MiB
    assert gov.admit(pending_batches=0, required=False)  # not read yet (rate limit)
    clock.advance(0.5)
    assert not gov.admit(pending_batches=0, required=False)
    s = gov.stats()
    assert s["low_memory"] == 1 and s["throttled"] == 1 and s["throttle_events"] == 1
    assert s["available_bytes"] == 512 * MiB
    mem.available = 4 * GiB
    clock.advance(0.5)
    assert gov.admit(pending_batches=0, required=False)
    assert gov.stats()["low_memory"] == 0


def test_memory_is_read_at_a_low_rate():
    gov, clock, mem = make(1000, sample_interval=0.5)
    gov.observe_batch(1)
    reads = mem.reads
    for _ in range(1000):
        gov.add(1)
        gov.admit(pending_batches=0, required=False)
        gov.stats()
        gov.release(1)
    assert mem.reads == reads  # the clock did not move: no reads at all
    clock.advance(0.5)
    for _ in range(1000):
        gov.admit(pending_batches=0, required=False)
    assert mem.reads == reads + 1
    gov.close()
    clock.advance(10.0)
    gov.stats()
    assert mem.reads == reads + 1  # closed: no more reads


def test_reader_exception_propagates_and_sampling_recovers():
    mem = FakeMemory()
    gov, clock, _ = make(1000, memory_reader=mem)
    calls = {"n": 0}

    def flaky() -> MemoryReading:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("psutil failed")
        return mem()

    gov._memory_reader = flaky  # swap after construction to fail the next read
    clock.advance(1.0)
    with pytest.raises(OSError, match="psutil failed"):
        gov.stats()
    clock.advance(1.0)
    assert gov.stats()["rss_bytes"] == mem.rss  # the next read works


# -------------------------------------------------------------------- prefetch depth


def test_effective_prefetch_shrinks_and_recovers():
    gov, clock, _ = make(1000, low_watermark=0.5, sample_interval=1.0)
    assert gov.effective_prefetch(32) == 32
    gov.add(1200)  # over the hard budget
    assert gov.effective_prefetch(32) == 32  # no reading yet
    seen = []
    for _ in range(7):
        clock.advance(1.0)
        seen.append(gov.effective_prefetch(32))
    assert seen == [16, 8, 4, 2, 1, 1, 1]
    assert gov.stats()["effective_prefetch_scale"] == 1 / 32
    gov.release(400)  # 800: under the budget but above low (500): hold
    clock.advance(1.0)
    assert gov.effective_prefetch(32) == 1
    gov.release(500)  # 300 < 500: recover one doubling per reading
    seen = []
    for _ in range(12):
        clock.advance(1.0)
        seen.append(gov.effective_prefetch(32))
    # The divisor is clamped at 32 (depth 1), so recovery starts at once.
    assert seen == [2, 4, 8, 16, 32, 32, 32, 32, 32, 32, 32, 32]
    assert gov.stats()["effective_prefetch_scale"] == 1.0


def test_effective_prefetch_shrinks_on_low_system_memory():
    gov, clock, mem = make(None, min_available="1GiB", sample_interval=1.0)
    mem.available = 100 * MiB
    clock.advance(1.0)
    assert gov.effective_prefetch(8) == 4
    clock.advance(1.0)
    assert gov.effective_prefetch(8) == 2
    mem.available = 8 * GiB
    clock.advance(1.0)
    assert gov.effective_prefetch(8) == 4
    clock.advance(1.0)
    assert gov.effective_prefetch(8) == 8


# --------------------------------------------------------------------------- device


def test_device_budget_with_injected_reader():
    dev = FakeDevice(free=70 * GiB, total=80 * GiB)
    gov, clock, _ = make(
        None, device_budget="1GiB", device_reader=dev, min_device_free="2GiB",
        high_watermark=0.9, low_watermark=0.5, sample_interval=1.0,
    )
    s = gov.stats()
    assert s["device_budget_bytes"] == 1 * GiB and s["device_free_bytes"] == 70 * GiB
    assert s["device_total_bytes"] == 80 * GiB and s["min_device_free_bytes"] == 2 * GiB
    # With a device budget the size must be known first.
    assert not gov.admit(pending_batches=0, required=False)
    gov.observe_batch(256 * MiB)
    assert gov.admit(pending_batches=5, required=False)  # host unlimited
    gov.add_device(768 * MiB)  # + 256 MiB = 1 GiB > 0.9 GiB
    assert not gov.admit(pending_batches=0, required=False)
    assert gov.admit(pending_batches=0, required=True)
    assert gov.stats()["device_peak_bytes_in_flight"] == 768 * MiB
    gov.release_device(256 * MiB)  # 512 + 256 = 768 MiB, not below 512 MiB
    assert not gov.admit(pending_batches=0, required=False)
    gov.release_device(512 * MiB)
    assert gov.admit(pending_batches=0, required=False)
    # Low device free memory throttles like low host memory.
    dev.free = 1 * GiB
    clock.advance(1.0)
    assert not gov.admit(pending_batches=0, required=False)
    assert gov.stats()["low_memory"] == 1
    assert gov.effective_prefetch(8) == 4
    dev.free = 60 * GiB
    clock.advance(1.0)
    assert gov.admit(pending_batches=0, required=False)
    assert gov.effective_prefetch(8) == 8
    with pytest.raises(ValueError, match="device bytes are in flight"):
        gov.release_device(1)


def test_device_budget_fraction_and_auto_floor():
    dev = FakeDevice(free=10 * GiB, total=40 * GiB)
    gov, _, _ = make(None, device_budget=0.5, device_reader=dev)
    assert gov.device_budget_bytes == 20 * GiB
    assert gov.min_device_free_bytes == 512 * MiB  # min(5% of 40 GiB, 512 MiB)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_budget_default_reader_on_gpu():
    gov, _, _ = make(None, device_budget=0.5)
    _free, total = torch.cuda.mem_get_info()
    s = gov.stats()
    assert s["device_total_bytes"] == total and 0 < s["device_free_bytes"] <= total
    assert gov.device_budget_bytes == total // 2


# ------------------------------------------------------------------------ nbytes_of


Pair = namedtuple("Pair", ["image", "label"])


@dataclass
class Sample:
    image: torch.Tensor
    meta: dict
    raw: bytes = b""


def test_nbytes_of_nested_structures():
    img = torch.zeros(2, 3, 4, dtype=torch.float32)  # 96 bytes
    arr = np.zeros((5, 5), dtype=np.float64)  # 200 bytes
    batch = {
        "sample": Sample(image=img, meta={"arr": arr, "name": "x", "id": 7}, raw=b"abcd"),
        "pair": Pair(torch.ones(10, dtype=torch.int16), [np.float32(1.0), None]),  # 20 + 4
        "list": [bytearray(3), (memoryview(b"12345"),)],  # 3 + 5
        "half": torch.zeros(8, dtype=torch.float16),  # 16
    }
    assert MemoryGovernor.nbytes_of(batch) == 96 + 200 + 4 + 20 + 4 + 3 + 5 + 16
    assert MemoryGovernor.nbytes_of(None) == 0
    assert MemoryGovernor.nbytes_of("text") == 0
    assert MemoryGovernor.nbytes_of(Sample) == 0  # a dataclass *type* is not a batch


def test_nbytes_of_counts_shared_objects_once_and_survives_cycles():
    t = torch.zeros(100, dtype=torch.uint8)
    cyclic: list = [t, t]
    cyclic.append(cyclic)
    assert MemoryGovernor.nbytes_of(cyclic) == 100
    sparse = torch.sparse_coo_tensor(
        torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (1000,), check_invariants=True
    )
    assert MemoryGovernor.nbytes_of(sparse) == 2 * 8 + 2 * 4  # indices int64 + values float32


# ------------------------------------------------------------------- thread safety


def test_concurrent_add_release_is_exact():
    gov, _, _ = make(None)
    n_threads, rounds, max_chunk = 8, 2000, 4096
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            barrier.wait(timeout=30)
            for _ in range(rounds):
                n = rng.randint(1, max_chunk)
                gov.add(n)
                gov.observe_batch(n)
                gov.release(n)
        except BaseException as exc:  # carried to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), name=f"test-memory-{i}") for i in range(n_threads)]
    for t in threads:
        t.start()
    # The consumer admits concurrently with the workers.
    for _ in range(rounds):
        gov.admit(pending_batches=1, required=False)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    s = gov.stats()
    assert s["bytes_in_flight"] == 0
    # Each thread holds at most one chunk at a time.
    assert 1 <= s["peak_bytes_in_flight"] <= n_threads * max_chunk


# ---------------------------------------------------------------------- simulation


def simulate(budget, *, batch_sizes, prefetch=32, steps=300, per_step=4):
    """A fake loader loop: the consumer admits while outstanding < prefetch,
    workers complete up to ``per_step`` batches per step (add + observe), the
    consumer takes one batch per step (release). Returns the governor's stats
    and the largest batch."""
    clock = FakeClock()
    gov = MemoryGovernor(budget, clock=clock, memory_reader=FakeMemory(), local_world_size=1,
                         min_available=None, sample_interval=0.5)
    sizes = iter(batch_sizes)
    pending: deque[int] = deque()  # admitted, not yet collated
    ready: deque[int] = deque()  # collated, in the buffer (bytes added)
    peak = 0
    delivered = 0
    for _ in range(steps):
        depth = gov.effective_prefetch(prefetch)
        while len(pending) + len(ready) < depth:
            required = not pending and not ready  # the batch the consumer needs next
            if not gov.admit(pending_batches=len(pending), required=required):
                break
            pending.append(next(sizes))
        for _ in range(min(per_step, len(pending))):
            n = pending.popleft()
            gov.add(n)
            gov.observe_batch(n)
            ready.append(n)
            peak = max(peak, gov.bytes_in_flight)
        if ready:
            gov.release(ready.popleft())
            delivered += 1
        clock.advance(0.1)
    s = gov.stats()
    assert s["peak_bytes_in_flight"] == peak
    assert delivered > steps // 2  # backpressure slows, it does not stall
    return s


def test_simulation_peak_stays_within_budget_plus_one_batch():
    budget, batch = 512 * MiB, 64 * MiB
    s = simulate(budget, batch_sizes=iter(lambda: batch, None))
    assert s["peak_bytes_in_flight"] <= budget + batch
    assert s["throttle_events"] >= 1


def test_simulation_with_variable_batches():
    rng = random.Random(0)
    sizes = [rng.randint(16 * MiB, 64 * MiB) for _ in range(10_000)]
    budget = 512 * MiB
    s = simulate(budget, batch_sizes=sizes)
    assert s["peak_bytes_in_flight"] <= budget + max(sizes)


def test_simulation_without_budget_exceeds_it():
    # The same loop without a budget: proves the bound above is not vacuous.
    budget, batch = 512 * MiB, 64 * MiB
    s = simulate(None, batch_sizes=iter(lambda: batch, None))
    assert s["peak_bytes_in_flight"] > 3 * (budget + batch)
    assert s["throttle_events"] == 0


# ------------------------------------------------- waiting for room (worker side)


def _in_thread(fn) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # carried to the test thread
            errors.append(exc)

    t = threading.Thread(target=run, name="test-memory-waiter", daemon=True)
    t.start()
    return t, errors


def test_wait_for_room_calls_required_outside_the_governor_lock():
    """No callback under the governor's lock: required() (the ready buffer's length, the
    pool's needed ordinal) must not create a lock order governor -> ready buffer."""
    gov, _, _ = make(1000)
    gov.add(900)
    held: list[bool] = []

    def required() -> bool:
        held.append(gov._lock.locked())  # white-box: only this thread could hold it here
        return True

    gov.wait_for_room(500, required=required, stop=threading.Event(), poll=3600)
    assert held == [False]


def test_wake_waiters_is_not_lost_when_the_needed_batch_changes_before_the_wait():
    """The consumer makes the waiting batch the needed one and wakes the waiters right
    after the worker read required() -- before it waits. The worker must still see it
    (a notify sent before the wait would be lost: it would sleep the whole poll)."""
    gov, _, _ = make(1000)
    gov.add(900)
    needed = [False]
    calls = [0]

    def required() -> bool:
        calls[0] += 1
        if calls[0] == 1:  # the consumer's move lands between this read and the wait
            needed[0] = True
            gov.wake_waiters()
            return False
        return needed[0]

    stop = threading.Event()
    t, errors = _in_thread(lambda: gov.wait_for_room(500, required=required, stop=stop,
                                                     poll=3600))
    try:
        t.join(timeout=60)  # returns at once when correct; the bound only ends a failure
        assert not t.is_alive(), "the worker missed wake_waiters() and sleeps its whole poll"
        assert not errors and calls[0] == 2
    finally:
        stop.set()
        gov.wake_waiters()
        t.join(timeout=10)


def test_wake_waiters_wakes_a_waiting_worker():
    gov, _, _ = make(1000)
    gov.add(900)
    needed = threading.Event()
    asked = threading.Semaphore(0)

    def required() -> bool:
        asked.release()
        return needed.is_set()

    stop = threading.Event()
    t, errors = _in_thread(lambda: gov.wait_for_room(500, required=required, stop=stop,
                                                     poll=3600))
    try:
        assert asked.acquire(timeout=60)  # it asked once, found no room: it waits now
        needed.set()
        gov.wake_waiters()
        t.join(timeout=60)
        assert not t.is_alive() and not errors
    finally:
        stop.set()
        gov.wake_waiters()
        t.join(timeout=10)


def test_release_making_room_wakes_a_waiting_worker():
    gov, _, _ = make(1000)
    gov.add(900)
    asked = threading.Semaphore(0)

    def required() -> bool:
        asked.release()
        return False

    stop = threading.Event()
    t, errors = _in_thread(lambda: gov.wait_for_room(500, required=required, stop=stop,
                                                     poll=3600))
    try:
        assert asked.acquire(timeout=60)
        gov.release(900)
        t.join(timeout=60)
        assert not t.is_alive() and not errors
    finally:
        stop.set()
        gov.wake_waiters()
        t.join(timeout=10)


def test_wait_for_room_returns_at_once_when_it_fits_or_without_budget():
    gov, _, _ = make(1000)
    gov.add(100)
    gov.wait_for_room(500, required=lambda: False, stop=threading.Event(), poll=3600)
    unlimited, _, _ = make(None)
    unlimited.add(10**9)
    unlimited.wait_for_room(10**9, required=lambda: False, stop=threading.Event(), poll=3600)
