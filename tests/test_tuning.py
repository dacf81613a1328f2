"""The tuning package: HillClimbTuner moves, bounds, convergence and state; the probe's
rules as pure functions (also with the GIL disabled); the package's surface and imports."""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest

import lightning_threadsafe
from lightning_threadsafe import _gil, tuning
from lightning_threadsafe.bottleneck import Bottleneck, BottleneckDetector, Verdict
from lightning_threadsafe.telemetry import TelemetryWindow
from lightning_threadsafe.tuning import (
    Decision,
    HillClimbTuner,
    OnlineProbe,
    ProbeResult,
    Settings,
    default_max_workers,
)
from lightning_threadsafe.tuning.rules import _ConcurrentState, _Rules


# ----------------------------------------------------------------- simulator
@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A noise-free model of an input pipeline feeding a consumer.

    Each sample waits ``latency`` (GIL released) then computes ``cpu`` seconds; with
    ``gil=True`` the compute holds the GIL, so threads share one core (with a small
    switching cost per extra thread) while processes use every core.
    """

    latency: float = 0.020
    cpu: float = 0.004
    cores: int = 2
    batch: int = 16
    step: float = 0.005  # consumer time per batch
    gil: bool = False
    per_worker: bool = True  # prefetch counts batches per worker (the loader's depth P * W)

    def in_flight(self, s: Settings) -> int:
        # Samples being loaded at once: bounded by the workers and by the look-ahead.
        if s.executor == "process" or self.per_worker:
            return s.num_workers
        return min(s.num_workers, s.prefetch * self.batch)

    def capacity(self, s: Settings) -> float:
        lat = self.in_flight(s) / (self.latency + self.cpu)
        if self.gil and s.executor == "thread":
            cpu = max(0.5, 1.0 - 0.02 * (s.num_workers - 1)) / self.cpu
        else:
            cpu = self.cores / self.cpu
        return min(lat, cpu)

    def window(self, s: Settings, duration: float = 1.0) -> TelemetryWindow:
        pipe = self.capacity(s)
        rate = min(pipe, self.batch / self.step)
        samples = rate * duration
        batches = samples / self.batch
        in_flight = self.in_flight(s)
        if rate >= pipe:  # pipeline-bound: every slot busy (Little's law)
            wall = max(self.latency + self.cpu, in_flight / rate)
        else:
            wall = self.latency + self.cpu
        consumer = batches * self.step
        return TelemetryWindow(
            duration_s=duration, samples=round(samples), batches=round(batches),
            fetch_wall_s=samples * wall, fetch_cpu_s=samples * self.cpu,
            process_cpu_s=samples * self.cpu, wait_s=max(duration - consumer, 0.0),
            consumer_s=consumer, threads=s.num_workers, prefetch=s.prefetch,
        )


def best_static(p: Pipeline, max_workers: int = 64, max_prefetch: int = 32) -> float:
    return max(
        p.window(Settings(w, f, e)).samples_per_sec
        for w in range(1, max_workers + 1) for f in (1, 2, 4, 8, 16, 32) if f <= max_prefetch
        for e in ("thread", "process")
    )


def run(p: Pipeline, tuner: HillClimbTuner, start: Settings, steps: int,
        detector: BottleneckDetector | None = None) -> list[Decision]:
    det = detector or BottleneckDetector(cpu_count=p.cores)
    s, out = start, []
    for _ in range(steps):
        w = p.window(s)
        det.update(w)
        d = tuner.step(w, det.compute(), s)
        det.reset()
        out.append(d)
        s = d.after
    return out


def verdict(code: Bottleneck) -> Verdict:
    return Verdict(code, code.name.lower(), "scripted")


def io_window(threads: int, *, tp: float = 100.0, wait: float = 0.5, batch: int = 16,
              cpu_ratio: float = 0.1) -> TelemetryWindow:
    """A latency-bound window, all threads busy, with throughput ``tp`` samples/s."""
    return TelemetryWindow(duration_s=1.0, samples=int(tp), batches=max(1, int(tp) // batch),
                           fetch_wall_s=float(threads), fetch_cpu_s=threads * cpu_ratio,
                           wait_s=wait, consumer_s=1.0 - wait, threads=threads)


# --------------------------------------------------------------- convergence
@pytest.mark.parametrize("per_worker", [True, False])
def test_w2_like_pipeline_converges_from_one_thread_and_holds(per_worker):
    p = Pipeline(per_worker=per_worker)
    target = best_static(p)
    tuner = HillClimbTuner(cpu_count=p.cores, prefetch_per_worker=per_worker)
    decisions = run(p, tuner, Settings(1, 1, "thread"), 25)
    reached = next(i for i, d in enumerate(decisions)
                   if p.window(d.after).samples_per_sec >= 0.9 * target)
    assert reached <= 3, [d.reason for d in decisions[:5]]
    # Then it holds: no change in the 20 steps after settling.
    settled = decisions[reached + 1:reached + 21]
    assert len(settled) == 20 and all(not d.changed for d in settled), \
        [d.reason for d in settled if d.changed]
    assert decisions[-1].after.executor == "thread"


@pytest.mark.parametrize("latency, cpu, cores, step", [
    (0.020, 0.003, 2, 0.005),   # W2 on 2 cores
    (0.020, 0.003, 2, 0.030),   # consumer-limited: stop when the step stops waiting
    (0.050, 0.001, 8, 0.002),   # long latency, cheap samples: many threads
    (0.002, 0.010, 4, 0.001),   # CPU-heavy, GIL-free
])
@pytest.mark.parametrize("per_worker", [True, False])
def test_converges_to_90_percent_of_best_static(latency, cpu, cores, step, per_worker):
    p = Pipeline(latency=latency, cpu=cpu, cores=cores, step=step, per_worker=per_worker)
    target = best_static(p, max_workers=min(64, 8 * cores))
    tuner = HillClimbTuner(cpu_count=cores, prefetch_per_worker=per_worker)
    decisions = run(p, tuner, Settings(1, 1, "thread"), 30)
    final = decisions[-1].after
    assert p.window(final).samples_per_sec >= 0.9 * target
    assert all(not d.changed for d in decisions[-20:])


def test_gil_bound_dataset_switches_to_processes():
    p = Pipeline(latency=0.0, cpu=0.010, cores=4, gil=True)
    decisions = run(p, HillClimbTuner(cpu_count=4), Settings(1, 1, "thread"), 10)
    # 1 thread: CPU -> 2 threads; 2 threads do not help and read as GIL -> processes.
    assert decisions[0].action == "workers+" and decisions[0].verdict_code == Bottleneck.CPU
    assert decisions[1].verdict_code == Bottleneck.GIL
    assert decisions[1].action == "executor"
    assert decisions[1].after.executor == "process" and decisions[1].after.num_workers == 4
    assert decisions[-1].after.executor == "process"
    assert all(not d.changed for d in decisions[3:])
    assert p.window(decisions[-1].after).samples_per_sec == pytest.approx(best_static(p))


def test_no_oscillation_on_random_stationary_workloads():
    # Any stationary throughput table and verdict map: the tuner stops moving.
    rng = random.Random(7)
    codes = list(Bottleneck)
    for _ in range(40):
        tp_table: dict[tuple, float] = {}
        code_table: dict[tuple, Bottleneck] = {}

        def tp(s: Settings) -> float:
            return tp_table.setdefault(s.key(), rng.uniform(10.0, 1000.0))  # noqa: B023

        def code(s: Settings) -> Bottleneck:
            return code_table.setdefault(s.key(), rng.choice(codes))  # noqa: B023

        tuner = HillClimbTuner(cpu_count=rng.choice([1, 2, 8]), max_workers=16, max_prefetch=8)
        s = Settings(rng.randint(1, 16), rng.randint(1, 8), rng.choice(["thread", "process"]))
        history = []
        for _ in range(300):
            w = io_window(s.num_workers, tp=tp(s))
            d = tuner.step(w, verdict(code(s)), s)
            history.append(d)
            assert tuner.min_workers <= d.after.num_workers <= tuner.max_workers
            assert tuner.min_prefetch <= d.after.prefetch <= tuner.max_prefetch
            s = d.after
        assert all(not d.changed for d in history[-100:])


# ------------------------------------------------------------ single moves
def test_none_holds():
    tuner = HillClimbTuner(cpu_count=4)
    d = tuner.step(io_window(4), verdict(Bottleneck.NONE), Settings(4, 2))
    assert d.action == "hold" and d.changed == {} and d.after == d.before


def test_io_raises_threads_at_least_geometrically_and_prefetch_follows():
    # Little waiting: the model asks for less than a doubling -> double.
    w = io_window(4, wait=0.06, batch=2)
    # Total look-ahead: enough batches for every thread to hold a sample.
    d = HillClimbTuner(cpu_count=2, prefetch_per_worker=False).step(
        w, verdict(Bottleneck.IO), Settings(4, 1))
    assert d.action == "workers+" and d.after.num_workers == 8
    assert d.after.prefetch == 4  # ceil(8 threads / batch of 2)
    assert d.changed == {"num_workers": (4, 8), "prefetch": (1, 4)}
    # Per-worker prefetch (torch's prefetch_factor): look-ahead grows with W already.
    d = HillClimbTuner(cpu_count=2).step(w, verdict(Bottleneck.IO), Settings(4, 1))
    assert d.after == Settings(8, 2)


def test_io_jumps_to_the_modelled_need():
    tuner = HillClimbTuner(cpu_count=2, max_workers=64)
    # 1 thread, 95% waiting, samples 10% CPU: 20 threads would stop the wait, and
    # 2 cores / 0.1 = 20 threads keep every core busy.
    d = tuner.step(io_window(1, wait=0.95), verdict(Bottleneck.IO), Settings(1, 1))
    assert d.after.num_workers == 20


def test_io_respects_max_workers_and_holds_there():
    tuner = HillClimbTuner(cpu_count=2, max_workers=6)
    d = tuner.step(io_window(4, wait=0.9), verdict(Bottleneck.IO), Settings(4, 2))
    assert d.after.num_workers == 6
    d = tuner.step(io_window(6, tp=150.0, wait=0.9), verdict(Bottleneck.IO), d.after)
    assert d.action == "hold" and "max_workers=6" in d.reason


def test_idle_workers_raise_prefetch_instead_of_threads():
    tuner = HillClimbTuner(cpu_count=2)
    w = dataclasses.replace(io_window(8), fetch_wall_s=2.0)  # 2 of 8 threads busy
    d = tuner.step(w, verdict(Bottleneck.IO), Settings(8, 2))
    assert d.action == "prefetch+" and d.after == Settings(8, 4)


def cpu_window(threads: int, cores: float, *, tp: float = 100.0) -> TelemetryWindow:
    """A CPU-heavy window: ``threads`` busy threads burning ``cores`` cores."""
    return TelemetryWindow(duration_s=1.0, samples=int(tp), batches=max(1, int(tp) // 16),
                           fetch_wall_s=float(threads), fetch_cpu_s=cores, process_cpu_s=cores,
                           wait_s=0.5, consumer_s=0.5, threads=threads)


def test_cpu_fills_the_cores_then_holds():
    tuner = HillClimbTuner(cpu_count=6)
    d = tuner.step(cpu_window(1, 1.0, tp=100), verdict(Bottleneck.CPU), Settings(1, 1))
    assert d.action == "workers+" and d.after.num_workers == 6  # one core busy -> 6 threads
    d = tuner.step(cpu_window(6, 6.0, tp=600), verdict(Bottleneck.CPU), d.after)
    assert d.action == "hold" and "6 cores busy" in d.reason


def test_cpu_beyond_core_count_only_while_cores_idle():
    # 4 threads on 4 cores using 3.3 cores (samples wait a little): one more thread.
    tuner = HillClimbTuner(cpu_count=4)
    d = tuner.step(cpu_window(4, 3.3), verdict(Bottleneck.CPU), Settings(4, 2))
    assert d.after.num_workers == 5
    # Within the margin of all cores: nothing to gain.
    d = HillClimbTuner(cpu_count=4).step(cpu_window(4, 3.9), verdict(Bottleneck.CPU),
                                         Settings(4, 2))
    assert d.action == "hold"
    # Processes never exceed the core count.
    d = HillClimbTuner(cpu_count=4).step(cpu_window(2, 1.0), verdict(Bottleneck.CPU),
                                         Settings(2, 2, "process"))
    assert d.after == Settings(4, 2, "process")


def test_gil_switches_executor_and_process_gil_is_cpu():
    tuner = HillClimbTuner(cpu_count=4)
    d = tuner.step(io_window(2), verdict(Bottleneck.GIL), Settings(2, 1))
    assert d.action == "executor" and d.after == Settings(4, 2, "process")
    # In process mode a GIL verdict is read as CPU: workers already at the core count.
    tuner2 = HillClimbTuner(cpu_count=4)
    d2 = tuner2.step(cpu_window(4, 4.0), verdict(Bottleneck.GIL), Settings(4, 2, "process"))
    assert d2.action == "hold" and "cpu-bound" in d2.reason
    # One core: processes cannot help.
    d3 = HillClimbTuner(cpu_count=1).step(io_window(2), verdict(Bottleneck.GIL), Settings(2, 1))
    assert d3.action == "hold"


def test_memory_halves_prefetch_and_caps_later_raises():
    tuner = HillClimbTuner(cpu_count=2)
    d = tuner.step(io_window(4), verdict(Bottleneck.MEMORY), Settings(4, 8))
    assert d.action == "prefetch-" and d.after == Settings(4, 4)
    # Safety move: kept although throughput dropped.
    d = tuner.step(io_window(4, tp=60.0), verdict(Bottleneck.MEMORY), d.after)
    assert d.after == Settings(4, 2)
    # Transfer-bound now, but prefetch may not climb back over the memory ceiling.
    d = tuner.step(io_window(4, tp=60.0), verdict(Bottleneck.TRANSFER), d.after)
    assert d.action == "hold" and "ceiling 2" in d.reason
    assert tuner.best == Settings(4, 2)
    d = tuner.step(io_window(4, tp=60.0), verdict(Bottleneck.MEMORY), Settings(4, 2))
    d = tuner.step(io_window(4, tp=60.0), verdict(Bottleneck.MEMORY), d.after)
    assert d.after.prefetch == 1
    d = tuner.step(io_window(4, tp=60.0), verdict(Bottleneck.MEMORY), d.after)
    assert d.action == "hold" and "memory_budget" in d.reason


def test_transfer_doubles_prefetch():
    tuner = HillClimbTuner(cpu_count=2, max_prefetch=6)
    d = tuner.step(io_window(4), verdict(Bottleneck.TRANSFER), Settings(4, 2))
    assert d.action == "prefetch+" and d.after.prefetch == 4
    d = tuner.step(io_window(4, tp=120.0), verdict(Bottleneck.TRANSFER), d.after)
    assert d.after.prefetch == 6  # bounded by max_prefetch


# ------------------------------------------------------- revert / hysteresis
def test_revert_when_no_improvement_and_no_retry_under_same_verdict():
    tuner = HillClimbTuner(cpu_count=8, margin=0.05)
    s4 = Settings(4, 2)
    d = tuner.step(io_window(4, tp=100.0, wait=0.06), verdict(Bottleneck.IO), s4)
    assert d.after.num_workers == 8
    # 8 threads give +4%: not enough -> back to 4 threads.
    d = tuner.step(io_window(8, tp=104.0, wait=0.06), verdict(Bottleneck.IO), d.after)
    assert d.action == "revert" and d.after == s4 and "did not beat" in d.reason
    for _ in range(5):  # same verdict at the best settings: hold, never retry 8
        d = tuner.step(io_window(4, tp=100.0, wait=0.06), verdict(Bottleneck.IO), d.after)
        assert d.action == "hold" and "already measured worse" in d.reason
    # The workload changed (now CPU-bound, 4 of 8 cores busy): 8 threads get one more try.
    d = tuner.step(cpu_window(4, 4.0), verdict(Bottleneck.CPU), d.after)
    assert d.action == "workers+" and d.after == Settings(8, 2)
    d = tuner.step(io_window(8, tp=101.0), verdict(Bottleneck.CPU), d.after)
    assert d.action == "revert"
    d = tuner.step(cpu_window(4, 4.0), verdict(Bottleneck.CPU), d.after)
    assert d.action == "hold" and "already measured worse" in d.reason


def test_improvement_is_kept_and_the_climb_continues():
    tuner = HillClimbTuner(cpu_count=64, max_workers=64)
    d = tuner.step(io_window(2, tp=100.0, wait=0.06), verdict(Bottleneck.IO), Settings(2, 2))
    d = tuner.step(io_window(4, tp=180.0, wait=0.06), verdict(Bottleneck.IO), d.after)
    assert d.action == "workers+" and d.after.num_workers == 8 and d.reason.startswith("kept")
    assert tuner.best == Settings(4, 2)


def test_waits_for_a_change_to_take_effect():
    tuner = HillClimbTuner(cpu_count=4)
    s = Settings(2, 1)
    d = tuner.step(io_window(2), verdict(Bottleneck.GIL), s)
    assert d.after.executor == "process"
    # The loader switches executors at the epoch boundary: still threads for a window.
    d = tuner.step(io_window(2), verdict(Bottleneck.GIL), s)
    assert d.action == "wait" and "waiting" in d.reason
    assert d.after == Settings(4, 2, "process")  # repeated, so applying it verbatim is safe
    d = tuner.step(io_window(4, tp=300.0), verdict(Bottleneck.CPU), Settings(4, 2, "process"))
    assert tuner.best == Settings(4, 2, "process")


def test_stops_waiting_for_a_change_that_never_comes():
    tuner = HillClimbTuner(cpu_count=4)
    s = Settings(2, 1)
    tuner.step(io_window(2), verdict(Bottleneck.GIL), s)
    actions = [tuner.step(io_window(2), verdict(Bottleneck.NONE), s).action for _ in range(3)]
    assert actions == ["wait", "wait", "hold"]


def test_settings_changed_outside_the_tuner_become_the_baseline():
    tuner = HillClimbTuner(cpu_count=4)
    tuner.step(io_window(2, wait=0.06), verdict(Bottleneck.IO), Settings(2, 2))
    d = tuner.step(io_window(6, tp=50.0), verdict(Bottleneck.NONE), Settings(6, 3))
    assert d.action == "hold" and tuner.best == Settings(6, 3)


def test_callers_settings_object_is_not_kept():
    tuner = HillClimbTuner(cpu_count=2)
    s = Settings(2, 2)
    d = tuner.step(io_window(2, wait=0.06), verdict(Bottleneck.IO), s)
    s.num_workers = 99
    assert d.before == Settings(2, 2) and tuner.best == Settings(2, 2)


def test_out_of_bounds_settings_are_clamped_first():
    tuner = HillClimbTuner(cpu_count=2, max_workers=8, max_prefetch=4)
    d = tuner.step(io_window(32), verdict(Bottleneck.NONE), Settings(32, 10))
    assert d.action == "clamp" and d.after == Settings(8, 4)


def test_empty_window_holds():
    tuner = HillClimbTuner(cpu_count=2)
    d = tuner.step(TelemetryWindow(), verdict(Bottleneck.IO), Settings(1, 1))
    assert d.action == "hold" and "no samples" in d.reason


# --------------------------------------------------------------- state_dict
def test_state_dict_round_trip_resumes_identically():
    p = Pipeline(latency=0.050, cpu=0.001, cores=8, step=0.002)
    a = HillClimbTuner(cpu_count=8)
    decisions = run(p, a, Settings(1, 1), 2)
    state = a.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain data
    b = HillClimbTuner(cpu_count=8)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert b.state_dict() == state
    s = decisions[-1].after
    for _ in range(6):
        w = p.window(s)
        det = BottleneckDetector(cpu_count=8)
        det.update(w)
        v = det.compute()
        da, db = a.step(w, v, s), b.step(w, v, s)
        assert da == db
        s = da.after


def test_load_state_dict_rejects_foreign_state():
    tuner = HillClimbTuner(cpu_count=2)
    with pytest.raises(ValueError, match="version"):
        tuner.load_state_dict({"version": 99})
    with pytest.raises(ValueError, match="valid"):
        tuner.load_state_dict({"version": 1, "best": None})


def test_decision_to_dict_is_plain_json():
    d = HillClimbTuner(cpu_count=2).step(io_window(1, wait=0.95), verdict(Bottleneck.IO),
                                         Settings(1, 1))
    out = d.to_dict()
    assert json.loads(json.dumps(out)) == out
    assert out["changed"]["num_workers"] == [1, 16] and out["verdict_code"] == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"min_workers": 0}, "min_workers=0"),
    ({"max_workers": 0}, "max_workers=0"),
    ({"min_prefetch": 4, "max_prefetch": 2}, "max_prefetch=2"),
    ({"margin": -0.1}, "margin=-0.1"),
    ({"cpu_count": 0}, "cpu_count=0"),
])
def test_tuner_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HillClimbTuner(**kwargs)


def test_settings_validation():
    with pytest.raises(ValueError, match="executor='auto'"):
        Settings(1, 1, "auto")
    with pytest.raises(ValueError, match="prefetch=0"):
        Settings(1, 0)


def test_default_max_workers():
    assert HillClimbTuner(cpu_count=2).max_workers == 16
    assert HillClimbTuner(cpu_count=32).max_workers == 64


def test_default_max_workers_function():
    assert default_max_workers(1) == 8
    assert default_max_workers(2) == 16
    assert default_max_workers(8) == 64 and default_max_workers(32) == 64


# --------------------------------------------------------- probe rules (pure functions)
@pytest.fixture
def gil(monkeypatch):
    """``gil(enabled)`` fixes what the probe rules and the detector see of the GIL."""

    def force(enabled: bool) -> None:
        monkeypatch.setattr("lightning_threadsafe.tuning.rules.gil_enabled", lambda: enabled)
        monkeypatch.setattr("lightning_threadsafe.bottleneck.gil_enabled", lambda: enabled)

    return force


def window_state(rules: _Rules, k: int, *, cores: float, cpu_ms: float = 10.0,
                 samples: int = 8) -> _ConcurrentState:
    """A concurrent window of ``samples`` samples of ``cpu_ms`` on ``k`` threads burning
    ``cores`` cores between them."""
    cpu_s = samples * cpu_ms / 1e3
    elapsed = cpu_s / cores if cores > 0 else samples * cpu_ms / 1e3
    return rules.concurrent(k, samples=samples, elapsed_s=elapsed, cpu_s=cpu_s,
                            process_cores=cores)


def test_rules_speedup_boundary(gil):
    gil(True)
    rules = _Rules.checked(2, None, None, True)
    # Just below 1.3 cores: ambiguous; samples CPU-heavy alone gain 1.29x: GIL-bound.
    state = window_state(rules, 2, cores=1.29)
    assert state.kind == "one core busy" and state.needs_serial
    r = rules.after_serial(state, [0.01] * 4, [0.01] * 4)
    assert r.executor == "process" and r.num_workers == 2 and "GIL-bound" in r.evidence["reason"]
    assert r.evidence["speedup"] == pytest.approx(1.29)
    # Just above: the threads ran in parallel, no serial phase needed.
    state = window_state(rules, 2, cores=1.31)
    assert state.kind == "parallel" and not state.needs_serial
    assert rules.decide(state).executor == "thread"


def test_rules_keep_threads_when_samples_already_use_several_cores(gil):
    gil(True)
    rules = _Rules.checked(2, None, None, True)
    r = rules.decide(window_state(rules, 2, cores=2.0))
    assert r.executor == "thread" and r.num_workers == 2
    assert r.evidence["process_cores"] == pytest.approx(2.0) and r.evidence["speedup"] is None


def test_rules_prefetch_per_worker_total_and_capped():
    per_worker = _Rules.checked(4, None, 2, True)
    assert per_worker.decide(window_state(per_worker, 4, cores=3.8)).prefetch == 2
    total = _Rules.checked(4, None, 2, False)
    r = total.decide(window_state(total, 4, cores=3.8))
    assert r.num_workers == 4 and r.prefetch == 4  # ceil(2 * 4 threads / batch of 2)
    capped = _Rules.checked(8, None, 1, False)
    r = capped.decide(window_state(capped, 4, cores=0.0))  # waiting, no CPU at all
    assert r.num_workers == 64 and r.prefetch == 32


def test_rules_tiny_samples_are_loaded_inline_never_by_processes(gil):
    gil(True)
    rules = _Rules.checked(8, None, None, True)
    state = window_state(rules, 8, cores=1.0, cpu_ms=0.05, samples=24)  # GIL-serialised
    assert state.tiny and not state.needs_serial
    r = rules.decide(state)
    assert r.executor == "thread" and r.num_workers == 0
    assert "tiny samples" in r.evidence["reason"]


def test_rules_one_core_only_sizes_threads():
    rules = _Rules.checked(1, None, None, True)
    r = rules.one_core([0.020] * 4, [0.020] * 4)
    assert r.executor == "thread" and r.num_workers == 1
    assert r.evidence["threads"] == 0 and r.evidence["wall_ms"] == pytest.approx(20.0)


def test_rules_validation():
    with pytest.raises(ValueError, match="batch_size=0"):
        _Rules.checked(2, None, 0, True)
    with pytest.raises(ValueError, match="cpu_count=0"):
        _Rules.checked(0, None, None, True)
    with pytest.raises(ValueError, match="max_workers=0"):
        _Rules.checked(2, 0, None, True)


def test_probe_result_to_dict_and_settings():
    r = ProbeResult("thread", 6, 2, {"reason": "scripted", "cpu_wall_ratio": 0.25})
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    d["evidence"]["reason"] = "changed"
    assert r.evidence["reason"] == "scripted"  # the evidence was copied
    assert r.settings() == Settings(6, 2, "thread")


# ------------------------------------------------------------ the GIL disabled
class Clocks:
    """A wall clock only the test advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def wall(self) -> float:
        return self.now


