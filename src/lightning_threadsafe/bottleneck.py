"""Bottleneck diagnosis: why the training step waits for data, and which knob to turn.

:class:`BottleneckDetector` reads :class:`~lightning_threadsafe.telemetry.TelemetryWindow`
values (``update``), and ``compute`` returns a :class:`Verdict` over everything
accumulated since the last ``reset``. The verdict's code is the public metric
``loader/<stage>/bottleneck``.

Quantities (all from the accumulated window)::

    wait          = wait_s / (wait_s + consumer_s)          # share of step time spent waiting
    throttled     = throttled_s / duration_s                # memory governor held loading back
    load_stage    = (fetch_wall_s + collate_s) / threads    # parallel loading time, all batches
    transfer_share= transfer_s / (transfer_s + load_stage)  # staging vs loading (serial stage)
    cpu_wall      = fetch_cpu_s / fetch_wall_s              # thread CPU per sample wall second
    fetch_cores   = fetch_cpu_s / duration_s                # cores the samples actually burn
    cores         = max(process_cpu_s, fetch_cpu_s) / duration_s
    busy          = fetch_wall_s / duration_s               # threads inside a sample, on average
    inflation     = serial_cpu_wall / cpu_wall              # how much longer a sample takes
                                                            # under concurrency than alone

Rules, first match wins (defaults in brackets; ``C`` = usable cores):

=====  ====================  ==========================================================  ====================================
order  code                  condition                                                   recommendation (knob)
=====  ====================  ==========================================================  ====================================
0      NONE ("no-data")      no sample in the window                                     nothing to judge yet
1      NONE                  ``wait < wait_threshold`` [0.05]                            none: the step is compute-bound
2      MEMORY                ``throttled >= memory_threshold`` [0.10]                    lower prefetch / raise memory_budget
3      TRANSFER              ``transfer_share >= transfer_threshold`` [0.5]              raise prefetch, pin_memory
4      CPU                   ``cores >= cpu_saturation * C`` [0.85] and                  cheaper transforms / more cores
                             ``busy >= C / 2`` (the loader's threads burn them)
5      GIL                   the GIL is enabled, ``C >= 2`` and ``busy >= 1.5`` and      executor="process"
                             ``gil_low <= fetch_cores <= gil_high`` [0.7, 1.2] and
                             (no serial baseline, or ``inflation >= gil_inflation`` [1.5])
6      IO                    ``cpu_wall < io_ratio`` [0.5]                               raise num_workers (threads)
7      CPU                   otherwise (samples mostly compute)                          threads up to C, then cheaper
                                                                                         transforms / more cores
=====  ====================  ==========================================================  ====================================

Why this order, and the ambiguous cases:

- *Saturated cores before everything per-sample.* ``time.thread_time`` does not
  run while a thread waits for a core, so an over-subscribed CPU-bound pool
  shows a low ``cpu_wall`` and would look I/O-bound. When the process already
  burns ~all cores, more threads cannot help whatever ``cpu_wall`` says.
- *GIL before IO.* A thread waiting for the GIL is blocked, not running, so
  GIL contention also *lowers* ``cpu_wall`` (n contending threads show about
  1/n). What marks the GIL is that the samples' CPU stays pinned at about one
  core while more than one thread is busy. That alone cannot be told apart from
  latency-bound samples whose GIL-free CPU happens to add up to one core, so
  when a serial baseline is known (learned from any window with ``threads <= 1``
  or passed as ``serial_cpu_ratio``, e.g. from the probe) the rule also
  asks that samples take ``gil_inflation`` times longer than they do alone.
  ``fetch_cores`` is used rather than process CPU because the process figure
  includes the training step.
- *One thread.* CPU-bound and GIL-bound look the same with one thread; the
  verdict is CPU ("raise num_workers"), and the next window, with two threads,
  tells them apart. With one usable core, GIL is never reported (processes
  would not help either).
- *Idle workers.* When the consumer waits but workers sit idle
  (``busy / threads < 0.5``), the look-ahead is too short; the IO and CPU
  recommendations then name ``prefetch`` first.
- MEMORY and TRANSFER come before the per-sample rules because they cap the
  pipeline whatever the sample costs.
- *Free-threaded Python.* With the GIL disabled
  (:func:`~lightning_threadsafe._gil.gil_enabled` false at ``compute``) rule 5 is
  off: threads that burn one core between them are not serialised by a lock the
  interpreter holds, so the window goes on to the IO and CPU rules (threads).
  ``evidence["gil_enabled"]`` says which way it went.

Example::

    detector = BottleneckDetector(cpu_count=8)
    detector.update(now.delta(earlier))
    verdict = detector.compute()
    trainer.logger.log_metrics({"loader/train/bottleneck": int(verdict.code)})
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from lightning_threadsafe._gil import gil_enabled
from lightning_threadsafe.telemetry import GAUGES, TelemetryWindow

__all__ = ["Bottleneck", "BottleneckDetector", "Verdict", "usable_cpu_count"]


def usable_cpu_count() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


class Bottleneck(IntEnum):
    """What limits the input pipeline; the value is the ``bottleneck`` metric code."""

    NONE = 0
    CPU = 1
    IO = 2
    GIL = 3
    MEMORY = 4
    TRANSFER = 5


_NAMES = {
    Bottleneck.NONE: "compute-bound",
    Bottleneck.CPU: "cpu-bound",
    Bottleneck.IO: "io-latency",
    Bottleneck.GIL: "gil-bound",
    Bottleneck.MEMORY: "memory-throttled",
    Bottleneck.TRANSFER: "transfer-bound",
}


@dataclass(frozen=True)
class Verdict:
    """The diagnosis of a window.

    Attributes:
        code: the :class:`Bottleneck`.
        name: a readable label (``"io-latency"``, ``"no-data"``...).
        recommendation: one line naming the knob to turn and the number behind it.
        evidence: the measured numbers the rules used (plain floats/ints/strings).
        window_batches: batches delivered in the judged window (how much data it rests on).
    """

    code: Bottleneck
    name: str
    recommendation: str
    evidence: dict[str, Any] = field(default_factory=dict)
    window_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, strings), e.g. for a logger or a checkpoint."""
        return {
            "code": int(self.code),
            "name": self.name,
            "recommendation": self.recommendation,
            "evidence": dict(self.evidence),
            "window_batches": self.window_batches,
        }


