"""Measurement primitives: throughput, time to first batch, peak memory, interleaved rounds.

Methodology (the same for every contender):

* **Fresh loader per measurement.** Each figure comes from a loader built for
  it and closed after it; nothing is shared between measurements but the
  dataset object and the OS page cache (the volume is read once before the
  first measurement, so every contender sees a warm cache).
* **Throughput** (:func:`measure_throughput`): iterate, discard the first
  ``warmup_batches`` batches (worker start-up, first reads), then count samples
  (or batches) until ``duration`` seconds have passed or the epoch ends. The
  consumer does nothing with a batch except note its size, so the figure is the
  loader's delivery rate.
* **Time to first batch** (:func:`measure_first_batch`): from just before the
  loader's constructor to the first batch in hand; nothing is excluded.
* **Peak memory** (:class:`MemorySampler`): a background thread samples this
  process's RSS every few milliseconds (plus the growth of ``/dev/shm`` when
  the contender uses worker processes, where torch keeps in-flight batches);
  the figure is peak minus the value just before the loader was built.
* **Rounds** (:func:`interleaved_rounds`): every round measures every contender
  once, round-robin, the starting contender rotating each round, so that slow
  drifts of a shared machine (other jobs, thermal state) spread over all
  contenders instead of biasing one. Figures are reported as the median over
  rounds with min-max and the inter-quartile range (:func:`summarize`).
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from benchmarks.contenders import Contender, LoaderHandle, LoaderSpec

__all__ = [
    "Measurement",
    "MemorySampler",
    "RoundsOutcome",
    "batch_len",
    "interleaved_rounds",
    "measure_first_batch",
    "measure_throughput",
    "plain",
    "report_extra",
    "summarize",
]


@dataclass
class Measurement:
    """One figure from one run of one contender, plus whatever else the run learnt."""

    value: float
    extra: dict[str, Any] = field(default_factory=dict)


def batch_len(batch: Any) -> int:
    """Number of samples in a collated batch (first dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_len(next(iter(batch.values())))
    return 1


def report_extra(handle: LoaderHandle) -> dict[str, Any]:
    """The parts of our loader's report the tables use (settings chosen, memory)."""
    try:
        report = handle.report()
    except Exception as exc:  # a broken report must not lose the figure
        return {"report_error": f"{type(exc).__name__}: {exc}"}
    if not isinstance(report, dict):
        return {}
    extra: dict[str, Any] = {}
    if isinstance(report.get("settings"), dict):
        extra["settings"] = plain(report["settings"])
    if isinstance(report.get("memory"), dict):
        extra["memory"] = plain(report["memory"])
    if isinstance(report.get("rates"), dict):
        extra["rates"] = plain(report["rates"])
    for key in ("bottleneck", "verdict"):
        if key in report:
            extra[key] = plain(report[key])
    return extra


def plain(value: Any) -> Any:
    """JSON-friendly copy (numbers, strings, lists, dicts; anything else as ``str``)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def measure_throughput(contender: Contender, spec: LoaderSpec, *, duration: float,
                       warmup_batches: int, warmup_s: float = 0.0,
                       per: str = "samples") -> Measurement:
    """Steady-state delivery rate of a fresh loader, in samples/s or batches/s.

    The warm-up ends when ``warmup_batches`` batches have arrived *and*
    ``warmup_s`` seconds have passed since the first one. Workers that start
    together finish their first batches together; passing one single-worker
    batch time as ``warmup_s`` keeps that initial burst out of the window.

    Raises:
        RuntimeError: if the epoch ends before one batch after the warm-up.
    """
    if per not in ("samples", "batches"):
        raise ValueError(f"per={per!r} must be 'samples' or 'batches'")
    t_open = time.perf_counter()
    handle = contender.open(spec)
    try:
        it = handle.iter()
        t_start = None
        samples = batches = seen = 0
        ttfb = float("nan")
        t_first = t_open
        for batch in it:
            seen += 1
            now = time.perf_counter()
            if seen == 1:
                t_first = now
                ttfb = now - t_open
            if t_start is None:
                if warmup_batches == 0 and warmup_s <= 0:
                    t_start = t_open  # no warm-up: this batch counts, from the constructor on
                else:
                    if seen >= warmup_batches and now - t_first >= warmup_s:
                        t_start = now  # the window starts after this batch
                    continue
            samples += batch_len(batch)
            batches += 1
            if time.perf_counter() - t_start >= duration:
                break
        elapsed = time.perf_counter() - (t_start if t_start is not None else t_open)
        if batches == 0:
            raise RuntimeError(f"the epoch ended after {seen} batches, within the warm-up; "
                               "make the dataset longer")
        extra = {"samples": samples, "batches": batches, "elapsed_s": elapsed,
                 "first_batch_s": ttfb, "warmup_batches": seen - batches,
                 **report_extra(handle)}
    finally:
        handle.close()
    count = samples if per == "samples" else batches
    return Measurement(count / elapsed, extra)


def measure_first_batch(contender: Contender, spec: LoaderSpec) -> Measurement:
    """Seconds from the loader's constructor to the first batch in hand (start-up cost)."""
    gc.collect()
    t0 = time.perf_counter()
    handle = contender.open(spec)
    try:
        next(handle.iter())
        dt = time.perf_counter() - t0
        extra = report_extra(handle)
    finally:
        handle.close()
    return Measurement(dt, extra)


def _shm_used() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class MemorySampler:
    """Samples this process's RSS (and optionally ``/dev/shm`` use) in a background thread.

    ``peak_growth`` = max over samples of (RSS + shm) minus the first sample,
    taken when the sampler starts. The thread (``bench-memory``) is joined on
    exit; it waits on an event with a timeout, so stopping is immediate.

    Args:
        interval_s: seconds between samples.
        include_shm: add the growth of ``/dev/shm`` (torch worker processes move
            each batch into shared memory until the consumer takes it).
    """

    def __init__(self, interval_s: float = 0.002, include_shm: bool = False) -> None:
        self.interval_s = interval_s
        self.include_shm = include_shm
        self._proc = psutil.Process()
        # Set by the owner to stop the sampler; the sampler thread waits on it.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self.baseline = 0
        self.peak = 0
        self.samples = 0

    def _read(self) -> int:
        value = self._proc.memory_info().rss
        if self.include_shm:
            value += _shm_used()
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = self._read()
            self.samples += 1
            if value > self.peak:
                self.peak = value

    def __enter__(self) -> MemorySampler:
        gc.collect()
        self.baseline = self.peak = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.peak = max(self.peak, self._read())

    @property
    def peak_growth(self) -> int:
        return max(0, self.peak - self.baseline)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max and quartiles of the per-round figures."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"n": len(vals), "median": statistics.median(vals), "min": vals[0],
            "max": vals[-1], "q1": q1, "q3": q3}


