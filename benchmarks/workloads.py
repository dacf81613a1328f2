"""The benchmark datasets (W1-W8 of ``BENCHMARKS.md``) and their single-thread calibration.

Every dataset here is map-style, deterministic per index and safe to call from
several threads at once, so that all contenders (torch processes, torchdata
threads, our loader) load exactly the same work:

* :class:`VolumeCrops` (W1, W5, and with ``latency_s`` W2/W7/W8): a random 48^3
  uint8 crop from a ~50 MiB ``.npy`` volume opened with ``mmap_mode="r"``,
  converted to float, normalised and smoothed with ``avg_pool3d``. The crop
  position comes from ``numpy.random.default_rng(index)``, so a sample depends
  only on its index. Reads through ``np.memmap`` are safe to share between
  threads (no seek state); the handle is reopened after a ``fork``/unpickle and
  never pickled, so process workers do not copy the volume. ``latency_s`` adds a
  ``time.sleep`` that releases the GIL (object storage / network file systems).
* :class:`GilBound` (W3): a pure-Python integer loop that holds the GIL for a
  calibrated number of milliseconds.
* :class:`TinyTensor` (W4, O1): returns one preallocated 16-float tensor; only the
  loader's own per-sample/per-batch overhead remains.
* :class:`BigSamples` (W6): fresh 64 MiB float tensors (filled, so the pages are
  resident and visible in RSS).

The *physical limits* printed beside each figure come from
:func:`calibrate`: it loads samples serially on the calling thread with
``torch.set_num_threads(1)`` and measures wall time and thread CPU time per
sample. ``cores / cpu_s`` is the CPU limit (no loader can do better than every
core busy on sample work); ``n / wall_s`` is the latency limit of ``n``
concurrent workers (each sample occupies one worker for its wall time).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "BigSamples",
    "Calibration",
    "GilBound",
    "TinyTensor",
    "VolumeCrops",
    "calibrate",
    "calibrate_gil_iterations",
    "first_item_collate",
    "make_volume",
    "usable_cores",
]


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_volume(side: int, cache_dir: Path | None = None) -> Path:
    """Create (once) a ``side**3`` uint8 random volume as ``.npy`` and return its path.

    The file is cached by size in ``cache_dir`` (default: the system temp dir),
    written to a temporary name and renamed, so concurrent runs never see a
    half-written file.
    """
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"lts-bench-volume-{side}.npy"
    expected = side**3
    if path.exists():
        try:
            vol = np.load(path, mmap_mode="r")
            if vol.shape == (side, side, side) and vol.dtype == np.uint8:
                return path
        except (OSError, ValueError):
            pass
    rng = np.random.default_rng(12345)
    data = rng.integers(0, 256, size=expected, dtype=np.uint8).reshape(side, side, side)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".npy.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class VolumeCrops(Dataset):
    """Random ``crop**3`` crops from a memory-mapped uint8 volume (W1; W2 with latency).

    Args:
        path: the ``.npy`` volume.
        length: number of indices (crops are drawn from ``default_rng(index)``).
        crop: edge length of a crop.
        latency_s: seconds of GIL-releasing sleep added per sample (0 for W1).
        smooth_passes: how many 3x3x3 ``avg_pool3d`` passes smooth the crop.

    Returns per sample a float32 tensor of shape ``(1, crop, crop, crop)``.
    """

    def __init__(self, path: Path, length: int, crop: int = 48, latency_s: float = 0.0,
                 smooth_passes: int = 1) -> None:
        self.path = str(path)
        self.length = int(length)
        self.crop = int(crop)
        self.latency_s = float(latency_s)
        self.smooth_passes = int(smooth_passes)
        self._vol: np.memmap | None = None
        self._pid = -1

    def _volume(self) -> np.ndarray:
        # A memmap opened before fork is still valid in the child, but we reopen
        # after fork/unpickle anyway so that nothing relies on inherited state.
        # Two threads racing here both open a read-only map; the last one wins
        # and the other is garbage-collected -- harmless for reads.
        vol = self._vol
        if vol is None or self._pid != os.getpid():
            vol = np.load(self.path, mmap_mode="r")
            self._vol, self._pid = vol, os.getpid()
        return vol

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_vol"] = None  # never pickle the mapped volume (it would copy 50 MiB)
        return state

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        vol = self._volume()
        c = self.crop
        hi = [s - c for s in vol.shape]
        z, y, x = (int(v) for v in np.random.default_rng(index).integers(0, hi, size=3))
        if self.latency_s > 0:
            time.sleep(self.latency_s)  # releases the GIL, like a remote read would
        crop = np.ascontiguousarray(vol[z:z + c, y:y + c, x:x + c])
        t = torch.from_numpy(crop).to(torch.float32)
        t = (t - t.mean()) / (t.std() + 1e-6)
        t = t.view(1, 1, c, c, c)
        for _ in range(self.smooth_passes):
            t = F.avg_pool3d(t, kernel_size=3, stride=1, padding=1)
        return t[0]


def _gil_loop(iterations: int, seed: int) -> int:
    acc = seed & 0x7FFFFFFF
    for _ in range(iterations):
        acc = (acc * 1103515245 + 12345) & 0x7FFFFFFF
    return acc


def calibrate_gil_iterations(target_s: float, probe: int = 200_000) -> int:
    """Loop iterations of :class:`GilBound` that take about ``target_s`` on this machine."""
    _gil_loop(probe // 10, 1)  # warm the interpreter's caches
    best = float("inf")
    for _ in range(3):  # min of three: the machine is shared and noisy
        t0 = time.perf_counter()
        _gil_loop(probe, 1)
        best = min(best, time.perf_counter() - t0)
    return max(1, int(target_s / (best / probe)))


class GilBound(Dataset):
    """A pure-Python loop per sample that holds the GIL (W3).

    Args:
        length: number of indices.
        iterations: loop iterations per sample (see :func:`calibrate_gil_iterations`).
    """

    def __init__(self, length: int, iterations: int) -> None:
        self.length = int(length)
        self.iterations = int(iterations)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        acc = _gil_loop(self.iterations, index)
        return torch.full((16,), float(acc % 997))


class TinyTensor(Dataset):
    """Returns the same preallocated small tensor for every index (W4: loader overhead)."""

    def __init__(self, length: int, numel: int = 16) -> None:
        self.length = int(length)
        self.tensor = torch.zeros(numel)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tensor


class BigSamples(Dataset):
    """Fresh ``nbytes`` float32 tensors, filled so that their pages are resident (W6)."""

    def __init__(self, length: int, nbytes: int) -> None:
        self.length = int(length)
        self.numel = int(nbytes) // 4

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((self.numel,), float(index), dtype=torch.float32)


def first_item_collate(batch: list[Any]) -> Any:
    """Collate for ``batch_size=1`` that returns the sample itself (no 64 MiB stack copy).

    Module-level so that it pickles for process workers.
    """
    return batch[0]


@dataclass(frozen=True)
class Calibration:
    """Single-thread cost of one sample, measured serially on one thread.

    Attributes:
        wall_s: wall seconds per sample (includes any simulated latency).
        cpu_s: thread-CPU seconds per sample (excludes sleeping).
        samples: how many samples were timed.
    """

    wall_s: float
    cpu_s: float
    samples: int

    @property
    def cpu_rate(self) -> float:
        """Samples per second one core sustains (CPU work only)."""
        return 1.0 / max(self.cpu_s, 1e-9)

    def cpu_limit(self, cores: int) -> float:
        """Samples/s with every core busy on sample work: ``cores / cpu_s``."""
        return cores * self.cpu_rate

    def latency_limit(self, workers: int) -> float:
        """Samples/s of ``workers`` concurrent workers: ``workers / wall_s``."""
        return workers / max(self.wall_s, 1e-9)

    def limit(self, cores: int, workers: int) -> float:
        """The physical ceiling for ``workers`` workers: min(CPU limit, latency limit)."""
        return min(self.cpu_limit(cores), self.latency_limit(max(1, workers)))


def calibrate(dataset: Dataset, *, seconds: float, min_samples: int = 5,
              warmup: int = 3) -> Calibration:
    """Time ``dataset[i]`` serially on this thread with one intra-op torch thread.

    Runs for about ``seconds`` (at least ``min_samples`` samples) after
    ``warmup`` untimed samples, and restores torch's thread count afterwards.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = len(dataset)  # type: ignore[arg-type]
        for i in range(min(warmup, n)):
            dataset[i]
        t0, c0 = time.perf_counter(), time.thread_time()
        count = 0
        while count < min_samples or time.perf_counter() - t0 < seconds:
            dataset[(warmup + count) % n]
            count += 1
        wall = (time.perf_counter() - t0) / count
        cpu = (time.thread_time() - c0) / count
    finally:
        torch.set_num_threads(n_threads)
    return Calibration(wall_s=wall, cpu_s=max(cpu, 1e-9), samples=count)