def _check_fraction(name: str, value: float, *, low: float = 0.0, high: float = 1.0) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and low < value <= high)
    if not ok:
        raise ValueError(f"{name}={value!r} must be a number in ({low}, {high}]")


class BottleneckDetector:
    """Accumulates telemetry windows and names the input bottleneck (rules: module docstring).

    Plain class, no threads: ``update``, ``compute`` and ``reset`` are called by one
    thread (the callback's). ``reset`` clears the accumulated windows but keeps
    the serial baseline, which describes the dataset rather than the window.

    Args:
        cpu_count: usable cores (default: this process's affinity mask).
        wait_threshold: the consumer must wait at least this share of its time
            for anything but NONE.
        memory_threshold: share of the window the memory governor throttled.
        transfer_threshold: share of staging in (staging + parallel loading).
        io_ratio: sample CPU / sample wall below which samples are latency-bound.
        cpu_saturation: share of ``cpu_count`` the process must burn to be CPU-saturated.
        gil_low, gil_high: the band of sample CPU (in cores) that reads as "one core".
        gil_inflation: with a serial baseline, how much longer samples must take
            under concurrency than alone to blame the GIL.
        serial_cpu_ratio: CPU/wall of a sample loaded alone (e.g. from
            the ``serial_cpu_wall_ratio`` evidence of
            :class:`~lightning_threadsafe.tuning.OnlineProbe`); windows with one thread
            refine it.

    Raises:
        ValueError: for an argument out of range, naming it.

    Example::

        det = BottleneckDetector(cpu_count=2)
        det.update(TelemetryWindow(duration_s=1.0, samples=40, fetch_wall_s=0.96,
                                   fetch_cpu_s=0.04, batches=10, wait_s=0.9,
                                   consumer_s=0.1, threads=1))
        assert det.compute().code is Bottleneck.IO
    """

    def __init__(
        self,
        *,
        cpu_count: int | None = None,
        wait_threshold: float = 0.05,
        memory_threshold: float = 0.10,
        transfer_threshold: float = 0.5,
        io_ratio: float = 0.5,
        cpu_saturation: float = 0.85,
        gil_low: float = 0.7,
        gil_high: float = 1.2,
        gil_inflation: float = 1.5,
        serial_cpu_ratio: float | None = None,
    ) -> None:
        if cpu_count is None:
            cpu_count = usable_cpu_count()
        if isinstance(cpu_count, bool) or not isinstance(cpu_count, int) or cpu_count < 1:
            raise ValueError(f"cpu_count={cpu_count!r} must be a positive int or None")
        for name, value in (("wait_threshold", wait_threshold),
                            ("memory_threshold", memory_threshold),
                            ("transfer_threshold", transfer_threshold),
                            ("io_ratio", io_ratio),
                            ("cpu_saturation", cpu_saturation)):
            _check_fraction(name, value)
        _check_fraction("gil_low", gil_low, high=float(cpu_count) + 1.0)
        _check_fraction("gil_high", gil_high, high=float(cpu_count) + 1.0)
        if gil_low >= gil_high:
            raise ValueError(f"gil_low={gil_low!r} must be below gil_high={gil_high!r}")
        _check_fraction("gil_inflation", gil_inflation, low=1.0, high=math.inf)
        if serial_cpu_ratio is not None:
            _check_fraction("serial_cpu_ratio", serial_cpu_ratio, high=math.inf)
        self.cpu_count = cpu_count
        self.wait_threshold = float(wait_threshold)
        self.memory_threshold = float(memory_threshold)
        self.transfer_threshold = float(transfer_threshold)
        self.io_ratio = float(io_ratio)
        self.cpu_saturation = float(cpu_saturation)
        self.gil_low = float(gil_low)
        self.gil_high = float(gil_high)
        self.gil_inflation = float(gil_inflation)
        self._given_serial_ratio = serial_cpu_ratio
        self._serial_cpu_s = 0.0  # learned from windows with threads <= 1
        self._serial_wall_s = 0.0
        self._acc: TelemetryWindow | None = None

    # ------------------------------------------------------------------ state
    @property
    def serial_cpu_ratio(self) -> float | None:
        """CPU/wall of a sample alone: learned from one-thread windows, else the given one."""
        if self._serial_wall_s > 0:
            return self._serial_cpu_s / self._serial_wall_s
        return self._given_serial_ratio

    @property
    def window(self) -> TelemetryWindow:
        """The accumulated window (empty before the first ``update``)."""
        return self._acc if self._acc is not None else TelemetryWindow()

    def update(self, window: TelemetryWindow) -> None:
        """Add a window: counters are summed, gauges are taken from the latest window."""
        if not isinstance(window, TelemetryWindow):
            raise TypeError(f"window={window!r} must be a TelemetryWindow")
        if window.samples > 0 and window.fetch_wall_s > 0 and 0 < window.threads <= 1:
            self._serial_cpu_s += window.fetch_cpu_s
            self._serial_wall_s += window.fetch_wall_s
        if self._acc is None:
            self._acc = window
            return
        acc = self._acc
        merged = {
            f.name: getattr(window, f.name) if f.name in GAUGES
            else getattr(acc, f.name) + getattr(window, f.name)
            for f in dataclasses.fields(TelemetryWindow)
        }
        self._acc = TelemetryWindow(**merged)

    def reset(self) -> None:
        """Forget the accumulated windows (the serial baseline is kept)."""
        self._acc = None

    # ---------------------------------------------------------------- verdict
    def compute(self) -> Verdict:
        """The verdict over everything accumulated since the last ``reset``."""
        w = self.window
        if w.samples <= 0 or w.duration_s <= 0:
            return Verdict(
                Bottleneck.NONE, "no-data", "no change — no sample was loaded in the window yet",
                {"reason": "no data", "samples": w.samples, "duration_s": w.duration_s},
                w.batches,
            )
        ev = self._evidence(w)
        wait = ev["wait_fraction"]
        c = self.cpu_count

        def verdict(code: Bottleneck, recommendation: str) -> Verdict:
            return Verdict(code, _NAMES[code], recommendation, ev, w.batches)

        if wait < self.wait_threshold:
            return verdict(Bottleneck.NONE,
                           f"no change needed — the step waited for data {wait:.0%} of its time "
                           f"(below {self.wait_threshold:.0%})")
        if ev["throttled_fraction"] >= self.memory_threshold:
            return verdict(Bottleneck.MEMORY,
                           f"lower prefetch or raise memory_budget — the memory governor held "
                           f"loading back {ev['throttled_fraction']:.0%} of the time")
        if ev["transfer_share"] >= self.transfer_threshold:
            return verdict(Bottleneck.TRANSFER,
                           f"raise prefetch and use pin_memory=True — host-to-device staging takes "
                           f"{w.transfer_ms:.1f} ms per batch, {ev['transfer_share']:.0%} of the "
                           f"staging+loading time")
        look_ahead = ""
        if ev["worker_utilisation"] < 0.5:
            look_ahead = (f"raise prefetch (workers idle {1 - ev['worker_utilisation']:.0%} of "
                          f"the time: look-ahead too short), then ")
        # Saturated cores count as a loader CPU bottleneck only when the loader keeps at
        # least half as many threads busy as there are cores: with fewer, the cores are
        # burnt elsewhere (the training step, spinning intra-op pools) and more threads
        # still help a latency-bound loader.
        if ev["cores"] >= self.cpu_saturation * c and ev["busy_threads"] >= 0.5 * c:
            return verdict(Bottleneck.CPU,
                           f"make transforms cheaper or add cores — the process uses "
                           f"{ev['cores']:.1f} of {c} cores")
        if self._gil_bound(ev):
            return verdict(Bottleneck.GIL,
                           f"use executor='process' — {ev['busy_threads']:.1f} busy threads "
                           f"share {ev['fetch_cpu_cores']:.2f} core of sample CPU: the GIL "
                           f"serialises them")
        if ev["cpu_wall_ratio"] < self.io_ratio:
            return verdict(Bottleneck.IO,
                           f"{look_ahead}raise num_workers (threads) — samples spend "
                           f"{1 - ev['cpu_wall_ratio']:.0%} of their time waiting on I/O")
        if w.threads < c:
            return verdict(Bottleneck.CPU,
                           f"{look_ahead}raise num_workers towards {c} (cores) — samples are "
                           f"CPU-bound (cpu/wall {ev['cpu_wall_ratio']:.2f}) and use "
                           f"{ev['cores']:.1f} of {c} cores")
        return verdict(Bottleneck.CPU,
                       f"{look_ahead}make transforms cheaper or add cores — samples are "
                       f"CPU-bound (cpu/wall {ev['cpu_wall_ratio']:.2f}) with {w.threads} workers "
                       f"on {c} cores")

    def _gil_bound(self, ev: dict[str, Any]) -> bool:
        if not ev["gil_enabled"]:  # free-threaded: threads are not serialised by a GIL
            return False
        if self.cpu_count < 2 or ev["busy_threads"] < 1.5:
            return False
        if not self.gil_low <= ev["fetch_cpu_cores"] <= self.gil_high:
            return False
        inflation = ev["wall_inflation"]
        return inflation is None or inflation >= self.gil_inflation

    def _evidence(self, w: TelemetryWindow) -> dict[str, Any]:
        threads = max(w.threads, 1)
        load_stage = (w.fetch_wall_s + w.collate_s) / threads
        staged = w.transfer_s + load_stage
        cpu_wall = w.fetch_cpu_s / w.fetch_wall_s if w.fetch_wall_s > 0 else 0.0
        fetch_cores = w.fetch_cpu_s / w.duration_s
        busy = w.fetch_wall_s / w.duration_s
        serial = self.serial_cpu_ratio
        inflation = serial / cpu_wall if serial is not None and cpu_wall > 0 else None
        return {
            "wait_fraction": w.wait_fraction,
            "throttled_fraction": w.throttled_fraction,
            "transfer_share": w.transfer_s / staged if staged > 0 else 0.0,
            "cpu_wall_ratio": cpu_wall,
            "fetch_cpu_cores": fetch_cores,
            "process_cpu_cores": w.cpu_cores_used,
            "cores": max(w.cpu_cores_used, fetch_cores),
            "busy_threads": busy,
            "worker_utilisation": min(busy / threads, 1.0),
            "threads": w.threads,
            "cpu_count": self.cpu_count,
            "serial_cpu_ratio": serial,
            "wall_inflation": inflation,
            "gil_enabled": gil_enabled(),
            "fetch_ms": w.fetch_ms,
            "cpu_per_sample_ms": w.cpu_per_sample_ms,
            "transfer_ms": w.transfer_ms,
            "samples_per_sec": w.samples_per_sec,
            "samples": w.samples,
            "duration_s": w.duration_s,
        }
