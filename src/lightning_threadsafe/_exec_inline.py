"""The inline executor: every sample loaded in the calling thread (``num_workers=0``).

Also the executor the online probe hands the rest of an epoch to when samples
are too cheap for worker threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from lightning_threadsafe._epoch import BaseIterator, EpochSpec, finish_batch
from lightning_threadsafe._fetch import load_many
from lightning_threadsafe._worker import BatchState

__all__ = ["InlineIterator"]

T = TypeVar("T")

class InlineIterator(BaseIterator[T]):
    """Loads each batch in the consumer's thread through the fast path (``load_many``)."""

    def __init__(self, spec: EpochSpec, source: Iterator[tuple[int, list[Any]]],
                 resumed: list[int], generator_state: list[int] | None) -> None:
        super().__init__(spec, resumed, generator_state)
        self._source = source
        self._stats = self._telemetry.register("lts-inline")

    def _next_item(self, entered: float) -> Any:
        spec = self.spec
        ordinal, indices = next(self._source)  # StopIteration ends the epoch
        batch = BatchState(ordinal, list(indices))
        # The ordinal is consumed whatever happens below: a failure is raised for it.
        self._delivered.append(ordinal)
        batch.results = load_many(spec.dataset, batch.indices, epoch=self.epoch,
                                  policy=spec.policy, stats=self._stats, ordinal=ordinal)
        finish_batch(spec, batch, self._stats, account=False)
        self._telemetry.delivered += batch.samples
        payload = batch.payload
        if spec.stager is not None and batch.samples:
            payload = spec.stager.handoff(payload)
        return payload

    def _shutdown(self) -> None:
        if self._stats is not None:
            self._telemetry.retire(self._stats)
            self._stats = None  # type: ignore[assignment]
