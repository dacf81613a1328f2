"""``EMVolumeDataModule``: the quickstart's data module over the synthetic EM volume."""

from __future__ import annotations

from typing import Any

from lightning_threadsafe.config import LoaderConfig, check_int
from lightning_threadsafe.datamodule import ThreadedDataModule
from lightning_threadsafe.examples.dataset import EMCropDataset
from lightning_threadsafe.examples.volume import make_synthetic_volume

__all__ = ["EMVolumeDataModule"]


class EMVolumeDataModule(ThreadedDataModule):
    """Random 3-D crops of the built-in synthetic EM volume, loaded by ``ThreadedDataLoader``.

    The volume is generated on first use (cached, checksummed; see
    :func:`make_synthetic_volume`). ``latency_ms`` simulates network storage
    per sample (a GIL-releasing wait), which is where threads shine.

    Args:
        root: cache folder of the volume (default: ``$LTS_CACHE_DIR`` or ``~/.cache``).
        crop: crop side in voxels (divisible by 4 for ``UNet3D``).
        train_samples, val_samples: crops per epoch.
        latency_ms: simulated storage latency per sample.
        batch_size, eval_batch_size, seed, loader: as in :class:`ThreadedDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        crop: int = 32,
        train_samples: int = 256,
        val_samples: int = 64,
        latency_ms: float = 0.0,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        seed: int = 0,
        loader: LoaderConfig | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
                         loader=loader)
        check_int("train_samples", train_samples, minimum=1)
        check_int("val_samples", val_samples, minimum=1)
        self.root = root
        self.crop = crop
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.latency_ms = latency_ms

    def prepare_data(self) -> None:
        make_synthetic_volume(self.root)

    def setup(self, stage: str) -> None:
        kw: dict[str, Any] = {"crop": self.crop, "latency_ms": self.latency_ms}
        if self.train_dataset is None and stage in ("fit",):
            self.train_dataset = EMCropDataset(self.root, samples_per_epoch=self.train_samples,
                                               split="train", **kw)
        if self.val_dataset is None and stage in ("fit", "validate"):
            self.val_dataset = EMCropDataset(self.root, samples_per_epoch=self.val_samples,
                                             split="val", **kw)
        if self.test_dataset is None and stage == "test":
            self.test_dataset = EMCropDataset(self.root, samples_per_epoch=self.val_samples,
                                              split="val", **kw)
        if self.predict_dataset is None and stage == "predict":
            self.predict_dataset = EMCropDataset(self.root, samples_per_epoch=self.val_samples,
                                                 split="val", **kw)
