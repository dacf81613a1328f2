"""Resources a dataset shares with the loader's worker threads.

* :class:`ThreadLocalResource` -- one instance per thread (file handles, database
  connections, store clients), created lazily on first use and closed on the
  thread that made it.
* :class:`ThreadSafeResource` -- one shared object behind a lock, with contention
  statistics (how often and how long threads waited for it).
* :func:`find_resources` -- finds the resources a dataset holds, so the loader's
  ``ThreadSafetyManager`` can register, report and close them automatically.

Both resource types pickle without their instances and locks: a process worker
that unpickles a dataset builds its own.
"""

from __future__ import annotations

import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from lightning_threadsafe.config import check_timeout
from lightning_threadsafe.deadlock import DeadlockDetector, active_detector

__all__ = ["ThreadLocalResource", "ThreadSafeResource", "find_resources"]

T = TypeVar("T")


def _default_close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


def _raise_first(errors: list[BaseException]) -> None:
    if errors:
        first = errors[0]
        if len(errors) > 1 and hasattr(first, "add_note"):  # Python >= 3.11
            for other in errors[1:]:
                first.add_note(f"also failed while closing: {other!r}")
        raise first


class _Slot:
    """One thread's instance and a weak reference to the thread that owns it."""

    __slots__ = ("instance", "owner")

    def __init__(self, instance: Any, owner: threading.Thread) -> None:
        self.instance = instance
        self.owner = weakref.ref(owner)


