"""Random 3-D crops from the synthetic EM volume, read through per-thread memory maps."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_threadsafe.examples.volume import _load_valid_manifest, make_synthetic_volume
from lightning_threadsafe.resources import ThreadLocalResource
from lightning_threadsafe.rng import sample_rng

__all__ = ["EMCropDataset"]

# Share of the volume's depth (from z = 0) used for training; validation gets the rest.
_TRAIN_FRACTION = 0.8
# Entropy mixed into validation crop seeds so they differ from any training stream.
_VAL_STREAM = 0x7661_6C00


class _Chunks:
    """One thread's read-only memory maps of every z-chunk (raw and labels)."""

    __slots__ = ("labels", "raw")

    def __init__(self, raw: list[np.ndarray], labels: list[np.ndarray]) -> None:
        self.raw = raw
        self.labels = labels

    def close(self) -> None:
        # Dropping the references is enough: numpy unmaps a file when the last
        # array viewing it is freed, so a crop still in use stays valid.
        self.raw = []
        self.labels = []


def _open_chunks(root: str, raw_names: tuple[str, ...], label_names: tuple[str, ...]) -> _Chunks:
    """Factory of the per-thread handles (module level, so it pickles)."""
    return _Chunks(
        [np.load(os.path.join(root, n), mmap_mode="r") for n in raw_names],
        [np.load(os.path.join(root, n), mmap_mode="r") for n in label_names],
    )


