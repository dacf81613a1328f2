"""Exceptions raised by the loader, each naming what went wrong and where.

All three accept a single message string as their only positional argument, so
they survive being re-created by torch's process workers (``ExceptionWrapper``
rebuilds an exception as ``type(message)``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LoaderStallError", "PotentialDeadlockError", "SampleLoadError"]


class SampleLoadError(RuntimeError):
    """A sample (or the collate of a batch) raised.

    Attributes:
        index: the dataset index that failed (``None`` when collate failed).
        batch_indices: the indices of the batch the sample belonged to.
        batch_ordinal: the position of that batch in the epoch.
        attempts: how many times the sample was tried.

    The original exception is chained as ``__cause__`` with its traceback.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        batch_indices: Sequence[int] | None = None,
        batch_ordinal: int | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.index = index
        self.batch_indices = list(batch_indices) if batch_indices is not None else None
        self.batch_ordinal = batch_ordinal
        self.attempts = attempts

    def __reduce__(self):  # keep the fields across pickling (process workers)
        return (
            _rebuild_sample_error,
            (str(self), self.index, self.batch_indices, self.batch_ordinal, self.attempts),
        )


def _rebuild_sample_error(message, index, batch_indices, batch_ordinal, attempts):
    return SampleLoadError(
        message,
        index=index,
        batch_indices=batch_indices,
        batch_ordinal=batch_ordinal,
        attempts=attempts,
    )


class LoaderStallError(RuntimeError):
    """No sample completed for ``stall_timeout`` seconds.

    Attributes:
        stall_timeout: the configured limit in seconds.
        stuck: ``{thread name: index or None}``, the index each worker holds.
        stacks: ``{thread name: formatted stack}`` of every worker thread.
    """

    def __init__(
        self,
        message: str,
        *,
        stall_timeout: float | None = None,
        stuck: dict[str, int | None] | None = None,
        stacks: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.stall_timeout = stall_timeout
        self.stuck = dict(stuck or {})
        self.stacks = dict(stacks or {})


class PotentialDeadlockError(RuntimeError):
    """Two locks were taken in opposite orders by different code paths.

    Attributes:
        first_lock, second_lock: names of the two locks forming the cycle.
        site: ``file:line`` of the acquisition that would close the cycle.
        conflicting_site: ``file:line`` where the opposite order was recorded.
        cycle: the full cycle of lock names, first lock repeated at the end.
    """

    def __init__(
        self,
        message: str,
        *,
        first_lock: str | None = None,
        second_lock: str | None = None,
        site: str | None = None,
        conflicting_site: str | None = None,
        cycle: Sequence[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.first_lock = first_lock
        self.second_lock = second_lock
        self.site = site
        self.conflicting_site = conflicting_site
        self.cycle = list(cycle or [])
