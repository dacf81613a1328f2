"""DeadlockDetector: lock-order cycles are reported, with both sites, before they deadlock."""

from __future__ import annotations

import pickle
import sys
import threading

import pytest
from _helpers import held_by_another_thread, run_in_thread

from lightning_threadsafe.deadlock import DeadlockDetector, TrackedLock, active_detector
from lightning_threadsafe.errors import PotentialDeadlockError
from lightning_threadsafe.resources import ThreadSafeResource


def _line() -> int:
    """The caller's line number + 1: the line of the statement after the call."""
    return sys._getframe(1).f_lineno + 1


def _run(fn, name: str):
    """Run ``fn`` on its own thread to completion; return the exception it raised, if any."""
    try:
        run_in_thread(fn, name)
    except BaseException as exc:
        return exc
    return None


def test_opposite_order_in_two_threads_names_both_locks_and_sites():
    detector = DeadlockDetector()
    a = ThreadSafeResource([], name="lock-a")
    b = ThreadSafeResource([], name="lock-b")
    lines: dict[str, int] = {}

    def first() -> None:
        with detector.activate():
            with a:
                lines["first_b"] = _line()
                with b:
                    pass

    def second() -> None:
        with detector.activate():
            with b:
                lines["second_a"] = _line()
                with a:
                    pass

    # One after the other: the threads never overlap, so nothing really deadlocks.
    assert _run(first, "first") is None
    assert detector.edges() == [("lock-a", "lock-b", f"{__file__}:{lines['first_b']}")]
    err = _run(second, "second")

    assert isinstance(err, PotentialDeadlockError)
    assert {err.first_lock, err.second_lock} == {"lock-a", "lock-b"}
    assert err.first_lock == "lock-b"  # held by the reporting thread
    assert err.second_lock == "lock-a"  # the acquisition that would close the cycle
    assert err.site == f"{__file__}:{lines['second_a']}"
    assert err.conflicting_site == f"{__file__}:{lines['first_b']}"
    assert err.cycle == ["lock-b", "lock-a", "lock-b"]
    message = str(err)
    assert "'lock-a'" in message and "'lock-b'" in message
    assert err.site in message and err.conflicting_site in message
    # Raised before acquiring: both resources were left free, nothing half-held.
    assert not a.locked() and not b.locked()
    assert a.stats()["acquisitions"] == 1  # only the first thread's
    # With raise_on_cycle=True the graph stays acyclic.
    assert [(x, y) for x, y, _ in detector.edges()] == [("lock-a", "lock-b")]


def test_consistent_order_is_never_reported():
    detector = DeadlockDetector()
    a = ThreadSafeResource(0, name="a", detector=detector)
    b = ThreadSafeResource(0, name="b", detector=detector)
    c = ThreadSafeResource(0, name="c", detector=detector)

    def ordered() -> None:
        for _ in range(3):
            with a, b, c:
                pass
            with a, c:
                pass
            with b:
                pass

    for k in range(3):
        assert _run(ordered, f"ordered-{k}") is None
    assert sorted((x, y) for x, y, _ in detector.edges()) == [
        ("a", "b"), ("a", "c"), ("b", "c"),
    ]
    assert detector.reports == []


def test_three_lock_cycle():
    detector = DeadlockDetector()
    x, y, z = (detector.tracked_lock(n) for n in ("x", "y", "z"))
    lines: dict[str, int] = {}
    with x:
        lines["xy"] = _line()
        with y:
            pass
    with y:
        lines["yz"] = _line()
        with z:
            pass
    with z:
        lines["zx"] = _line()
        with pytest.raises(PotentialDeadlockError) as info:
            x.acquire()
    err = info.value
    assert err.first_lock == "z" and err.second_lock == "x"
    assert err.cycle == ["z", "x", "y", "z"]
    assert err.site == f"{__file__}:{lines['zx'] + 1}"  # the x.acquire() line
    assert err.conflicting_site == f"{__file__}:{lines['xy']}"  # where x -> y was recorded
    assert f"{__file__}:{lines['yz']}" in str(err)  # every edge of the path is named
    assert not x.locked()
    assert detector.held_locks() == []


