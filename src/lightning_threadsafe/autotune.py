"""Tuning the loader's knobs: a probe and a measured hill-climber.

:class:`OnlineProbe` picks first settings for ``"auto"`` from the first samples
the worker pool loads (no start-up phase); :func:`probe` applies the same rules
synchronously where a decision is needed before loading starts.
:class:`HillClimbTuner` then refines ``num_workers``, ``prefetch`` and the
executor from measured windows (one ``step`` per window, e.g. per epoch).

The hill-climber (in the spirit of tf.data's HILL_CLIMB, but judged on measured
throughput instead of a queueing model):

1. Each ``step`` records the window's throughput (samples/s) for the current
   settings. The settings with the best measured throughput are the *best*.
2. A pending change is judged on the window that ran with it: *kept* if it beat
   the best by more than ``margin`` (then the next move follows the verdict,
   usually the same direction again); otherwise it is recorded as *worse under
   the verdict that motivated it* and the tuner goes back to the best settings
   (or, when the failed window's verdict names another knob, straight to that
   knob's move from the best settings — this is how two threads that do not beat
   one switch a GIL-bound dataset to processes).
3. From the best settings the verdict picks one move:

   ========  ==========================================================================
   verdict   move (bounds always applied; ``W``=num_workers, ``P``=prefetch, ``C``=cores)
   ========  ==========================================================================
   NONE      hold
   IO        ``W -> max(2W, min(W / (1 - wait), 1.5 C * wall/cpu))``: geometric at least, or a
             jump to the modelled need (enough threads to stop the wait, never more than
             keep all cores busy); if workers sit idle (< 50% busy) ``P -> 2P`` instead
   CPU       ``W -> ceil(W * C / cores_used)`` (workers in proportion to idle cores: straight
             to C from one CPU-bound thread, past C only while samples leave cores idle, e.g.
             partly waiting); hold once that cannot gain ``margin`` (cheaper transforms /
             more cores). Processes: at most C
   GIL       executor ``"process"`` with ``W = C`` (the loader switches at an epoch
             boundary); already processes: treated as CPU
   MEMORY    ``P -> P // 2``; a *safety* move, kept without a throughput test, and it
             lowers a prefetch ceiling that later moves respect
   TRANSFER  ``P -> 2P`` (deeper staging look-ahead)
   ========  ==========================================================================

   Prefetch follows threads. By default ``prefetch`` is per worker, like torch's
   ``prefetch_factor`` (the loader holds ``P * W`` batches in flight), so look-ahead
   already grows with W and a growing W only lifts P to at least 2. With
   ``prefetch_per_worker=False`` (P is the total look-ahead in batches), a growing W
   in thread mode lifts ``P = max(P, 2, ceil(W / batch_size))`` (batch size =
   samples / batches of the window), so there are at least as many samples in
   flight as threads. A
   move whose target was already measured worse under the same verdict is not
   tried again: the tuner holds.

Termination (no oscillation): the settings form a finite grid (bounded W and P,
two executors) and there are six verdicts. Every move either raises the best
measured throughput by a factor > 1 + ``margin`` — on a stationary workload
each setting can then become best at most once — or marks a new
(setting, verdict) pair as worse, which is never tried again; safety moves only
lower the prefetch ceiling, which is bounded below. So only finitely many moves
happen, then the tuner holds. A setting measured worse is retried only when a
*different* verdict motivates it (the workload changed), at most once per verdict.
The final throughput is within ``1 / (1 + margin)`` of every neighbour it tried.

State (``state_dict``) is plain data, so tuned settings survive a resume.

Example::

    tuner = HillClimbTuner(cpu_count=8)
    decision = tuner.step(window, detector.compute(), Settings(4, 2, "thread"))
    loader.apply(decision.after)
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_threadsafe._intraop import limit_intra_op_threads
from lightning_threadsafe.bottleneck import Bottleneck, Verdict, usable_cpu_count
from lightning_threadsafe.telemetry import TelemetryWindow

__all__ = ["Decision", "HillClimbTuner", "ProbeResult", "Settings", "probe"]

EXECUTORS = ("thread", "process")
_STATE_VERSION = 1
# How many windows a change may take to show up (e.g. an executor switch waits
# for the epoch boundary) before the tuner stops waiting for it.
_MAX_WAIT_WINDOWS = 2
# Below this share of busy workers the look-ahead, not the thread count, is short.
_IDLE_UTILISATION = 0.5


def default_max_workers(cpu_count: int) -> int:
    """The thread cap of the tuner and the probes: 8 per core, at most 64."""
    return min(64, 8 * cpu_count)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


@dataclass
class Settings:
    """The knobs the tuner turns.

    Attributes:
        num_workers: threads (thread executor) or worker processes.
        prefetch: look-ahead in batches, per worker (torch's ``prefetch_factor``) or in
            total, as the tuner's ``prefetch_per_worker`` says.
        executor: ``"thread"`` or ``"process"``.

    Raises:
        ValueError: for a value out of range, naming the field.
    """

    num_workers: int
    prefetch: int
    executor: str = "thread"

    def __post_init__(self) -> None:
        _check_int("num_workers", self.num_workers, 0)
        _check_int("prefetch", self.prefetch, 1)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor={self.executor!r} must be one of 'thread', 'process'")

    def key(self) -> tuple[int, int, str]:
        return (self.num_workers, self.prefetch, self.executor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        return cls(int(d["num_workers"]), int(d["prefetch"]), str(d["executor"]))


@dataclass(frozen=True)
class Decision:
    """One tuner step: what was, what should be, and why.

    Attributes:
        before, after: the settings the window ran with, and those to apply.
        changed: ``{field: (old, new)}`` for the fields that differ.
        reason: one line explaining the decision with the measured numbers.
        action: ``"hold"``, ``"workers+"``, ``"prefetch+"``, ``"prefetch-"``,
            ``"executor"``, ``"revert"``, ``"clamp"``, or ``"wait"`` (the previous
            change has not taken effect yet; ``after`` repeats it).
        verdict_code, verdict_name: the verdict the decision followed.
        throughput: samples/s measured over the window.
    """

    before: Settings
    after: Settings
    changed: dict[str, tuple[Any, Any]]
    reason: str
    action: str
    verdict_code: int
    verdict_name: str
    throughput: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples become lists)."""
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "changed": {k: [old, new] for k, (old, new) in self.changed.items()},
            "reason": self.reason,
            "action": self.action,
            "verdict_code": self.verdict_code,
            "verdict_name": self.verdict_name,
            "throughput": self.throughput,
        }


