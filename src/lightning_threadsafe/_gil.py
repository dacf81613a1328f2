"""Whether this interpreter runs with the GIL: the switch for GIL-specific heuristics.

Some diagnoses only make sense with a global interpreter lock: the online
probe's GIL wait and its "threads gain nothing, so processes" verdict
(:mod:`lightning_threadsafe.tuning.rules`), and the bottleneck detector's GIL
rule (:mod:`lightning_threadsafe.bottleneck`). On a free-threaded build
(``python3.13t``) with the GIL disabled, threads really run in parallel; the
same measurements then mean samples that wait or compute on threads, never
GIL-bound.

The answer can change while the process runs: a free-threaded interpreter
re-enables the GIL when it imports an extension module that does not declare
free-threading support. So callers ask at decision time, not once at import.
Tests force the other branch by monkeypatching the name ``gil_enabled`` in the
module that imported it (e.g. ``lightning_threadsafe.bottleneck.gil_enabled``).
"""

from __future__ import annotations

import sys

__all__ = ["gil_enabled"]


def gil_enabled() -> bool:
    """Whether the GIL is enabled now.

    Returns:
        ``sys._is_gil_enabled()`` where the interpreter has it (Python 3.13+);
        ``True`` on older interpreters, which always have a GIL.
    """
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    if is_enabled is None:
        return True
    return bool(is_enabled())
