"""Tuning the loader's knobs: a start-up probe and a measured hill-climber.

:func:`probe` picks first settings for ``"auto"`` from a handful of samples.
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
            max_workers = min(64, 8 * cpu_count)
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
_GIL_SPEEDUP = 1.3
_MAX_PROBE_PREFETCH = 32
# Threads for latency-bound samples: cores / (cpu/wall) would just fill the cores if the
# samples' CPU cost stayed as measured alone; it grows under contention (cache, GIL
# hand-offs), and an idle thread waiting on I/O costs nothing, so plan 1.5x that.
_LATENCY_HEADROOM = 1.5
_TINY_SAMPLE_S = 2e-4  # below this per-sample wall time, loader overhead dominates: threads
_MIN_PROCESS_SAMPLE_S = 1e-3  # processes only pay off when a sample costs more than IPC does
_GIL_PROCESS_CORES = 1.3  # two GIL-bound threads burn at most ~one core of process CPU
_JOIN_POLL_S = 0.1


def probe(
    load: Callable[[int], object],
    indices: Sequence[int],
    *,
    cpu_count: int | None = None,
    max_workers: int | None = None,
    batch_size: int | None = None,
    prefetch_per_worker: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    thread_clock: Callable[[], float] = time.thread_time,
    process_clock: Callable[[], float] = time.process_time,
) -> ProbeResult:
    """Pick start-up settings for ``"auto"`` from a few samples.

    1. The first half of ``indices`` is loaded serially, timing each sample's
       wall (``clock``) and thread CPU (``thread_clock``); the first sample is a
       warm-up and is left out of the means when there are at least three.
    2. With two or more cores, the second half is loaded by two threads
       (``lts-probe-0``/``-1``, joined before returning) and the speedup is
       ``serial wall per sample * count / concurrent wall``.
    3. Choice, with ``ratio = cpu / wall`` of a serial sample: tiny samples
       (< 0.2 ms) are loaded inline, ``num_workers=0`` (handing them to a thread
       costs more than loading them; processes would add IPC); ``"process"`` with ``num_workers = cpu_count`` when the samples
       are CPU-heavy (``ratio >= 0.5``), take at least 1 ms, two threads give
       less than a 1.3x speedup *and* burn at most ~1.3 cores of process CPU
       meanwhile (``process_clock``): the GIL serialises them. Samples that
       already use several cores (torch intra-op threads) or starve on a loaded
       machine show more process CPU or no GIL signature and stay on threads.
       Otherwise ``"thread"`` with
       ``num_workers = ceil(cpu_count / ratio)`` — the threads that keep every core
       busy while the others wait on I/O (``cpu_count`` for CPU-bound samples;
       ``ratio`` is the lower of the serial and the warmer concurrent phase) —
       capped at ``max_workers`` (default ``min(64, 8 * cpu_count)``).
       ``prefetch`` is 2 per worker (torch's default ``prefetch_factor``); with
       ``prefetch_per_worker=False`` and a ``batch_size`` in thread mode it is the
       total look-ahead ``max(2, ceil(2 * num_workers / batch_size))`` (two samples
       in flight per thread, capped at 32).

    Args:
        load: loads one sample (``dataset.__getitem__``); its result is dropped.
        indices: at least four dataset indices to probe with.
        cpu_count: usable cores (default: this process's affinity mask).
        max_workers: cap on the thread count.
        batch_size: the loader's batch size, to size a total prefetch.
        prefetch_per_worker: whether ``prefetch`` counts batches per worker (default)
            or in total.
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
                         f"(half loaded serially, half by two threads)")
    if cpu_count is None:
        cpu_count = usable_cpu_count()
    _check_int("cpu_count", cpu_count, 1)
    if max_workers is None:
        max_workers = min(64, 8 * cpu_count)
    _check_int("max_workers", max_workers, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)

    half = len(indices) // 2
    serial, concurrent = indices[:half], indices[half:2 * half]
    walls, cpus = [], []
    for i in serial:
        w0, c0 = clock(), thread_clock()
        load(i)
        cpus.append(thread_clock() - c0)
        walls.append(clock() - w0)
    if len(walls) >= 3:
        walls, cpus = walls[1:], cpus[1:]
    wall = max(sum(walls) / len(walls), 0.0)
    cpu = max(sum(cpus) / len(cpus), 0.0)
    ratio = min(cpu / wall, 1.0) if wall > 0 else 1.0

    speedup: float | None = None
    process_cores: float | None = None
    evidence_concurrent_ratio = None
    if cpu_count >= 2:
        t0, p0 = clock(), process_clock()
        c_wall, c_cpu = _load_in_two_threads(load, concurrent, clock, thread_clock)
        elapsed = clock() - t0
        # The serial samples come first and pay the cold start (page faults, pools
        # spinning up), which inflates their CPU share; the concurrent ones are warmer.
        # Size threads from the lower CPU share of the two phases.
        if c_wall > 0:
            concurrent_ratio = min(c_cpu / c_wall, 1.0)
            evidence_concurrent_ratio: float | None = concurrent_ratio
        else:
            evidence_concurrent_ratio = None
        speedup = wall * len(concurrent) / elapsed if elapsed > 0 else 2.0
        process_cores = (process_clock() - p0) / elapsed if elapsed > 0 else None

    evidence: dict[str, Any] = {
        "serial_wall_ms": 1000.0 * wall,
        "serial_cpu_ms": 1000.0 * cpu,
        "cpu_wall_ratio": ratio,
        "speedup_2_threads": speedup,
        "process_cores_2_threads": process_cores,
        "concurrent_cpu_wall_ratio": evidence_concurrent_ratio,
        "samples_serial": len(serial),
        "samples_concurrent": len(concurrent) if speedup is not None else 0,
        "cpu_count": cpu_count,
    }
    if wall < _TINY_SAMPLE_S:
        evidence["reason"] = (f"tiny samples ({1e6 * wall:.0f} us): handing them to threads or "
                              f"processes costs more than loading them, so load inline")
        return ProbeResult("thread", 0, 2, evidence)
    # GIL-bound: CPU-heavy samples that two threads cannot speed up AND whose two threads
    # burn no more than about one core of process CPU (the GIL lets one run at a time).
    # The last test keeps samples that already use several cores (torch intra-op
    # threads) or that starve on a loaded machine from being sent to processes.
    gil_bound = (
        ratio >= _CPU_HEAVY_RATIO and speedup is not None and speedup < _GIL_SPEEDUP
        and wall >= _MIN_PROCESS_SAMPLE_S
        and (process_cores is None or process_cores <= _GIL_PROCESS_CORES)
    )
    if gil_bound:
        assert speedup is not None
        workers = min(cpu_count, max_workers)
        evidence["reason"] = (f"CPU-heavy samples (cpu/wall {ratio:.2f}) gain only "
                              f"{speedup:.2f}x from two threads, which burn "
                              f"{process_cores or 0:.2f} cores: GIL-bound")
        return ProbeResult("process", workers, 2, evidence)
    sizing = ratio if evidence_concurrent_ratio is None else min(ratio, evidence_concurrent_ratio)
    headroom = _LATENCY_HEADROOM if sizing < _CPU_HEAVY_RATIO else 1.0
    if sizing > 0:
        workers = min(max_workers, max(1, math.ceil(headroom * cpu_count / sizing)))
    else:
        workers = max_workers
    prefetch = 2
    if batch_size is not None and not prefetch_per_worker:
        prefetch = min(_MAX_PROBE_PREFETCH, max(2, math.ceil(2 * workers / batch_size)))
    kind = "latency-bound" if ratio < _CPU_HEAVY_RATIO else "CPU-bound, threads scale"
    evidence["reason"] = f"{kind} samples (cpu/wall {ratio:.2f}): {workers} threads"
    return ProbeResult("thread", workers, prefetch, evidence)


def _load_in_two_threads(load: Callable[[int], object], indices: Sequence[int],
                         clock: Callable[[], float] = time.perf_counter,
                         thread_clock: Callable[[], float] = time.thread_time,
                         ) -> tuple[float, float]:
    """Load ``indices`` with two threads; re-raise the first exception of ``load``.

    Returns the summed per-sample ``(wall, thread CPU)`` seconds of the loads.
    """
    totals = [0.0, 0.0]  # guarded by errors_lock
    # stop: set by the first failing thread (or an interrupted caller); each thread
    # checks it between samples. errors: appended by threads, read after the join.
    stop = threading.Event()
    errors: list[BaseException] = []
    errors_lock = threading.Lock()  # guards `errors` (threads append, caller reads after join)

    def run(part: Sequence[int]) -> None:
        for i in part:
            if stop.is_set():
                return
            w0, c0 = clock(), thread_clock()
            try:
                load(i)
            except BaseException as exc:
                with errors_lock:
                    errors.append(exc)
                stop.set()
                return
            w, c = clock() - w0, thread_clock() - c0
            with errors_lock:
                totals[0] += w
                totals[1] += c

    threads = [threading.Thread(target=run, args=(indices[n::2],), name=f"lts-probe-{n}",
                                daemon=True) for n in range(2)]
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
        first = errors[0] if errors else None
    if first is not None:
        raise first
    return totals[0], totals[1]
