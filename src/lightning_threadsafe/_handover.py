"""The hand-over of the rest of an epoch from the thread pool to another executor.

When the online probe decides that threads are the wrong executor, the thread
iterator stops admitting batches, and the plan not yet started (including
admitted batches no worker has touched) goes to the next executor: inline
loading for samples too cheap for threads, or torch's worker processes for
GIL-bound samples. The next executor's iterator is driven by the thread
iterator, which stays the one object the consumer holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from lightning_threadsafe._epoch import BaseIterator, EpochSpec
from lightning_threadsafe._exec_inline import InlineIterator
from lightning_threadsafe._exec_process import ProcessIterator

__all__ = ["next_executor"]


def next_executor(spec: EpochSpec, kind: str,
                  source: Iterator[tuple[int, list[Any]]]) -> BaseIterator[Any]:
    """The iterator that loads ``source`` (the rest of the epoch) with ``kind``.

    ``kind``: ``"inline"`` or ``"process"`` (with the settings the probe resolved).
    """
    values = spec.settings.values
    if kind == "process":
        rest = dataclasses.replace(spec, executor="process",
                                   num_workers=int(values["num_workers"]))
        it: BaseIterator[Any] = ProcessIterator(rest, source, [], None)
    elif kind == "inline":
        rest = dataclasses.replace(spec, executor="thread", num_workers=0)
        it = InlineIterator(rest, source, [], None)
    else:  # pragma: no cover - the thread iterator passes only the two kinds
        raise ValueError(f"kind={kind!r} must be 'inline' or 'process'")
    it._started = True  # the thread iterator told the loader already
    return it
