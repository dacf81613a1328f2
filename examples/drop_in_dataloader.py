"""Plain PyTorch: swap torch's DataLoader for ThreadedDataLoader and compare.

    python examples/drop_in_dataloader.py

A dataset whose samples wait 10 ms on (simulated) network storage: threads overlap
the waits; torch's process workers need one process per concurrent wait.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_threadsafe import ThreadedDataLoader, sample_rng


class RemoteCrops(Dataset):
    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        time.sleep(0.01)  # network latency (releases the GIL)
        rng = sample_rng()  # per-sample seed: identical whatever thread runs it
        return {"image": torch.from_numpy(rng.random((16, 16), dtype="float32")), "index": torch.tensor(i)}


def timed(loader) -> float:
    t0 = time.perf_counter()
    n = sum(len(b["index"]) for b in loader)
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    ds = RemoteCrops()
    print(f"torch DataLoader, 2 processes: {timed(DataLoader(ds, batch_size=16, num_workers=2)):7.1f} samples/s")
    with ThreadedDataLoader(ds, batch_size=16, num_workers=32, seed=0) as loader:
        print(f"ThreadedDataLoader, 32 threads: {timed(loader):7.1f} samples/s")
        report = loader.get_thread_safety_performance_report()
        print("fetch ms/sample:", round(report["rates"]["fetch_ms"], 2),
              "| errors:", report["errors"]["raised"])
    with ThreadedDataLoader(ds, batch_size=16, num_workers="auto", seed=0) as loader:
        rate = timed(loader)  # the first epoch includes the online probe's short window
        print(f"ThreadedDataLoader, auto -> {loader.settings}: {rate:7.1f} samples/s")
