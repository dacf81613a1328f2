"""Lightning integration with real Trainers on CPU: data module, callbacks, TensorBoard, resume, CLI."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from _helpers import AugmentedDataset, FailingDataset
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_threadsafe import (
    LoaderConfig,
    SampleLoadError,
    ThreadedDataLoader,
    ThreadedDataModule,
)
from lightning_threadsafe.callbacks import AutoTuner, LoaderMonitor

HERE = Path(__file__).parent

METRIC_NAMES = (
    "samples_per_sec", "wait_fraction", "wait_ms", "fetch_ms", "collate_ms", "transfer_ms",
    "queue_depth", "threads", "prefetch", "bytes_in_flight_mb", "rss_mb", "throttle_events",
    "throttled_sec", "errors", "retries", "skipped", "bottleneck",
)


class TinyModel(L.LightningModule):
    """Records the indices it trains on, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.trained: dict[int, list[int]] = collections.defaultdict(list)

    def training_step(self, batch, batch_idx):
        self.trained[self.current_epoch].extend(int(i) for i in batch["index"])
        return self.layer(batch["x"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch["x"]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, max_epochs=2, enable_progress_bar=False,
                enable_model_summary=False, logger=False, enable_checkpointing=False,
                default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    base.update(kw)
    return L.Trainer(**base)


def _lts_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lts-")]


def test_fit_logs_every_documented_metric_to_tensorboard(tmp_path):
    dm = ThreadedDataModule(
        train_dataset=AugmentedDataset(64, max_delay_ms=1.0), val_dataset=AugmentedDataset(16),
        batch_size=4, seed=3,
        loader=LoaderConfig(num_workers=3, prefetch_factor=2, memory_budget="256MiB"),
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = LoaderMonitor(log_every_n_steps=4, summary=True)
    trainer = _trainer(tmp_path, logger=logger, callbacks=[monitor], log_every_n_steps=4)
    trainer.fit(TinyModel(), datamodule=dm)
    logger.experiment.flush()

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for stage in ("train", "val"):
        for name in METRIC_NAMES:
            assert f"loader/{stage}/{name}" in tags, f"missing loader/{stage}/{name}"
    values = {t: [e.value for e in acc.Scalars(t)] for t in tags if t.startswith("loader/")}
    assert all(v == 3.0 for v in values["loader/train/threads"])
    assert all(v > 0 for v in values["loader/train/samples_per_sec"])
    assert all(0.0 <= v <= 1.0 for v in values["loader/train/wait_fraction"])
    assert all(v in {0, 1, 2, 3, 4, 5} for v in values["loader/train/bottleneck"])
    assert all(v == 0 for v in values["loader/train/errors"])
    assert any("verdict" in t for t in acc.Tags()["tensors"])  # verdict text
    # 2 epochs x 16 batches: logged every 4 batches + at each epoch end
    assert len(values["loader/train/samples_per_sec"]) >= 8
    summary = monitor.summary_data
    assert summary["train"]["samples"] == 128 and summary["val"]["samples"] == 32
    assert summary["train"]["threads"] == 3
    assert not _lts_threads()


def test_monitor_without_logger_warns_once_and_still_summarises(tmp_path):
    dm = ThreadedDataModule(train_dataset=AugmentedDataset(16), batch_size=4,
                            loader=LoaderConfig(num_workers=2))
    monitor = LoaderMonitor(log_every_n_steps=1, summary=False)
    with pytest.warns(UserWarning, match="no logger is attached") as rec:
        _trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(TinyModel(), datamodule=dm)
    assert sum("no logger is attached" in str(w.message) for w in rec) == 1
    assert monitor.summary_data["train"]["batches"] == 4


def test_input_bound_training_is_diagnosed_and_warned(tmp_path):
    # 1 thread, 15 ms latency per sample, an instant step: the loop waits on I/O.
    ds = AugmentedDataset(48, max_delay_ms=30.0)
    dm = ThreadedDataModule(train_dataset=ds, batch_size=4, shuffle=False,
                            loader=LoaderConfig(num_workers=1, prefetch_factor=1))
    monitor = LoaderMonitor(log_every_n_steps=4, summary=False)
    with pytest.warns(UserWarning, match="input-bound"):
        _trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(TinyModel(), datamodule=dm)
    assert monitor.summary_data["train"]["verdict"] == "io-latency"
    assert monitor.summary_data["train"]["bottleneck"] == 2
    assert monitor.summary_data["train"]["wait_fraction"] > 0.5


def test_autotuner_raises_threads_for_an_io_bound_loader(tmp_path):
    ds = AugmentedDataset(48, max_delay_ms=30.0)
    dm = ThreadedDataModule(train_dataset=ds, batch_size=4,
                            loader=LoaderConfig(num_workers=1, prefetch_factor=1))
    tuner = AutoTuner(every_n_epochs=1)
    _trainer(tmp_path, callbacks=[tuner, LoaderMonitor(summary=False)], max_epochs=2).fit(
        TinyModel(), datamodule=dm)
    first = tuner.decisions[0]
    assert first["verdict"]["name"] == "io-latency"
    assert first["after"]["num_workers"] > first["before"]["num_workers"] == 1
    assert dm.loaders["train"].settings["num_workers"] == tuner.decisions[-1]["after"]["num_workers"]


# --------------------------------------------------------------------------- resume


class _CrashAt(Callback):
    """Raises at the start of a chosen batch, after the checkpoint of the previous step."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            raise RuntimeError("simulated crash")


class _ApplySettings(Callback):
    """Stands for a tuner: changes the train loader's settings at the start of fit."""

    def on_train_start(self, trainer, pl_module):
        trainer.datamodule.loaders["train"].apply_settings({"num_workers": 3, "prefetch_factor": 3})


@pytest.mark.parametrize("in_order", [True, False])
def test_resume_from_a_mid_epoch_checkpoint_trains_each_sample_exactly_once(tmp_path, in_order):
    n, bs = 40, 4  # 10 batches per epoch

    def dm():
        return ThreadedDataModule(train_dataset=AugmentedDataset(n, max_delay_ms=2.0), batch_size=bs,
                                  seed=5, loader=LoaderConfig(num_workers=2, in_order=in_order))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                           filename="{epoch}-{step}")
    model1 = TinyModel()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path, enable_checkpointing=True,
                 callbacks=[_ApplySettings(), _CrashAt(epoch=1, batch_idx=3), ckpt]).fit(
            model1, datamodule=dm())
    assert not _lts_threads()  # on_exception stopped the loader's threads
    # 10 batches per epoch; the last checkpoint is after step 12 = epoch 1, batch 1. Batch 2
    # was trained after it (lost with the crash), so batches 2.. of epoch 1 remain.
    last = tmp_path / "ckpt" / "epoch=1-step=12.ckpt"
    assert last.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    state = torch.load(last, weights_only=True)  # plain data only
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["delivered"]

    model2 = TinyModel()
    dm2 = dm()
    _trainer(tmp_path).fit(model2, datamodule=dm2, ckpt_path=str(last))
    assert sorted(model1.trained[0]) == list(range(n))
    epoch1 = model1.trained[1][: 2 * bs] + model2.trained[1]  # trained before the checkpoint + after
    assert collections.Counter(epoch1) == collections.Counter(range(n))
    # tuned settings survived the resume
    assert dm2.loaders["train"].settings["num_workers"] == 3
    assert dm2.loaders["train"].settings["prefetch_factor"] == 3
    if in_order:  # the same order as an uninterrupted run
        ref = TinyModel()
        _trainer(tmp_path).fit(ref, datamodule=dm())
        assert model1.trained[1][: 2 * bs] + model2.trained[1] == ref.trained[1]


def test_exception_in_a_sample_during_fit_leaves_no_threads(tmp_path):
    dm = ThreadedDataModule(train_dataset=FailingDataset(32, {21}), batch_size=4, shuffle=False,
                            loader=LoaderConfig(num_workers=3))

    class Model(TinyModel):
        def training_step(self, batch, batch_idx):
            return self.layer(batch.float().expand(-1, 4)).mean()

    with pytest.raises(SampleLoadError) as info:
        _trainer(tmp_path).fit(Model(), datamodule=dm)
    assert info.value.index == 21
    assert not _lts_threads()


def test_loader_from_a_lightning_module_is_resumable_and_cleaned_up(tmp_path):
    class Model(TinyModel):
        def train_dataloader(self):
            self.loader = ThreadedDataLoader(AugmentedDataset(24), batch_size=4, shuffle=True,
                                             num_workers=2, seed=1)
            return self.loader

    model = Model()
    monitor = LoaderMonitor(summary=False)
    _trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(model)
    assert sorted(model.trained[0]) == list(range(24))
    assert model.loader._consumed_fn is not None  # bound by LoaderMonitor for exact resume
    assert not _lts_threads()


# --------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("source", ["datamodule", "module"])
def test_ddp_two_cpu_processes_shard_each_epoch_exactly(tmp_path, source):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_script.py"), str(out), source],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    n = ranks[0]["n"]
    for epoch in ("0", "1"):
        a, b = ranks[0]["trained"][epoch], ranks[1]["trained"][epoch]
        assert not set(a) & set(b), f"epoch {epoch}: ranks overlap"
        assert sorted(a + b) == list(range(n)), f"epoch {epoch}: union is not the epoch"
    assert ranks[0]["trained"]["0"] != ranks[0]["trained"]["1"]  # reshuffled per epoch
    assert ranks[0]["settings"] == ranks[1]["settings"]  # tuning decided once, applied everywhere


# --------------------------------------------------------------------------- CLI


def test_cli_print_config_and_fast_dev_run_with_the_quickstart(tmp_path, monkeypatch, capsys):
    from lightning_threadsafe.cli import main

    monkeypatch.setenv("LTS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = str(HERE.parent / "configs" / "quickstart.yaml")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", config, "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_threadsafe.examples.EMVolumeDataModule" in printed and "num_workers: auto" in printed
    assert main(["fit", "--config", config, "--trainer.fast_dev_run=true",
                 "--data.init_args.train_samples=8", "--data.init_args.val_samples=4",
                 "--trainer.enable_progress_bar=false"]) == 0
    assert not _lts_threads()


@pytest.mark.parametrize(
    ("override", "field"),
    [("--data.init_args.loader.num_workers=-3", "num_workers"),
     ("--data.init_args.loader.executor=fiber", "executor"),
     ("--data.init_args.loader.memory_budget=lots", "memory_budget")],
)
def test_cli_rejects_a_bad_loader_value_naming_the_field(tmp_path, monkeypatch, capsys, override,
                                                         field):
    from lightning_threadsafe.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LTS_CACHE_DIR", str(tmp_path / "cache"))
    config = str(HERE.parent / "configs" / "quickstart.yaml")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", config, override, "--trainer.fast_dev_run=true"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert field in err and "loader" in err


def test_transfer_batch_to_device_on_cpu_is_the_default_behaviour():
    dm = ThreadedDataModule(train_dataset=AugmentedDataset(4))
    batch = {"x": torch.ones(2)}
    out = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert out["x"] is batch["x"]


def test_datamodule_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="batch_size=0"):
        ThreadedDataModule(batch_size=0)
    with pytest.raises(TypeError, match="loader="):
        ThreadedDataModule(loader=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefetch_factor=0"):
        ThreadedDataModule(loader={"prefetch_factor": 0})  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no train_dataset"):
        ThreadedDataModule().train_dataloader()
