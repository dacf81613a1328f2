"""Loading one sample: sample context, error policy, retries, timing.

Shared by every executor (calling thread, worker threads, process workers), so
a sample is loaded the same way whichever runs it.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from lightning_threadsafe import rng as _rng
from lightning_threadsafe.errors import SampleLoadError
from lightning_threadsafe.telemetry import WorkerStats

__all__ = ["FetchPolicy", "Skipped", "load_many", "load_sample"]

_MAX_BACKOFF_S = 2.0
_CPU_TIMING_MIN_S = 50e-6  # mean sample wall time below which thread CPU is not read


@dataclass(frozen=True)
class FetchPolicy:
    """How a failing sample is handled (see ``ThreadedDataLoader(on_error=...)``)."""

    seed: int
    on_error: str = "raise"  # "raise" | "skip" | "retry"
    max_retries: int = 2
    backoff_s: float = 0.01  # first retry delay; doubles each attempt, capped at _MAX_BACKOFF_S
    skip_after_retries: bool = False  # with on_error="retry": skip (True) or raise (False) at the end


@dataclass(frozen=True)
class Skipped:
    """Marker left in place of a sample that failed under ``on_error="skip"``."""

    index: Any
    error: str
    attempts: int




def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def load_sample(
    dataset: Any,
    index: Any,
    *,
    epoch: int,
    policy: FetchPolicy,
    stats: WorkerStats | None = None,
    stop: threading.Event | None = None,
    batch_indices: list[Any] | None = None,
    ordinal: int | None = None,
    first_failure: BaseException | None = None,
) -> Any:
    """Return ``dataset[index]`` under the sample context of ``(seed, epoch, index)``.

    Returns a :class:`Skipped` marker when the policy skips the sample.
    ``first_failure``: the first attempt already ran elsewhere (``load_many``) and
    raised this; the policy continues from attempt 2.

    Raises:
        SampleLoadError: the sample failed and the policy raises; the original
            exception is chained as ``__cause__``. Exceptions that are not
            ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) are never
            retried or skipped.
    """
    local = _rng._local
    # SampleContext(seed, epoch, key) without the namedtuple's Python-level __new__
    # (the same object, at half the cost).
    ctx = tuple.__new__(_rng.SampleContext, (
        policy.seed, epoch, index if type(index) is int else _rng._index_key(index)))
    # Thread CPU time costs ~1 us per reading: read it only while samples are not tiny
    # on average; tiny samples are counted as pure CPU (their wall time).
    cpu_timed = stats is not None and (
        stats.samples < 8 or stats.fetch_wall_s > _CPU_TIMING_MIN_S * stats.samples)
    if first_failure is None:  # the first attempt: the common, successful case
        value, first_failure = _attempt(dataset, index, local, ctx, stats, cpu_timed)
        if first_failure is None:
            if stats is not None:
                stats.samples += 1
            return value
    return _apply_policy(dataset, index, local, ctx, stats, cpu_timed, policy, stop,
                         batch_indices, ordinal, first_failure)


def _apply_policy(dataset: Any, index: Any, local: Any, ctx: Any, stats: WorkerStats | None,
                  cpu_timed: bool, policy: FetchPolicy, stop: threading.Event | None,
                  batch_indices: list[Any] | None, ordinal: int | None,
                  first_failure: BaseException) -> Any:
    """Attempt 1 raised ``first_failure``: retry, skip or raise as ``policy`` says."""
    attempts = 0
    retries = policy.max_retries if policy.on_error == "retry" else 0
    while True:
        attempts += 1
        if first_failure is not None:  # attempt 1 ran already (here or in load_many)
            failure, first_failure = first_failure, None
            if stats is not None:
                stats.errors += 1
        else:
            value, failure = _attempt(dataset, index, local, ctx, stats, cpu_timed)
            if failure is None:
                if stats is not None:
                    stats.samples += 1
                return value
            if stats is not None:
                stats.errors += 1
        fatal = not isinstance(failure, Exception)
        if not fatal and attempts <= retries:
            if stats is not None:
                stats.retries += 1
            fatal = _back_off(policy, attempts, stop)
            if not fatal:
                continue
        skip = not fatal and (
            policy.on_error == "skip" or (policy.on_error == "retry" and policy.skip_after_retries)
        )
        if skip:
            if stats is not None:
                stats.skipped += 1
            return Skipped(index, _describe(failure), attempts)
        where = f" (batch {ordinal}: indices {batch_indices})" if batch_indices is not None else ""
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        raise SampleLoadError(
            f"loading sample index={index!r}{where} failed{tries}: {_describe(failure)}",
            index=index,
            batch_indices=batch_indices,
            batch_ordinal=ordinal,
            attempts=attempts,
        ) from failure


def _back_off(policy: FetchPolicy, attempts: int, stop: threading.Event | None) -> bool:
    """Wait before the next attempt; ``True`` when the loader stopped meanwhile.

    Interruptible: a stopping loader does not wait the backoff out.
    """
    delay = min(policy.backoff_s * (2 ** (attempts - 1)), _MAX_BACKOFF_S)
    if stop is not None:
        return stop.wait(delay)
    time.sleep(delay)
    return False


def _attempt(dataset: Any, index: Any, local: Any, ctx: Any, stats: WorkerStats | None,
             cpu_timed: bool) -> tuple[Any, BaseException | None]:
    """One try of ``dataset[index]`` under ``ctx``: ``(value, None)`` or ``(None, exception)``."""
    t0 = time.perf_counter()
    c0 = time.thread_time() if cpu_timed else 0.0
    prev = getattr(local, "ctx", None)
    local.ctx = ctx
    try:
        return dataset[index], None
    except BaseException as exc:  # classified by the caller, never swallowed
        return None, exc
    finally:
        local.ctx = prev
        if stats is not None:
            wall = time.perf_counter() - t0
            stats.fetch_wall_s += wall
            stats.fetch_cpu_s += (time.thread_time() - c0) if cpu_timed else wall


def load_many(
    dataset: Any,
    indices: list[Any],
    *,
    epoch: int,
    policy: FetchPolicy,
    stats: WorkerStats,
    ordinal: int | None = None,
    stop: threading.Event | None = None,
    batch_indices: list[Any] | None = None,
) -> list[Any]:
    """Load ``indices`` in the calling thread: a tight loop, the policy on failures only.

    Same results, seeding and error handling as ``load_sample`` per index (a failing
    index continues with ``load_sample(first_failure=...)``), at a fraction of the
    per-sample overhead -- the hot path of the inline executor (a whole batch) and of
    worker threads (a share of a batch).

    Args:
        stop: interrupts retry backoffs (worker threads pass the pool's stop event).
        batch_indices: the whole batch, named in errors (default ``indices``).

    ``stats.current_index`` is the index being loaded while it loads (the stall
    watchdog's view) and ``None`` on return. Timing: one wall (and, for samples that
    are not tiny, one thread-CPU) reading around the loop, minus the time a failing
    sample spends in the policy (whose retries time themselves; backoffs are not
    sample time).

    Raises:
        SampleLoadError: a sample failed and the policy raises (see ``load_sample``).
    """
    local = _rng._local
    seed = policy.seed
    # SampleContext(seed, epoch, key) built without the namedtuple's Python-level
    # __new__ (the same object, at half the cost): this is most of the per-sample cost.
    new, ctx_type = tuple.__new__, _rng.SampleContext
    key = _rng._index_key
    where = batch_indices if batch_indices is not None else indices
    prev = getattr(local, "ctx", None)
    out: list[Any] = []
    append = out.append
    cpu_timed = stats.samples < 8 or stats.fetch_wall_s > _CPU_TIMING_MIN_S * stats.samples
    perf, cpu_clock = time.perf_counter, time.thread_time
    fallbacks = 0  # samples handed to load_sample (it counts and times those itself)
    aside_wall = aside_cpu = 0.0
    t0 = perf()
    c0 = cpu_clock() if cpu_timed else 0.0
    try:
        for index in indices:
            stats.current_index = index
            local.ctx = new(ctx_type, (seed, epoch, index if type(index) is int else key(index)))
            try:
                append(dataset[index])
            except BaseException as exc:  # handed to the policy below, never swallowed
                local.ctx = prev
                f0 = perf()
                fc0 = cpu_clock() if cpu_timed else 0.0
                try:
                    append(load_sample(dataset, index, epoch=epoch, policy=policy, stats=stats,
                                       stop=stop, batch_indices=where, ordinal=ordinal,
                                       first_failure=exc))
                    fallbacks += 1  # appended: load_sample counted it (loaded or skipped)
                finally:
                    aside_wall += perf() - f0
                    if cpu_timed:
                        aside_cpu += cpu_clock() - fc0
    finally:
        local.ctx = prev
        stats.current_index = None
        wall = perf() - t0 - aside_wall
        stats.fetch_wall_s += wall
        stats.fetch_cpu_s += (cpu_clock() - c0 - aside_cpu) if cpu_timed else wall
        stats.samples += len(out) - fallbacks
    return out
