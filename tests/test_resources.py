"""ThreadLocalResource, ThreadSafeResource and find_resources."""

from __future__ import annotations

import pickle
import sqlite3
import threading

import pytest
from _helpers import held_by_another_thread, run_in_thread
from torch.utils.data import ConcatDataset, Dataset, Subset

from lightning_threadsafe.resources import ThreadLocalResource, ThreadSafeResource, find_resources


class _Counter:
    """A picklable factory that counts how often it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"id": self.calls, "closed": False}


def _mark_closed(obj: dict) -> None:
    obj["closed"] = True


# ---------------------------------------------------------------------- ThreadLocalResource
def test_thread_local_lazy_and_distinct_per_thread():
    factory = _Counter()
    res = ThreadLocalResource(factory, _mark_closed, name="counter")
    assert factory.calls == 0  # lazy: nothing created by the constructor
    assert res.stats() == {"name": "counter", "instances_created": 0, "instances_open": 0}

    mine = res.get()
    assert res() is mine and res.get() is mine  # same instance on the same thread
    theirs = run_in_thread(res.get)
    assert theirs is not mine
    assert factory.calls == 2
    assert res.stats()["instances_created"] == 2

    # Many threads at once: every thread gets its own instance.
    start = threading.Barrier(4, timeout=30)
    got: list = [None] * 4

    def worker(k: int) -> None:
        start.wait()
        got[k] = res.get()
        assert res.get() is got[k]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len({id(x) for x in got} | {id(mine), id(theirs)}) == 6
    assert res.close_all() == 6


def test_close_current_thread_closes_sqlite_on_owning_thread(tmp_path):
    db = tmp_path / "rows.db"
    with sqlite3.connect(db) as setup:
        setup.execute("CREATE TABLE t (id INTEGER, x TEXT)")
        setup.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"row{i}") for i in range(4)])
    setup.close()
    closed_on: list[str] = []

    def close(conn: sqlite3.Connection) -> None:
        conn.close()  # raises ProgrammingError if called from another thread
        closed_on.append(threading.current_thread().name)

    res = ThreadLocalResource(lambda: sqlite3.connect(db), close, name="rows")
    conns: list[sqlite3.Connection] = []

    def worker() -> str:
        conn = res.get()
        conns.append(conn)
        (x,) = conn.execute("SELECT x FROM t WHERE id=2").fetchone()
        assert res.close_current_thread() is True
        assert res.close_current_thread() is False  # idempotent
        return x

    assert run_in_thread(worker, name="sqlite-owner") == "row2"
    assert closed_on == ["sqlite-owner"]
    with pytest.raises(sqlite3.ProgrammingError):
        conns[0].execute("SELECT 1")  # really closed
    assert res.stats() == {"name": "rows", "instances_created": 1, "instances_open": 0}

    # close_current_thread only touches the caller's own instance.
    other = run_in_thread(res.get)
    assert res.close_current_thread() is False
    assert res.stats()["instances_open"] == 1
    # Closing from a non-owning thread fails for sqlite: that is the close_all caveat.
    with pytest.raises(sqlite3.ProgrammingError):
        res.close_all()
    assert res.stats()["instances_open"] == 0
    assert other is not conns[0]


def test_close_all_closes_every_instance_and_is_idempotent():
    res = ThreadLocalResource(_Counter(), _mark_closed)
    objs = [res.get(), run_in_thread(res.get), run_in_thread(res.get)]
    assert res.stats()["instances_open"] == 3
    assert res.close_all() == 3
    assert all(o["closed"] for o in objs)
    assert res.stats()["instances_open"] == 0
    assert res.close_all() == 0
    # A new get() after close_all() builds a fresh instance.
    fresh = res.get()
    assert fresh is not objs[0] and not fresh["closed"]
    res.close_all()


def test_close_all_attempts_every_instance_then_raises_first_error():
    seen: list[int] = []

    def close(obj: dict) -> None:
        seen.append(obj["id"])
        raise OSError(f"cannot close {obj['id']}")

    res = ThreadLocalResource(_Counter(), close)
    res.get()
    run_in_thread(res.get)
    with pytest.raises(OSError, match="cannot close"):
        res.close_all()
    assert sorted(seen) == [1, 2]
    assert res.stats()["instances_open"] == 0


def test_default_close_calls_close_method():
    class Handle:
        closed = False

        def close(self) -> None:
            self.closed = True

    res = ThreadLocalResource(Handle)
    h = res.get()
    assert res.close_current_thread()
    assert h.closed


def test_instance_of_ended_thread_is_not_reused():
    # An ended thread that did not close leaves an orphan; a later thread (which
    # may get the same ident from the OS) never receives it.
    res = ThreadLocalResource(_Counter(), _mark_closed)
    first = run_in_thread(res.get)
    later = [run_in_thread(res.get) for _ in range(5)]
    assert all(x is not first for x in later)
    assert res.stats()["instances_open"] == 6
    assert res.close_all() == 6
    assert first["closed"]


def test_factory_error_stores_nothing():
    def boom():
        raise OSError("no store")

    res = ThreadLocalResource(boom, name="store")
    with pytest.raises(OSError, match="no store"):
        res.get()
    assert res.stats() == {"name": "store", "instances_created": 0, "instances_open": 0}


def test_thread_local_pickle_round_trip_drops_instances():
    factory = _Counter()
    res = ThreadLocalResource(factory, _mark_closed, name="p")
    original = res.get()
    copy = pickle.loads(pickle.dumps(res))
    assert copy.name == "p"
    assert copy.stats() == {"name": "p", "instances_created": 0, "instances_open": 0}
    made = copy.get()
    assert made is not original and made["id"] == 2  # the factory's state came along
    copy.close_all()
    res.close_all()


def test_thread_local_validation_names_argument():
    with pytest.raises(TypeError, match="factory="):
        ThreadLocalResource(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="close="):
        ThreadLocalResource(dict, close=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name="):
        ThreadLocalResource(dict, name=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- ThreadSafeResource
def test_thread_safe_with_and_acquire_release():
    res = ThreadSafeResource([1, 2], name="list")
    with res as obj:
        assert obj == [1, 2]
        assert res.locked()
    assert not res.locked()
    obj = res.acquire(timeout=1.0)
    obj.append(3)
    res.release()
    s = res.stats()
    assert s["name"] == "list" and s["acquisitions"] == 2 and s["contended"] == 0
    assert s["wait_seconds_total"] == 0.0 and s["contention_rate"] == 0.0
    with pytest.raises(RuntimeError, match="not acquired"):
        res.release()


class _SignallingLock:
    """A real lock that sets ``tried`` when a non-blocking acquire finds it taken.

    Injected into a ThreadSafeResource so a test knows, without sleeping, that a
    thread has failed its try-acquire and is about to block.
    """

    def __init__(self) -> None:
        self._inner = threading.Lock()
        self.tried = threading.Event()  # set by the contending thread, awaited by the test

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ok = self._inner.acquire(blocking, timeout)
        if not ok and not blocking:
            self.tried.set()
        return ok

    def release(self) -> None:
        self._inner.release()

    def locked(self) -> bool:
        return self._inner.locked()


def test_thread_safe_forced_contention_statistics():
    res = ThreadSafeResource({"n": 0}, name="shared")
    lock = res._lock = _SignallingLock()  # force the interleaving (see _SignallingLock)
    holding = threading.Event()  # set by A once it holds the resource
    let_go = threading.Event()  # set by the test once B has found the lock taken

    def thread_a() -> None:
        with res as obj:
            obj["n"] += 1
            holding.set()
            assert let_go.wait(timeout=30)

    def thread_b() -> None:
        with res as obj:  # finds A holding it, so it must wait
            obj["n"] += 1

    a = threading.Thread(target=thread_a, name="holder")
    a.start()
    assert holding.wait(timeout=30)
    b = threading.Thread(target=thread_b, name="waiter")
    b.start()
    assert lock.tried.wait(timeout=30)  # B's try-acquire failed: B is contending
    let_go.set()
    a.join(timeout=30)
    b.join(timeout=30)
    assert not a.is_alive() and not b.is_alive()
    s = res.stats()
    assert s["acquisitions"] == 2
    assert s["contended"] == 1
    assert s["timeouts"] == 0
    assert s["contention_rate"] == 0.5
    assert s["wait_seconds_total"] > 0 and s["wait_seconds_max"] == s["wait_seconds_total"]
    assert s["wait_seconds_mean"] == s["wait_seconds_total"]
    assert s["hold_seconds_total"] > 0
    with res as obj:
        assert obj["n"] == 2
    assert res.stats()["contended"] == 1  # an uncontended acquisition adds none


def test_thread_safe_timeout_is_counted():
    res = ThreadSafeResource(object(), name="busy")
    with held_by_another_thread(res), pytest.raises(TimeoutError, match="'busy'"):
        res.acquire(timeout=0)
    s = res.stats()
    assert s["timeouts"] == 1 and s["acquisitions"] == 1 and s["contended"] == 0


def test_thread_safe_validation():
    res = ThreadSafeResource(1)
    with pytest.raises(ValueError, match="timeout="):
        res.acquire(timeout=-1)
    with pytest.raises(TypeError, match="detector="):
        ThreadSafeResource(1, detector="yes")  # type: ignore[arg-type]
    assert not res.locked()


def test_thread_safe_pickle_round_trip_resets_lock_and_stats():
    res = ThreadSafeResource({"a": 1}, name="cfg")
    with res:
        blob = pickle.dumps(res)  # pickled while held: the copy gets a new free lock
    copy = pickle.loads(blob)
    assert copy.name == "cfg" and not copy.locked()
    assert copy.stats()["acquisitions"] == 0
    with copy as obj:
        assert obj == {"a": 1}
    assert res.stats()["acquisitions"] == 1


def test_default_names_are_unique():
    a, b = ThreadSafeResource(1), ThreadSafeResource(1)
    assert a.name != b.name and a.name.startswith("int@")


# ---------------------------------------------------------------------- find_resources
class _Leaf(Dataset):
    def __init__(self, res) -> None:
        self.res = res
        self.meta = {"handles": [res], "name": "leaf"}
        self.indices = list(range(20_000))  # a large list is skipped cheaply
        self.me = self  # a cycle

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return i


class _Slotted:
    __slots__ = ("lock",)

    def __init__(self, lock) -> None:
        self.lock = lock


def test_find_resources_nested_datasets():
    local = ThreadLocalResource(dict, name="handles")
    shared = ThreadSafeResource({}, name="cache")
    slotted = ThreadSafeResource(0, name="slot")
    a = _Leaf(local)
    b = _Leaf(shared)
    b.extra = (_Slotted(slotted),)
    ds = ConcatDataset([Subset(a, [0, 1]), b])
    found = find_resources(ds)
    assert found == [local, shared, slotted]  # each once, in discovery order
    assert find_resources(local) == [local]
    assert find_resources(object()) == []


def test_find_resources_max_depth():
    res = ThreadSafeResource(0, name="deep")
    ds = Subset(_Leaf(res), [0])  # Subset -> .dataset -> .res: two attribute hops
    assert find_resources(ds, max_depth=2) == [res]
    assert find_resources(ds, max_depth=1) == []
    with pytest.raises(ValueError, match="max_depth="):
        find_resources(ds, max_depth=-1)
