"""Fault-injection datasets and collate functions for the reliability suite.

Everything here is defined at module level so it pickles into process workers
(``executor="process"``) and can be imported by the subprocess scripts of
``tests/test_reliability.py``. Delays are *workload* (they make completion order
differ from sampler order), never synchronisation.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_threadsafe import sample_rng

__all__ = [
    "BigSampleDataset",
    "GatedDataset",
    "GilStressDataset",
    "LoggingDataset",
    "RaisingDataset",
    "TripwireBatch",
    "append_line",
    "collate_returns_none",
    "collate_returns_tripwire",
    "collate_returns_unsized_mapping",
]


def append_line(path: str, line: str) -> None:
    """Append one line to ``path`` durably (flush + fsync), so a SIGKILL cannot lose it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class GilStressDataset(Dataset):
    """``{"index": i, "x": 4 floats from sample_rng()}`` with mixed per-sample cost.

    Most samples sleep 0-``max_delay_ms`` (fixed per index; ``time.sleep``
    releases the GIL, like a storage read); every ``gil_every``-th sample instead
    spins a short pure-Python loop that holds the GIL (a Python transform).
    """

    def __init__(self, n: int, *, max_delay_ms: float = 0.2, gil_every: int = 97,
                 gil_loop: int = 300) -> None:
        self.n = n
        gen = np.random.default_rng(2024)
        self.delays = gen.uniform(0.0, max_delay_ms, size=n) / 1000.0
        self.gil_every = gil_every
        self.gil_loop = gil_loop

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.gil_every and i % self.gil_every == 0:
            acc = 0
            for k in range(self.gil_loop):  # holds the GIL: pure-Python work
                acc += k * k
        else:
            time.sleep(float(self.delays[i]))
        x = sample_rng().standard_normal(4).astype(np.float32)
        return {"index": i, "x": torch.from_numpy(x)}


class BigSampleDataset(Dataset):
    """``{"index": i, "x": <nbytes of float32 filled with i>}``: large samples for the governor."""

    def __init__(self, n: int, nbytes: int) -> None:
        self.n = n
        self.numel = nbytes // 4

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "x": torch.full((self.numel,), float(i), dtype=torch.float32)}


class RaisingDataset(Dataset):
    """``dataset[i] == tensor([i])``, raising ``exc("boom at i")`` at the indices in ``fail_at``.

    ``attempts`` counts calls per failing index (thread executor / inline only:
    process workers count in their own memory).
    """

    def __init__(self, n: int, fail_at: set[int] | frozenset[int], *,
                 exc: type[BaseException] = ValueError, times: int | None = None) -> None:
        self.n = n
        self.fail_at = frozenset(fail_at)
        self.exc = exc
        self.times = times
        self._lock = threading.Lock()  # guards attempts: workers count concurrently
        self.attempts: dict[int, int] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.fail_at:
            with self._lock:
                k = self.attempts[i] = self.attempts.get(i, 0) + 1
            if self.times is None or k <= self.times:
                raise self.exc(f"boom at {i}")
        return torch.tensor([i])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class GatedDataset(Dataset):
    """Blocks at ``block_at`` until the test opens the gate; works in threads and forked processes.

    The gate is a pipe: the blocking sample waits (``select``, bounded by
    ``max_block_s``) until the test writes to it with :meth:`open`. A pipe, unlike a
    ``multiprocessing.Event``, stays usable when a waiting process is terminated
    (torch kills its workers after an error). :meth:`wait_entered` waits, with a
    deadline, until the blocking sample has started. Call :meth:`close` at the end.
    """

    def __init__(self, n: int, block_at: int, *, max_block_s: float = 60.0) -> None:
        self.n = n
        self.block_at = block_at
        self.max_block_s = max_block_s
        self._gate_r, self._gate_w = os.pipe()  # readable once the test opened the gate
        self._entered_r, self._entered_w = os.pipe()  # a byte per entry into the blocking sample

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.block_at:
            os.write(self._entered_w, b"x")
            select.select([self._gate_r], [], [], self.max_block_s)
        return torch.tensor([i])

    def wait_entered(self, timeout: float = 30.0) -> bool:
        ready, _, _ = select.select([self._entered_r], [], [], timeout)
        return bool(ready)

    def open(self) -> None:
        os.write(self._gate_w, b"x")

    def close(self) -> None:
        for fd in (self._gate_r, self._gate_w, self._entered_r, self._entered_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class LoggingDataset(Dataset):
    """``{"index": i, "x": 8 floats from sample_rng()}``; appends ``i`` to ``log_path`` durably.

    The log records *loading* (which runs ahead of training). Used by the
    kill-and-resume subprocess test.
    """

    def __init__(self, n: int, log_path: str) -> None:
        self.n = n
        self.log_path = log_path

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        append_line(self.log_path, str(int(i)))
        x = sample_rng().standard_normal(8).astype(np.float32)
        return {"index": i, "x": torch.from_numpy(x)}


# --------------------------------------------------------------------- garbage collates


def collate_returns_none(samples: list[Any]) -> None:
    """A collate_fn with a forgotten ``return``."""
    return None


class TripwireBatch:
    """A batch object that is fine to hold and pass around but fails when used."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices  # kept so the test can still check exactly-once

    def __len__(self) -> int:
        raise RuntimeError("tripwire: this batch is garbage")

    def to(self, *args: Any, **kwargs: Any) -> TripwireBatch:
        raise RuntimeError("tripwire: this batch is garbage")


def collate_returns_tripwire(samples: list[torch.Tensor]) -> TripwireBatch:
    return TripwireBatch([int(s) for s in samples])


class _UnsizedMapping(dict):
    """A dict whose ``values()`` raises: breaks anything that walks the batch (e.g. sizing)."""

    def values(self):  # type: ignore[override]
        raise RuntimeError("tripwire: values() of a garbage batch")


def collate_returns_unsized_mapping(samples: list[torch.Tensor]) -> dict[str, Any]:
    return _UnsizedMapping(index=torch.stack(samples))
