"""The probe's decision rules: pure functions from measured samples to settings.

:class:`~lightning_threadsafe.tuning.OnlineProbe` measures the first samples the
live worker pool loads and hands the numbers to :class:`_Rules`, which picks the
``"auto"`` settings (a :class:`ProbeResult`). Nothing here loads, waits or locks.

1. **Concurrent window.** ``k`` threads load samples at once. Over the window the
   CPU the samples burnt, in cores: ``P`` (the workers' thread CPU over the
   window's wall time); the threads' compute share ``ratio = P / k`` (capped at 1).
   :meth:`_Rules.concurrent` classifies it (a :class:`_ConcurrentState`):

   * tiny samples (under 0.2 ms of CPU each, and of wall time per thread even if
     the GIL serialised the ``k`` threads): ``num_workers=0``, loaded inline
     (handing them to threads or processes costs more than loading them);
   * ``P >= 1.3`` (``"parallel"``): the threads ran in parallel, so the GIL is not
     the limit: threads;
   * ``P < 0.7`` (``"waiting"``): the threads mostly waited (I/O latency); a
     GIL-bound pool always has one thread running, so it burns about one core:
     threads;
   * otherwise (``"one core busy"``) ``P`` is about one core: GIL-bound, *or*
     samples that wait just ``1 - 1/k`` of their time.

2. **Telling the GIL from waits** (:meth:`_Rules.from_gil_wait`). After each
   window sample the worker yields the GIL once and times how long it takes to get
   it back: a mean of at least 1 ms with CPU-heavy samples (at least 1 ms of CPU)
   means the workers fight over the GIL: ``"process"``, one worker per core; under
   0.2 ms the GIL is mostly free (``"free GIL"``): threads. In between (or not
   measured) a **serial phase** decides (:meth:`_Rules.after_serial`): samples
   timed alone give ``serial_ratio`` (cpu/wall of a lone sample) and
   ``speedup = P / serial_ratio`` (how many serial loads ran at once); CPU-heavy
   samples (``serial_ratio >= 0.5``, at least 1 ms) with ``speedup < 1.3`` are
   GIL-bound: ``"process"``. Others: threads.

   With one core there is no concurrency to test (processes cannot help either):
   the samples only size the threads (:meth:`_Rules.one_core`).

3. **Threads** (:meth:`_Rules.decide`): ``cpu_count`` when ``ratio >= 0.85``
   (CPU-bound); ``ceil(cpu_count / ratio)`` when ``ratio >= 0.5``; latency-bound
   samples get 1.5x headroom, ``ceil(1.5 * cpu_count / ratio)``; all capped at
   ``max_workers`` (default ``min(64, 8 * cpu_count)``). ``ratio`` is the lower of
   the concurrent and (if measured) the serial one. ``prefetch`` is 2 per worker
   (torch's default ``prefetch_factor``); with ``prefetch_per_worker=False`` and a
   ``batch_size`` it is the total look-ahead ``max(2, ceil(2 * num_workers /
   batch_size))`` (two samples in flight per thread, capped at 32).

**Free-threaded Python.** The GIL rules only hold with a GIL. When
:func:`~lightning_threadsafe._gil.gil_enabled` is false as the window closes, about
one core busy cannot be the GIL (``"no GIL"``): the GIL wait is ignored, no serial
phase runs and nothing is GIL-bound; the samples are sized as threads like any
other (CPU-bound or waiting, by ``ratio``).

Evidence (``ProbeResult.evidence``): ``threads`` (k), ``wall_ms`` (thread-seconds
per sample), ``cpu_ms`` (mean thread CPU per sample), ``process_cores`` (P),
``cpu_wall_ratio`` (the ratio used for sizing), ``serial_cpu_wall_ratio`` and
``speedup`` (``None`` unless the serial phase ran), ``gil_wait_ms`` (when the GIL
wait was used), ``gil_enabled``, ``samples_concurrent``, ``samples_serial``,
``cpu_count``, ``reason``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_threadsafe._gil import gil_enabled
from lightning_threadsafe.bottleneck import usable_cpu_count
from lightning_threadsafe.tuning.settings import (
    LATENCY_HEADROOM,
    Settings,
    check_int,
    default_max_workers,
)

__all__ = ["ProbeResult"]

# Thresholds of the rules (see the module docstring).
_CPU_HEAVY_RATIO = 0.5
_CPU_BOUND_RATIO = 0.85  # threads compute at least this share of the time: one per core
_GIL_SPEEDUP = 1.3
_SCALING_CORES = 1.3  # the probe's threads burn more cores than this: not GIL-bound
_WAITING_CORES = 0.7  # ... fewer than this: they mostly wait (a GIL-bound pool burns ~1)
# Mean wait to get the GIL back after yielding it once, in the online probe's window:
# at least this, the workers fight over the GIL (GIL-bound); below _FREE_GIL_S it is
# free most of the time (they wait on I/O); in between, a serial phase decides.
_GIL_WAIT_S = 1e-3
_FREE_GIL_S = 2e-4
_MAX_PROBE_PREFETCH = 32
_TINY_SAMPLE_S = 2e-4  # below this per-sample wall time, loader overhead dominates: threads
_MIN_PROCESS_SAMPLE_S = 1e-3  # processes only pay off when a sample costs more than IPC does


@dataclass(frozen=True)
class ProbeResult:
    """Settings picked by the probe, with the measurements behind them.

    Attributes:
        executor: ``"thread"`` or ``"process"``.
        num_workers: threads or processes (0: load inline).
        prefetch: look-ahead in batches (per worker unless the probe was told otherwise).
        evidence: the measured numbers and a ``reason`` (module docstring).
    """

    executor: str
    num_workers: int
    prefetch: int
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the evidence is copied)."""
        return {"executor": self.executor, "num_workers": self.num_workers,
                "prefetch": self.prefetch, "evidence": dict(self.evidence)}

    def settings(self) -> Settings:
        """The result as tuner :class:`~lightning_threadsafe.tuning.Settings`."""
        return Settings(self.num_workers, self.prefetch, self.executor)


