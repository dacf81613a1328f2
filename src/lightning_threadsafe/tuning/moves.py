"""The hill-climber's move table: what each verdict changes, from given settings.

:class:`VerdictMoves` is the part of :class:`~lightning_threadsafe.tuning.HillClimbTuner`
that maps one verdict and one window to one change of the settings (or none, when
the knob is at its bound). It judges nothing and remembers nothing: keeping,
reverting and never retrying a move are the climb's business
(:mod:`~lightning_threadsafe.tuning.hill_climb`, which also holds the termination
argument).

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
flight as threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_threadsafe.bottleneck import Bottleneck, Verdict
from lightning_threadsafe.telemetry import TelemetryWindow
from lightning_threadsafe.tuning.settings import LATENCY_HEADROOM, Settings

__all__ = ["IDLE_UTILISATION", "Move", "VerdictMoves", "describe", "label"]

# Below this share of busy workers the look-ahead, not the thread count, is short.
IDLE_UTILISATION = 0.5


@dataclass
class Move:
    """One change a verdict asks for.

    Attributes:
        after: the settings to apply.
        action: the decision's action (``"workers+"``, ``"prefetch-"``...).
        reason: one line with the measured numbers behind it.
        kind: ``"explore"`` (judged on throughput), ``"safety"`` or ``"revert"``
            (accepted on arrival).
    """

    after: Settings
    action: str
    reason: str
    kind: str = "explore"


class VerdictMoves:
    """The move table of the module docstring, over the bounds of the class using it.

    A mixin of :class:`~lightning_threadsafe.tuning.HillClimbTuner`: it reads the
    bounds below and the current prefetch ceiling, and changes none of them. No
    threads and no locks (one caller at a time, like the tuner).

    Attributes:
        min_workers: lower bound on ``num_workers``.
        max_workers: upper bound on ``num_workers``.
        min_prefetch: lower bound on ``prefetch``.
        max_prefetch: upper bound on ``prefetch``.
        cpu_count: usable cores.
        margin: a change must raise throughput by more than this share to be worth it.
        prefetch_per_worker: whether ``prefetch`` counts batches per worker.
    """

    min_workers: int
    max_workers: int
    min_prefetch: int
    max_prefetch: int
    cpu_count: int
    margin: float
    prefetch_per_worker: bool
    _prefetch_ceiling: int  # lowered by memory moves (the tuner keeps it)

    def _clamp(self, s: Settings) -> Settings:
        """``s`` moved into the bounds."""
        return Settings(min(max(s.num_workers, self.min_workers), self.max_workers),
                        min(max(s.prefetch, self.min_prefetch), self._prefetch_cap()),
                        s.executor)

    def _prefetch_cap(self) -> int:
        """The highest prefetch a move may set: ``max_prefetch`` under the ceiling."""
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

    def _move_from(self, s: Settings, code: Bottleneck, window: TelemetryWindow) -> Move | None:
        """The verdict's move from ``s`` (``None`` when the knob is at its bound)."""
        w, p = s.num_workers, s.prefetch
        cap = self._prefetch_cap()
        if code is Bottleneck.NONE:
            return None
        if code is Bottleneck.MEMORY:
            if p <= self.min_prefetch:
                return None
            new = max(self.min_prefetch, p // 2)
            return Move(Settings(w, new, s.executor), "prefetch-",
                        f"memory-throttled: prefetch {p} -> {new}", kind="safety")
        if code is Bottleneck.TRANSFER:
            new = min(cap, 2 * p)
            if new <= p:
                return None
            return Move(Settings(w, new, s.executor), "prefetch+",
                        f"transfer-bound: deeper staging look-ahead, prefetch {p} -> {new}")
        if code is Bottleneck.GIL:  # thread executor only (process mapped to CPU by step)
            if self.cpu_count < 2:
                return None
            after = self._with_workers(Settings(w, p, "process"), self.cpu_count, window)
            return Move(after, "executor",
                        f"gil-bound: executor thread -> process with {after.num_workers} "
                        f"workers (applied at the next epoch boundary)")
        busy = window.fetch_wall_s / window.duration_s if window.duration_s > 0 else 0.0
        if (window.threads > 0 and busy / window.threads < IDLE_UTILISATION
                and min(cap, 2 * p) > p):
            new = min(cap, 2 * p)
            return Move(Settings(w, new, s.executor), "prefetch+",
                        f"{label(code)} with workers {busy / window.threads:.0%} busy: "
                        f"look-ahead too short, prefetch {p} -> {new}")
        if code is Bottleneck.CPU:
            return self._cpu_move(s, window)
        return self._io_move(s, window)

    def _cpu_move(self, s: Settings, window: TelemetryWindow) -> Move | None:
        """Workers in proportion to the idle cores: ``W * C / cores_used``.

        ``C`` at once from one CPU-bound thread; past ``C`` only while samples still
        leave cores idle; processes at most ``C``.
        """
        w = s.num_workers
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
        return Move(after, "workers+", f"cpu-bound using {cores:.1f} of {self.cpu_count} "
                                       f"cores: workers {w} -> {after.num_workers}")

    def _io_move(self, s: Settings, window: TelemetryWindow) -> Move | None:
        """At least double the workers; jump to the modelled need when it is further."""
        w = s.num_workers
        target = 2 * w
        wait = window.wait_fraction
        n_wait = math.ceil(w / max(1.0 - wait, 0.05))
        if window.fetch_cpu_s > 0:
            n_cpu = math.ceil(LATENCY_HEADROOM * self.cpu_count * window.fetch_wall_s
                              / window.fetch_cpu_s)
        else:
            n_cpu = self.max_workers
        target = max(target, min(n_wait, n_cpu))
        after = self._with_workers(s, target, window)
        if after.num_workers <= w:
            return None
        return Move(after, "workers+",
                    f"io-latency: workers {w} -> {after.num_workers} (wait {wait:.0%}, "
                    f"wall/cpu {window.fetch_ms / max(window.cpu_per_sample_ms, 1e-9):.1f})")

    def _hold_reason(self, s: Settings, code: Bottleneck, verdict: Verdict) -> str:
        """Why the verdict asks for no move from ``s``."""
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


def describe(s: Settings) -> str:
    """``"4 threads, prefetch 2"``: settings in a reason."""
    return f"{s.num_workers} {s.executor}s, prefetch {s.prefetch}"


def label(code: Bottleneck) -> str:
    """The verdict code in a reason (``"io"``, ``"gil"``...)."""
    return code.name.lower()
