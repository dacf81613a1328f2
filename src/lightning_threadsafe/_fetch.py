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
    attempts = 0
    retries = policy.max_retries if policy.on_error == "retry" else 0
    local = _rng._local
    ctx = _rng.SampleContext(policy.seed, epoch, _rng._index_key(index))
    # Thread CPU time costs ~1 us per reading: read it only while samples are not tiny
    # on average; tiny samples are counted as pure CPU (their wall time).
    cpu_timed = stats is not None and (
        stats.samples < 8 or stats.fetch_wall_s > _CPU_TIMING_MIN_S * stats.samples)
    while True:
        attempts += 1
        if first_failure is not None:  # attempt 1 ran in load_many's fast path
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
) -> list[Any]:
    """Load a whole batch in the calling thread: a tight loop, the policy on failures only.

    Same results, seeding and error handling as ``load_sample`` per index (a failing
    index continues with ``load_sample(first_failure=...)``), at a fraction of the
    per-sample overhead -- the inline executor's hot path.
    """
    local = _rng._local
    seed = policy.seed
    ctx_type = _rng.SampleContext
    key = _rng._index_key
    prev = getattr(local, "ctx", None)
    out: list[Any] = []
    cpu_timed = stats.samples < 8 or stats.fetch_wall_s > _CPU_TIMING_MIN_S * stats.samples
    t0 = time.perf_counter()
    c0 = time.thread_time() if cpu_timed else 0.0
    ok = 0
    try:
        for index in indices:
            local.ctx = ctx_type(seed, epoch, key(index))
            try:
                out.append(dataset[index])
                ok += 1
            except BaseException as exc:  # handed to the policy below, never swallowed
                local.ctx = prev
                out.append(load_sample(dataset, index, epoch=epoch, policy=policy, stats=stats,
                                       batch_indices=indices, ordinal=ordinal,
                                       first_failure=exc))
    finally:
        local.ctx = prev
        wall = time.perf_counter() - t0
        stats.fetch_wall_s += wall
        stats.fetch_cpu_s += (time.thread_time() - c0) if cpu_timed else wall
        stats.samples += ok
    return out
