"""The one answer to "may batch k start?": prefetch depth x memory governor, with a floor.

Consumer thread only. A batch may start when

- nothing is outstanding (the batch the consumer needs next always starts), or
- fewer samples are still to load than there are workers (start-up concurrency is
  at least ``num_workers`` samples, whatever the budget: samples that must load
  together -- a barrier, a shared prefetch -- never wait for work not yet started), or
- fewer than ``depth`` batches are outstanding and the governor has room.

Bytes in the ready buffer stay bounded by the governor's gate on the workers
(``MemoryGovernor.wait_for_room``), which the floor does not bypass.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning_threadsafe._epoch import LiveSettings
from lightning_threadsafe._worker import BatchState
from lightning_threadsafe.memory import MemoryGovernor

__all__ = ["Admission"]


class Admission:
    """Decides admission for one epoch of the thread executor."""

    def __init__(self, settings: LiveSettings, governor: MemoryGovernor | None) -> None:
        self._settings = settings
        self._governor = governor

    def may_start(self, outstanding: Iterable[BatchState], count: int, workers: int,
                  *, probing: bool) -> bool:
        """Whether one more batch may start now.

        Args:
            outstanding: the admitted batches not yet delivered (oldest first).
            count: how many there are.
            workers: the pool's live size.
            probing: the online probe runs (the settings may still say "auto").
        """
        if count == 0:
            return True
        depth = self._settings.depth(self._governor, workers if probing else None)
        gov = self._governor
        unfinished = [b for b in outstanding if not b.done]
        if count < depth and (gov is None or gov.admit(pending_batches=len(unfinished),
                                                         required=False)):
            return True
        # The floor: every worker has a sample to load. `remaining` is read without the
        # batch lock: a stale (higher) value only delays the next admission to the next
        # consumer turn, it never admits past the floor.
        return sum(b.remaining for b in unfinished) < workers