@dataclass
class _Pending:
    """A change handed out and not yet judged."""

    before: Settings
    after: Settings
    code: int  # the verdict that motivated it
    kind: str  # "explore" (judged on throughput) | "safety" | "revert" (accepted on arrival)
    waited: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before.to_dict(), "after": self.after.to_dict(),
                "code": self.code, "kind": self.kind, "waited": self.waited}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Pending:
        return cls(Settings.from_dict(d["before"]), Settings.from_dict(d["after"]),
                   int(d["code"]), str(d["kind"]), int(d["waited"]))


@dataclass
class _Move:
    after: Settings
    action: str
    reason: str
    kind: str = "explore"


class HillClimbTuner:
    """Measured hill-climbing over ``num_workers``, ``prefetch`` and the executor.

    Plain class, no threads and no locks: one caller at a time (the auto-tune
    callback, on rank 0; the decision is broadcast). Apply ``Decision.after``
    verbatim after each ``step``. Algorithm and termination argument: module docstring.

    Args:
        min_workers, max_workers: bounds on ``num_workers`` (``max_workers``
            defaults to ``min(64, 8 * cpu_count)``).
        min_prefetch, max_prefetch: bounds on ``prefetch``.
        cpu_count: usable cores (default: this process's affinity mask).
        margin: a change is kept only if it raises throughput by more than this share.
        prefetch_per_worker: ``prefetch`` counts batches per worker (torch's
            ``prefetch_factor``; the default) rather than the total look-ahead.

    Raises:
        ValueError: for a bound out of range, naming it.

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
        _check_int("cpu_count", cpu_count, 1)
        if max_workers is None:
            max_workers = default_max_workers(cpu_count)
        _check_int("min_workers", min_workers, 1)
        _check_int("max_workers", max_workers, min_workers)
        _check_int("min_prefetch", min_prefetch, 1)
        _check_int("max_prefetch", max_prefetch, min_prefetch)
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
        """Judge the window that ran with ``current`` and decide the next settings."""
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

        def decide(move: _Move | None, hold_reason: str = "") -> Decision:
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
                return decide(_Move(dataclasses.replace(best), "revert",
                                    f"{failed}; back to the best settings", kind="revert"))
        elif pending is not None and key == pending.before.key() and \
                pending.waited < _MAX_WAIT_WINDOWS:
            # Not applied yet (an executor switch waits for the epoch boundary): repeat
            # the change so that a caller applying `after` verbatim does not undo it.
            pending.waited += 1
            if self._best is not None and key == self._best.key():
                self._best_tp = tp
            return Decision(current, dataclasses.replace(pending.after),
                            _changes(current, pending.after),
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
                    return decide(_Move(clamped, "clamp", "settings moved into the tuner's "
                                        "bounds", kind="safety"))

        move = self._move_from(current, code, window)
        if move is None:
            return decide(None, note + self._hold_reason(current, code, verdict))
        if code in self._worse.get(move.after.key(), ()):
            return decide(None, f"{note}{move.action} to {_fmt(move.after)} was already measured "
                                f"worse under {_label(code)}; holding")
        move.reason = note + move.reason
        return decide(move)

    def _decision(self, current: Settings, move: _Move | None, hold_reason: str,
                  verdict: Verdict, code: Bottleneck, tp: float) -> Decision:
        if move is None or move.after.key() == current.key():
            after, action, reason = dataclasses.replace(current), "hold", hold_reason
        else:
            after, action, reason = move.after, move.action, move.reason
            self._pending = _Pending(dataclasses.replace(current), dataclasses.replace(after),
                                     int(code), move.kind)
            if move.kind == "safety" and action == "prefetch-":
                self._prefetch_ceiling = min(self._prefetch_ceiling, after.prefetch)
        return Decision(dataclasses.replace(current), after, _changes(current, after), reason, action,
                        int(verdict.code), verdict.name, tp)

    # ------------------------------------------------------------------ moves
    def _clamp(self, s: Settings) -> Settings:
        return Settings(min(max(s.num_workers, self.min_workers), self.max_workers),
                        min(max(s.prefetch, self.min_prefetch), self._prefetch_cap()),
                        s.executor)

    def _prefetch_cap(self) -> int:
        return max(self.min_prefetch, min(self.max_prefetch, self._prefetch_ceiling))

    def _with_workers(self, s: Settings, workers: int, window: TelemetryWindow) -> Settings:
        """``s`` with more workers and prefetch raised so every worker has a sample in flight."""
        executor = s.executor
        workers = min(max(workers, self.min_workers), self.max_workers)
        prefetch = max(s.prefetch, 2)
        if not self.prefetch_per_worker and executor == "thread" and window.batches > 0:
            batch_size = max(1.0, window.samples / window.batches)
            prefetch = max(prefetch, math.ceil(workers / batch_size))
        prefetch = min(max(prefetch, self.min_prefetch), self._prefetch_cap())
        return Settings(workers, prefetch, executor)

    def _move_from(self, s: Settings, code: Bottleneck, window: TelemetryWindow) -> _Move | None:
        """The verdict's move from ``s`` (``None`` when the knob is at its bound)."""
        w, p = s.num_workers, s.prefetch
        cap = self._prefetch_cap()
        if code is Bottleneck.NONE:
            return None
        if code is Bottleneck.MEMORY:
            if p <= self.min_prefetch:
                return None
            new = max(self.min_prefetch, p // 2)
            return _Move(Settings(w, new, s.executor), "prefetch-",
                         f"memory-throttled: prefetch {p} -> {new}", kind="safety")
        if code is Bottleneck.TRANSFER:
            new = min(cap, 2 * p)
            if new <= p:
                return None
            return _Move(Settings(w, new, s.executor), "prefetch+",
                         f"transfer-bound: deeper staging look-ahead, prefetch {p} -> {new}")
        if code is Bottleneck.GIL:  # thread executor only (process mapped to CPU by step)
            if self.cpu_count < 2:
                return None
            after = self._with_workers(Settings(w, p, "process"), self.cpu_count, window)
            return _Move(after, "executor",
                         f"gil-bound: executor thread -> process with {after.num_workers} "
                         f"workers (applied at the next epoch boundary)")
        busy = window.fetch_wall_s / window.duration_s if window.duration_s > 0 else 0.0
        if (window.threads > 0 and busy / window.threads < _IDLE_UTILISATION
                and min(cap, 2 * p) > p):
            new = min(cap, 2 * p)
            return _Move(Settings(w, new, s.executor), "prefetch+",
                         f"{_label(code)} with workers {busy / window.threads:.0%} busy: "
                         f"look-ahead too short, prefetch {p} -> {new}")
        if code is Bottleneck.CPU:
            # Workers in proportion to the idle cores: W * C / cores_used (C at once from
            # one CPU-bound thread; past C only while samples still leave cores idle).
            cores = (max(window.process_cpu_s, window.fetch_cpu_s) / window.duration_s
                     if window.duration_s > 0 else 0.0)
            limit = self.max_workers
            if s.executor == "process":  # more processes than cores only add memory
                limit = min(limit, max(self.cpu_count, self.min_workers))
            if cores > 0:
                gain = self.cpu_count / cores
                if gain <= 1.0 + self.margin:
                    return None  # cannot beat the margin: the cores are busy
                target = math.ceil(w * gain)
            else:
                target = 2 * w
            after = self._with_workers(s, min(limit, target), window)
            if after.num_workers <= w:
                return None
            return _Move(after, "workers+", f"cpu-bound using {cores:.1f} of {self.cpu_count} "
                                            f"cores: workers {w} -> {after.num_workers}")
        # IO: at least double; jump to the modelled need when it is further.
        target = 2 * w
        wait = window.wait_fraction
        n_wait = math.ceil(w / max(1.0 - wait, 0.05))
        if window.fetch_cpu_s > 0:
            n_cpu = math.ceil(_LATENCY_HEADROOM * self.cpu_count * window.fetch_wall_s
                              / window.fetch_cpu_s)
        else:
            n_cpu = self.max_workers
        target = max(target, min(n_wait, n_cpu))
        after = self._with_workers(s, target, window)
        if after.num_workers <= w:
            return None
        return _Move(after, "workers+",
                     f"io-latency: workers {w} -> {after.num_workers} (wait {wait:.0%}, "
                     f"wall/cpu {window.fetch_ms / max(window.cpu_per_sample_ms, 1e-9):.1f})")

    def _hold_reason(self, s: Settings, code: Bottleneck, verdict: Verdict) -> str:
        if code is Bottleneck.NONE:
            return f"{verdict.name}: no change needed"
        if code is Bottleneck.MEMORY:
            return (f"memory-throttled at the minimum prefetch {s.prefetch}: raise "
                    f"memory_budget or make samples smaller")
        if code is Bottleneck.TRANSFER:
            return f"transfer-bound at the prefetch ceiling {self._prefetch_cap()}"
        if code is Bottleneck.GIL:
            return "gil-bound with one core: processes would not help"
        if code is Bottleneck.CPU:
            return (f"cpu-bound with {s.num_workers} workers keeping {self.cpu_count} cores "
                    f"busy: make transforms cheaper or add cores")
        return f"io-latency at max_workers={self.max_workers}"

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


def _changes(before: Settings, after: Settings) -> dict[str, tuple[Any, Any]]:
    return {f: (getattr(before, f), getattr(after, f))
            for f in ("num_workers", "prefetch", "executor")
            if getattr(before, f) != getattr(after, f)}


def _fmt(s: Settings) -> str:
    return f"{s.num_workers} {s.executor}s, prefetch {s.prefetch}"


def _label(code: Bottleneck) -> str:
    return code.name.lower()


# ---------------------------------------------------------------------- probe
@dataclass(frozen=True)
class ProbeResult:
    """Settings picked by :func:`probe`, with the measurements behind them."""

    executor: str
    num_workers: int
    prefetch: int
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"executor": self.executor, "num_workers": self.num_workers,
                "prefetch": self.prefetch, "evidence": dict(self.evidence)}

    def settings(self) -> Settings:
        return Settings(self.num_workers, self.prefetch, self.executor)


