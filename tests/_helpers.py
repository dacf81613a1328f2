"""Datasets with chosen behaviours, shared by the tests (slow, failing, blocking, GIL-bound...)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_threadsafe import sample_rng


class RangeDataset(Dataset):
    """``dataset[i] == tensor([i])``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.tensor([i])


class AugmentedDataset(Dataset):
    """Index plus a per-sample random augmentation from sample_rng(); optional random delay.

    The delay (a GIL-releasing sleep of 0-``max_delay_ms``, fixed per index) makes
    completion order differ from sampler order; it is workload, not synchronisation.
    """

    def __init__(self, n: int, max_delay_ms: float = 0.0) -> None:
        self.n = n
        self.delays = np.random.default_rng(1234).uniform(0, max_delay_ms, size=n) / 1000.0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = sample_rng()
        if self.delays[i] > 0:
            time.sleep(float(self.delays[i]))
        return {"index": i, "x": torch.from_numpy(rng.standard_normal(4).astype(np.float32))}


class FailingDataset(Dataset):
    """Raises ``exc`` at the indices in ``fail_at`` (the first ``times`` attempts, or always)."""

    def __init__(self, n: int, fail_at: set[int], *, exc: type[BaseException] = ValueError,
                 times: int | None = None) -> None:
        self.n = n
        self.fail_at = set(fail_at)
        self.exc = exc
        self.times = times
        self._lock = threading.Lock()  # guards attempts (workers count concurrently)
        self.attempts: dict[int, int] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        with self._lock:
            self.attempts[i] = self.attempts.get(i, 0) + 1
            k = self.attempts[i]
        if i in self.fail_at and (self.times is None or k <= self.times):
            raise self.exc(f"boom at {i}")
        return torch.tensor([i])


class BlockingDataset(Dataset):
    """Blocks at ``block_at`` until ``release`` is set (the test controls it)."""

    def __init__(self, n: int, block_at: int) -> None:
        self.n = n
        self.block_at = block_at
        self.release = threading.Event()  # set by the test to let the blocked sample finish
        self.entered = threading.Event()  # set when the blocking sample starts

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.block_at:
            self.entered.set()
            self.release.wait(60)  # bounded: the test always sets it
        return torch.tensor([i])


class RecordingDataset(Dataset):
    """Records every index loaded (thread-safe)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._lock = threading.Lock()  # guards seen
        self.seen: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        with self._lock:
            self.seen.append(int(i))
        return torch.tensor([i])


def flat_indices(batches: list[Any], key: str | None = None) -> list[int]:
    out: list[int] = []
    for b in batches:
        t = b[key] if key is not None else b
        out.extend(int(v) for v in torch.as_tensor(t).flatten().tolist())
    return out


class GlobalRNGDataset(Dataset):
    """Not thread-safe: draws from numpy's global RNG (the checker must flag it)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i + np.random.random()])


class SeededDataset(Dataset):
    """Thread-safe: all randomness from sample_rng()."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i + sample_rng().random()])


@contextlib.contextmanager
def held_by_another_thread(lock: Any):
    """Hold ``lock`` (anything usable with ``with``) in a helper thread for the block's duration.

    Synchronised with events, no sleeps: the block runs only once the lock is held, and the
    helper releases it and is joined when the block ends.
    """
    holding, let_go = threading.Event(), threading.Event()  # set by the holder / by us

    def hold() -> None:
        with lock:
            holding.set()
            let_go.wait(timeout=30)

    t = threading.Thread(target=hold, name="test-holder")
    t.start()
    try:
        assert holding.wait(timeout=30), "the helper thread never got the lock"
        yield
    finally:
        let_go.set()
        t.join(timeout=30)


def run_in_thread(fn: Any, name: str = "test-worker") -> Any:
    """Run ``fn`` on a new thread to completion; return its result or re-raise its exception."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised on the calling thread below
            box["error"] = exc

    t = threading.Thread(target=target, name=name)
    t.start()
    t.join(timeout=30)  # bounded: a hung fn fails the test instead of hanging it
    assert not t.is_alive(), f"{name} did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]