def test_report_mode_records_each_cycle_once():
    detector = DeadlockDetector(raise_on_cycle=False)
    a, b = detector.tracked_lock("a"), detector.tracked_lock("b")
    with a, b:
        pass
    for _ in range(2):
        with b, a:  # would raise; here it is recorded (once) and proceeds
            pass
    reports = detector.reports
    assert len(reports) == 1 and reports[0].cycle == ["b", "a", "b"]
    detector.reset()
    assert detector.edges() == [] and detector.reports == []


def test_active_detector_only_inside_activate():
    assert active_detector() is None
    outer, inner = DeadlockDetector(), DeadlockDetector()
    with outer.activate() as d:
        assert d is outer and active_detector() is outer
        with inner.activate():
            assert active_detector() is inner
        assert active_detector() is outer
        # Thread-local: another thread sees no active detector.
        seen: list = []
        assert _run(lambda: seen.append(active_detector()), "other") is None
        assert seen == [None]
    assert active_detector() is None


def test_no_detector_means_no_behaviour_change():
    a = ThreadSafeResource(0, name="a")
    b = ThreadSafeResource(0, name="b")
    with a, b:
        pass
    with b, a:  # opposite order, but no detector attached or active: no check
        pass
    assert active_detector() is None
    assert a.stats()["acquisitions"] == 2 and b.stats()["acquisitions"] == 2
    # A detector that is neither attached nor active records nothing.
    idle = DeadlockDetector()
    with a, b:
        pass
    assert idle.edges() == []


def test_explicit_detector_wins_over_active_one():
    explicit, active = DeadlockDetector(), DeadlockDetector()
    a = ThreadSafeResource(0, name="a", detector=explicit)
    b = ThreadSafeResource(0, name="b", detector=explicit)
    with active.activate():
        with a, b:
            pass
    assert [(x, y) for x, y, _ in explicit.edges()] == [("a", "b")]
    assert active.edges() == []


def test_reentrant_acquisition():
    detector = DeadlockDetector()
    # A non-re-entrant lock taken twice by one thread: a certain self-deadlock,
    # reported before blocking.
    res = ThreadSafeResource(0, name="once", detector=detector)
    with res:
        first = sys._getframe().f_lineno - 1
        with pytest.raises(PotentialDeadlockError) as info:
            res.acquire(timeout=0)
    assert info.value.cycle == ["once", "once"]
    assert info.value.conflicting_site == f"{__file__}:{first}"
    assert not res.locked()
    # An RLock may be re-entered: no edge, no report, held until the last release.
    r = detector.tracked_lock("r", threading.RLock())
    other = detector.tracked_lock("other")
    assert isinstance(r, TrackedLock) and r.reentrant
    with r, other, r:
        assert detector.held_locks() == ["r", "other"]
    assert detector.held_locks() == []
    assert ("other", "r") not in [(x, y) for x, y, _ in detector.edges()]


def test_out_of_order_release_and_failed_acquire():
    detector = DeadlockDetector()
    a, b = detector.tracked_lock("a"), detector.tracked_lock("b")
    a.acquire()
    b.acquire()
    a.release()  # released out of order
    assert detector.held_locks() == ["b"]
    b.release()
    assert detector.held_locks() == []
    # A failed non-blocking acquire leaves nothing held.
    with held_by_another_thread(a):
        assert a.acquire(blocking=False) is False
        assert detector.held_locks() == []


def test_detector_pickles_as_empty_copy_and_validates():
    detector = DeadlockDetector(raise_on_cycle=False)
    with detector.tracked_lock("a"), detector.tracked_lock("b"):
        pass
    copy = pickle.loads(pickle.dumps(detector))
    assert copy.raise_on_cycle is False and copy.edges() == []
    res = pickle.loads(pickle.dumps(ThreadSafeResource(1, name="r", detector=detector)))
    assert isinstance(res.detector, DeadlockDetector) and res.detector is not detector
    with pytest.raises(TypeError, match="raise_on_cycle="):
        DeadlockDetector(raise_on_cycle="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name="):
        detector.tracked_lock("")
    with pytest.raises(TypeError, match="lock="):
        detector.tracked_lock("x", lock=object())