# Thresholds of the probe (see probe's docstring).
_CPU_HEAVY_RATIO = 0.5
_CPU_BOUND_RATIO = 0.85  # threads compute at least this share of the time: one per core
_GIL_SPEEDUP = 1.3
_SCALING_CORES = 1.3  # the probe's threads burn more cores than this: not GIL-bound
_WAITING_CORES = 0.7  # ... fewer than this: they mostly wait (a GIL-bound pool burns ~1)
_MAX_PROBE_THREADS = 8
# Mean wait to get the GIL back after yielding it once, in the online probe's window:
# at least this, the workers fight over the GIL (GIL-bound); below _FREE_GIL_S it is
# free most of the time (they wait on I/O); in between, a serial phase decides.
_GIL_WAIT_S = 1e-3
_FREE_GIL_S = 2e-4
_MAX_PROBE_PREFETCH = 32
# Threads for latency-bound samples: cores / (cpu/wall) would just fill the cores if the
# samples' CPU cost stayed as measured alone; it grows under contention (cache, GIL
# hand-offs), and an idle thread waiting on I/O costs nothing, so plan 1.5x that.
_LATENCY_HEADROOM = 1.5
_TINY_SAMPLE_S = 2e-4  # below this per-sample wall time, loader overhead dominates: threads
_MIN_PROCESS_SAMPLE_S = 1e-3  # processes only pay off when a sample costs more than IPC does
_JOIN_POLL_S = 0.1


