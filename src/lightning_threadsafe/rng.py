"""Per-sample deterministic randomness.

Inside a sample load the loader sets a *sample context* ``(seed, epoch, index)``
for the current thread. :func:`sample_rng` and :func:`sample_torch_generator`
return generators seeded from it, so augmentations depend only on the seed,
the epoch and the sample's index -- not on the thread that ran it, the number
of threads, the executor, scheduling order or the resume point.

Example::

    from lightning_threadsafe import sample_rng

    class Crops(Dataset):
        def __getitem__(self, i):
            rng = sample_rng()          # same numbers for (seed, epoch, i) everywhere
            z, y, x = rng.integers(0, 100, size=3)
            ...

Outside a sample load (e.g. in a notebook) the functions fall back to a
context of ``(0, 0, 0)`` unless ``strict=True``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["SampleContext", "current_sample_context", "sample_context", "sample_rng",
           "sample_seed", "sample_torch_generator"]

_MASK64 = (1 << 64) - 1


class SampleContext(NamedTuple):
    """Identity of the sample being loaded on this thread (immutable; cheap to create)."""

    seed: int
    epoch: int
    index: int


# Each thread has its own slot: contexts never leak between workers. A
# threading.local is per-thread state, so no lock is needed (free-threading safe).
_local = threading.local()


def current_sample_context() -> SampleContext | None:
    """The context of the sample being loaded on this thread, or ``None``."""
    return getattr(_local, "ctx", None)


@contextlib.contextmanager
def sample_context(seed: int, epoch: int, index: int) -> Iterator[SampleContext]:
    """Set the sample context for the current thread (nests, restores on exit)."""
    prev = getattr(_local, "ctx", None)
    ctx = SampleContext(int(seed), int(epoch), _index_key(index))
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = prev


def _index_key(index: object) -> int:
    if type(index) is int:  # the hot path: plain int indices
        return index
    if isinstance(index, (int, np.integer)):
        return int(index)
    # Non-integer keys (strings, tuples): a stable hash that does not depend on
    # PYTHONHASHSEED, so it agrees across processes.
    data = repr(index).encode()
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & _MASK64
    return h


def _context(strict: bool) -> SampleContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        if strict:
            raise RuntimeError(
                "sample_rng()/sample_torch_generator() called outside a sample load; "
                "call it from Dataset.__getitem__ while a ThreadedDataLoader is loading, "
                "or pass strict=False to use the fallback context (seed=0, epoch=0, index=0)"
            )
        ctx = SampleContext(0, 0, 0)
    return ctx


def sample_seed(stream: int = 0, *, strict: bool = False) -> int:
    """A 64-bit seed derived from the current sample context and ``stream``.

    Different ``stream`` values give independent seeds for the same sample
    (e.g. one for crops, one for noise).
    """
    ctx = _context(strict)
    seq = np.random.SeedSequence(
        entropy=[ctx.seed & _MASK64, ctx.epoch & _MASK64, ctx.index & _MASK64, stream & _MASK64]
    )
    return int(seq.generate_state(1, dtype=np.uint64)[0])


def sample_rng(stream: int = 0, *, strict: bool = False) -> np.random.Generator:
    """A fresh numpy ``Generator`` seeded from ``(seed, epoch, index, stream)``."""
    return np.random.default_rng(sample_seed(stream, strict=strict))


def sample_torch_generator(
    stream: int = 0, *, device: str | torch.device = "cpu", strict: bool = False
) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``(seed, epoch, index, stream)``."""
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(stream, strict=strict) & ((1 << 63) - 1))
    return g
