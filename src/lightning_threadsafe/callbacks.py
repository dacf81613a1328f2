"""Lightning callbacks: ``LoaderMonitor`` (metrics, verdict, summary) and ``AutoTuner``.

Both are thin: the numbers come from the loader's telemetry
(:class:`~lightning_threadsafe.telemetry.TelemetryWindow`), the diagnosis from
:class:`~lightning_threadsafe.bottleneck.BottleneckDetector` and the tuning from
``ThreadedDataLoader.optimize_thread_safety_settings()``.

Metrics logged by :class:`LoaderMonitor`, as ``loader/<stage>/<name>`` with
``stage`` in ``train``/``val``:

=====================  =====================================================================
name                   meaning
=====================  =====================================================================
samples_per_sec        samples loaded per second over the window
wait_fraction          share of the loop's wall time spent waiting for data (0..1)
wait_ms                mean wait per batch
fetch_ms               mean wall time of ``dataset[i]`` per sample
collate_ms             mean collate (+ pin) time per batch
transfer_ms            mean host-to-device staging time per batch
queue_depth            batches ready and waiting at the end of the window
threads                worker threads (or processes) running
prefetch               effective look-ahead in batches (after memory throttling)
bytes_in_flight_mb     MiB held in the loader's buffers
rss_mb                 resident memory of the process, MiB
throttle_events        times the memory governor started holding work back (cumulative)
throttled_sec          seconds spent throttled (cumulative)
errors                 sample failures seen, including retried ones (cumulative)
retries                retry attempts (cumulative)
skipped                samples dropped by ``on_error="skip"`` (cumulative)
bottleneck             0 compute-bound, 1 cpu, 2 io-latency, 3 gil, 4 memory, 5 transfer
=====================  =====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_threadsafe.bottleneck import Bottleneck, BottleneckDetector, Verdict
from lightning_threadsafe.config import check_int
from lightning_threadsafe.loader import ThreadedDataLoader
from lightning_threadsafe.telemetry import TelemetrySnapshot, TelemetryWindow

__all__ = ["AutoTuner", "LoaderMonitor", "find_loaders", "window_metrics"]

_MIB = 1024 * 1024


def find_loaders(obj: Any) -> list[ThreadedDataLoader[Any]]:
    """The ``ThreadedDataLoader`` objects in ``obj`` (a loader, or lists/dicts of them)."""
    out: list[ThreadedDataLoader[Any]] = []
    seen: set[int] = set()

    def walk(x: Any) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, ThreadedDataLoader):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            flat = getattr(x, "flattened", None)  # Lightning's CombinedLoader
            if isinstance(flat, list):
                for v in flat:
                    walk(v)

    walk(obj)
    return out


def window_metrics(window: TelemetryWindow, totals: TelemetrySnapshot,
                   verdict: Verdict | None) -> dict[str, float]:
    """The documented metric names (without the ``loader/<stage>/`` prefix)."""
    m = {
        "samples_per_sec": window.samples_per_sec,
        "wait_fraction": window.wait_fraction,
        "wait_ms": window.wait_ms,
        "fetch_ms": window.fetch_ms,
        "collate_ms": window.collate_ms,
        "transfer_ms": window.transfer_ms,
        "queue_depth": float(window.queue_depth),
        "threads": float(window.threads),
        "prefetch": float(window.prefetch),
        "bytes_in_flight_mb": window.bytes_in_flight / _MIB,
        "rss_mb": window.rss_bytes / _MIB,
        "throttle_events": float(totals.throttle_events),
        "throttled_sec": float(totals.throttled_s),
        "errors": float(totals.errors),
        "retries": float(totals.retries),
        "skipped": float(totals.skipped),
    }
    if verdict is not None:
        m["bottleneck"] = float(int(verdict.code))
    return {k: (0.0 if not math.isfinite(v) else float(v)) for k, v in m.items()}


class _Track:
    """Windows of one loader: the last logged snapshot and the whole-run accumulation."""

    def __init__(self, loader: ThreadedDataLoader[Any]) -> None:
        self.loader = loader
        self.start = loader._manager.snapshot(**loader._gauges())
        self.last = self.start
        self.detector = BottleneckDetector()
        self.run_detector = BottleneckDetector()
        self.verdict: Verdict | None = None

    def window(self) -> tuple[TelemetryWindow, TelemetrySnapshot]:
        snap = self.loader._manager.snapshot(**self.loader._gauges())
        w = snap.delta(self.last)
        self.last = snap
        return w, snap

    def whole(self) -> TelemetryWindow:
        return self.last.delta(self.start)


class LoaderMonitor(Callback):
    """Logs loader telemetry, diagnoses the bottleneck and prints a summary at the end of fit.

    Args:
        log_every_n_steps: log a window every this many batches (per stage).
        summary: print a rich table at the end of fit (rank zero).
        warn_input_bound: warn once (rank zero) when training waits on data.

    Metrics: ``loader/<stage>/<name>`` (see the module docstring for every name),
    logged to every attached logger on rank zero; the verdict and its
    recommendation are logged as text where the logger supports it
    (TensorBoard). With no logger attached it warns once and still summarises.

    Example::

        trainer = Trainer(callbacks=[LoaderMonitor(log_every_n_steps=20)], ...)
        trainer.fit(model, datamodule=ThreadedDataModule(...))
        trainer.callbacks[0].summary_data["train"]["verdict"]
    """

    def __init__(self, log_every_n_steps: int = 50, summary: bool = True,
                 warn_input_bound: bool = True) -> None:
        super().__init__()
        check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        self.log_every_n_steps = log_every_n_steps
        self.summary = summary
        self.warn_input_bound = warn_input_bound
        self._tracks: dict[str, list[_Track]] = {}
        self._counts: dict[str, int] = {}
        self._warned_no_logger = False
        self._warned_input_bound = False
        self.summary_data: dict[str, dict[str, Any]] = {}
        self.logged_steps = 0

    # ------------------------------------------------------------------ plumbing

    def _start(self, stage: str, loaders: Iterable[ThreadedDataLoader[Any]], trainer: L.Trainer) -> None:
        known = {id(t.loader): t for t in self._tracks.get(stage, [])}
        tracks = []
        for ld in loaders:
            tracks.append(known.get(id(ld)) or _Track(ld))
            if stage == "train" and ld._consumed_fn is None:
                ld.bind_consumption(lambda tr=trainer: int(
                    tr.fit_loop.epoch_loop.batch_progress.current.processed))
        self._tracks[stage] = tracks
        self._counts.setdefault(stage, 0)

    def _log(self, trainer: L.Trainer, stage: str, *, text: bool = False) -> None:
        for i, track in enumerate(self._tracks.get(stage, [])):
            window, totals = track.window()
            prefix = f"loader/{stage}/" if i == 0 else f"loader/{stage}_{i}/"
            if window.batches == 0 and window.samples == 0:
                if text and track.verdict is not None and trainer.is_global_zero:
                    v = track.verdict  # nothing new since the last log: restate its verdict
                    self._emit(trainer, {}, text=f"{v.name}: {v.recommendation}",
                               tag=prefix + "verdict")
                continue
            track.detector.reset()
            track.detector.update(window)
            track.run_detector.update(window)
            verdict = track.detector.compute()
            track.verdict = verdict
            metrics = {prefix + k: v for k, v in window_metrics(window, totals, verdict).items()}
            if not trainer.is_global_zero:
                continue
            self._emit(trainer, metrics, text=f"{verdict.name}: {verdict.recommendation}" if text
                       else None, tag=prefix + "verdict")
            if (stage == "train" and self.warn_input_bound and not self._warned_input_bound
                    and verdict.code is not Bottleneck.NONE and window.batches >= 2):
                self._warned_input_bound = True
                rank_zero_warn(
                    f"training is input-bound: the loop waited for data {window.wait_fraction:.0%} "
                    f"of the time ({verdict.name}). {verdict.recommendation}"
                )

    def _emit(self, trainer: L.Trainer, metrics: dict[str, float], *, text: str | None,
              tag: str) -> None:
        if not trainer.loggers:
            if not self._warned_no_logger:
                self._warned_no_logger = True
                rank_zero_warn("LoaderMonitor: no logger is attached; loader metrics go only to "
                               "the end-of-fit summary")
            return
        step = trainer.global_step
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            if text is not None:
                exp = getattr(logger, "experiment", None)
                add_text = getattr(exp, "add_text", None)
                if callable(add_text):
                    add_text(tag, text, step)
        self.logged_steps += 1

    def _tick(self, trainer: L.Trainer, stage: str) -> None:
        self._counts[stage] = self._counts.get(stage, 0) + 1
        if self._counts[stage] % self.log_every_n_steps == 0:
            self._log(trainer, stage)

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("train", find_loaders(trainer.train_dataloader), trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._tick(trainer, "train")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, "train", text=True)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._start("val", find_loaders(trainer.val_dataloaders), trainer)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._tick(trainer, "val")

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, "val", text=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary_data = self._summarise()
        if self.summary and trainer.is_global_zero:
            self.print_summary()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        for tracks in self._tracks.values():
            for t in tracks:
                t.loader.cleanup_thread_safety_resources()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for tracks in self._tracks.values():
            for t in tracks:
                t.loader.cleanup_thread_safety_resources()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self._counts)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._counts.update(state_dict.get("counts", {}))

    # ------------------------------------------------------------------ summary

    def _summarise(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for stage, tracks in self._tracks.items():
            if not tracks:
                continue
            t = tracks[0]
            whole = t.whole()
            verdict = t.run_detector.compute() if whole.samples else None
            report = t.loader.get_thread_safety_performance_report()
            mem = report["memory"]
            out[stage] = {
                "samples": whole.samples,
                "batches": whole.batches,
                "samples_per_sec": whole.samples_per_sec,
                "wait_fraction": whole.wait_fraction,
                "fetch_ms": whole.fetch_ms,
                "collate_ms": whole.collate_ms,
                "transfer_ms": whole.transfer_ms,
                "threads": report["settings"]["num_workers"],
                "prefetch_factor": report["settings"]["prefetch_factor"],
                "executor": report["settings"]["executor"],
                "peak_bytes_in_flight_mb": (mem.get("peak_bytes_in_flight") or 0) / _MIB,
                "budget_mb": (mem["budget_bytes"] / _MIB) if mem.get("budget_bytes") else None,
                "throttle_events": report["totals"]["throttle_events"],
                "throttled_sec": report["totals"]["throttled_s"],
                "rss_mb": report["totals"]["rss_bytes"] / _MIB,
                "errors": report["errors"]["raised"],
                "retries": report["totals"]["retries"],
                "skipped": report["errors"]["skipped"],
                "tuning": [d.get("reason", "") for d in report["tuning"]],
                "verdict": verdict.name if verdict else "no-data",
                "bottleneck": int(verdict.code) if verdict else 0,
                "recommendation": verdict.recommendation if verdict else "",
            }
        return out

    def print_summary(self) -> None:
        """Print the end-of-fit table (rich) from ``summary_data``."""
        from rich.console import Console
        from rich.table import Table

        data = self.summary_data
        if not data:
            return
        stages = list(data)
        table = Table(title="lightning-threadsafe: data loading summary", show_lines=False)
        table.add_column("metric")
        for s in stages:
            table.add_column(s, justify="right")

        def row(label: str, fmt: str, key: str) -> None:
            vals = []
            for s in stages:
                v = data[s].get(key)
                vals.append("-" if v is None else format(v, fmt) if fmt else str(v))
            table.add_row(label, *vals)

        row("samples/s", ".1f", "samples_per_sec")
        row("wait fraction", ".1%", "wait_fraction")
        row("fetch ms/sample", ".2f", "fetch_ms")
        row("collate ms/batch", ".2f", "collate_ms")
        row("transfer ms/batch", ".2f", "transfer_ms")
        row("executor", "", "executor")
        row("threads", "", "threads")
        row("prefetch factor", "", "prefetch_factor")
        row("peak in flight MiB", ".1f", "peak_bytes_in_flight_mb")
        row("memory budget MiB", ".0f", "budget_mb")
        row("throttle events", "", "throttle_events")
        row("throttled s", ".2f", "throttled_sec")
        row("RSS MiB", ".0f", "rss_mb")
        table.add_row("errors / retries / skipped",
                      *[f"{data[s]['errors']} / {data[s]['retries']} / {data[s]['skipped']}"
                        for s in stages])
        table.add_row("verdict", *[data[s]["verdict"] for s in stages])
        console = Console(stderr=False)
        console.print(table)
        for s in stages:
            if data[s]["recommendation"]:
                console.print(f"[bold]{s}[/bold]: {data[s]['verdict']} -- {data[s]['recommendation']}")
            for reason in data[s]["tuning"]:
                console.print(f"  tuning ({s}): {reason}")


class AutoTuner(Callback):
    """Tunes threads, prefetch and executor at the end of training epochs.

    Every ``every_n_epochs`` epochs, rank zero calls
    ``optimize_thread_safety_settings(apply=False)`` on each training
    ``ThreadedDataLoader``; the decision is broadcast and applied on every rank
    (so all ranks run the same settings), then logged. Changes to the thread
    count and executor take effect at the next epoch.

    Args:
        every_n_epochs: tune after every this many training epochs.
        apply: apply the decisions (``False``: only report them).

    Attributes:
        decisions: every decision taken, as plain dicts.
    """

    def __init__(self, every_n_epochs: int = 1, apply: bool = True) -> None:
        super().__init__()
        check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.every_n_epochs = every_n_epochs
        self.apply = apply
        self.decisions: list[dict[str, Any]] = []

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        for i, loader in enumerate(find_loaders(trainer.train_dataloader)):
            decision = (loader.optimize_thread_safety_settings(apply=False)
                        if trainer.is_global_zero else None)
            decision = trainer.strategy.broadcast(decision, src=0)
            if decision is None:
                continue
            if self.apply:
                loader.apply_decision(decision)
            self.decisions.append(decision)
            if decision.get("changed"):
                rank_zero_info(f"AutoTuner (loader {i}): {decision['reason']}")
            if trainer.is_global_zero:
                step = trainer.global_step
                after = decision["after"]
                for logger in trainer.loggers:
                    logger.log_metrics({f"tuner/train_{i}/num_workers": float(after["num_workers"]),
                                        f"tuner/train_{i}/prefetch": float(after["prefetch"]),
                                        f"tuner/train_{i}/process_executor":
                                            float(after["executor"] == "process")}, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"decisions": list(self.decisions)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.decisions = list(state_dict.get("decisions", []))