class ThreadLocalResource(Generic[T]):
    """One instance of a resource per thread, created lazily by :meth:`get`.

    Guarantees:
        * No instance is ever handed to two threads: a thread only ever receives
          the instance its own ``get()`` created (``instances_open`` ==
          number of threads that called ``get()`` and have not been closed).
        * ``close_current_thread()`` closes the calling thread's instance on that
          thread (sqlite3 connections, for one, must be closed where they were made).
        * Thread identifiers can be reused by the OS after a thread ends; an
          instance left behind by an ended thread is never given to the new thread
          with the same identifier -- it is kept for :meth:`close_all`.

    The loader's worker threads call :meth:`close_current_thread` as they exit.

    Args:
        factory: builds one instance; called on the thread that will use it.
        close: closes one instance; by default calls ``instance.close()`` when it
            exists.
        name: a label for reports (default: the factory's name).

    Example::

        db = ThreadLocalResource(lambda: sqlite3.connect("index.db"), name="index-db")

        class Rows(Dataset):
            def __getitem__(self, i):
                return db.get().execute("SELECT x FROM t WHERE id=?", (i,)).fetchone()

    Pickling keeps ``factory``, ``close`` and ``name`` (so they must be
    picklable: module-level functions or ``functools.partial``, not lambdas) and
    drops the instances.
    """

    def __init__(self, factory: Callable[[], T], close: Callable[[T], None] | None = None, *,
                 name: str | None = None) -> None:
        if not callable(factory):
            raise TypeError(f"factory={factory!r} must be a callable returning a new instance")
        if close is not None and not callable(close):
            raise TypeError(f"close={close!r} must be a callable taking an instance, or None")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name={name!r} must be a str or None")
        self._factory = factory
        self._close = close
        self.name = name if name is not None else getattr(factory, "__qualname__", repr(factory))
        self._init_state()

    def _init_state(self) -> None:
        # Guards _slots, _orphans and _created. Held only for dict operations:
        # never while a factory or close function runs. Any thread calling
        # get()/close_*()/stats() takes it briefly; nobody waits long.
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}  # thread ident -> that thread's instance
        self._orphans: list[Any] = []  # instances whose thread ended without closing
        self._created = 0

    # ------------------------------------------------------------------ access
    def get(self) -> T:
        """This thread's instance, created by ``factory()`` on first use.

        Raises:
            Whatever ``factory()`` raises (nothing is stored then).
        """
        ident = threading.get_ident()
        me = threading.current_thread()
        with self._lock:
            slot = self._slots.get(ident)
            if slot is not None:
                if slot.owner() is me:
                    return slot.instance
                # The ident belonged to a thread that ended without closing.
                del self._slots[ident]
                self._orphans.append(slot.instance)
        # Only this thread creates the instance for its ident, so the factory runs
        # outside the lock (it may be slow) without any risk of a double creation.
        instance = self._factory()
        with self._lock:
            self._slots[ident] = _Slot(instance, me)
            self._created += 1
        return instance

    __call__ = get

    # ------------------------------------------------------------------ closing
    def _close_one(self, instance: Any) -> None:
        (self._close or _default_close)(instance)

    def close_current_thread(self) -> bool:
        """Close the calling thread's instance, on this thread.

        Returns:
            ``True`` if there was an instance to close. Safe to call twice.

        Raises:
            Whatever the close function raises (the instance is forgotten anyway).
        """
        ident = threading.get_ident()
        me = threading.current_thread()
        with self._lock:
            slot = self._slots.get(ident)
            if slot is None or slot.owner() is not me:
                return False
            del self._slots[ident]
        self._close_one(slot.instance)
        return True

    def close_all(self) -> int:
        """Close every remaining instance from the *calling* thread.

        Caveat: resources bound to the thread that created them (sqlite3
        connections with ``check_same_thread=True``, some GPU or store clients)
        cannot be closed from another thread -- their owners should call
        :meth:`close_current_thread` first, which the loader's workers do. Call
        this only when no thread is using the resource any more; an instance
        created concurrently with ``close_all()`` stays open. Every instance is
        attempted; the first error is raised afterwards (later ones are attached
        as notes).

        Returns:
            How many instances were closed.
        """
        with self._lock:
            instances = [slot.instance for slot in self._slots.values()] + self._orphans
            self._slots = {}
            self._orphans = []
        errors: list[BaseException] = []
        for instance in instances:
            try:
                self._close_one(instance)
            except Exception as exc:
                errors.append(exc)
        _raise_first(errors)
        return len(instances)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """``{"name", "instances_created", "instances_open"}``."""
        with self._lock:
            return {
                "name": self.name,
                "instances_created": self._created,
                "instances_open": len(self._slots) + len(self._orphans),
            }

    def __repr__(self) -> str:
        s = self.stats()
        return (f"ThreadLocalResource(name={s['name']!r}, instances_open={s['instances_open']}, "
                f"instances_created={s['instances_created']})")

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self._factory, "close": self._close, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._factory = state["factory"]
        self._close = state["close"]
        self.name = state["name"]
        self._init_state()