def probe(
    load: Callable[[int], object],
    indices: Sequence[int],
    *,
    cpu_count: int | None = None,
    max_workers: int | None = None,
    batch_size: int | None = None,
    prefetch_per_worker: bool = True,
    serial: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    thread_clock: Callable[[], float] = time.thread_time,
    process_clock: Callable[[], float] = time.process_time,
) -> ProbeResult:
    """Pick start-up settings for ``"auto"`` from a few samples, concurrent first.

    The probe loads real samples (the loader keeps them: they are the epoch's
    first), so in the common case it costs the time to first batch nothing
    beyond loading that batch on every core.

    1. **Concurrent phase.** The first ``n - serial`` of the ``n`` indices are
       loaded by ``k = min(cpu_count, n_concurrent // 2, 8)`` threads
       (``lts-probe-<i>``, one torch intra-op thread each, like the loader's
       workers) that take indices from a shared counter. Measured over the
       steady window -- from the moment every thread finished its first (cold)
       sample to the moment the first thread found no more work, i.e. while all
       ``k`` threads were busy; the whole phase if that window is empty -- the
       process CPU burnt, in cores: ``P``. The threads' compute share is
       ``ratio = P / k`` (capped at 1).
    2. **Choice**, by what ``P`` rules out:

       * tiny samples (under 0.2 ms of CPU each, and of wall time per thread
         even if the GIL serialised the ``k`` threads): ``num_workers=0``, loaded inline
         (handing them to threads or processes costs more than loading them);
       * ``P >= 1.3``: the threads ran in parallel, so the GIL is not the limit:
         threads;
       * ``P < 0.7``: the threads mostly waited (I/O latency); a GIL-bound pool
         always has one thread running, so it burns about one core: threads;
       * otherwise ``P`` is about one core: GIL-bound, *or* samples that wait
         just ``1 - 1/k`` of their time. The last ``serial`` indices are
         then loaded serially on one thread (``lts-probe-serial``) and
         ``speedup = P / serial_ratio`` (how many serial loads ran at once;
         ``serial_ratio`` = cpu/wall of a lone sample). CPU-heavy samples
         (``serial_ratio >= 0.5``, at least 1 ms) with ``speedup < 1.3`` are
         GIL-bound: ``"process"``, one worker per core. Others: threads.

       With one core there is no concurrency to test (processes cannot help
       either): the first part is loaded serially on the calling thread, the
       first sample as a warm-up, and only sizes the threads.
    3. **Threads**: ``cpu_count`` when ``ratio >= 0.85`` (CPU-bound);
       ``ceil(cpu_count / ratio)`` when ``ratio >= 0.5``; latency-bound samples
       get 1.5x headroom, ``ceil(1.5 * cpu_count / ratio)``; all capped at
       ``max_workers`` (default ``min(64, 8 * cpu_count)``). ``ratio`` is the
       lower of the concurrent and (if measured) the serial one. ``prefetch``
       is 2 per worker (torch's default ``prefetch_factor``); with
       ``prefetch_per_worker=False`` and a ``batch_size`` in thread mode it is
       the total look-ahead ``max(2, ceil(2 * num_workers / batch_size))``
       (two samples in flight per thread, capped at 32).

    Evidence (``ProbeResult.evidence``): ``threads`` (k), ``wall_ms`` (thread-seconds
    per sample: ``k`` x the phase's wall time / samples), ``cpu_ms`` (mean thread
    CPU per sample),
    ``process_cores`` (P), ``cpu_wall_ratio`` (the ratio used for sizing),
    ``serial_cpu_wall_ratio`` and ``speedup`` (``None`` unless the serial phase
    ran), ``samples_concurrent``, ``samples_serial``, ``cpu_count``, ``reason``.

    Args:
        load: loads one sample (``dataset.__getitem__``); its result is dropped.
        indices: at least four dataset indices to probe with, in loading order.
        cpu_count: usable cores (default: this process's affinity mask).
        max_workers: cap on the thread count.
        batch_size: the loader's batch size, to size a total prefetch.
        prefetch_per_worker: whether ``prefetch`` counts batches per worker (default)
            or in total.
        serial: how many of the last indices are kept for the serial phase
            (default ``n // 3``; at least 2 must remain for the concurrent phase).
        clock, thread_clock, process_clock: wall, per-thread CPU and process CPU clocks
            (injectable for tests).

    Returns:
        A :class:`ProbeResult`.

    Raises:
        ValueError: for fewer than four indices or a bad count.
        Exception: whatever ``load`` raises, unchanged (the caller names the sample).
            A ``load`` that never returns cannot be interrupted; the loader's stall
            watchdog covers it.
    """
    indices = list(indices)
    if len(indices) < 4:
        raise ValueError(f"indices={indices!r} must hold at least 4 indices "
                         f"(most loaded concurrently, the rest serially if needed)")
    rules = _Rules.checked(cpu_count, max_workers, batch_size, prefetch_per_worker)
    cpu_count = rules.cpu_count
    if serial is None:
        serial = len(indices) // 3
    if isinstance(serial, bool) or not isinstance(serial, int) or not \
            0 <= serial <= len(indices) - 2:
        raise ValueError(f"serial={serial!r} must be an int in [0, {len(indices) - 2}] "
                         f"(at least 2 of the {len(indices)} indices load concurrently)")
    first = indices[:len(indices) - serial]
    rest = indices[len(first):]
    if cpu_count == 1:
        walls, cpus = _load_serially(load, first, clock, thread_clock)
        if len(walls) >= 3:  # the first sample is a warm-up
            walls, cpus = walls[1:], cpus[1:]
        return rules.one_core(walls, cpus)
    k = max(2, min(cpu_count, len(first) // 2, _MAX_PROBE_THREADS))
    run = _load_concurrently(load, first, k, clock, thread_clock, process_clock)
    state = rules.concurrent(k, samples=run.samples, elapsed_s=run.elapsed_s, cpu_s=run.cpu_s,
                             process_cores=run.process_cores)
    if state.needs_serial and rest:
        walls, cpus = _load_serially(load, rest, clock, thread_clock,
                                     thread_name="lts-probe-serial")
        return rules.after_serial(state, walls, cpus)
    return rules.decide(state)


@dataclass
class _ConcurrentState:
    """What the concurrent phase of a probe found (see :func:`probe`)."""

    evidence: dict[str, Any]
    kind: str  # "parallel" | "waiting" | "one core busy" | "free GIL" | "one core"
    ratio: float
    tiny: bool

    @property
    def needs_serial(self) -> bool:
        return not self.tiny and self.kind == "one core busy"


@dataclass(frozen=True)
class _Rules:
    """The probe's decision rules, shared by :func:`probe` and :class:`OnlineProbe`."""

    cpu_count: int
    max_workers: int
    batch_size: int | None
    prefetch_per_worker: bool

    @classmethod
    def checked(cls, cpu_count: int | None, max_workers: int | None, batch_size: int | None,
                prefetch_per_worker: bool) -> _Rules:
        """Validated rules; ``cpu_count`` defaults to the usable cores, ``max_workers``
        to ``min(64, 8 * cpu_count)``."""
        if cpu_count is None:
            cpu_count = usable_cpu_count()
        _check_int("cpu_count", cpu_count, 1)
        if max_workers is None:
            max_workers = default_max_workers(cpu_count)
        _check_int("max_workers", max_workers, 1)
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        return cls(cpu_count, max_workers, batch_size, prefetch_per_worker)

    def _base(self) -> dict[str, Any]:
        return {"cpu_count": self.cpu_count, "serial_cpu_wall_ratio": None, "speedup": None,
                "samples_serial": 0}

    def one_core(self, walls: Sequence[float], cpus: Sequence[float]) -> ProbeResult:
        wall = sum(walls) / max(len(walls), 1)
        ratio = round(min(sum(cpus) / sum(walls), 1.0), 6) if sum(walls) > 0 else 1.0
        evidence = self._base()
        evidence.update(threads=0, wall_ms=1e3 * wall, cpu_ms=1e3 * sum(cpus) / max(len(cpus), 1),
                        process_cores=None, cpu_wall_ratio=ratio, samples_concurrent=0,
                        samples_serial=len(walls))
        return self.decide(_ConcurrentState(evidence, "one core", ratio,
                                            tiny=wall < _TINY_SAMPLE_S))

    def concurrent(self, k: int, *, samples: int, elapsed_s: float, cpu_s: float,
                   process_cores: float) -> _ConcurrentState:
        samples = max(samples, 1)
        wall = k * elapsed_s / samples  # thread-seconds per sample
        cpu = cpu_s / samples
        cores = round(max(process_cores, 0.0), 6)  # measured: exact thresholds mean nothing
        ratio = round(min(cores / k, 1.0), 6)
        evidence = self._base()
        evidence.update(threads=k, wall_ms=1e3 * wall, cpu_ms=1e3 * cpu, process_cores=cores,
                        cpu_wall_ratio=ratio, samples_concurrent=samples)
        kind = ("parallel" if cores >= _SCALING_CORES else
                "waiting" if cores < _WAITING_CORES else "one core busy")
        tiny = cpu < _TINY_SAMPLE_S and wall < k * _TINY_SAMPLE_S  # even if GIL-serialised
        return _ConcurrentState(evidence, kind, ratio, tiny)

    def after_serial(self, state: _ConcurrentState, walls: Sequence[float],
                     cpus: Sequence[float]) -> ProbeResult:
        ev = state.evidence
        k, cores = int(ev["threads"]), float(ev["process_cores"])
        s_wall = sum(walls) / max(len(walls), 1)
        s_ratio = round(min(sum(cpus) / sum(walls), 1.0), 6) if sum(walls) > 0 else 1.0
        speedup = round(cores / s_ratio, 6) if s_ratio > 0 else float(k)
        ev.update(serial_cpu_wall_ratio=s_ratio, speedup=speedup, samples_serial=len(walls))
        if s_ratio >= _CPU_HEAVY_RATIO and s_wall >= _MIN_PROCESS_SAMPLE_S \
                and speedup < _GIL_SPEEDUP:
            ev["reason"] = (f"CPU-heavy samples (cpu/wall {s_ratio:.2f} alone) gain only "
                            f"{speedup:.2f}x from {k} threads, which burn {cores:.2f} cores: "
                            "GIL-bound")
            return self._processes(ev)
        state.ratio = min(state.ratio, s_ratio)
        ev["cpu_wall_ratio"] = state.ratio
        return self.decide(state)

    def gil_bound(self, state: _ConcurrentState, gil_wait_s: float) -> ProbeResult:
        """Processes for samples the online probe saw fight over the GIL."""
        ev = state.evidence
        ev["reason"] = (f"{ev['threads']} threads burn {ev['process_cores']:.2f} cores and wait "
                        f"{1e3 * gil_wait_s:.1f} ms on average to get the GIL back: "
                        "GIL-bound")
        return self._processes(ev)

    def _processes(self, ev: dict[str, Any]) -> ProbeResult:
        # One process per core: more would buy little (a few % on W3) for a copy of the
        # dataset each and torch's "more workers than cores" warning.
        return ProbeResult("process", min(self.cpu_count, self.max_workers), 2, ev)

    def decide(self, state: _ConcurrentState) -> ProbeResult:
        ev, ratio = state.evidence, state.ratio
        if state.tiny:
            ev["reason"] = (f"tiny samples ({ev['cpu_ms'] * 1e3:.0f} us of CPU): handing them "
                            "to threads or processes costs more than loading them, so load "
                            "inline")
            return ProbeResult("thread", 0, 2, ev)
        cores = self.cpu_count
        if ratio >= _CPU_BOUND_RATIO:
            workers = cores
        elif ratio >= _CPU_HEAVY_RATIO:
            workers = math.ceil(cores / ratio - 1e-9)  # 1e-9: ratios are rounded
        elif ratio > 0:
            workers = math.ceil(_LATENCY_HEADROOM * cores / ratio - 1e-9)
        else:
            workers = self.max_workers
        workers = max(1, min(self.max_workers, workers))
        prefetch = 2
        if self.batch_size is not None and not self.prefetch_per_worker:
            prefetch = min(_MAX_PROBE_PREFETCH, max(2, math.ceil(2 * workers / self.batch_size)))
        cores_txt = f"{ev['process_cores'] or 0:.2f}"
        what = {"parallel": f"threads ran in parallel ({cores_txt} cores)",
                "waiting": f"threads mostly wait ({cores_txt} cores busy)",
                "one core busy": f"{ev['speedup'] or 0:.2f}x from {ev['threads']} threads: "
                                 "not GIL-bound",
                "free GIL": f"{cores_txt} cores busy, the GIL mostly free: waiting, not "
                            "GIL-bound",
                "one core": "one core"}[state.kind]
        bound = "latency-bound" if ratio < _CPU_HEAVY_RATIO else "CPU-bound"
        ev["reason"] = f"{bound} samples (cpu/wall {ratio:.2f}; {what}): {workers} threads"
        return ProbeResult("thread", workers, prefetch, ev)


class OnlineProbe:
    """The ``"auto"`` probe run inside the live worker pool: no start-up phase.

    The loader starts loading at once with ``threads`` provisional worker
    threads; each worker reports every completed sample (:meth:`observe`) until
    a decision is made, and the rules are those of :func:`probe`:

    1. *Warm-up*: until each of the first ``threads`` workers finished one sample
       (first samples pay cold starts: thread start, allocator, caches).
    2. *Concurrent window*: the next ``window`` samples (default ``max(4, 2 *
       threads)``) -- the CPU they burnt over the window in cores (``P``), thread CPU per
       sample, thread-seconds per sample (the window also closes after two
       samples once it lasted ``enough_s``). ``P`` sums the workers' thread CPU (the
       training loop runs meanwhile and must not count). Tiny samples: inline; ``P >= 1.3`` or
       ``P < 0.7``: threads, sized; otherwise (about one core busy):
    3. *Serial*: :attr:`wanted_workers` drops to 1 (the consumer retires the
       others); once one worker is left, ``serial`` samples (or two, once they
       took ``enough_s``) timed alone tell
       GIL-bound (processes) from waiting (threads). With one provisional thread
       (one core) the window's samples only size the threads.

    Thread-safety: :meth:`observe` is called by any worker thread, concurrently;
    every field is guarded by ``_lock``. :attr:`result` (set once) and
    :attr:`wanted_workers` are published by single reference stores under the
    lock and read without it: the reporting worker shrinks the pool for the
    serial phase at once; the consumer applies the result (the loader's
    settings, a larger pool, or a switch of executor).

    Args:
        threads: provisional worker threads the pool started with (>= 1).
        cpu_count, max_workers, batch_size, prefetch_per_worker: as for :func:`probe`.
        window: samples in the concurrent window (>= 2).
        serial: samples timed alone when the window is ambiguous (>= 1).
        enough_s: a phase also ends after 2 samples once it has lasted this long
            (window: wall time; serial: summed sample time), so slow samples are
            not measured longer than needed.
        clock: the wall clock (injectable for tests).
        on_serial: called once, from the reporting worker, when the serial phase starts
            (the loader shrinks its pool to one thread there).
    """

    def __init__(self, *, threads: int, cpu_count: int | None = None,
                 max_workers: int | None = None, batch_size: int | None = None,
                 prefetch_per_worker: bool = True, window: int | None = None, serial: int = 4,
                 enough_s: float = 0.03,
                 clock: Callable[[], float] = time.perf_counter,
                 on_serial: Callable[[], None] | None = None) -> None:
        _check_int("threads", threads, 1)
        self._rules = _Rules.checked(cpu_count, max_workers, batch_size, prefetch_per_worker)
        if window is None:
            window = max(4, 2 * threads)
        _check_int("window", window, 2)
        _check_int("serial", serial, 1)
        if not isinstance(enough_s, (int, float)) or isinstance(enough_s, bool) or enough_s <= 0:
            raise ValueError(f"enough_s={enough_s!r} must be a positive number of seconds")
        self.threads = threads
        self.result: ProbeResult | None = None
        self.wanted_workers = threads
        self._window = window
        self._serial = serial
        self._enough_s = enough_s
        self._clock = clock
        # Called once, under _lock, as the serial phase starts (the pool shrinks to one
        # worker there and then: a result cannot be published meanwhile, so a stale
        # shrink can never undo the consumer's resize to the decided size).
        self.on_serial = on_serial
        # Everything below is guarded by _lock.
        self._lock = threading.Lock()
        self._warm: set[int] = set()  # ids of workers that finished their first sample
        self._start: float | None = None  # wall clock at the window's start
        self._walls: list[float] = []  # per-sample wall / thread CPU: the window, then serial
        self._cpus: list[float] = []
        self._gil: list[float] | None = []  # GIL waits in the window (None: not measured)
        self._state: _ConcurrentState | None = None  # set when the serial phase starts
        self._serial_open = False  # one worker left: the serial samples count from now

    def observe(self, worker: int, *, wall_s: float, cpu_s: float, live_workers: int,
                gil_wait_s: float | None = None) -> None:
        """A worker finished a sample that took ``wall_s`` / ``cpu_s`` (thread CPU).

        ``gil_wait_s``: how long the worker then waited to get the GIL back after
        yielding it once (``time.sleep(0)``), or ``None`` if not measured.
        """
        if self.result is not None:
            return
        with self._lock:
            if self.result is not None:
                return
            if self._state is None:
                self._observe_concurrent(worker, wall_s, cpu_s, gil_wait_s)
            elif live_workers <= 1:
                if not self._serial_open:
                    # samples that started while other workers ran do not count
                    self._serial_open = True
                    return
                self._walls.append(wall_s)
                self._cpus.append(cpu_s)
                n = len(self._walls)
                if n >= self._serial or (n >= 2 and sum(self._walls) >= self._enough_s):
                    self._publish(self._rules.after_serial(self._state, self._walls, self._cpus))

    def _observe_concurrent(self, worker: int, wall_s: float, cpu_s: float,
                            gil_wait_s: float | None) -> None:
        if self._start is None:
            self._warm.add(worker)
            if len(self._warm) >= self.threads:
                self._start = self._clock()
            return
        self._walls.append(wall_s)
        self._cpus.append(cpu_s)
        if self._gil is not None:
            if gil_wait_s is None:
                self._gil = None
            else:
                self._gil.append(gil_wait_s)
        n = len(self._walls)
        if n >= self._window or (n >= 2 and self._clock() - self._start >= self._enough_s):
            self._close_window()

    def _close_window(self) -> None:
        assert self._start is not None
        if self.threads == 1:
            self._publish(self._rules.one_core(self._walls, self._cpus))
            return
        elapsed = self._clock() - self._start
        # The workers' own thread CPU, not the process's: the training loop runs meanwhile
        # and would make a GIL-bound pool look parallel.
        cores = sum(self._cpus) / elapsed if elapsed > 0 else float(self.threads)
        state = self._rules.concurrent(self.threads, samples=len(self._walls), elapsed_s=elapsed,
                                       cpu_s=sum(self._cpus), process_cores=cores)
        if state.kind != "parallel" and not state.tiny and self._gil:
            # About one core busy: the GIL, or waits of 1 - 1/threads. Yielding the GIL
            # once after each sample tells them apart without a serial phase: a worker
            # gets it back at once unless another thread holds it running Python (then
            # after up to the switch interval, 5 ms by default).
            gil = sum(self._gil) / len(self._gil)
            state.evidence["gil_wait_ms"] = 1e3 * gil
            cpu = sum(self._cpus) / len(self._cpus)
            if gil >= _GIL_WAIT_S and cpu >= _MIN_PROCESS_SAMPLE_S:
                self._publish(self._rules.gil_bound(state, gil))
                return
            if gil < _FREE_GIL_S and state.kind == "one core busy":
                state.kind = "free GIL"
                self._publish(self._rules.decide(state))
                return
        if state.needs_serial:
            self._state = state
            self._walls, self._cpus = [], []
            self.wanted_workers = 1
            if self.on_serial is not None:
                self.on_serial()
        else:
            self._publish(self._rules.decide(state))

    def _publish(self, result: ProbeResult) -> None:
        result.evidence["online"] = True
        if result.executor == "thread" and result.num_workers > 0:
            self.wanted_workers = result.num_workers
        self.result = result

    def finish(self) -> ProbeResult:
        """Decide with what was seen so far (the epoch ended before a decision)."""
        with self._lock:
            if self.result is None:
                if self._state is not None:
                    self._publish(self._rules.after_serial(self._state, self._walls, self._cpus)
                                  if self._walls else self._rules.decide(self._state))
                elif self._start is not None and self._walls:
                    self._close_window()
                    if self.result is None:  # would need a serial phase: no samples left
                        assert self._state is not None
                        self._publish(self._rules.decide(self._state))
                else:
                    cores = self._rules.cpu_count
                    self._publish(ProbeResult("thread", min(cores, self._rules.max_workers), 2, {
                        "reason": "too few samples to probe: one thread per core",
                        "cpu_count": cores}))
            assert self.result is not None
            return self.result


@dataclass
class _ConcurrentRun:
    """What :func:`_load_concurrently` measured."""

    samples: int  # loaded
    elapsed_s: float  # wall time of the whole phase
    cpu_s: float  # summed per-sample thread CPU
    process_cores: float  # process CPU / wall over the steady window


def _load_serially(load: Callable[[int], object], indices: Sequence[int],
                   clock: Callable[[], float], thread_clock: Callable[[], float],
                   thread_name: str | None = None) -> tuple[list[float], list[float]]:
    """Per-sample ``(walls, cpus)`` of loading ``indices`` one by one.

    On the calling thread, or with ``thread_name`` on one fresh thread (one
    intra-op torch thread, like the workers) that the caller joins.
    """
    walls: list[float] = []
    cpus: list[float] = []

    def run(_: int, stop: threading.Event | None = None) -> None:
        for i in indices:
            if stop is not None and stop.is_set():
                return
            w0, c0 = clock(), thread_clock()
            load(i)
            cpus.append(thread_clock() - c0)
            walls.append(clock() - w0)

    if thread_name is None:
        run(0)
    else:
        _run_threads(run, [thread_name])
    return walls, cpus


def _load_concurrently(load: Callable[[int], object], indices: Sequence[int], k: int,
                       clock: Callable[[], float], thread_clock: Callable[[], float],
                       process_clock: Callable[[], float]) -> _ConcurrentRun:
    """Load ``indices`` on ``k`` threads taking them from a shared counter."""
    # All of the following are guarded by `lock`: the threads take the next position
    # and record their results under it; the caller reads them after the join.
    lock = threading.Lock()
    nxt = [0]
    totals = [0, 0.0]  # samples, thread CPU
    warm: list[tuple[float, float]] = []  # (wall, process CPU) as each thread's 1st sample ended
    idle: list[tuple[float, float]] = []  # ... as the first thread found no more work

    def run(_: int, stop: threading.Event) -> None:
        done = 0
        while not stop.is_set():
            with lock:
                pos = nxt[0]
                if pos >= len(indices):
                    if not idle:
                        idle.append((clock(), process_clock()))
                    return
                nxt[0] = pos + 1
            c0 = thread_clock()
            load(indices[pos])
            c = thread_clock() - c0
            done += 1
            with lock:
                totals[0] += 1
                totals[1] += c
                if done == 1:
                    warm.append((clock(), process_clock()))

    start = (clock(), process_clock())
    _run_threads(run, [f"lts-probe-{n}" for n in range(k)])
    end = (clock(), process_clock())
    with lock:
        window = (max(warm), idle[0]) if warm and idle else (start, end)
        if window[1][0] - window[0][0] <= 0:
            window = (start, end)
        samples, cpu_s = int(totals[0]), float(totals[1])
    (w0, p0), (w1, p1) = window
    cores = (p1 - p0) / (w1 - w0) if w1 > w0 else float(k)
    return _ConcurrentRun(max(samples, 1), max(end[0] - start[0], 0.0), cpu_s, max(cores, 0.0))


def _run_threads(target: Callable[[int, threading.Event], None], names: Sequence[str]) -> None:
    """Run ``target(n, stop)`` on one thread per name; join them; re-raise the first exception.

    Each thread runs torch ops on one intra-op thread (like the loader's workers).
    ``target`` checks ``stop`` between samples: the first failure (or an
    interrupted caller) sets it, so the other threads stop early.
    """
    # errors: appended by the threads, read after the join (guarded by errors_lock).
    errors: list[BaseException] = []
    errors_lock = threading.Lock()
    stop = threading.Event()

    def main(n: int) -> None:
        try:
            limit_intra_op_threads()
            target(n, stop)
        except BaseException as exc:
            with errors_lock:
                errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=main, args=(n,), name=name, daemon=True)
               for n, name in enumerate(names)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            # A bounded join in a loop keeps the caller interruptible; user code inside
            # `load` itself cannot be interrupted.
            while t.is_alive():
                t.join(timeout=_JOIN_POLL_S)
    finally:
        stop.set()
    with errors_lock:
        first_error = errors[0] if errors else None
    if first_error is not None:
        raise first_error
