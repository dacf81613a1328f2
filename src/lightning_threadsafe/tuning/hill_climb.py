"""A measured hill-climber over ``num_workers``, ``prefetch`` and the executor.

:class:`HillClimbTuner` refines the settings the probe
(:class:`~lightning_threadsafe.tuning.OnlineProbe`) picked, from measured windows
(one ``step`` per window, e.g. per epoch). It is in the spirit of tf.data's
HILL_CLIMB, but judged on measured throughput instead of a queueing model:

1. Each ``step`` records the window's throughput (samples/s) for the current
   settings. The settings with the best measured throughput are the *best*.
2. A pending change is judged on the window that ran with it: *kept* if it beat
   the best by more than ``margin`` (then the next move follows the verdict,
   usually the same direction again); otherwise it is recorded as *worse under
   the verdict that motivated it* and the tuner goes back to the best settings
   (or, when the failed window's verdict names another knob, straight to that
   knob's move from the best settings — this is how two threads that do not beat
   one switch a GIL-bound dataset to processes).
3. From the best settings the verdict picks one move, from the table in
   :mod:`~lightning_threadsafe.tuning.moves` (IO and CPU raise ``num_workers``,
   GIL switches to processes, MEMORY halves ``prefetch`` as a *safety* move that
   also lowers a prefetch ceiling, TRANSFER doubles ``prefetch``; all within the
   bounds). A move whose target was already measured worse under the same
   verdict is not tried again: the tuner holds.

Termination (no oscillation): the settings form a finite grid (bounded W and P,
two executors) and there are six verdicts. Every move either raises the best
measured throughput by a factor > 1 + ``margin`` — on a stationary workload
each setting can then become best at most once — or marks a new
(setting, verdict) pair as worse, which is never tried again; safety moves only
lower the prefetch ceiling, which is bounded below. A change that has not taken
effect yet (an executor switch waits for the epoch boundary) is repeated for at
most two windows, then the tuner stops waiting for it. So only finitely many
moves happen, then the tuner holds. A setting measured worse is retried only
when a *different* verdict motivates it (the workload changed), at most once per
verdict. The final throughput is within ``1 / (1 + margin)`` of every neighbour
it tried.

State (``state_dict``) is plain data, so tuned settings survive a resume.

Example::

    tuner = HillClimbTuner(cpu_count=8)
    decision = tuner.step(window, detector.compute(), Settings(4, 2, "thread"))
    loader.apply(decision.after)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lightning_threadsafe.bottleneck import Bottleneck, Verdict, usable_cpu_count
from lightning_threadsafe.telemetry import TelemetryWindow
from lightning_threadsafe.tuning.moves import Move, VerdictMoves, describe, label
from lightning_threadsafe.tuning.settings import (
    Decision,
    Settings,
    changes,
    check_int,
    default_max_workers,
)

__all__ = ["HillClimbTuner"]

_STATE_VERSION = 1
# How many windows a change may take to show up (e.g. an executor switch waits
# for the epoch boundary) before the tuner stops waiting for it.
_MAX_WAIT_WINDOWS = 2


@dataclass
class _Pending:
    """A change handed out and not yet judged."""

    before: Settings
    after: Settings
    code: int  # the verdict that motivated it
    kind: str  # "explore" (judged on throughput) | "safety" | "revert" (accepted on arrival)
    waited: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for the tuner's ``state_dict``."""
        return {"before": self.before.to_dict(), "after": self.after.to_dict(),
                "code": self.code, "kind": self.kind, "waited": self.waited}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Pending:
        """The change :meth:`to_dict` returned."""
        return cls(Settings.from_dict(d["before"]), Settings.from_dict(d["after"]),
                   int(d["code"]), str(d["kind"]), int(d["waited"]))