class ThreadSafeResource(Generic[T]):
    """One shared object behind a lock, with contention statistics.

    Guarantees:
        * At most one thread holds the object at a time (between ``acquire()`` and
          ``release()``, or inside ``with``).
        * ``acquisitions`` counts successful acquires; ``contended`` counts those
          that found the lock taken and had to wait (an exact count: each acquire
          tries without blocking first); ``timeouts`` counts acquires that gave up.
        * With a :class:`~lightning_threadsafe.deadlock.DeadlockDetector` attached
          (``detector=``) or active on the acquiring thread, every acquisition is
          checked against the lock-order graph *before* blocking. Without one the
          only extra cost is one integer test.

    The lock is not re-entrant: acquiring it again on the thread that holds it
    blocks (and is reported as a self-deadlock when a detector is in use).

    Args:
        obj: the shared object.
        name: the lock's name in reports and in the deadlock detector (default:
            ``"<type>@<id>"``, unique per resource).
        detector: a deadlock detector to report to (default: the active detector
            of the acquiring thread, if any).

    Example::

        tokenizer = ThreadSafeResource(load_tokenizer(), name="tokenizer")

        class Texts(Dataset):
            def __getitem__(self, i):
                with tokenizer as tok:
                    return tok.encode(self.lines[i])

    Pickling keeps ``obj`` (which must be picklable), ``name`` and the detector
    (an empty copy); the lock and the statistics start fresh.
    """

    def __init__(self, obj: T, *, name: str | None = None,
                 detector: DeadlockDetector | None = None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name={name!r} must be a str or None")
        if detector is not None and not isinstance(detector, DeadlockDetector):
            raise TypeError(f"detector={detector!r} must be a DeadlockDetector or None")
        self._obj = obj
        self._given_name = name
        self._detector = detector
        self._init_state()

    def _init_state(self) -> None:
        self.name = (self._given_name if self._given_name is not None
                     else f"{type(self._obj).__name__}@{id(self):#x}")
        # Guards the shared object: held by the one thread using it (between
        # acquire() and release()); other threads wait in acquire().
        self._lock = threading.Lock()
        # Guards the counters below. Held for a few additions; stats() readers
        # take it too, so a snapshot is consistent.
        self._stats_lock = threading.Lock()
        self._acquisitions = 0
        self._contended = 0
        self._timeouts = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._hold_total = 0.0
        # Written only by the thread holding _lock (so _lock guards them): when
        # the current hold began and which detector saw the acquisition.
        self._held_since = 0.0
        self._held_detector: DeadlockDetector | None = None

    @property
    def detector(self) -> DeadlockDetector | None:
        """The explicitly attached detector (``None`` means: the active one, if any)."""
        return self._detector

    # ------------------------------------------------------------------ locking
    def acquire(self, timeout: float | None = None) -> T:
        """Wait for the lock and return the shared object.

        Args:
            timeout: seconds to wait at most; ``None`` waits until the lock is
                free (the loader's stall watchdog reports a thread stuck here).

        Returns:
            The shared object; call :meth:`release` when done.

        Raises:
            ValueError: ``timeout`` is negative or not a number.
            TimeoutError: the lock was not free within ``timeout`` seconds.
            PotentialDeadlockError: a deadlock detector saw a lock-order cycle
                (raised before blocking).
        """
        check_timeout("timeout", timeout)
        detector = self._detector or active_detector()
        if detector is not None:
            detector.before_acquire(self.name)
        wait = 0.0
        contended = not self._lock.acquire(blocking=False)
        if contended:
            start = time.perf_counter()
            ok = self._lock.acquire(timeout=-1 if timeout is None else timeout)
            wait = time.perf_counter() - start
            if not ok:
                with self._stats_lock:
                    self._timeouts += 1
                    self._wait_total += wait
                    self._wait_max = max(self._wait_max, wait)
                raise TimeoutError(
                    f"ThreadSafeResource {self.name!r} was not free within timeout={timeout!r} s"
                )
        self._held_since = time.perf_counter()
        self._held_detector = detector
        with self._stats_lock:
            self._acquisitions += 1
            if contended:
                self._contended += 1
                self._wait_total += wait
                self._wait_max = max(self._wait_max, wait)
        if detector is not None:
            detector.after_acquire(self.name)
        return self._obj

    def release(self) -> None:
        """Release the lock taken by :meth:`acquire`.

        Raises:
            RuntimeError: the resource is not held.
        """
        if not self._lock.locked():
            raise RuntimeError(f"release() called on ThreadSafeResource {self.name!r}, "
                               "which is not acquired")
        held_for = time.perf_counter() - self._held_since
        detector = self._held_detector
        self._held_detector = None
        with self._stats_lock:
            self._hold_total += held_for
        self._lock.release()
        if detector is not None:
            detector.on_release(self.name)

    def locked(self) -> bool:
        """Whether some thread holds the resource now (a momentary answer)."""
        return self._lock.locked()

    def __enter__(self) -> T:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self.release()

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Contention statistics.

        Keys: ``name``, ``acquisitions``, ``contended``, ``timeouts``,
        ``contention_rate`` (contended / acquisitions), ``wait_seconds_total``,
        ``wait_seconds_max``, ``wait_seconds_mean`` (per contended acquisition),
        ``hold_seconds_total``.
        """
        with self._stats_lock:
            acq, cont = self._acquisitions, self._contended
            waits = cont + self._timeouts
            return {
                "name": self.name,
                "acquisitions": acq,
                "contended": cont,
                "timeouts": self._timeouts,
                "contention_rate": cont / acq if acq else 0.0,
                "wait_seconds_total": self._wait_total,
                "wait_seconds_max": self._wait_max,
                "wait_seconds_mean": self._wait_total / waits if waits else 0.0,
                "hold_seconds_total": self._hold_total,
            }

    def __repr__(self) -> str:
        return f"ThreadSafeResource(name={self.name!r}, obj={type(self._obj).__name__})"

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"obj": self._obj, "name": self._given_name, "detector": self._detector}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._obj = state["obj"]
        self._given_name = state["name"]
        self._detector = state["detector"]
        self._init_state()


# ---------------------------------------------------------------------- discovery
# Values never searched: scalars, text, arrays and tensors (their elements cannot
# be resources), and code objects (modules, classes, functions hold no dataset state).
_LEAF_TYPES: tuple[type, ...] = (
    str, bytes, bytearray, int, float, complex, bool, type(None), range, memoryview,
    np.ndarray, np.generic, torch.Tensor,
    types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
)
# A container larger than this is not searched item by item (e.g. Subset.indices).
_MAX_CONTAINER_ITEMS = 10_000


def _is_leaf(obj: Any) -> bool:
    # isinstance only: no attribute lookups, which could run arbitrary __getattr__ code.
    return isinstance(obj, _LEAF_TYPES)


def _attributes(obj: Any) -> list[Any]:
    values: list[Any] = []
    try:
        values.extend(vars(obj).values())
    except TypeError:
        pass
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            try:
                values.append(getattr(obj, slot))
            except AttributeError:
                pass
    return values


def find_resources(obj: Any, max_depth: int = 3) -> list[ThreadLocalResource | ThreadSafeResource]:
    """The resources held by a dataset, in discovery order, each once.

    Searches ``obj`` itself, its attributes (``vars()`` and ``__slots__``), and
    the items of lists, tuples, sets and dict values among them -- so nested
    datasets such as ``Subset.dataset`` and ``ConcatDataset.datasets`` are
    searched too. Each attribute hop counts one level of ``max_depth``; items of
    a container are at the container's level. Cycles are safe (every object is
    visited once); arrays, tensors, strings, numbers, modules, classes and
    functions are not searched, nor containers of more than 10,000 items.

    Args:
        obj: a dataset (or any object).
        max_depth: how many attribute hops to follow from ``obj`` (>= 0).

    Returns:
        The :class:`ThreadLocalResource` and :class:`ThreadSafeResource` objects found.

    Raises:
        ValueError: ``max_depth`` is not an int >= 0.

    Example::

        ds = ConcatDataset([Volumes(handles=ThreadLocalResource(open_store)), Labels()])
        find_resources(ds)  # [ThreadLocalResource(...)]
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth={max_depth!r} must be an int >= 0")
    found: list[ThreadLocalResource | ThreadSafeResource] = []
    seen: set[int] = set()
    # Depth-first, pre-order; each stack entry is (object, attribute hops so far).
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if _is_leaf(node) or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, (ThreadLocalResource, ThreadSafeResource)):
            found.append(node)
            continue
        if isinstance(node, (dict, list, tuple, set, frozenset)):
            if len(node) > _MAX_CONTAINER_ITEMS:
                continue
            children = list(node.values()) if isinstance(node, dict) else list(node)
            child_depth = depth
        elif depth < max_depth:
            children, child_depth = _attributes(node), depth + 1
        else:
            continue
        stack.extend((child, child_depth) for child in reversed(children))
    return found
