"""check_thread_safety flags racy datasets deterministically and passes correct ones.

The racy datasets force their race: on the checker's threads (named
``lts-check-<n>``) they meet at a ``threading.Barrier`` between writing shared
state and reading it back, so both threads of a pair always write before either
reads. With ``threads=2`` and an even number of indices every barrier fills.
"""

from __future__ import annotations

import itertools
import random
import threading

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from lightning_threadsafe.checker import ThreadSafetyReport, check_thread_safety
from lightning_threadsafe.resources import ThreadLocalResource, ThreadSafeResource
from lightning_threadsafe.rng import sample_rng

N = 8  # indices checked by the forced-race tests (even: barriers of 2 always fill)


def _on_check_thread() -> bool:
    return threading.current_thread().name.startswith("lts-check-")


class _Handoff:
    """A barrier of two that only engages on the checker's concurrent threads."""

    def __init__(self) -> None:
        # Both checker threads wait here once per sample; the timeout turns a
        # bug in the pairing into a test failure instead of a hang.
        self._barrier = threading.Barrier(2, timeout=30)

    def __call__(self) -> None:
        if _on_check_thread():
            self._barrier.wait()


class SharedScratch(Dataset):
    """Writes each sample into one shared buffer, then returns a copy (a race)."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.buf = np.zeros(16)
        self.handoff = _Handoff()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        self.buf[:] = i
        self.handoff()  # the other thread writes its own index here
        return self.buf * 2.0


class GlobalNumpyRng(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> np.ndarray:
        return np.random.rand(4) + i


class GlobalRandom(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> float:
        return random.random() + i


class GlobalTorch(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3) + i


RECORD = 8  # bytes of payload per record
STRIDE = 16  # payload + 8 bytes of padding, so a read that continues another never hits a record


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "records.bin"
    with open(path, "wb") as f:
        for i in range(N):
            f.write(i.to_bytes(RECORD, "little") + b"\xff" * (STRIDE - RECORD))
    return path


def _record(f, i: int) -> int:
    return int.from_bytes(f.read(RECORD), "little")


class SharedHandle(Dataset):
    """One file handle for all threads, used with seek() then read() (a race)."""

    def __init__(self, path) -> None:
        self.f = open(path, "rb")  # closed by the test
        self.handoff = _Handoff()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        self.f.seek(i * STRIDE)
        self.handoff()  # the other thread seeks the shared handle here
        return _record(self.f, i)


class PerThreadHandles(Dataset):
    """The fix: each thread opens its own handle."""

    def __init__(self, path) -> None:
        self.handles = ThreadLocalResource(lambda: open(path, "rb"), name="records")
        self.handoff = _Handoff()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        f = self.handles.get()
        f.seek(i * STRIDE)
        self.handoff()
        return _record(f, i)


class LockedHandle(Dataset):
    """The other fix: seek+read of the shared handle under one lock."""

    def __init__(self, path) -> None:
        self.f = ThreadSafeResource(open(path, "rb"), name="records")

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        with self.f as f:
            f.seek(i * STRIDE)
            return _record(f, i)


class Augmented(Dataset):
    """Correct: per-sample randomness from sample_rng(), nested outputs, NaNs."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int) -> dict:
        rng = sample_rng()
        x = rng.normal(size=(3, 4)).astype(np.float32)
        x[0, 0] = np.nan
        return {
            "image": torch.from_numpy(x),
            "label": i % 3,
            "meta": {"name": f"s{i}", "crop": [int(v) for v in rng.integers(0, 9, 3)],
                     "weight": float("nan") if i % 2 else 0.5},
            "array": x.copy(),
        }


def test_flags_shared_scratch_buffer():
    report = check_thread_safety(SharedScratch(), threads=2, rounds=2)
    assert not report.safe
    assert report.differing_indices  # at least one of every pair read the other's write
    assert report.global_rng == [] and report.errors == {}
    assert report.checked == N and report.threads == 2 and report.rounds == 2
    assert any("ThreadLocalResource" in h for h in report.hints)


def test_flags_global_numpy_rng_by_hint_and_differences():
    state = np.random.get_state()
    report = check_thread_safety(GlobalNumpyRng(), threads=4, rounds=2)
    assert not report.safe
    assert report.global_rng == ["numpy"]
    assert any("np.random" in h and "sample_rng()" in h for h in report.hints)
    # The global stream moved on, so every index drew different numbers.
    assert report.differing_indices == list(range(N))
    # The checker leaves the global RNG as it found it.
    after = np.random.get_state()
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(state, after))