def _lts_threads() -> set[str]:
    """Names of live threads started by our loader (named ``lts-*`` by convention)."""
    return {t.name for t in threading.enumerate() if t.name.startswith("lts-") and t.is_alive()}


@dataclass
class RoundsOutcome:
    """Per contender: the measurements that succeeded and the first error, if any."""

    measurements: dict[str, list[Measurement]]
    errors: dict[str, str]


def interleaved_rounds(contenders: Sequence[Contender], measure: Callable[[Contender], Measurement],
                       rounds: int, log: Callable[[str], None], tag: str,
                       fmt: Callable[[float], str] = lambda v: f"{v:.4g}") -> RoundsOutcome:
    """Measure every available contender once per round, round-robin, rotating the start.

    A contender that raises is reported with its error and not measured again
    (a broken loader must not stall the whole run); the others go on. Threads
    named ``lts-*`` still alive after a run (the loader was closed) are recorded
    in the measurement's ``threads_left_after_close``.
    torch's intra-op thread count is restored after each run in case a loader
    changed it, so that no contender inherits another's setting.
    """
    live = [c for c in contenders if c.unavailable is None]
    out: dict[str, list[Measurement]] = {c.name: [] for c in live}
    errors: dict[str, str] = {}
    n_threads = torch.get_num_threads()
    for r in range(rounds):
        k = r % max(1, len(live))
        order = live[k:] + live[:k]
        for c in order:
            if c.name in errors:
                continue
            before = _lts_threads()
            try:
                m = measure(c)
            except Exception as exc:
                errors[c.name] = f"{type(exc).__name__}: {exc}"
                log(f"[{tag}] round {r + 1}/{rounds} {c.name}: [red]error[/] {errors[c.name]}")
                continue
            finally:
                if torch.get_num_threads() != n_threads:
                    torch.set_num_threads(n_threads)
                gc.collect()
            left = sorted(_lts_threads() - before)
            if left:  # the loader was closed: none of its threads should remain
                m.extra["threads_left_after_close"] = left
            out[c.name].append(m)
            log(f"[{tag}] round {r + 1}/{rounds} {c.name}: {fmt(m.value)}")
    return RoundsOutcome(out, errors)
