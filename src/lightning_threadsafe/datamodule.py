"""``ThreadedDataModule``: a ``LightningDataModule`` whose loaders are ``ThreadedDataLoader``.

Build it from datasets::

    dm = ThreadedDataModule(train_dataset=train, val_dataset=val, batch_size=32,
                            loader=LoaderConfig(num_workers="auto", memory_budget="2GiB"))
    trainer.fit(model, datamodule=dm)

or subclass it and create the datasets in ``setup(stage)`` (see
``lightning_threadsafe.examples.EMVolumeDataModule``). Every ``__init__``
argument is type-hinted, so it works from YAML through ``LightningCLI``.

What it adds to a plain data module:

- **Sharding under DDP**: each rank loads only its shard (``DistributedSampler``
  semantics, the epoch set by Lightning), whether or not Lightning would inject
  a sampler.
- **Exact mid-epoch resume**: the train loader's position is saved by
  Lightning's fit loop (the loader is stateful); the data module tells the
  loader how many delivered batches the fit loop actually trained on (Lightning
  fetches one batch ahead), so a resume yields exactly the batches not trained on.
  The data module's own ``state_dict`` carries the seed and the tuned loader
  settings under ``"ThreadedDataModule"`` (Lightning saves it by class name).
- **No second copy**: ``transfer_batch_to_device`` leaves a batch alone when
  it is already on the device (staged by the CUDA stream scheduler).
- **Cleanup**: threads stop in ``teardown`` and in ``on_exception``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from lightning_threadsafe.config import LoaderConfig, check_int
from lightning_threadsafe.loader import ThreadedDataLoader

__all__ = ["ThreadedDataModule"]

_STAGES = ("train", "val", "test", "predict")


def _on_device(batch: Any, device: torch.device) -> bool:
    """True when every tensor in ``batch`` is already on ``device`` (and there is one)."""
    found = False

    def walk(x: Any) -> bool:
        nonlocal found
        if isinstance(x, torch.Tensor):
            found = True
            return x.device == device
        if isinstance(x, dict):
            return all(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return all(walk(v) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return all(walk(getattr(x, f.name)) for f in dataclasses.fields(x))
        return True

    return walk(batch) and found


class ThreadedDataModule(L.LightningDataModule):
    """A data module serving ``ThreadedDataLoader`` loaders.

    Args:
        train_dataset, val_dataset, test_dataset, predict_dataset: map-style (or
            iterable) datasets; a subclass may instead assign them in ``setup``.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (default: ``batch_size``).
        shuffle: shuffle the training set each epoch (seeded, same on every rank).
        drop_last: drop the last incomplete training batch.
        collate_fn: custom collate function (default torch's ``default_collate``).
        seed: base seed for shuffles and ``sample_rng()``.
        loader: the loader knobs (:class:`LoaderConfig`), nested under ``loader:`` in YAML.

    Raises:
        ValueError / TypeError: naming the argument for invalid values.
    """

    def __init__(
        self,
        train_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        predict_dataset: Dataset | None = None,
        *,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        seed: int = 0,
        loader: LoaderConfig | None = None,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, minimum=1)
        check_int("eval_batch_size", eval_batch_size, minimum=1, none=True)
        check_int("seed", seed, minimum=0)
        if loader is None:
            loader = LoaderConfig()
        elif isinstance(loader, dict):
            loader = LoaderConfig(**loader)
        elif not isinstance(loader, LoaderConfig):
            raise TypeError(f"loader={loader!r} must be a LoaderConfig, a dict of its fields, or None")
        loader.validate()
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.test_dataset = test_dataset
        self.predict_dataset = predict_dataset
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.collate_fn = collate_fn
        self.seed = seed
        self.loader_config = loader
        # Saved under one key so it never clashes with a model's hparams (e.g. batch_size).
        self.save_hyperparameters(
            {"threaded_data": {"batch_size": batch_size, "eval_batch_size": self.eval_batch_size,
                               "shuffle": shuffle, "drop_last": drop_last, "seed": seed,
                               "loader": loader.to_dict()}}
        )
        self._loaders: dict[str, ThreadedDataLoader[Any]] = {}
        self._pending_settings: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ loaders

    def _make_loader(self, stage: str, dataset: Dataset | None) -> ThreadedDataLoader[Any]:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {stage}_dataset: pass {stage}_dataset=... or assign "
                f"self.{stage}_dataset in setup()"
            )
        existing = self._loaders.get(stage)
        if existing is not None and existing.dataset is dataset:
            return existing  # keep tuned settings and the epoch counter across epochs
        train = stage == "train"
        cfg = self.loader_config.loader_kwargs()
        cfg.pop("seed", None)
        loader: ThreadedDataLoader[Any] = ThreadedDataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=self.shuffle if train else False,
            drop_last=self.drop_last if train else False,
            collate_fn=self.collate_fn,
            seed=self.loader_config.seed if self.loader_config.seed is not None else self.seed,
            **cfg,
        )
        if stage in self._pending_settings:
            loader.apply_settings(self._pending_settings.pop(stage))
        if train:
            loader.bind_consumption(self._trained_batches_in_epoch)
        self._loaders[stage] = loader
        return loader

    def _trained_batches_in_epoch(self) -> int | None:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> ThreadedDataLoader[Any]:
        return self._make_loader("train", self.train_dataset)

    # Without a dataset for a stage, Lightning gets an empty list: "no data for this
    # stage" (validation is skipped), instead of an error.
    def val_dataloader(self) -> ThreadedDataLoader[Any] | list[Any]:
        return self._make_loader("val", self.val_dataset) if self.val_dataset is not None else []

    def test_dataloader(self) -> ThreadedDataLoader[Any] | list[Any]:
        return self._make_loader("test", self.test_dataset) if self.test_dataset is not None else []

    def predict_dataloader(self) -> ThreadedDataLoader[Any] | list[Any]:
        if self.predict_dataset is None:
            return []
        return self._make_loader("predict", self.predict_dataset)

    @property
    def loaders(self) -> dict[str, ThreadedDataLoader[Any]]:
        """The loaders created so far, by stage (``train``/``val``/``test``/``predict``)."""
        return dict(self._loaders)

    # ------------------------------------------------------------------ transfer

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if device.type != "cpu" and _on_device(batch, device):
            return batch  # staged on a side stream already: no second copy
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Seed and the tuned settings of each loader, as plain data."""
        return {
            "seed": self.seed,
            "settings": {stage: ld.settings for stage, ld in self._loaders.items()},
            "positions": {stage: ld.state_dict() for stage, ld in self._loaders.items()
                          if stage == "train"},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the tuned settings (the position is restored through the loader itself)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict={state_dict!r} must be a dict from ThreadedDataModule.state_dict()")
        if "seed" in state_dict and int(state_dict["seed"]) != self.seed:
            rank_zero_warn(
                f"resuming with seed={self.seed} but the checkpoint was trained with "
                f"seed={state_dict['seed']}; using the checkpoint's seed"
            )
            self.seed = int(state_dict["seed"])
        for stage, settings in (state_dict.get("settings") or {}).items():
            if stage in self._loaders:
                self._loaders[stage].apply_settings(settings)
            else:
                self._pending_settings[stage] = dict(settings)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Stop every loader's threads and close its resources (idempotent)."""
        for ld in self._loaders.values():
            ld.cleanup_thread_safety_resources()

    def teardown(self, stage: str) -> None:
        self.cleanup()

    def on_exception(self, exception: BaseException) -> None:
        self.cleanup()