@pytest.mark.parametrize(
    ("dataset", "name", "fix"),
    [(GlobalRandom(), "random", "sample_rng()"), (GlobalTorch(), "torch", "sample_torch_generator()")],
)
def test_flags_other_global_rngs(dataset, name, fix):
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    report = check_thread_safety(dataset, threads=2, rounds=1)
    assert report.global_rng == [name]
    assert any(fix in h for h in report.hints)
    assert not report.safe and report.differing_indices
    assert random.getstate() == py_state
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_flags_shared_file_handle(records):
    ds = SharedHandle(records)
    try:
        # Serially every record reads back as its index.
        assert [ds[i] for i in range(N)] == list(range(N))
        report = check_thread_safety(ds, threads=2, rounds=2)
    finally:
        ds.f.close()
    assert not report.safe
    assert report.differing_indices
    assert report.global_rng == []


def test_passes_thread_local_handles(records):
    ds = PerThreadHandles(records)
    try:
        report = check_thread_safety(ds, threads=2, rounds=2)
        # The check threads closed their own handles; only the caller's is open.
        assert ds.handles.stats()["instances_open"] == 1
        assert ds.handles.stats()["instances_created"] == 1 + 2 * 2
    finally:
        ds.handles.close_all()
    assert report.safe, str(report)


def test_passes_locked_shared_handle(records):
    ds = LockedHandle(records)
    try:
        report = check_thread_safety(ds, threads=4, rounds=2)
    finally:
        with ds.f as f:
            f.close()
    assert report.safe, str(report)
    assert ds.f.stats()["acquisitions"] == N * 3 + 1


def test_passes_correct_dataset_with_sample_rng():
    report = check_thread_safety(Augmented(), threads=8, rounds=3, seed=7, epoch=2)
    assert report.safe, str(report)
    assert report.differing_indices == [] and report.global_rng == [] and report.hints == []
    assert report.checked == 64  # max_samples
    assert "SAFE" in str(report)


def test_threads_are_named_and_indices_respected():
    seen: dict[int, set[str]] = {}
    lock = threading.Lock()  # guards seen; taken by each loading thread

    class Recorder(Dataset):
        def __getitem__(self, i):
            with lock:
                seen.setdefault(i, set()).add(threading.current_thread().name)
            return i

    report = check_thread_safety(Recorder(), indices=[5, 3, 5, np.int64(9)], threads=3, rounds=2)
    assert report.safe and report.checked == 3
    assert sorted(seen) == [3, 5, 9]
    names = set().union(*seen.values()) - {threading.current_thread().name}
    assert names and all(n.startswith("lts-check-") for n in names)


def test_errors_are_recorded_not_raised():
    class Failing(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 3:
                raise ValueError("bad sample 3")
            if i == 4 and _on_check_thread():
                raise OSError("only under threads")
            return i

    report = check_thread_safety(Failing(), threads=2, rounds=1)
    assert report.errors == {3: repr(ValueError("bad sample 3")),
                             4: repr(OSError("only under threads"))}
    assert report.differing_indices == [4]  # 3 fails the same way every time
    assert not report.safe
    assert any("raised" in h for h in report.hints)


def test_report_str_and_to_dict():
    report = check_thread_safety(GlobalNumpyRng(), threads=2, rounds=1, max_samples=4)
    text = str(report)
    assert "UNSAFE" in text and "numpy" in text and "hint:" in text
    d = report.to_dict()
    assert d["safe"] is False and d["global_rng"] == ["numpy"] and d["checked"] == 4
    assert ThreadSafetyReport(**d) == report


def test_validation_names_the_argument():
    ds = Augmented()
    for kwargs, name in [({"threads": 0}, "threads="), ({"rounds": 0}, "rounds="),
                         ({"max_samples": 0}, "max_samples="), ({"seed": -1}, "seed="),
                         ({"epoch": 1.5}, "epoch="), ({"threads": True}, "threads=")]:
        with pytest.raises(ValueError, match=name):
            check_thread_safety(ds, **kwargs)
    with pytest.raises(TypeError, match="dataset="):
        check_thread_safety(object())
    class NoLen:
        def __getitem__(self, i):
            return i

    with pytest.raises(TypeError, match="no __len__"):
        check_thread_safety(NoLen())
    with pytest.raises(TypeError, match="indices="):
        check_thread_safety(ds, indices="abc")
    with pytest.raises(TypeError, match="indices contains"):
        check_thread_safety(ds, indices=[1.5])


class _Recording:
    """Records the indices it is asked for (``list.append`` under a lock: thread-safe)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        with self._lock:
            self.seen.add(i)
        return i


def test_default_indices_spread_over_the_whole_index_space() -> None:
    ds = _Recording(900_000)
    report = check_thread_safety(ds, threads=2, rounds=1, max_samples=8)
    assert report.checked == 8
    assert min(ds.seen) == 0 and max(ds.seen) == 899_999
    assert len(ds.seen) == 8
    spread = sorted(ds.seen)
    assert min(b - a for a, b in itertools.pairwise(spread)) > 100_000


def test_default_indices_cover_a_small_dataset_entirely() -> None:
    ds = _Recording(5)
    report = check_thread_safety(ds, threads=2, rounds=1, max_samples=64)
    assert report.checked == 5 and ds.seen == {0, 1, 2, 3, 4}
