"""Find a thread-safety bug in a dataset with ``check_thread_safety``, then fix it two ways.

The dataset reads fixed-size records from one binary file. The buggy version
shares a single file handle between threads: ``seek()`` and ``read()`` are each
safe, but another thread can move the shared file position in between, so a
thread reads someone else's record. The two fixes:

1. ``ThreadLocalResource`` -- each worker thread opens its own handle (closed on
   that thread when the loader's workers exit).
2. ``ThreadSafeResource`` -- keep one handle, but make seek+read one critical
   section (simple; threads then queue for the handle, see its statistics).

Run:  python examples/thread_safe_resources.py   (takes a second or two)
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from lightning_threadsafe.checker import check_thread_safety
from lightning_threadsafe.resources import ThreadLocalResource, ThreadSafeResource

RECORD_BYTES = 64
N_RECORDS = 64
STORAGE_LATENCY_S = 0.0005  # network storage: each read waits a little (and releases the GIL)


def write_records(path: Path) -> None:
    """Record i: 64 bytes, all derived from i."""
    with open(path, "wb") as f:
        for i in range(N_RECORDS):
            f.write(((np.arange(RECORD_BYTES) + 7 * i) % 256).astype(np.uint8).tobytes())


def read_record(f, index: int) -> np.ndarray:
    f.seek(index * RECORD_BYTES)
    time.sleep(STORAGE_LATENCY_S)  # simulated storage latency between seek and read
    return np.frombuffer(f.read(RECORD_BYTES), dtype=np.uint8).copy()


class SharedHandleRecords(Dataset):
    """BUGGY: one file handle shared by every thread."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")  # closed by close()

    def __len__(self) -> int:
        return N_RECORDS

    def __getitem__(self, index: int) -> np.ndarray:
        return read_record(self.f, index)

    def close(self) -> None:
        self.f.close()


class PerThreadRecords(Dataset):
    """FIX 1: one handle per thread (``functools.partial`` keeps the dataset picklable)."""

    def __init__(self, path: Path) -> None:
        self.handles = ThreadLocalResource(functools.partial(open, path, "rb"), name="records")

    def __len__(self) -> int:
        return N_RECORDS

    def __getitem__(self, index: int) -> np.ndarray:
        return read_record(self.handles.get(), index)

    def close(self) -> None:
        self.handles.close_all()


class LockedRecords(Dataset):
    """FIX 2: one shared handle, seek+read under its lock."""

    def __init__(self, path: Path) -> None:
        self.handle = ThreadSafeResource(open(path, "rb"), name="records")

    def __len__(self) -> int:
        return N_RECORDS

    def __getitem__(self, index: int) -> np.ndarray:
        with self.handle as f:
            return read_record(f, index)

    def close(self) -> None:
        with self.handle as f:
            f.close()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.bin"
        write_records(path)
        results = {}
        for cls in (SharedHandleRecords, PerThreadRecords, LockedRecords):
            dataset = cls(path)
            try:
                report = check_thread_safety(dataset, threads=8, rounds=3)
            finally:
                stats = (dataset.handles.stats() if isinstance(dataset, PerThreadRecords)
                         else dataset.handle.stats() if isinstance(dataset, LockedRecords)
                         else None)
                dataset.close()
            results[cls.__name__] = report.safe
            print(f"== {cls.__name__} ==")
            print(report)
            if stats is not None:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
                print(f"  resource stats: {shown}")
            print()
    ok = (not results["SharedHandleRecords"] and results["PerThreadRecords"]
          and results["LockedRecords"])
    print("as expected: the shared handle is flagged, both fixes pass" if ok
          else f"unexpected results: {results}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
