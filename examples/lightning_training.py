"""Lightning: ThreadedDataModule + LoaderMonitor + AutoTuner on the synthetic EM volume.

    python examples/lightning_training.py

The same job as `lightning-threadsafe fit --config configs/quickstart.yaml`, in Python.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_threadsafe import LoaderConfig
from lightning_threadsafe.callbacks import AutoTuner, LoaderMonitor
from lightning_threadsafe.examples import EMVolumeDataModule, UNet3D

if __name__ == "__main__":
    L.seed_everything(0)
    dm = EMVolumeDataModule(crop=32, train_samples=96, val_samples=16, latency_ms=5.0, batch_size=4,
                            loader=LoaderConfig(num_workers="auto", prefetch_factor="auto",
                                                memory_budget="1GiB"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, log_every_n_steps=5,
                        logger=TensorBoardLogger("runs", name="example"),
                        callbacks=[LoaderMonitor(log_every_n_steps=5), AutoTuner()])
    trainer.fit(UNet3D(base_channels=8), datamodule=dm)
