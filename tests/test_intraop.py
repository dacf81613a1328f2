"""Tests for ``_intraop``: the one-time OpenMP lookup never blocks its caller forever."""

from __future__ import annotations

import threading

import torch

from lightning_threadsafe import _intraop


def test_lookup_gives_up_at_its_deadline_when_the_trial_hangs(monkeypatch):
    """A trial thread stuck in the runtime (a hung dlopen, a lock held at fork) must not
    hang every loader thread that starts: the lookup has a deadline, then reports no
    runtime (the optimisation is skipped, loading still works)."""
    release = threading.Event()  # holds the trial thread inside _candidates()
    entered = threading.Event()

    def stuck_candidates():
        entered.set()
        release.wait()
        return []

    monkeypatch.setattr(_intraop, "_candidates", stuck_candidates)
    monkeypatch.setattr(_intraop, "_LOOKUP_TIMEOUT_S", 0.05, raising=False)
    result: list[object] = []
    caller = threading.Thread(target=lambda: result.append(_intraop._lookup()),
                              name="test-intraop-caller", daemon=True)
    caller.start()
    try:
        assert entered.wait(timeout=60)
        caller.join(timeout=60)  # returns at its 0.05 s deadline; the bound ends a failure
        assert not caller.is_alive(), "_lookup() joined the stuck trial without a deadline"
        assert result == [None]
    finally:
        release.set()
        caller.join(timeout=10)


def test_limit_intra_op_threads_is_per_thread():
    before = torch.get_num_threads()
    seen: list[tuple[bool, int]] = []

    def worker() -> None:
        ok = _intraop.limit_intra_op_threads()
        seen.append((ok, torch.get_num_threads()))

    t = threading.Thread(target=worker, name="lts-test-intraop", daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    ok, inside = seen[0]
    assert inside == 1 or not ok
    assert torch.get_num_threads() == before  # the calling thread keeps its own count