@dataclass
class _ConcurrentState:
    """What the concurrent window of a probe found.

    Attributes:
        evidence: the measurements so far (completed by the rule that decides).
        kind: ``"parallel"``, ``"waiting"``, ``"one core busy"``, ``"free GIL"``,
            ``"no GIL"`` or ``"one core"`` (module docstring).
        ratio: the threads' compute share used for sizing.
        tiny: the samples are too cheap to hand to workers.
        gil: whether the GIL was enabled as the window closed; without it no rule
            reports GIL-bound.
    """

    evidence: dict[str, Any]
    kind: str
    ratio: float
    tiny: bool
    gil: bool = True

    @property
    def needs_serial(self) -> bool:
        """Whether only samples timed alone can tell the GIL from waits."""
        return not self.tiny and self.kind == "one core busy"


@dataclass(frozen=True)
class _Rules:
    """The probe's decision rules (module docstring), for one machine and loader.

    Attributes:
        cpu_count: usable cores.
        max_workers: cap on the thread count.
        batch_size: the loader's batch size, to size a total prefetch (or ``None``).
        prefetch_per_worker: whether ``prefetch`` counts batches per worker.
    """

    cpu_count: int
    max_workers: int
    batch_size: int | None
    prefetch_per_worker: bool

    @classmethod
    def checked(cls, cpu_count: int | None, max_workers: int | None, batch_size: int | None,
                prefetch_per_worker: bool) -> _Rules:
        """Validated rules.

        Args:
            cpu_count: usable cores (default: this process's affinity mask).
            max_workers: cap on the thread count (default ``min(64, 8 * cpu_count)``).
            batch_size: the loader's batch size, or ``None``.
            prefetch_per_worker: whether ``prefetch`` counts batches per worker.

        Raises:
            ValueError: for a count out of range, naming it.
        """
        if cpu_count is None:
            cpu_count = usable_cpu_count()
        check_int("cpu_count", cpu_count, 1)
        if max_workers is None:
            max_workers = default_max_workers(cpu_count)
        check_int("max_workers", max_workers, 1)
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        return cls(cpu_count, max_workers, batch_size, prefetch_per_worker)

    def _base(self, gil: bool) -> dict[str, Any]:
        return {"cpu_count": self.cpu_count, "serial_cpu_wall_ratio": None, "speedup": None,
                "samples_serial": 0, "gil_enabled": gil}

    def one_core(self, walls: Sequence[float], cpus: Sequence[float]) -> ProbeResult:
        """Threads sized from samples loaded one at a time (one core: nothing to compare)."""
        wall = sum(walls) / max(len(walls), 1)
        ratio = round(min(sum(cpus) / sum(walls), 1.0), 6) if sum(walls) > 0 else 1.0
        evidence = self._base(gil_enabled())
        evidence.update(threads=0, wall_ms=1e3 * wall, cpu_ms=1e3 * sum(cpus) / max(len(cpus), 1),
                        process_cores=None, cpu_wall_ratio=ratio, samples_concurrent=0,
                        samples_serial=len(walls))
        return self.decide(_ConcurrentState(evidence, "one core", ratio,
                                            tiny=wall < _TINY_SAMPLE_S))

    def concurrent(self, k: int, *, samples: int, elapsed_s: float, cpu_s: float,
                   process_cores: float) -> _ConcurrentState:
        """Classify a window in which ``k`` threads loaded ``samples`` in ``elapsed_s``.

        Args:
            k: threads loading at once.
            samples: samples completed in the window.
            elapsed_s: the window's wall time.
            cpu_s: the samples' summed thread CPU.
            process_cores: CPU burnt by the samples over the window, in cores (``P``).

        Returns:
            The :class:`_ConcurrentState` the other rules decide from.
        """
        gil = gil_enabled()
        samples = max(samples, 1)
        wall = k * elapsed_s / samples  # thread-seconds per sample
        cpu = cpu_s / samples
        cores = round(max(process_cores, 0.0), 6)  # measured: exact thresholds mean nothing
        ratio = round(min(cores / k, 1.0), 6)
        evidence = self._base(gil)
        evidence.update(threads=k, wall_ms=1e3 * wall, cpu_ms=1e3 * cpu, process_cores=cores,
                        cpu_wall_ratio=ratio, samples_concurrent=samples)
        kind = ("parallel" if cores >= _SCALING_CORES else
                "waiting" if cores < _WAITING_CORES else
                "one core busy" if gil else "no GIL")
        tiny = cpu < _TINY_SAMPLE_S and wall < k * _TINY_SAMPLE_S  # even if GIL-serialised
        return _ConcurrentState(evidence, kind, ratio, tiny, gil)

    def from_gil_wait(self, state: _ConcurrentState, gil_wait_s: float,
                      cpu_s: float) -> ProbeResult | None:
        """Decide from the mean GIL wait of the window, or ``None`` when it cannot.

        A worker gets the GIL back at once after yielding it unless another thread
        holds it running Python (then after up to the switch interval, 5 ms by
        default). Only used for about one core busy, with the GIL enabled.

        Args:
            state: the window's state (its kind may become ``"free GIL"``).
            gil_wait_s: the mean wait to get the GIL back after yielding it once.
            cpu_s: the mean thread CPU per sample.
        """
        if not state.gil or state.kind == "parallel" or state.tiny:
            return None
        state.evidence["gil_wait_ms"] = 1e3 * gil_wait_s
        if gil_wait_s >= _GIL_WAIT_S and cpu_s >= _MIN_PROCESS_SAMPLE_S:
            return self.gil_bound(state, gil_wait_s)
        if gil_wait_s < _FREE_GIL_S and state.kind == "one core busy":
            state.kind = "free GIL"
            return self.decide(state)
        return None

    def after_serial(self, state: _ConcurrentState, walls: Sequence[float],
                     cpus: Sequence[float]) -> ProbeResult:
        """Decide from the window and samples timed alone (``walls``/``cpus``)."""
        ev = state.evidence
        k, cores = int(ev["threads"]), float(ev["process_cores"])
        s_wall = sum(walls) / max(len(walls), 1)
        s_ratio = round(min(sum(cpus) / sum(walls), 1.0), 6) if sum(walls) > 0 else 1.0
        speedup = round(cores / s_ratio, 6) if s_ratio > 0 else float(k)
        ev.update(serial_cpu_wall_ratio=s_ratio, speedup=speedup, samples_serial=len(walls))
        if state.gil and s_ratio >= _CPU_HEAVY_RATIO and s_wall >= _MIN_PROCESS_SAMPLE_S \
                and speedup < _GIL_SPEEDUP:
            ev["reason"] = (f"CPU-heavy samples (cpu/wall {s_ratio:.2f} alone) gain only "
                            f"{speedup:.2f}x from {k} threads, which burn {cores:.2f} cores: "
                            "GIL-bound")
            return self._processes(ev)
        state.ratio = min(state.ratio, s_ratio)
        ev["cpu_wall_ratio"] = state.ratio
        return self.decide(state)

    def gil_bound(self, state: _ConcurrentState, gil_wait_s: float) -> ProbeResult:
        """Processes for samples the online probe saw fight over the GIL."""
        ev = state.evidence
        ev["reason"] = (f"{ev['threads']} threads burn {ev['process_cores']:.2f} cores and wait "
                        f"{1e3 * gil_wait_s:.1f} ms on average to get the GIL back: "
                        "GIL-bound")
        return self._processes(ev)

    def _processes(self, ev: dict[str, Any]) -> ProbeResult:
        # One process per core: more would buy little (a few % on W3) for a copy of the
        # dataset each and torch's "more workers than cores" warning.
        return ProbeResult("process", min(self.cpu_count, self.max_workers), 2, ev)

    def decide(self, state: _ConcurrentState) -> ProbeResult:
        """Threads (or inline loading for tiny samples), sized from ``state.ratio``."""
        ev, ratio = state.evidence, state.ratio
        if state.tiny:
            ev["reason"] = (f"tiny samples ({ev['cpu_ms'] * 1e3:.0f} us of CPU): handing them "
                            "to threads or processes costs more than loading them, so load "
                            "inline")
            return ProbeResult("thread", 0, 2, ev)
        cores = self.cpu_count
        if ratio >= _CPU_BOUND_RATIO:
            workers = cores
        elif ratio >= _CPU_HEAVY_RATIO:
            workers = math.ceil(cores / ratio - 1e-9)  # 1e-9: ratios are rounded
        elif ratio > 0:
            workers = math.ceil(LATENCY_HEADROOM * cores / ratio - 1e-9)
        else:
            workers = self.max_workers
        workers = max(1, min(self.max_workers, workers))
        prefetch = 2
        if self.batch_size is not None and not self.prefetch_per_worker:
            prefetch = min(_MAX_PROBE_PREFETCH, max(2, math.ceil(2 * workers / self.batch_size)))
        cores_txt = f"{ev['process_cores'] or 0:.2f}"
        what = {"parallel": f"threads ran in parallel ({cores_txt} cores)",
                "waiting": f"threads mostly wait ({cores_txt} cores busy)",
                "one core busy": f"{ev['speedup'] or 0:.2f}x from {ev['threads']} threads: "
                                 "not GIL-bound",
                "free GIL": f"{cores_txt} cores busy, the GIL mostly free: waiting, not "
                            "GIL-bound",
                "no GIL": f"{cores_txt} cores busy with the GIL disabled: not GIL-bound",
                "one core": "one core"}[state.kind]
        bound = "latency-bound" if ratio < _CPU_HEAVY_RATIO else "CPU-bound"
        ev["reason"] = f"{bound} samples (cpu/wall {ratio:.2f}; {what}): {workers} threads"
        return ProbeResult("thread", workers, prefetch, ev)
