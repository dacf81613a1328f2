"""``DeadlockDetector``: a lock-order graph that reports potential deadlocks before they happen.

Modelled on Linux's *lockdep*: every time a thread acquires lock ``B`` while it
holds lock ``A``, the detector records the edge ``A -> B`` together with the
*acquisition site* (``file:line`` of the user's code that took ``B``). If an
acquisition would add an edge that closes a cycle -- some other code path has
already taken the locks in the opposite order -- the detector raises
:class:`~lightning_threadsafe.errors.PotentialDeadlockError` naming both locks,
both sites and the whole cycle, *before* the underlying lock is acquired. The two
orders never have to overlap in time: one run that exercises both code paths,
one after the other, is enough to find the bug.

The detector is opt-in and costs nothing when it is off: a
:class:`~lightning_threadsafe.resources.ThreadSafeResource` consults it only when
one is attached explicitly or :meth:`DeadlockDetector.activate` made one *active*
on the current thread (the loader's worker threads run inside ``activate()`` in
debug mode). :func:`active_detector` answers ``None`` with a single integer test
while no detector is active anywhere in the process.

Re-entrant acquisition (a thread acquires a lock key it already holds):

* for a re-entrant lock (``reentrant=True``; ``tracked_lock`` infers it for an
  ``RLock``) it adds no edge and is never reported -- it only deepens the hold,
  and the key stays held until the matching number of releases;
* for a non-re-entrant lock (``threading.Lock``, every ``ThreadSafeResource``)
  it is a certain self-deadlock, reported as the one-lock cycle ``[A, A]`` whose
  ``conflicting_site`` is where the thread first took ``A``.

Lock keys are names: two locks that share a name are one lock *class* to the
detector, as in lockdep (give each resource its own name, or leave the default
which is unique per object).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from lightning_threadsafe.errors import PotentialDeadlockError

__all__ = ["DeadlockDetector", "TrackedLock", "active_detector"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB_FILE = contextlib.__file__
_RLOCK_TYPE = type(threading.RLock())

# The active detector of each thread (set by DeadlockDetector.activate). A
# threading.local is per-thread state: no lock needed, free-threading safe.
_local = threading.local()
# How many activate() blocks are open in the whole process. Written under
# _active_count_lock; read without it by active_detector() as a fast path. A
# stale read is harmless: a thread that activated a detector itself wrote the
# count before reading it, and any other thread's thread-local slot is empty.
_active_count = 0
_active_count_lock = threading.Lock()  # guards writes of _active_count; held for one add


def active_detector() -> DeadlockDetector | None:
    """The detector made active on the current thread by :meth:`DeadlockDetector.activate`.

    Returns ``None`` outside any ``activate()`` block (the common case costs one
    integer test).
    """
    if not _active_count:
        return None
    return getattr(_local, "detector", None)


def _caller_site() -> str:
    """``file:line`` of the innermost frame outside this package (and contextlib)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE_DIR) and filename != _CONTEXTLIB_FILE:
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>:0"


class _Held:
    """One lock key held by the current thread (an entry of its held stack)."""

    __slots__ = ("depth", "key", "site")

    def __init__(self, key: str, site: str) -> None:
        self.key = key
        self.site = site
        self.depth = 1  # re-entrant holds of the same key by this thread


