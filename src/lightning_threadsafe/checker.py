"""``check_thread_safety``: a race detector for datasets.

It loads the same indices serially and then concurrently from several threads,
and reports the indices whose outputs differ. A difference means the dataset
shares mutable state between threads: a scratch buffer, a file handle used with
``seek()`` + ``read()``, a cache without a lock, or the process-global RNGs.
Per-sample randomness drawn from :func:`~lightning_threadsafe.sample_rng` is not a
difference: every load runs inside the same ``(seed, epoch, index)`` sample context.

Races are timing-dependent: a report with ``safe=True`` means no race was seen
in ``rounds`` concurrent passes, not that none exists. More rounds and threads,
and indices whose loads take a while, make a race more likely to show.

Example::

    from lightning_threadsafe.checker import check_thread_safety

    report = check_thread_safety(MyDataset(), threads=8, rounds=3)
    print(report)            # a short summary with hints
    assert report.safe, report.differing_indices
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_threadsafe.resources import ThreadLocalResource, find_resources
from lightning_threadsafe.rng import sample_context

__all__ = ["ThreadSafetyReport", "check_thread_safety"]

# How long a checker thread waits at the start barrier for its peers; the
# barrier only makes the threads overlap, so a timeout just loses the overlap.
_BARRIER_TIMEOUT_S = 30.0

_RNG_HINTS = {
    "numpy": "np.random global RNG was used during loading; "
             "use lightning_threadsafe.sample_rng() instead",
    "random": "the `random` module's global RNG was used during loading; "
              "use lightning_threadsafe.sample_rng() instead",
    "torch": "torch's global RNG was used during loading (torch.rand/randn/randint or "
             "transforms without a generator); "
             "use lightning_threadsafe.sample_torch_generator() instead",
}


@dataclass
class ThreadSafetyReport:
    """What :func:`check_thread_safety` found.

    Attributes:
        safe: no differing index and no global RNG use.
        differing_indices: indices whose concurrent output (or error) differed
            from the serial one in at least one round, sorted.
        global_rng: global RNGs used by the serial pass, among ``'numpy'``,
            ``'random'``, ``'torch'``.
        errors: ``{index: repr(exception)}`` for indices that raised (the serial
            error when there was one); errors are recorded, not raised.
        checked: how many indices were checked.
        threads, rounds: the concurrency used.
        hints: what to do about each finding.
    """

    safe: bool
    differing_indices: list[int] = field(default_factory=list)
    global_rng: list[str] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    checked: int = 0
    threads: int = 0
    rounds: int = 0
    hints: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        verdict = "SAFE" if self.safe else "UNSAFE"
        parts = [
            f"ThreadSafetyReport: {verdict} -- {len(self.differing_indices)}/{self.checked} "
            f"indices differ ({self.threads} threads x {self.rounds} rounds)"
        ]
        if self.differing_indices:
            shown = ", ".join(str(i) for i in self.differing_indices[:10])
            more = ", ..." if len(self.differing_indices) > 10 else ""
            parts.append(f"  differing indices: [{shown}{more}]")
        if self.global_rng:
            parts.append(f"  global RNG used: {', '.join(self.global_rng)}")
        if self.errors:
            parts.append(f"  {len(self.errors)} indices raised")
        parts.extend(f"  hint: {h}" for h in self.hints)
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (lists, dicts, ints, strings)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- comparison
def _float_equal(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _outputs_equal(a: Any, b: Any) -> bool:
    """Exact, NaN-aware structural equality of two samples."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
        return torch.equal(a, b)
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        if not (isinstance(a, (np.ndarray, np.generic)) and isinstance(b, (np.ndarray, np.generic))):
            return False
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype == object:
            return all(_outputs_equal(x, y) for x, y in zip(a.ravel(), b.ravel()))
        try:
            return bool(np.array_equal(a, b, equal_nan=True))
        except TypeError:  # dtypes without NaN (strings, bytes, structured)
            return bool(np.array_equal(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return _float_equal(a, b)
    if isinstance(a, complex):
        return _float_equal(a.real, b.real) and _float_equal(a.imag, b.imag)
    if isinstance(a, (str, bytes, int, bool, type(None))):
        return a == b
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_outputs_equal(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b
    if isinstance(a, Sequence):
        return len(a) == len(b) and all(_outputs_equal(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(_outputs_equal(getattr(a, f.name), getattr(b, f.name))
                   for f in dataclasses.fields(a))
    try:
        result = a == b
        if isinstance(result, bool):
            return result
        return bool(np.all(np.asarray(result)))
    except Exception:
        return repr(a) == repr(b)


# ---------------------------------------------------------------------- loading
class _Outcome:
    """One load of one index: its output snapshot, or the exception it raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error

    def same_as(self, other: _Outcome) -> bool:
        if self.error is not None or other.error is not None:
            return (self.error is not None and other.error is not None
                    and type(self.error) is type(other.error)
                    and str(self.error) == str(other.error))
        return _outputs_equal(self.value, other.value)


def _load(dataset: Any, index: int, seed: int, epoch: int) -> _Outcome:
    """Load one index inside its sample context; snapshot the output or keep the error."""
    try:
        with sample_context(seed, epoch, index):
            value = dataset[index]
        # Snapshot at once, so an output that aliases shared state (a buffer the
        # next load overwrites) is compared as it was when it was returned.
        try:
            value = copy.deepcopy(value)
        except Exception:  # not copyable (e.g. holds a handle): compare as is
            pass
        return _Outcome(value=value)
    except Exception as exc:
        return _Outcome(error=exc)


def _rng_states() -> dict[str, Any]:
    return {
        "numpy": np.random.get_state(),
        "random": random.getstate(),
        "torch": torch.random.get_rng_state(),
    }


def _rng_changed(before: Any, after: Any) -> bool:
    if isinstance(before, torch.Tensor):
        return not torch.equal(before, after)
    if isinstance(before, tuple) and before and before[0] == "MT19937":  # numpy
        return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(before, after))
    return before != after


def _restore_rng_states(states: dict[str, Any]) -> None:
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
    torch.random.set_rng_state(states["torch"])


def _concurrent_round(dataset: Any, order: list[int], threads: int, seed: int, epoch: int,
                      round_no: int, locals_: list[ThreadLocalResource],
                      close_errors: list[str]) -> dict[int, _Outcome]:
    """Load ``order`` with ``threads`` threads; thread k takes order[k::threads].

    Like the loader's workers, each thread closes its instances of the dataset's
    :class:`ThreadLocalResource` objects (``locals_``) before it exits; a close
    error is appended to ``close_errors``.
    """
    # Each thread writes only the keys of its own share (and its own slot of
    # closing), and the caller reads them after join() (a happens-before edge),
    # so no lock is needed.
    shares: list[dict[int, _Outcome]] = [{} for _ in range(threads)]
    closing: list[list[str]] = [[] for _ in range(threads)]
    # Releases all threads at once so that their loads overlap; every thread
    # waits on it once, with a timeout (a broken barrier only loses overlap).
    barrier = threading.Barrier(threads, timeout=_BARRIER_TIMEOUT_S)

    def work(k: int) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        try:
            for index in order[k::threads]:
                shares[k][index] = _load(dataset, index, seed, epoch)
        finally:
            for res in locals_:
                try:
                    res.close_current_thread()
                except Exception as exc:
                    closing[k].append(f"closing {res.name!r} on a check thread raised {exc!r}")

    workers = [
        threading.Thread(target=work, args=(k,), name=f"lts-check-{round_no * threads + k}",
                         daemon=True)
        for k in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        # User code in __getitem__ cannot be interrupted: a load that never
        # returns blocks the check here (the join loop keeps Ctrl-C working).
        while t.is_alive():
            t.join(timeout=1.0)
    merged: dict[int, _Outcome] = {}
    for share, errs in zip(shares, closing):
        merged.update(share)
        close_errors.extend(errs)
    return merged


def _check_positive(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}={value!r} must be {kind}")


def _spread(n: int, m: int) -> list[int]:
    """``min(n, m)`` distinct indices of ``range(n)`` evenly spaced, ``0`` and ``n - 1`` included."""
    if n <= m:
        return list(range(n))
    if m == 1:
        return [0]
    return sorted({(k * (n - 1)) // (m - 1) for k in range(m)})


def check_thread_safety(
    dataset: Any,
    indices: Sequence[int] | None = None,
    *,
    threads: int = 8,
    rounds: int = 3,
    seed: int = 0,
    epoch: int = 0,
    max_samples: int = 64,
) -> ThreadSafetyReport:
    """Load indices serially, then concurrently, and report the ones that differ.

    The serial pass loads each index once inside ``sample_context(seed, epoch, i)``
    and watches the process-global RNGs (numpy, ``random``, torch): if any of them
    moved, the dataset draws from it, which is never reproducible under threads.
    Then, ``rounds`` times, ``threads`` threads named ``lts-check-<n>`` start
    together (a barrier) and load the indices in a shuffled order (a different,
    deterministic order each round); every output is compared with the serial one
    (tensors, arrays, dicts, lists, scalars, strings; exact and NaN-aware). The
    global RNG states are restored when the check ends; every thread has been
    joined when it returns, after closing its instances of the dataset's
    :class:`~lightning_threadsafe.resources.ThreadLocalResource` objects (as the
    loader's workers do); the instances the serial pass made on the calling
    thread stay open for the caller.

    Args:
        dataset: anything with ``__getitem__`` (and ``__len__`` when ``indices``
            is ``None``).
        indices: the indices to check; ``None`` checks ``min(len(dataset), max_samples)``
            indices spread evenly over the whole index space, first and last included
            (datasets whose indices are positions -- voxel centres, chunks -- differ from
            one end to the other). Duplicates are checked once.
        threads: concurrent threads per round (>= 1).
        rounds: concurrent passes (>= 1).
        seed, epoch: the sample context of every load (ints >= 0).
        max_samples: the number of indices checked when ``indices`` is ``None`` (>= 1).

    Returns:
        A :class:`ThreadSafetyReport`. Exceptions raised by samples are recorded
        in ``errors``; an index that raises in some loads only is a difference.

    Raises:
        TypeError: ``dataset`` has no ``__getitem__`` (or no ``__len__`` while
            ``indices`` is ``None``), or ``indices`` is not a sequence of ints.
        ValueError: a numeric argument is out of range (the message names it).
    """
    if not hasattr(dataset, "__getitem__"):
        raise TypeError(f"dataset={dataset!r} must support dataset[i] (__getitem__)")
    _check_positive("threads", threads, 1)
    _check_positive("rounds", rounds, 1)
    _check_positive("max_samples", max_samples, 1)
    _check_positive("seed", seed, 0)
    _check_positive("epoch", epoch, 0)
    if indices is None:
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(
                f"dataset={dataset!r} has no __len__; pass indices=[...] to choose what to check"
            ) from None
        index_list = _spread(n, max_samples)
    else:
        if isinstance(indices, (str, bytes, Mapping)) or not hasattr(indices, "__iter__"):
            raise TypeError(f"indices={indices!r} must be a sequence of ints or None")
        index_list = []
        for i in list(indices):
            if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.is_floating_point():
                i = int(i)
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"indices contains {i!r}; every index must be an int")
            index_list.append(int(i))
        index_list = list(dict.fromkeys(index_list))

    locals_ = [r for r in find_resources(dataset) if isinstance(r, ThreadLocalResource)]
    close_errors: list[str] = []
    original_rng = _rng_states()
    try:
        serial = {i: _load(dataset, i, seed, epoch) for i in index_list}
        after = _rng_states()
        global_rng = [k for k in ("numpy", "random", "torch")
                      if _rng_changed(original_rng[k], after[k])]
        # The global RNGs are deliberately *not* reset before the concurrent
        # rounds: a dataset drawing from them then yields different numbers for
        # every index, so the race is reported deterministically.
        differing: set[int] = set()
        errors: dict[int, str] = {i: repr(o.error) for i, o in serial.items() if o.error}
        for r in range(rounds):
            order = list(index_list)
            random.Random(seed * 1_000_003 + epoch * 1009 + r).shuffle(order)
            results = _concurrent_round(dataset, order, threads, seed, epoch, r, locals_,
                                        close_errors)
            for i in index_list:
                outcome = results.get(i) or _Outcome(error=RuntimeError(
                    f"the load of index {i} did not complete (its thread ended early)"))
                if not outcome.same_as(serial[i]):
                    differing.add(i)
                if outcome.error is not None and i not in errors:
                    errors[i] = repr(outcome.error)
    finally:
        _restore_rng_states(original_rng)

    hints = [_RNG_HINTS[k] for k in global_rng]
    if differing:
        hints.append(
            f"{len(differing)} of {len(index_list)} indices gave different outputs when loaded "
            "concurrently: the dataset shares mutable state between threads (a scratch buffer, "
            "a file handle used with seek()+read(), an unlocked cache). Give each thread its "
            "own with ThreadLocalResource, or guard the shared object with ThreadSafeResource"
        )
    if errors:
        hints.append(f"{len(errors)} indices raised; see `errors` (their exceptions were "
                     "compared, not their outputs)")
    hints.extend(dict.fromkeys(close_errors))
    return ThreadSafetyReport(
        safe=not differing and not global_rng,
        differing_indices=sorted(differing),
        global_rng=global_rng,
        errors=dict(sorted(errors.items())),
        checked=len(index_list),
        threads=threads,
        rounds=rounds,
        hints=hints,
    )
