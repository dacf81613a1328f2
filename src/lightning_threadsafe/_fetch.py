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

__all__ = ["SKIPPED", "FetchPolicy", "Skipped", "load_sample"]

_MAX_BACKOFF_S = 2.0


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


SKIPPED = Skipped  # the type doubles as the check: isinstance(x, SKIPPED)


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
) -> Any:
    """Return ``dataset[index]`` under the sample context of ``(seed, epoch, index)``.

    Returns a :class:`Skipped` marker when the policy skips the sample.

    Raises:
        SampleLoadError: the sample failed and the policy raises; the original
            exception is chained as ``__cause__``. Exceptions that are not
            ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) are never
            retried or skipped.
    """
    attempts = 0
    retries = policy.max_retries if policy.on_error == "retry" else 0
    while True:
        attempts += 1
        t0 = time.perf_counter()
        c0 = time.thread_time()
        prev = _rng.current_sample_context()
        _rng._local.ctx = _rng.SampleContext(policy.seed, epoch, _rng._index_key(index))
        try:
            value = dataset[index]
        except BaseException as exc:
            failure: BaseException | None = exc
        else:
            failure = None
        finally:
            _rng._local.ctx = prev
            if stats is not None:
                stats.fetch_wall_s += time.perf_counter() - t0
                stats.fetch_cpu_s += time.thread_time() - c0
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
            delay = min(policy.backoff_s * (2 ** (attempts - 1)), _MAX_BACKOFF_S)
            # Interruptible backoff: a stopping loader does not wait it out.
            if stop is not None:
                if stop.wait(delay):
                    fatal = True
            else:
                time.sleep(delay)
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