def feed(probe: OnlineProbe, clocks: Clocks, *, n: int, wall: float, cpu: float,
         gil_wait: float | None = None, workers: int = 2) -> None:
    """``n`` samples completing round-robin on ``workers`` busy workers."""
    for i in range(n):
        clocks.now += wall / workers
        probe.observe(i % workers, wall_s=wall, cpu_s=cpu, live_workers=workers,
                      gil_wait_s=gil_wait)


@pytest.mark.parametrize("enabled", [True, False])
def test_online_probe_never_reports_gil_bound_with_the_gil_disabled(gil, enabled):
    # Two workers burn one core between them and wait 4 ms for the GIL after yielding
    # it: with a GIL that is a GIL fight (processes); without one it cannot be, and the
    # samples are sized as threads at once -- no GIL wait rule, no serial phase.
    gil(enabled)
    c = Clocks()
    p = OnlineProbe(threads=2, cpu_count=2, window=4, clock=c.wall)
    p.on_serial = lambda: pytest.fail("no serial phase expected")
    feed(p, c, n=6, wall=0.020, cpu=0.010, gil_wait=0.004)
    r = p.result
    assert r is not None and r.evidence["gil_enabled"] is enabled
    if enabled:
        assert r.executor == "process" and "GIL-bound" in r.evidence["reason"]
    else:
        assert r.executor == "thread" and r.num_workers == 4  # ceil(2 cores / 0.5)
        assert "with the GIL disabled: not GIL-bound" in r.evidence["reason"]
        assert "gil_wait_ms" not in r.evidence and p.wanted_workers == 4


