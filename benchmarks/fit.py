"""W7: a short Lightning ``fit`` and the share of its wall time spent waiting for data.

The model is a small 3-D conv net (``avg_pool3d`` down to 12^3, one ``Conv3d``,
a linear head) whose ``training_step`` also sleeps ``step_s`` seconds: the sleep
stands for the accelerator's compute, which on a GPU machine does not occupy
the host CPU either.

**How the wait is measured** (:class:`WaitTimer`, the same for every loader):
Lightning's fit loop fetches the next batch inside ``next(data_fetcher)``,
which runs after ``on_train_batch_end`` of step *N-1* and before
``on_train_batch_start`` of step *N* (its one-batch look-ahead means the call
made there fetches batch *N+1*; the total over a run is the same). So

* ``wait``  = time from ``on_train_batch_end`` to the next ``on_train_batch_start``
  (data wait plus Lightning's small per-step bookkeeping),
* ``step``  = time from ``on_train_batch_start`` to ``on_train_batch_end``,
* ``wait_fraction = sum(wait) / (sum(wait) + sum(step))`` over the steps after
  ``warmup_steps`` (start-up is W5's subject).

A "preloaded" reference (a list of ready batches) measures the bookkeeping
floor of this method: the wait fraction no loader can go below. When
``lightning_threadsafe.callbacks.LoaderMonitor`` exists it is attached to the
"ours auto" runs and its own ``wait_fraction`` (the loader's telemetry: time
blocked in ``next()`` over the whole fit, warm-up included) is reported beside
the gap timer's.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyConvNet", "WaitTimer", "run_fit"]


class TinyConvNet(pl.LightningModule):
    """A small conv net whose training step takes about ``step_s`` plus a few ms of CPU."""

    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.step_s = step_s
        self.conv = nn.Conv3d(1, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = F.avg_pool3d(batch, kernel_size=4)
        y = self.conv(x).mean(dim=(2, 3, 4))
        loss = self.head(y).pow(2).mean()
        time.sleep(self.step_s)  # the accelerator's compute, which leaves the host CPU free
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class WaitTimer(pl.Callback):
    """Times the gaps between steps (data wait) and the steps themselves. See module doc."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.steps: list[float] = []
        self._step_start: float | None = None
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self.waits.append(now - self._last_end)
        self._step_start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._step_start is not None:
            self.steps.append(now - self._step_start)
        self._last_end = now

    def summary(self, warmup_steps: int) -> dict[str, float]:
        # waits[i] is the gap before step i+1; skip the warm-up steps and their gaps.
        waits = self.waits[max(0, warmup_steps - 1):]
        steps = self.steps[warmup_steps:]
        total = sum(waits) + sum(steps)
        if not steps or total <= 0:
            raise RuntimeError(f"only {len(self.steps)} steps ran; nothing after the warm-up")
        return {"wait_fraction": sum(waits) / total,
                "wait_ms_mean": 1e3 * sum(waits) / max(1, len(waits)),
                "step_ms_mean": 1e3 * sum(steps) / len(steps),
                "steps_timed": len(steps), "steps_per_s": len(steps) / total}


def _loader_monitor() -> Any | None:
    try:
        from lightning_threadsafe.callbacks import LoaderMonitor
    except ImportError:
        return None
    try:  # no end-of-fit table in the middle of the benchmark's own output
        return LoaderMonitor(summary=False, warn_input_bound=False)
    except TypeError:
        return LoaderMonitor()


def _monitor_wait_fraction(monitor: Any, trainer: pl.Trainer) -> float | None:
    """The monitor's whole-fit ``wait_fraction`` (``summary_data``), else its logged metric."""
    data = getattr(monitor, "summary_data", None)
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        value = data["train"].get("wait_fraction")
        if isinstance(value, (int, float)):
            return float(value)
    metric = next((v for k, v in trainer.callback_metrics.items()
                   if k.endswith("wait_fraction")), None)
    return float(metric) if metric is not None else None


def run_fit(loader: Any, *, steps: int, step_s: float, warmup_steps: int,
            with_monitor: bool = False) -> dict[str, Any]:
    """Fit :class:`TinyConvNet` for ``steps`` steps on ``loader`` and time the data waits.

    Returns:
        ``wait_fraction``, ``wait_ms_mean``, ``step_ms_mean``, ``steps_timed``,
        ``steps_per_s`` (over the timed steps), ``fit_s`` and, when a ``LoaderMonitor``
        was attached, ``monitor_wait_fraction`` (or ``monitor_note``).
    """
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    timer = WaitTimer()
    callbacks: list[pl.Callback] = [timer]
    monitor = _loader_monitor() if with_monitor else None
    if monitor is not None:
        callbacks.append(monitor)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1,
                         limit_train_batches=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks)
    model = TinyConvNet(step_s)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few workers" hints etc.: not what is measured
        trainer.fit(model, train_dataloaders=loader)
    result: dict[str, Any] = {"fit_s": time.perf_counter() - t0, **timer.summary(warmup_steps)}
    if monitor is not None:
        value = _monitor_wait_fraction(monitor, trainer)
        if value is not None:
            result["monitor_wait_fraction"] = value
        else:
            result["monitor_note"] = "LoaderMonitor reported no wait_fraction"
    return result
