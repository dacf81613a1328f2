"""Tuning the loader's knobs: the ``"auto"`` probe and a measured hill-climber.

:class:`OnlineProbe` picks first settings for ``"auto"`` from the first samples
the live worker pool loads (no start-up phase); :class:`HillClimbTuner` then
refines ``num_workers``, ``prefetch`` and the executor from measured windows (one
``step`` per window, e.g. per epoch).

Modules, one concept each:

- :mod:`~lightning_threadsafe.tuning.settings`: :class:`Settings`, :class:`Decision`,
  :func:`default_max_workers` and the checks both tuners share;
- :mod:`~lightning_threadsafe.tuning.rules`: the probe's decision rules
  (:class:`ProbeResult`), pure functions of measurements;
- :mod:`~lightning_threadsafe.tuning.online`: :class:`OnlineProbe`, which collects
  those measurements from the worker pool;
- :mod:`~lightning_threadsafe.tuning.moves`: the hill-climber's move per verdict;
- :mod:`~lightning_threadsafe.tuning.hill_climb`: :class:`HillClimbTuner` (judging
  moves, state, and why it terminates).

Nothing here imports the loader: the loader imports this package.
"""

from __future__ import annotations

from lightning_threadsafe.tuning.hill_climb import HillClimbTuner
from lightning_threadsafe.tuning.online import OnlineProbe
from lightning_threadsafe.tuning.rules import ProbeResult
from lightning_threadsafe.tuning.settings import Decision, Settings, default_max_workers

__all__ = [
    "Decision",
    "HillClimbTuner",
    "OnlineProbe",
    "ProbeResult",
    "Settings",
    "default_max_workers",
]