def test_probe_rules_with_the_gil_disabled_skip_the_serial_phase_and_processes(gil):
    gil(False)
    rules = _Rules.checked(4, None, None, True)
    state = window_state(rules, 4, cores=1.0)  # one core busy: the GIL pattern
    assert state.kind == "no GIL" and not state.gil and not state.needs_serial
    assert rules.from_gil_wait(state, 0.004, 0.010) is None  # the GIL wait means nothing
    # Even serial samples that gain nothing from threads are not GIL-bound without a GIL.
    r = rules.after_serial(state, [0.01] * 4, [0.01] * 4)
    assert r.executor == "thread" and r.num_workers == 24  # ceil(1.5 * 4 cores / 0.25)
    assert r.evidence["speedup"] == pytest.approx(1.0)
    r2 = rules.decide(window_state(rules, 4, cores=1.0))
    assert r2.executor == "thread" and r2.num_workers == 24
    assert "GIL disabled" in r2.evidence["reason"]


def test_the_detector_and_the_probe_ask_at_decision_time(gil):
    # A free-threaded interpreter re-enables the GIL when it imports an extension that
    # does not support free threading: the switch is read per decision, not cached.
    rules = _Rules.checked(2, None, None, True)
    gil(False)
    assert window_state(rules, 2, cores=1.0).kind == "no GIL"
    gil(True)
    assert window_state(rules, 2, cores=1.0).kind == "one core busy"