class DeadlockDetector:
    """Lock-order graph over instrumented locks; reports cycles before they deadlock.

    Guarantees:
        * An edge ``A -> B`` exists iff some thread acquired (or tried to acquire)
          ``B`` while holding ``A``; its site is the first such acquisition seen.
        * With ``raise_on_cycle=True`` the graph stays acyclic: an acquisition that
          would close a cycle raises before the underlying lock is touched and adds
          no edge.
        * With ``raise_on_cycle=False`` each offending edge is reported once in
          :attr:`reports` and then added, so the same order is not reported again.

    Each thread's held stack lives in a thread-local; the graph and the reports
    are guarded by one internal (untracked) lock.

    Args:
        raise_on_cycle: raise :class:`PotentialDeadlockError` (default) or only
            record it in :attr:`reports`.

    Example::

        detector = DeadlockDetector()
        a, b = detector.tracked_lock("a"), detector.tracked_lock("b")
        with a:
            with b:      # records a -> b at this line
                ...
        with b:
            with a:      # raises PotentialDeadlockError: b -> a closes a cycle
                ...
    """

    def __init__(self, *, raise_on_cycle: bool = True) -> None:
        if not isinstance(raise_on_cycle, bool):
            raise TypeError(f"raise_on_cycle={raise_on_cycle!r} must be True or False")
        self.raise_on_cycle = raise_on_cycle
        self._init_state()

    def _init_state(self) -> None:
        # Guards _edges and _reports. Held only for a dict update or a graph
        # search, never while a tracked lock is acquired; nobody waits on it long.
        self._graph_lock = threading.Lock()
        # _edges[a][b] = site where b was first acquired while a was held
        # (insertion ordered, so edges() is reproducible).
        self._edges: dict[str, dict[str, str]] = {}
        self._reports: list[PotentialDeadlockError] = []
        # Per-thread state: .held (stack of _Held) and .pending ({key: site} between
        # before_acquire and after_acquire). Only the owning thread touches it.
        self._tls = threading.local()

    # Pickling (a dataset holding resources with a detector goes to a process
    # worker): the copy is an empty detector with the same settings.
    def __getstate__(self) -> dict[str, Any]:
        return {"raise_on_cycle": self.raise_on_cycle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.raise_on_cycle = state["raise_on_cycle"]
        self._init_state()

    def __repr__(self) -> str:
        with self._graph_lock:
            n_edges = sum(len(v) for v in self._edges.values())
            n_reports = len(self._reports)
        return (f"DeadlockDetector(raise_on_cycle={self.raise_on_cycle}, edges={n_edges}, "
                f"reports={n_reports})")

    # ------------------------------------------------------------------ activation
    @contextlib.contextmanager
    def activate(self) -> Iterator[DeadlockDetector]:
        """Make this detector the active detector of the current thread (nests)."""
        global _active_count
        prev = getattr(_local, "detector", None)
        with _active_count_lock:
            _active_count += 1
        _local.detector = self
        try:
            yield self
        finally:
            _local.detector = prev
            with _active_count_lock:
                _active_count -= 1

    # ------------------------------------------------------------------ instrumentation
    def _held_stack(self) -> list[_Held]:
        held = getattr(self._tls, "held", None)
        if held is None:
            held = self._tls.held = []
            self._tls.pending = {}
        return held

    def before_acquire(self, lock_key: str, site: str | None = None, *,
                       reentrant: bool = False) -> None:
        """Check and record the ordering implied by acquiring ``lock_key`` now.

        Call it before blocking on the underlying lock; call :meth:`after_acquire`
        once it is held and :meth:`on_release` after releasing it, all on the same
        thread.

        Args:
            lock_key: the lock's name (its identity in the graph).
            site: ``file:line`` of the acquisition; by default the innermost frame
                outside this package.
            reentrant: whether the lock may be re-acquired by the thread holding it.

        Raises:
            PotentialDeadlockError: (with ``raise_on_cycle=True``) the acquisition
                would close a cycle in the lock-order graph, or would re-acquire a
                non-re-entrant lock this thread holds.
        """
        if site is None:
            site = _caller_site()
        held = self._held_stack()
        pending = self._tls.pending
        pending[lock_key] = site
        if not held:
            return
        for h in held:
            if h.key == lock_key:
                if not reentrant:
                    error = self._self_deadlock(lock_key, site, h.site)
                    if self.raise_on_cycle:
                        pending.pop(lock_key, None)
                        raise error
                    with self._graph_lock:
                        self._reports.append(error)
                return  # a re-entrant hold adds no ordering
        error = None
        with self._graph_lock:
            new_from: list[str] = []
            # Innermost held lock first: its conflict is the most local one.
            for h in reversed(held):
                outgoing = self._edges.get(h.key)
                if outgoing is not None and lock_key in outgoing:
                    continue  # already checked when the edge was added
                new_from.append(h.key)
                if error is None:
                    # A shortest path from lock_key never uses an edge into
                    # lock_key, so the edges not yet added cannot matter here.
                    path = self._path(lock_key, h.key)
                    if path is not None:
                        error = self._cycle_error(h, lock_key, site, path)
            if error is not None:
                if self.raise_on_cycle:
                    pending.pop(lock_key, None)
                    raise error  # the graph is left exactly as it was
                self._reports.append(error)
            for key in new_from:
                self._edges.setdefault(key, {})[lock_key] = site

    def after_acquire(self, lock_key: str) -> None:
        """Push ``lock_key`` on this thread's held stack (the lock is now held)."""
        held = self._held_stack()
        site = self._tls.pending.pop(lock_key, "<unknown>:0")
        for h in held:
            if h.key == lock_key:
                h.depth += 1
                return
        held.append(_Held(lock_key, site))

    def on_release(self, lock_key: str) -> None:
        """Pop ``lock_key`` from this thread's held stack (out-of-order release is fine).

        A key this thread does not hold (released on another thread, or acquired
        before the detector was attached) is ignored.
        """
        held = self._held_stack()
        for pos in range(len(held) - 1, -1, -1):
            if held[pos].key == lock_key:
                held[pos].depth -= 1
                if held[pos].depth == 0:
                    del held[pos]
                return

    def held_locks(self) -> list[str]:
        """The lock keys the current thread holds, outermost first."""
        return [h.key for h in self._held_stack()]

    def tracked_lock(self, name: str, lock: Any = None, *, reentrant: bool | None = None) -> TrackedLock:
        """A lock (a new ``threading.Lock`` unless ``lock`` is given) that reports to this detector.

        Args:
            name: the lock's key in the graph.
            lock: an object with ``acquire(blocking, timeout)``/``release()``.
            reentrant: whether the lock is re-entrant; inferred for ``threading.RLock``.
        """
        return TrackedLock(self, name, lock, reentrant=reentrant)

    # ------------------------------------------------------------------ results
    def edges(self) -> list[tuple[str, str, str]]:
        """Every recorded ordering as ``(held lock, acquired lock, acquisition site)``."""
        with self._graph_lock:
            return [(a, b, site) for a, out in self._edges.items() for b, site in out.items()]

    @property
    def reports(self) -> list[PotentialDeadlockError]:
        """Potential deadlocks recorded with ``raise_on_cycle=False`` (a copy)."""
        with self._graph_lock:
            return list(self._reports)

    def reset(self) -> None:
        """Forget every edge and report.

        Held stacks are per-thread and describe locks really held now, so they
        are kept (a lock released after ``reset()`` is still popped correctly).
        """
        with self._graph_lock:
            self._edges.clear()
            self._reports.clear()

    # ------------------------------------------------------------------ internals
    def _path(self, start: str, goal: str) -> list[tuple[str, str, str]] | None:
        """Edges of a shortest path ``start -> ... -> goal`` (caller holds _graph_lock)."""
        parent: dict[str, tuple[str, str]] = {start: (start, "")}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt, site in self._edges.get(node, {}).items():
                if nxt in parent:
                    continue
                parent[nxt] = (node, site)
                if nxt == goal:
                    path = []
                    cur = goal
                    while cur != start:
                        prev, s = parent[cur]
                        path.append((prev, cur, s))
                        cur = prev
                    return path[::-1]
                queue.append(nxt)
        return None

    def _cycle_error(self, held: _Held, key: str, site: str,
                     path: list[tuple[str, str, str]]) -> PotentialDeadlockError:
        cycle = [held.key, key] + [b for (_, b, _) in path]
        recorded = "; ".join(f"{a!r} -> {b!r} at {s}" for a, b, s in path)
        message = (
            f"potential deadlock: acquiring {key!r} at {site} while holding {held.key!r} "
            f"(acquired at {held.site}), but the opposite order was recorded: {recorded}. "
            f"Cycle: {' -> '.join(cycle)}. Take these locks in one consistent order everywhere."
        )
        return PotentialDeadlockError(
            message, first_lock=held.key, second_lock=key, site=site,
            conflicting_site=path[0][2], cycle=cycle,
        )

    @staticmethod
    def _self_deadlock(key: str, site: str, first_site: str) -> PotentialDeadlockError:
        message = (
            f"potential deadlock: acquiring {key!r} at {site} while this thread already holds "
            f"it (acquired at {first_site}); the lock is not re-entrant, so this would block "
            f"forever. Cycle: {key} -> {key}."
        )
        return PotentialDeadlockError(
            message, first_lock=key, second_lock=key, site=site,
            conflicting_site=first_site, cycle=[key, key],
        )


class TrackedLock:
    """A lock wrapper that reports acquisitions and releases to a :class:`DeadlockDetector`.

    Usable as ``with lock:`` or with ``acquire()``/``release()`` like
    ``threading.Lock``. The check runs before the underlying lock is touched, so a
    potential deadlock raises instead of blocking.

    Example::

        detector = DeadlockDetector()
        cache_lock = detector.tracked_lock("cache")
        with cache_lock:
            ...
    """

    def __init__(self, detector: DeadlockDetector, name: str, lock: Any = None, *,
                 reentrant: bool | None = None) -> None:
        if not isinstance(detector, DeadlockDetector):
            raise TypeError(f"detector={detector!r} must be a DeadlockDetector")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} must be a non-empty str")
        if lock is None:
            lock = threading.Lock()
        if not (callable(getattr(lock, "acquire", None)) and callable(getattr(lock, "release", None))):
            raise TypeError(f"lock={lock!r} must have acquire() and release() methods")
        self.detector = detector
        self.name = name
        # The wrapped lock: held by whoever acquired this TrackedLock.
        self._lock = lock
        self.reentrant = isinstance(lock, _RLOCK_TYPE) if reentrant is None else bool(reentrant)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Check the lock order, then acquire like ``threading.Lock.acquire``.

        Raises:
            PotentialDeadlockError: see :meth:`DeadlockDetector.before_acquire`.
        """
        self.detector.before_acquire(self.name, reentrant=self.reentrant)
        ok = self._lock.acquire(blocking, timeout)
        if ok:
            self.detector.after_acquire(self.name)
        return bool(ok)

    def release(self) -> None:
        self._lock.release()
        self.detector.on_release(self.name)

    def locked(self) -> bool:
        locked = getattr(self._lock, "locked", None)
        return bool(locked()) if callable(locked) else False

    def __enter__(self) -> TrackedLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"TrackedLock({self.name!r}, reentrant={self.reentrant})"
