"""One torch intra-op thread per loader thread, without touching any other thread.

torch's DataLoader calls ``torch.set_num_threads(1)`` in each worker *process*:
the loader parallelises across samples, so a sample's torch ops should not also
fan out over every core. In a worker *thread* that call would be wrong twice:
``torch.set_num_threads`` also stores a process-wide default that every thread
created later (the training loop's helpers, a user's threads) starts from, and
with OpenMP (torch's CPU backend on Linux) each worker thread that runs a
parallel op gets its own team of ``cores - 1`` helper threads, which spin
between ops: with ``n`` workers on ``c`` cores that is ``n * c`` runnable
threads fighting for ``c`` cores (measured on W1: 8-10% fewer samples/s and
slower first batches).

OpenMP's thread count is a per-thread setting (the ``nthreads-var`` ICV), and
torch reads it back for every parallel op (``omp_get_max_threads``). So each
loader thread first lets torch initialise its own setting (torch does that
lazily, once per thread, from the process-wide default -- done first so that it
cannot later overwrite ours), then sets it to 1 through the OpenMP runtime
torch itself loaded. Nothing process-wide changes: other threads keep their
count, threads created later start from the same default as before.

Where the OpenMP runtime cannot be found (a torch build without OpenMP, another
platform's runtime name), this is a no-op and :func:`limit_intra_op_threads`
returns ``False``; loading still works, only without this optimisation. MKL's
BLAS (linked privately into torch's wheels) keeps its own thread count.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable

import torch

__all__ = ["limit_intra_op_threads"]

_OMP_LIBRARY = re.compile(r"lib(g|i)?omp[^/]*\.(so|dylib)[.\d]*$")

_UNRESOLVED = object()
# The setter, None (no runtime found), or _UNRESOLVED; published by one reference store.
_setter: object = _UNRESOLVED
# Serialises the one-time lookup (not the calls): held by the first loader thread to start
# while it runs the trial (at most _LOOKUP_TIMEOUT_S); threads starting meanwhile wait on it.
_resolve_lock = threading.Lock()
# Longest wait for the trial thread: a runtime that hangs (a dlopen stuck on the loader
# lock, a lock inherited at fork) must not hang every loader thread that starts.
_LOOKUP_TIMEOUT_S = 10.0


def _loaded_omp_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "omp" in line}
    except OSError:
        return []
    return sorted(p for p in paths if _OMP_LIBRARY.search(p))


def _candidates() -> list[Callable[[int], None]]:
    libs: list[ctypes.CDLL] = []
    try:
        libs.append(ctypes.CDLL(None))  # symbols already global in this process
    except OSError:
        pass
    for path in _loaded_omp_libraries():  # the runtimes loaded (dlopen reuses them)
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    out = []
    for lib in libs:
        fn = getattr(lib, "omp_set_num_threads", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int]
            fn.restype = None
            out.append(fn)
    return out


def _lookup() -> Callable[[int], None] | None:
    """The ``omp_set_num_threads`` of the runtime torch uses: the first candidate that
    torch sees take effect, tried on a short-lived thread (its setting dies with it).

    ``None`` when no runtime is found or the trial does not finish within
    ``_LOOKUP_TIMEOUT_S`` (it is then left to finish on its own: a daemon thread whose
    late answer is ignored).
    """
    found: list[Callable[[int], None]] = []  # written by the trial only, read after its join

    def trial() -> None:
        before = torch.get_num_threads()  # torch's lazy per-thread initialisation
        for fn in _candidates():
            fn(1)
            if torch.get_num_threads() == 1:
                found.append(fn)
                return
            fn(before)

    t = threading.Thread(target=trial, name="lts-intraop-lookup", daemon=True)
    t.start()
    t.join(_LOOKUP_TIMEOUT_S)
    if t.is_alive():
        return None
    return found[0] if found else None


def _omp_setter() -> Callable[[int], None] | None:
    global _setter
    setter = _setter
    if setter is _UNRESOLVED:
        with _resolve_lock:
            if _setter is _UNRESOLVED:
                _setter = _lookup()
            setter = _setter
    return setter  # type: ignore[return-value]


def limit_intra_op_threads() -> bool:
    """Run torch ops of the *calling thread* on one intra-op thread.

    Called once at the start of every loader thread (workers and the probe),
    before ``worker_init_fn`` (which may change it again).

    Returns:
        Whether the limit is in effect (``False``: no OpenMP runtime found).
    """
    setter = _omp_setter()
    if setter is None:
        return False
    torch.get_num_threads()  # torch's lazy per-thread initialisation happens here, first
    setter(1)
    return torch.get_num_threads() == 1