class HillClimbTuner(VerdictMoves):
    """Measured hill-climbing over ``num_workers``, ``prefetch`` and the executor.

    Plain class, no threads and no locks: one caller at a time (the auto-tune
    callback, on rank 0; the decision is broadcast). Apply ``Decision.after``
    verbatim after each ``step``. Algorithm and termination argument: module
    docstring; the moves: :mod:`~lightning_threadsafe.tuning.moves`.

    Args:
        min_workers: lower bound on ``num_workers``.
        max_workers: upper bound on ``num_workers`` (default ``min(64, 8 * cpu_count)``).
        min_prefetch: lower bound on ``prefetch``.
        max_prefetch: upper bound on ``prefetch``.
        cpu_count: usable cores (default: this process's affinity mask).
        margin: a change is kept only if it raises throughput by more than this share.
        prefetch_per_worker: ``prefetch`` counts batches per worker (torch's
            ``prefetch_factor``; the default) rather than the total look-ahead.

    Raises:
        ValueError: for a bound out of range, naming it.
        TypeError: for a ``prefetch_per_worker`` that is not a bool.

    Example::

        tuner = HillClimbTuner(cpu_count=2, max_workers=32)
        d = tuner.step(window, verdict, Settings(num_workers=1, prefetch=1))
        d.after   # e.g. Settings(num_workers=12, prefetch=2, executor='thread')
    """

    def __init__(
        self,
        *,
        min_workers: int = 1,
        max_workers: int | None = None,
        min_prefetch: int = 1,
        max_prefetch: int = 32,
        cpu_count: int | None = None,
        margin: float = 0.05,
        prefetch_per_worker: bool = True,
    ) -> None:
        if cpu_count is None:
            cpu_count = usable_cpu_count()
        check_int("cpu_count", cpu_count, 1)
        if max_workers is None:
            max_workers = default_max_workers(cpu_count)
        check_int("min_workers", min_workers, 1)
        check_int("max_workers", max_workers, min_workers)
        check_int("min_prefetch", min_prefetch, 1)
        check_int("max_prefetch", max_prefetch, min_prefetch)
        if (isinstance(margin, bool) or not isinstance(margin, (int, float))
                or not math.isfinite(margin) or margin < 0):
            raise ValueError(f"margin={margin!r} must be a number >= 0")
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.min_prefetch = min_prefetch
        self.max_prefetch = max_prefetch
        self.cpu_count = cpu_count
        if not isinstance(prefetch_per_worker, bool):
            raise TypeError(f"prefetch_per_worker={prefetch_per_worker!r} must be True or False")
        self.margin = float(margin)
        self.prefetch_per_worker = prefetch_per_worker
        self._reset_state()

    def _reset_state(self) -> None:
        self._best: Settings | None = None
        self._best_tp = 0.0
        self._measured: dict[tuple[int, int, str], float] = {}
        self._worse: dict[tuple[int, int, str], set[int]] = {}
        self._prefetch_ceiling = self.max_prefetch
        self._pending: _Pending | None = None

    @property
    def best(self) -> Settings | None:
        """The best measured settings so far (``None`` before the first step)."""
        return dataclasses.replace(self._best) if self._best is not None else None

    # ------------------------------------------------------------------- step
    def step(self, window: TelemetryWindow, verdict: Verdict, current: Settings) -> Decision:
        """Judge the window that ran with ``current`` and decide the next settings.

        Args:
            window: what the loader measured while running with ``current``.
            verdict: the bottleneck detector's verdict on that window.
            current: the settings the window ran with (not kept: copied).

        Returns:
            The :class:`Decision`; apply its ``after`` verbatim.

        Raises:
            TypeError: for an argument of the wrong type.
        """
        if not isinstance(window, TelemetryWindow):
            raise TypeError(f"window={window!r} must be a TelemetryWindow")
        if not isinstance(verdict, Verdict):
            raise TypeError(f"verdict={verdict!r} must be a Verdict")
        if not isinstance(current, Settings):
            raise TypeError(f"current={current!r} must be a Settings")
        current = dataclasses.replace(current)  # the caller may mutate theirs
        tp = window.samples_per_sec
        code = Bottleneck(verdict.code)
        if code is Bottleneck.GIL and current.executor == "process":
            code = Bottleneck.CPU  # processes do not share a GIL

        def decide(move: Move | None, hold_reason: str = "") -> Decision:
            return self._decision(current, move, hold_reason, verdict, code, tp)

        if window.samples <= 0 or window.duration_s <= 0:
            return decide(None, "no samples in the window; holding")

        key = current.key()
        self._measured[key] = tp
        pending = self._pending
        note = ""
        if pending is not None and key == pending.after.key():
            self._pending = None
            if pending.kind != "explore" or tp > self._best_tp * (1.0 + self.margin):
                if pending.kind == "explore":
                    note = f"kept: {tp:.1f} samples/s beats {self._best_tp:.1f} by > {self.margin:.0%}; "
                self._best, self._best_tp = current, tp
            else:
                self._worse.setdefault(key, set()).add(pending.code)
                failed = (f"{tp:.1f} samples/s did not beat {self._best_tp:.1f} by "
                          f"{self.margin:.0%}")
                best = self._best if self._best is not None else pending.before
                # A new verdict in the failed window names another knob: take its move
                # from the best settings now instead of spending a window going back.
                alt = self._move_from(best, code, window) if code != pending.code else None
                if (alt is not None and alt.after.key() != key
                        and code not in self._worse.get(alt.after.key(), ())):
                    alt.reason = f"{failed}; {alt.reason}"
                    return decide(alt)
                return decide(Move(dataclasses.replace(best), "revert",
                                   f"{failed}; back to the best settings", kind="revert"))
        elif pending is not None and key == pending.before.key() and \
                pending.waited < _MAX_WAIT_WINDOWS:
            # Not applied yet (an executor switch waits for the epoch boundary): repeat
            # the change so that a caller applying `after` verbatim does not undo it.
            pending.waited += 1
            if self._best is not None and key == self._best.key():
                self._best_tp = tp
            return Decision(current, dataclasses.replace(pending.after),
                            changes(current, pending.after),
                            "waiting for the previous change to take effect", "wait",
                            int(verdict.code), verdict.name, tp)
        else:
            self._pending = None
            if self._best is not None and key == self._best.key():
                self._best_tp = tp  # re-measured: the workload may drift
            else:  # first step, or the settings were changed outside the tuner
                self._best, self._best_tp = current, tp
                clamped = self._clamp(current)
                if clamped.key() != key:
                    return decide(Move(clamped, "clamp", "settings moved into the tuner's "
                                       "bounds", kind="safety"))

        move = self._move_from(current, code, window)
        if move is None:
            return decide(None, note + self._hold_reason(current, code, verdict))
        if code in self._worse.get(move.after.key(), ()):
            return decide(None, f"{note}{move.action} to {describe(move.after)} was already "
                                f"measured worse under {label(code)}; holding")
        move.reason = note + move.reason
        return decide(move)

    def _decision(self, current: Settings, move: Move | None, hold_reason: str,
                  verdict: Verdict, code: Bottleneck, tp: float) -> Decision:
        """The decision for ``move`` (a hold when ``None``), recorded as pending."""
        if move is None or move.after.key() == current.key():
            after, action, reason = dataclasses.replace(current), "hold", hold_reason
        else:
            after, action, reason = move.after, move.action, move.reason
            self._pending = _Pending(dataclasses.replace(current), dataclasses.replace(after),
                                     int(code), move.kind)
            if move.kind == "safety" and action == "prefetch-":
                self._prefetch_ceiling = min(self._prefetch_ceiling, after.prefetch)
        return Decision(dataclasses.replace(current), after, changes(current, after), reason,
                        action, int(verdict.code), verdict.name, tp)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain data: best settings, the measured table, the worse marks, a pending change."""
        return {
            "version": _STATE_VERSION,
            "best": self._best.to_dict() if self._best is not None else None,
            "best_throughput": self._best_tp,
            "prefetch_ceiling": self._prefetch_ceiling,
            "measured": [[w, p, e, tp] for (w, p, e), tp in sorted(self._measured.items())],
            "worse": [[w, p, e, sorted(codes)] for (w, p, e), codes in sorted(self._worse.items())],
            "pending": self._pending.to_dict() if self._pending is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: a :meth:`state_dict` of this version.

        Raises:
            ValueError: for a state of another version or shape.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"state={state!r} is not a HillClimbTuner state of version "
                             f"{_STATE_VERSION}")
        try:
            best = Settings.from_dict(state["best"]) if state["best"] is not None else None
            measured = {(int(w), int(p), str(e)): float(tp) for w, p, e, tp in state["measured"]}
            worse = {(int(w), int(p), str(e)): {int(c) for c in codes}
                     for w, p, e, codes in state["worse"]}
            pending = (_Pending.from_dict(state["pending"]) if state["pending"] is not None
                       else None)
            ceiling = int(state["prefetch_ceiling"])
            best_tp = float(state["best_throughput"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state is not a valid HillClimbTuner state: {exc}") from exc
        self._best, self._best_tp = best, best_tp
        self._measured, self._worse = measured, worse
        self._pending, self._prefetch_ceiling = pending, ceiling