def test_gil_enabled_follows_the_interpreter(monkeypatch):
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    assert _gil.gil_enabled() is False
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
    assert _gil.gil_enabled() is True
    monkeypatch.delattr(sys, "_is_gil_enabled", raising=False)
    assert _gil.gil_enabled() is True  # before 3.13 there is always a GIL


# ------------------------------------------------------------ the package
TUNING_DIR = Path(tuning.__file__).parent


def test_package_surface():
    assert tuning.__all__ == sorted(tuning.__all__) == [
        "Decision", "HillClimbTuner", "OnlineProbe", "ProbeResult", "Settings",
        "default_max_workers"]
    assert lightning_threadsafe.HillClimbTuner is HillClimbTuner
    assert "probe" not in lightning_threadsafe.__all__
    assert not hasattr(lightning_threadsafe, "probe")
    with pytest.raises(ModuleNotFoundError):
        __import__("lightning_threadsafe.autotune")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", [*sorted(TUNING_DIR.glob("*.py")), Path(_gil.__file__)],
                         ids=lambda p: p.name)
def test_tuning_modules_are_small_and_never_import_the_loader(path):
    assert len(path.read_text().splitlines()) <= 400
    loader_side = {"lightning_threadsafe.loader", "lightning_threadsafe._iterators",
                   "lightning_threadsafe._process", "lightning_threadsafe._epoch"}
    bad = {m for m in _imports(path)
           if m in loader_side or m.startswith("lightning_threadsafe._exec_")}
    assert not bad, f"{path.name} imports {sorted(bad)}"
