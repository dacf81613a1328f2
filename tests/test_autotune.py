"""HillClimbTuner moves, bounds, convergence and state; the start-up probe."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time

import pytest
import torch

from lightning_threadsafe.autotune import Decision, HillClimbTuner, ProbeResult, Settings, probe
from lightning_threadsafe.bottleneck import Bottleneck, BottleneckDetector, Verdict
from lightning_threadsafe.telemetry import TelemetryWindow


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


# -------------------------------------------------------------------- probe
class FakeClocks:
    """A wall clock and per-thread CPU clocks advanced only by the fake loads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards now/cpu (advanced by the probe's threads)
        self.now = 0.0
        self.cpu: dict[int, float] = {}

    def wall(self) -> float:
        with self._lock:
            return self.now

    def thread(self) -> float:
        with self._lock:
            return self.cpu.get(threading.get_ident(), 0.0)

    def process(self) -> float:
        with self._lock:
            return sum(self.cpu.values()) + self.extra_process_cpu

    extra_process_cpu = 0.0  # CPU burnt outside the samples' threads (intra-op pools)

    def advance(self, wall: float, cpu: float) -> None:
        with self._lock:
            self.now += wall
            me = threading.get_ident()
            self.cpu[me] = self.cpu.get(me, 0.0) + cpu


def fake_load(clocks: FakeClocks, *, wall: float, cpu: float, speedup: float = 2.0,
              first_wall: float | None = None):
    """A load whose samples take ``wall``/``cpu`` alone; in the probe's concurrent threads
    the shared wall clock advances ``wall / speedup`` per sample (the threads together
    finish ``speedup`` times faster than serially). ``first_wall``: the very first
    sample's wall time (a cold start)."""
    calls = []
    lock = threading.Lock()  # guards calls (several probe threads)

    def load(i: int) -> int:
        name = threading.current_thread().name
        concurrent = name.startswith("lts-probe-") and name != "lts-probe-serial"
        w = wall / speedup if concurrent else wall
        with lock:
            if first_wall is not None and not calls:
                w = first_wall
            calls.append(i)
        clocks.advance(w, cpu)
        return i

    load.calls = calls  # type: ignore[attr-defined]
    return load


def run_probe(load, clocks: FakeClocks, n: int = 12, **kw) -> ProbeResult:
    return probe(load, list(range(n)), clock=clocks.wall, thread_clock=clocks.thread,
                 process_clock=clocks.process, **kw)


def test_probe_latency_bound_picks_threads_without_a_serial_phase():
    c = FakeClocks()
    load = fake_load(c, wall=0.020, cpu=0.001)
    r = run_probe(load, c, cpu_count=2, max_workers=64)
    assert r.executor == "thread"
    assert r.num_workers == 60  # ceil(1.5 headroom * 2 cores / (1 ms / 20 ms))
    assert r.prefetch == 2
    assert r.evidence["process_cores"] == pytest.approx(0.1)  # 2 threads x 5% busy
    assert r.evidence["cpu_wall_ratio"] == pytest.approx(0.05)
    assert r.evidence["speedup"] is None and r.evidence["samples_serial"] == 0
    assert sorted(load.calls) == list(range(8))  # the 4 serial indices were never loaded
    # default cap: min(64, 8 * cores)
    c2 = FakeClocks()
    assert run_probe(fake_load(c2, wall=0.020, cpu=0.001), c2, cpu_count=2).num_workers == 16


def test_probe_gil_bound_picks_processes():
    c = FakeClocks()
    load = fake_load(c, wall=0.010, cpu=0.010, speedup=1.0)
    r = run_probe(load, c, cpu_count=4)
    assert r.executor == "process" and r.num_workers == 4 and r.prefetch == 2
    assert r.evidence["threads"] == 4
    assert r.evidence["process_cores"] == pytest.approx(1.0)
    assert r.evidence["serial_cpu_wall_ratio"] == pytest.approx(1.0)
    assert r.evidence["speedup"] == pytest.approx(1.0)
    assert "GIL" in r.evidence["reason"]
    assert sorted(load.calls) == list(range(12))  # the serial phase ran


def test_probe_cpu_bound_that_scales_picks_threads_at_once():
    c = FakeClocks()
    load = fake_load(c, wall=0.010, cpu=0.010, speedup=3.8)  # 4 threads, 3.8 cores busy
    r = run_probe(load, c, cpu_count=4, batch_size=2)
    assert r.executor == "thread" and r.num_workers == 4
    assert r.prefetch == 2  # per worker
    assert r.evidence["process_cores"] == pytest.approx(3.8)
    assert r.evidence["speedup"] is None  # no serial phase: 3.8 cores rule the GIL out
    assert sorted(load.calls) == list(range(8))
    c2 = FakeClocks()
    r2 = run_probe(fake_load(c2, wall=0.010, cpu=0.010, speedup=3.8), c2, cpu_count=4,
                   batch_size=2, prefetch_per_worker=False)
    assert r2.prefetch == 4  # total: ceil(2 * 4 threads / batch of 2)


def test_probe_speedup_boundary():
    for speedup, executor in ((1.29, "process"), (1.31, "thread")):
        c = FakeClocks()
        assert run_probe(fake_load(c, wall=0.01, cpu=0.01, speedup=speedup), c,
                         cpu_count=2).executor == executor


def test_probe_one_core_busy_but_waiting_samples_stay_on_threads():
    # Two threads burn one core between them -- like the GIL -- but a lone sample waits
    # half its time: two threads run two samples at once. Not GIL-bound.
    c = FakeClocks()
    r = run_probe(fake_load(c, wall=0.010, cpu=0.005, speedup=2.0), c, cpu_count=2)
    assert r.evidence["process_cores"] == pytest.approx(1.0)
    assert r.evidence["serial_cpu_wall_ratio"] == pytest.approx(0.5)
    assert r.evidence["speedup"] == pytest.approx(2.0)
    assert r.executor == "thread" and r.num_workers == 4  # ceil(2 cores / 0.5)


def test_probe_one_core_starts_no_threads():
    c = FakeClocks()
    load = fake_load(c, wall=0.010, cpu=0.010, speedup=1.0)
    r = run_probe(load, c, cpu_count=1)
    assert r.executor == "thread" and r.num_workers == 1
    assert r.evidence["threads"] == 0 and r.evidence["speedup"] is None
    assert len(load.calls) == 8  # only the first part, serially


def test_probe_ignores_the_cold_first_sample():
    c = FakeClocks()
    r = run_probe(fake_load(c, wall=0.020, cpu=0.020, first_wall=5.0), c, cpu_count=2)
    assert r.evidence["process_cores"] == pytest.approx(2.0)
    assert r.executor == "thread" and r.num_workers == 2
    c1 = FakeClocks()
    r1 = run_probe(fake_load(c1, wall=0.020, cpu=0.020, first_wall=5.0), c1, cpu_count=1)
    assert r1.evidence["wall_ms"] == pytest.approx(20.0)


def test_probe_prefetch_is_capped():
    c = FakeClocks()
    r = run_probe(fake_load(c, wall=0.020, cpu=0.0), c, cpu_count=8, batch_size=1,
                  prefetch_per_worker=False)
    assert r.num_workers == 64 and r.prefetch == 32


def test_probe_errors_propagate_unchanged():
    boom = KeyError("index 2 is corrupt")

    def concurrent_fail(i: int) -> None:
        if i == 2:
            raise boom

    with pytest.raises(KeyError) as info:
        probe(concurrent_fail, range(12), cpu_count=2)
    assert info.value is boom

    c = FakeClocks()
    load = fake_load(c, wall=0.010, cpu=0.010, speedup=1.0)  # GIL-bound: a serial phase

    def failing(i: int) -> int:
        load(i)
        if i == 10:  # in the serial part
            raise ValueError(f"bad sample {i}")
        return i

    with pytest.raises(ValueError, match="bad sample 10"):
        run_probe(failing, c, cpu_count=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("lts-probe-")]


def test_probe_validation():
    with pytest.raises(ValueError, match="at least 4"):
        probe(lambda i: i, [0, 1, 2])
    with pytest.raises(ValueError, match="batch_size=0"):
        probe(lambda i: i, range(4), batch_size=0)
    with pytest.raises(ValueError, match=r"serial=3 must be an int in \[0, 2\]"):
        probe(lambda i: i, range(4), serial=3)


def test_probe_result_to_dict():
    c = FakeClocks()
    r = run_probe(fake_load(c, wall=0.02, cpu=0.001), c, cpu_count=2)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert r.settings() == Settings(r.num_workers, r.prefetch, r.executor)


def test_probe_threads_use_one_intra_op_thread_and_leave_the_caller_alone():
    seen = []
    before = torch.get_num_threads()
    probe(lambda i: seen.append(torch.get_num_threads()), range(12), cpu_count=2)
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


def test_real_probe_on_sleeping_load_picks_threads():
    # Real clocks: a 20 ms sleep releases the GIL and burns no CPU, so the samples are
    # unambiguously latency-bound however loaded the machine is. No timing assertions.
    r = probe(lambda i: time.sleep(0.02), range(12), batch_size=4)
    assert r.executor == "thread"
    assert r.num_workers >= 2
    assert r.evidence["cpu_wall_ratio"] < 0.5


def test_probe_keeps_threads_when_samples_already_use_several_cores():
    # Two threads gain nothing, but the process burns ~2 cores meanwhile (torch's intra-op
    # threads inside each sample): the GIL is not the limit, processes would not help.
    c = FakeClocks()

    def load(i: int) -> int:
        in_probe_thread = threading.current_thread().name.startswith("lts-probe-")
        c.advance(0.010, 0.010)
        if in_probe_thread:
            with c._lock:
                c.extra_process_cpu += 0.010  # the intra-op helper thread's share
        return i

    r = run_probe(load, c, cpu_count=2)
    assert r.evidence["process_cores"] == pytest.approx(2.0)
    assert r.evidence["speedup"] is None
    assert r.executor == "thread"


def test_probe_tiny_samples_are_loaded_inline_never_by_processes():
    c = FakeClocks()
    r = run_probe(fake_load(c, wall=0.00005, cpu=0.00005, speedup=1.0), c, cpu_count=8)
    assert r.executor == "thread" and r.num_workers == 0
    assert "tiny samples" in r.evidence["reason"]
