"""Run by test_lightning.py: a 2-process CPU DDP fit (gloo) that records what each rank trains.

Usage: python ddp_script.py OUT_DIR {datamodule|module}
Lightning's "ddp" strategy re-launches this script once per extra rank.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L
import torch
from _helpers import AugmentedDataset
from torch import nn

from lightning_threadsafe import LoaderConfig, ThreadedDataLoader, ThreadedDataModule
from lightning_threadsafe.callbacks import AutoTuner, find_loaders

N = 48


class Model(L.LightningModule):
    def __init__(self, out: Path, source: str) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.out = out
        self.source = source
        self.trained: dict[int, list[int]] = collections.defaultdict(list)

    def training_step(self, batch, batch_idx):
        self.trained[self.current_epoch].extend(int(i) for i in batch["index"])
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_end(self):
        loaders = find_loaders(self.trainer.train_dataloader)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps({
            "n": N,
            "trained": {str(k): v for k, v in self.trained.items()},
            "settings": loaders[0].settings,
        }))


class ModuleLoaderModel(Model):
    def train_dataloader(self):
        return ThreadedDataLoader(AugmentedDataset(N, max_delay_ms=1.0), batch_size=4, shuffle=True,
                                  num_workers=2, seed=2)


def main() -> None:
    out, source = Path(sys.argv[1]), sys.argv[2]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                        callbacks=[AutoTuner()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    if source == "datamodule":
        dm = ThreadedDataModule(train_dataset=AugmentedDataset(N, max_delay_ms=1.0), batch_size=4,
                                seed=2, loader=LoaderConfig(num_workers=2))
        trainer.fit(Model(out, source), datamodule=dm)
    else:
        trainer.fit(ModuleLoaderModel(out, source))


if __name__ == "__main__":
    main()