class EMCropDataset(Dataset[dict[str, Any]]):
    """Random crops of the synthetic EM volume with their membrane masks.

    Each sample reads a ``crop``-sized block from the z-chunked ``.npy`` files of
    :func:`~lightning_threadsafe.examples.make_synthetic_volume` through memory
    maps. Every thread opens its own maps (a
    :class:`~lightning_threadsafe.ThreadLocalResource`), as it would open its
    own handles to a chunked store on network storage; ``latency_ms`` adds the
    per-read latency of such storage as a sleep, which releases the GIL.

    The volume is split along z: ``"train"`` crops lie in the first 80% of the
    slices, ``"val"`` crops in the last 20%; no crop straddles the split.

    Guarantees:
        * ``"train"``: every random choice (crop origin, flips) comes from
          :func:`~lightning_threadsafe.sample_rng`, so a sample depends only on
          ``(seed, epoch, index)`` -- never on the thread or the order of loading.
        * ``"val"``: the crop depends only on ``index`` (the same validation set
          every epoch and seed) and is never flipped.
        * The dataset pickles without its memory maps (for process workers).

    Args:
        root: a directory holding a valid volume (any shape), or where to
            generate the default one; ``None`` uses the default cache directory
            (see :func:`make_synthetic_volume`). The volume is generated (once,
            under a cross-process lock, so DDP ranks may construct the dataset
            together) when the directory holds no valid volume.
        crop: edge length of a cubic crop, or ``(D, H, W)``.
        samples_per_epoch: the dataset's length (crops are drawn at random, so
            the length only sets how many make an epoch).
        split: ``"train"`` or ``"val"``.
        latency_ms: simulated storage latency per sample, in milliseconds.
        flips: random flips along each axis (``"train"`` only).
        normalize: scale the image to zero mean and unit standard deviation
            using the volume's statistics; otherwise raw grey levels (0-255).

    Returns from ``dataset[i]``:
        ``{"image": float32 [1, D, H, W], "mask": float32 [1, D, H, W] of 0/1
        (1 = membrane), "index": i}``.

    Example::

        from lightning_threadsafe.examples import EMCropDataset

        train = EMCropDataset(crop=32, samples_per_epoch=512, latency_ms=5.0)
        sample = train[0]
        sample["image"].shape   # torch.Size([1, 32, 32, 32])
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        crop: int | tuple[int, int, int] = 32,
        samples_per_epoch: int = 512,
        split: Literal["train", "val"] = "train",
        latency_ms: float = 0.0,
        flips: bool = True,
        normalize: bool = True,
    ) -> None:
        self.crop = _check_crop(crop)
        if (isinstance(samples_per_epoch, bool) or not isinstance(samples_per_epoch, int)
                or samples_per_epoch < 1):
            raise ValueError(f"samples_per_epoch={samples_per_epoch!r} must be a positive int")
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} must be 'train' or 'val'")
        if (isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float))
                or not latency_ms >= 0 or latency_ms == float("inf")):
            raise ValueError(f"latency_ms={latency_ms!r} must be a finite number >= 0")
        for name, value in (("flips", flips), ("normalize", normalize)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be a bool")
        self.samples_per_epoch = samples_per_epoch
        self.split = split
        self.latency_ms = float(latency_ms)
        self.flips = flips
        self.normalize = normalize

        # Eager: the volume's shape is needed to validate `crop`, and generating
        # here (the main process, before any worker starts) means at most one
        # generation per process, under the volume's file lock.
        path = None if root is None else Path(root).expanduser().absolute()
        manifest = _load_valid_manifest(path) if path is not None else None
        if manifest is None:
            path = make_synthetic_volume(path)
            manifest = _load_valid_manifest(path)
            if manifest is None:
                raise RuntimeError(f"the volume in {str(path)!r} failed its checks right after "
                                   "generation (is another process rewriting it?)")
        self.root = path
        d, h, w = manifest["shape"]
        self.shape = (int(d), int(h), int(w))
        self._chunk_z0 = np.array([c["z0"] for c in manifest["chunks"]], dtype=np.int64)
        self._mean = float(manifest["raw_mean"])
        self._std = max(float(manifest["raw_std"]), 1e-6)

        depth = self.shape[0]
        train_end = int(depth * _TRAIN_FRACTION)
        self.z_range = (0, train_end) if split == "train" else (train_end, depth)
        cd, ch, cw = self.crop
        if cd > self.z_range[1] - self.z_range[0] or ch > self.shape[1] or cw > self.shape[2]:
            raise ValueError(
                f"crop={crop!r} does not fit the {split!r} split of the volume: at most "
                f"({self.z_range[1] - self.z_range[0]}, {self.shape[1]}, {self.shape[2]}) "
                f"(z-range {self.z_range} of shape {self.shape})"
            )

        self._chunks: ThreadLocalResource[_Chunks] = ThreadLocalResource(
            functools.partial(
                _open_chunks,
                str(path),
                tuple(c["raw"] for c in manifest["chunks"]),
                tuple(c["labels"] for c in manifest["chunks"]),
            ),
            name="em-volume-chunks",
        )

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index={index!r} out of range for {self.samples_per_epoch} samples")
        index = int(index)
        if self.split == "train":
            rng = sample_rng()
        else:
            rng = np.random.default_rng((_VAL_STREAM, index))
        cd, ch, cw = self.crop
        z0 = int(rng.integers(self.z_range[0], self.z_range[1] - cd + 1))
        y0 = int(rng.integers(0, self.shape[1] - ch + 1))
        x0 = int(rng.integers(0, self.shape[2] - cw + 1))
        flip = rng.random(3) < 0.5 if self.flips and self.split == "train" else None

        if self.latency_ms > 0:
            time.sleep(self.latency_ms / 1000.0)  # stands for a network-storage read
        raw, labels = self.read(z0, y0, x0)

        if flip is not None:
            axes = tuple(int(a) for a in np.flatnonzero(flip))
            if axes:
                raw = np.flip(raw, axes)
                labels = np.flip(labels, axes)
        image = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        if self.normalize:
            image = (image - self._mean) / self._std
        mask = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        return {"image": image[None], "mask": mask[None], "index": index}

    def read(self, z0: int, y0: int, x0: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw and label blocks of size ``crop`` at origin ``(z0, y0, x0)`` (uint8 copies).

        A block may span several z-chunks; it is assembled from each.

        Raises:
            ValueError: the block does not lie inside the volume.
        """
        cd, ch, cw = self.crop
        if not (0 <= z0 <= self.shape[0] - cd and 0 <= y0 <= self.shape[1] - ch
                and 0 <= x0 <= self.shape[2] - cw):
            raise ValueError(f"origin=({z0}, {y0}, {x0}) with crop={self.crop} lies outside "
                             f"the volume of shape {self.shape}")
        chunks = self._chunks.get()
        raw = np.empty(self.crop, dtype=np.uint8)
        labels = np.empty(self.crop, dtype=np.uint8)
        first = int(np.searchsorted(self._chunk_z0, z0, side="right")) - 1
        z = z0
        for c in range(first, len(self._chunk_z0)):
            if z >= z0 + cd:
                break
            start = z - int(self._chunk_z0[c])
            stop = min(start + (z0 + cd - z), chunks.raw[c].shape[0])
            n = stop - start
            raw[z - z0:z - z0 + n] = chunks.raw[c][start:stop, y0:y0 + ch, x0:x0 + cw]
            labels[z - z0:z - z0 + n] = chunks.labels[c][start:stop, y0:y0 + ch, x0:x0 + cw]
            z += n
        return raw, labels

    def close(self) -> None:
        """Drop every thread's memory maps (safe to call twice; reopened on next use)."""
        self._chunks.close_all()

    def __repr__(self) -> str:
        return (f"EMCropDataset(root={str(self.root)!r}, crop={self.crop}, split={self.split!r}, "
                f"samples_per_epoch={self.samples_per_epoch}, latency_ms={self.latency_ms})")


def _check_crop(crop: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(crop, (int, np.integer)) and not isinstance(crop, bool):
        dims: tuple[Any, ...] = (crop, crop, crop)
    elif isinstance(crop, (tuple, list)) and len(crop) == 3:
        dims = tuple(crop)
    else:
        raise ValueError(f"crop={crop!r} must be a positive int or a tuple of 3 positive ints")
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
               for n in dims):
        raise ValueError(f"crop={crop!r} must be a positive int or a tuple of 3 positive ints")
    return int(dims[0]), int(dims[1]), int(dims[2])
