"""The epoch's batch plan: which indices form which batch, per epoch and per rank.

:class:`BatchPlan` turns the DataLoader-style arguments (``batch_size``,
``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last``, ``generator``) into a
lazy sequence of index lists for an epoch. It is:

- **torch-compatible**: it uses torch's own ``SequentialSampler``,
  ``RandomSampler`` and ``BatchSampler``, so with the same ``generator`` the
  order is the one ``torch.utils.data.DataLoader`` produces;
- **seeded and epoch-aware**: without a generator, epoch ``e`` shuffles with a
  generator seeded from ``(seed, e)``, so shuffles differ per epoch and agree
  across ranks and restarts;
- **rank-sharded**: under ``torch.distributed`` each rank gets the
  ``DistributedSampler`` share (pad by wrapping around, or drop the tail with
  ``drop_last``), for the default samplers and for user samplers alike;
- **resumable**: a plan re-created for the same epoch yields the same batches,
  so a resume skips the batches already delivered.

User samplers must be deterministic for a given epoch (call ``set_epoch`` if
they have it) for exact resume; the default ones are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

__all__ = ["BatchPlan", "DistributedInfo", "epoch_generator"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator for shuffling epoch ``epoch`` of a loader seeded with ``seed``."""
    ss = np.random.SeedSequence([seed & ((1 << 64) - 1), epoch, 0x5348_5546])  # "SHUF"
    g = torch.Generator()
    g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1))
    return g


@dataclass(frozen=True)
class DistributedInfo:
    """Rank and world size used for sharding (``world_size == 1``: no sharding)."""

    rank: int = 0
    world_size: int = 1

    @staticmethod
    def detect() -> DistributedInfo:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return DistributedInfo(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return DistributedInfo()


class BatchPlan:
    """Lazily produces the batches of indices of one epoch.

    Args:
        dataset: a map-style dataset (``len()`` needed for the default samplers).
        batch_size: samples per batch, or ``None`` to disable automatic batching
            (each "batch" is then one index, given to ``collate_fn`` as is).
        shuffle, sampler, batch_sampler, drop_last, generator: as in
            ``torch.utils.data.DataLoader``.
        seed: base seed for epoch shuffles when ``generator`` is ``None``; ``None``: each
            epoch's order seed is given to :meth:`batches` (drawn by the loader from
            torch's global RNG, as torch's ``RandomSampler`` draws it).
        distributed: rank and world size to shard for.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int | None,
        shuffle: bool,
        sampler: Iterable[Any] | None,
        batch_sampler: Iterable[list[Any]] | None,
        drop_last: bool,
        generator: torch.Generator | None,
        seed: int | None,
        distributed: DistributedInfo = DistributedInfo(),
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.user_sampler = sampler
        self.user_batch_sampler = batch_sampler
        self.drop_last = drop_last
        self.generator = generator
        self.seed = seed
        self.distributed = distributed

    # -- per-epoch construction -------------------------------------------------

    def default_shuffle(self) -> bool:
        """Whether the order comes from the plan's own ``RandomSampler`` without a generator."""
        return (self.shuffle and self.generator is None and self.user_sampler is None
                and self.user_batch_sampler is None)

    def _index_sampler(self, epoch: int, shuffle_seed: int | None) -> Iterable[Any]:
        if self.user_sampler is not None:
            set_epoch = getattr(self.user_sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            return self.user_sampler
        if self.shuffle:
            if self.generator is not None:
                gen = self.generator
            elif shuffle_seed is not None:
                # Exactly what torch's RandomSampler does with a seed it drew itself.
                gen = torch.Generator()
                gen.manual_seed(shuffle_seed)
            else:
                gen = epoch_generator(self.seed if self.seed is not None else 0, epoch)
            return RandomSampler(self.dataset, generator=gen)
        return SequentialSampler(self.dataset)

    def _shard(self, items: list[Any]) -> list[Any]:
        """DistributedSampler semantics on a list: pad by wrap-around, then take rank::world."""
        world, rank = self.distributed.world_size, self.distributed.rank
        if world == 1:
            return items
        n = len(items)
        if n == 0:
            return items
        # With drop_last (and automatic batching), torch's DistributedSampler drops the
        # tail so that every rank gets the same number; otherwise it pads by wrapping.
        if self.drop_last and self.user_batch_sampler is None and n % world:
            per_rank = n // world
        else:
            per_rank = math.ceil(n / world)
        total = per_rank * world
        if total > n:
            reps = math.ceil(total / n)
            items = (items * reps)[:total]
        else:
            items = items[:total]
        return items[rank:total:world]

    def batches(self, epoch: int, shuffle_seed: int | None = None) -> Iterator[list[Any]]:
        """The epoch's batches of indices (lists), for this rank.

        ``shuffle_seed``: the order seed of a default shuffle without ``seed`` or
        ``generator`` (see :meth:`default_shuffle`).
        """
        if self.user_batch_sampler is not None:
            set_epoch = getattr(self.user_batch_sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            if self.distributed.world_size == 1:
                yield from (list(b) for b in self.user_batch_sampler)
            else:
                yield from (list(b) for b in self._shard([list(b) for b in self.user_batch_sampler]))
            return
        index_sampler = self._index_sampler(epoch, shuffle_seed)
        if self.distributed.world_size > 1:
            index_sampler = self._shard(list(index_sampler))
        if self.batch_size is None:
            yield from ([i] for i in index_sampler)
            return
        yield from BatchSampler(index_sampler, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        """Number of batches per epoch on this rank (raises TypeError if unknowable)."""
        if self.user_batch_sampler is not None:
            n = len(self.user_batch_sampler)  # type: ignore[arg-type]
            world = self.distributed.world_size
            return math.ceil(n / world) if world > 1 else n
        src = self.user_sampler if self.user_sampler is not None else self.dataset
        if not isinstance(src, Sized):
            raise TypeError(f"{type(src).__name__} has no len(); the loader's length is unknown")
        n = len(src)
        world = self.distributed.world_size
        if world > 1:
            n = n // world if (self.drop_last and n % world) else math.ceil(n / world)
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # -- generator state (user generators only) ----------------------------------

    def generator_state(self) -> list[int] | None:
        if self.generator is None:
            return None
        return self.generator.get_state().tolist()

    def set_generator_state(self, state: list[int] | None) -> None:
        if state is not None and self.generator is not None:
            self.generator.set_state(torch.tensor(state, dtype=torch.uint8))
