"""The built-in example: 3-D membrane segmentation on a synthetic EM volume.

* :func:`make_synthetic_volume` -- generates (once) and caches the volume.
* :class:`EMCropDataset` -- random crops read through per-thread memory maps,
  with optional simulated storage latency.
* :class:`UNet3D` -- a small 3-D U-Net ``LightningModule``.
* :class:`EMVolumeDataModule` -- the quickstart's ``ThreadedDataModule`` over the volume.
"""

from lightning_threadsafe.examples.datamodule import EMVolumeDataModule
from lightning_threadsafe.examples.dataset import EMCropDataset
from lightning_threadsafe.examples.model import UNet3D
from lightning_threadsafe.examples.volume import make_synthetic_volume

__all__ = ["EMCropDataset", "EMVolumeDataModule", "UNet3D", "make_synthetic_volume"]
