"""Stall watchdog: turns "no sample completed for ``stall_timeout`` s" into an error.

There is no watchdog thread: the consumer, which already wakes at least every
``poll`` seconds while it waits (every wait re-checks a stop signal), calls
:meth:`StallWatchdog.check`. Workers call :meth:`progress` when a sample
completes. The clock is injectable so tests drive it without sleeping.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence

from lightning_threadsafe.errors import LoaderStallError
from lightning_threadsafe.telemetry import WorkerStats

__all__ = ["StallWatchdog", "thread_stacks"]


def thread_stacks(threads: Sequence[threading.Thread]) -> dict[str, str]:
    """Formatted current stack of each live thread, by thread name."""
    frames = sys._current_frames()
    out: dict[str, str] = {}
    for t in threads:
        frame = frames.get(t.ident) if t.ident is not None else None
        out[t.name] = "".join(traceback.format_stack(frame)) if frame is not None else "<no frame>"
    return out


class StallWatchdog:
    """Detects that no progress was made for ``stall_timeout`` seconds.

    Guarantees: ``check`` returns an error only if work is outstanding and the
    last call to ``progress`` (or ``arm``) is older than ``stall_timeout``.
    ``_last`` is a single float written by workers and read by the consumer; a
    stale read can only delay detection by one poll, never cause a false one
    (it is monotonic non-decreasing).
    """

    def __init__(self, stall_timeout: float | None, *, clock: Callable[[], float] = time.monotonic):
        self.stall_timeout = stall_timeout
        self.clock = clock
        self._last = clock()
        self.stalls: list[dict[str, object]] = []

    def arm(self) -> None:
        """Restart the countdown (new epoch, or work admitted after an idle period)."""
        self._last = self.clock()

    def progress(self) -> None:
        self._last = self.clock()

    def check(
        self, workers: Sequence[tuple[threading.Thread, WorkerStats]], *, outstanding: bool
    ) -> LoaderStallError | None:
        if self.stall_timeout is None or not outstanding:
            return None
        idle = self.clock() - self._last
        if idle < self.stall_timeout:
            return None
        threads = [t for t, _ in workers]
        stacks = thread_stacks(threads)
        stuck = {t.name: s.current_index for t, s in workers}  # type: ignore[misc]
        holding = {k: v for k, v in stuck.items() if v is not None}
        lines = [
            f"no sample completed for {idle:.1f}s (stall_timeout={self.stall_timeout}s); "
            f"workers holding a sample: {holding or 'none'}"
        ]
        for name, stack in stacks.items():
            lines.append(f"--- {name} (index {stuck.get(name)!r}) ---\n{stack}")
        self.stalls.append({"idle_s": idle, "stuck": dict(stuck)})
        return LoaderStallError(
            "\n".join(lines), stall_timeout=self.stall_timeout, stuck=stuck, stacks=stacks
        )
