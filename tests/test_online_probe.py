"""The online "auto" probe: its rules on fake clocks, the pool it resizes, and the loader
switching executor mid-epoch with exactly the batches a static loader gives."""

from __future__ import annotations

import collections
import os
import threading

import pytest
import torch
from _helpers import AugmentedDataset, RangeDataset, flat_indices

from lightning_threadsafe import ThreadedDataLoader
from lightning_threadsafe._worker import BatchState, ThreadPool
from lightning_threadsafe.scheduler import PriorityWorkQueue
from lightning_threadsafe.telemetry import LoaderTelemetry
from lightning_threadsafe.tuning import OnlineProbe, ProbeResult


class Clocks:
    """A wall clock that only the test advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def wall(self) -> float:
        return self.now

    def run(self, seconds: float) -> None:
        self.now += seconds


def online(clocks: Clocks, **kw) -> OnlineProbe:
    kw.setdefault("cpu_count", 2)
    kw.setdefault("threads", 2)
    return OnlineProbe(clock=clocks.wall, **kw)


def feed(probe: OnlineProbe, clocks: Clocks, *, n: int, wall: float, cpu: float,
         live: int = 2, workers: int = 2, gil: float | None = None) -> None:
    """``n`` samples completing round-robin on ``workers`` busy workers; each took
    ``wall`` / ``cpu`` (thread CPU) on its thread, so the workers burn
    ``workers * cpu / wall`` cores between them."""
    for i in range(n):
        clocks.run(wall / workers)
        probe.observe(i % workers, wall_s=wall, cpu_s=cpu, live_workers=live, gil_wait_s=gil)


# ------------------------------------------------------------------ rules (fake clocks)


def test_parallel_samples_decide_threads_right_after_the_window():
    c = Clocks()
    p = online(c, window=4)
    feed(p, c, n=2, wall=0.5, cpu=0.5)  # warm-up: each worker's first sample
    assert p.result is None
    feed(p, c, n=3, wall=0.005, cpu=0.00475)
    assert p.result is None  # the window needs 4 samples
    feed(p, c, n=1, wall=0.005, cpu=0.00475)
    r = p.result
    assert r is not None and r.executor == "thread" and r.num_workers == 2
    assert r.evidence["process_cores"] == pytest.approx(1.9)
    assert r.evidence["online"] is True and r.evidence["speedup"] is None
    assert p.wanted_workers == 2


def test_the_cold_first_samples_are_not_measured():
    c = Clocks()
    p = online(c, window=4)
    feed(p, c, n=2, wall=5.0, cpu=0.0)  # a cold start that only waits (not measured)
    feed(p, c, n=4, wall=0.005, cpu=0.005)
    assert p.result.evidence["process_cores"] == pytest.approx(2.0)


def test_waiting_samples_grow_the_pool_with_headroom():
    c = Clocks()
    p = online(c, window=4, max_workers=64)
    feed(p, c, n=6, wall=0.020, cpu=0.001)
    r = p.result
    assert r.executor == "thread" and r.num_workers == 60  # ceil(1.5 * 2 / 0.05)
    assert p.wanted_workers == 60


def test_one_core_busy_runs_a_serial_phase_and_picks_processes_when_gil_bound():
    c = Clocks()
    p = online(c, window=4, serial=3)
    feed(p, c, n=6, wall=0.020, cpu=0.010)
    assert p.result is None and p.wanted_workers == 1  # ambiguous: time samples alone
    # the other worker has not exited yet: its overlapping samples do not count
    feed(p, c, n=2, wall=0.010, cpu=0.010, live=2, workers=1)
    assert p.result is None
    feed(p, c, n=1, wall=0.010, cpu=0.010, live=1, workers=1)  # opens the phase
    feed(p, c, n=2, wall=0.010, cpu=0.010, live=1, workers=1)
    assert p.result is None
    feed(p, c, n=1, wall=0.010, cpu=0.010, live=1, workers=1)
    r = p.result
    assert r.executor == "process" and r.num_workers == 2
    assert r.evidence["speedup"] == pytest.approx(1.0)
    assert "GIL-bound" in r.evidence["reason"]


def test_the_serial_phase_shrinks_through_on_serial_once_under_the_lock():
    c = Clocks()
    calls = []
    p = online(c, window=4, serial=2)
    p.on_serial = lambda: calls.append(p._lock.locked())
    feed(p, c, n=6, wall=0.020, cpu=0.010)
    feed(p, c, n=1, wall=0.010, cpu=0.010, live=1, workers=1)
    assert calls == [True]  # called once, while the probe's lock was held


def test_a_gil_fight_seen_in_the_window_picks_processes_without_a_serial_phase():
    c = Clocks()
    p = online(c, window=4)
    p.on_serial = lambda: pytest.fail("no serial phase needed")
    feed(p, c, n=6, wall=0.020, cpu=0.010, gil=0.004)  # one core busy, GIL back after 4 ms
    r = p.result
    assert r.executor == "process" and r.num_workers == 2
    assert r.evidence["gil_wait_ms"] == pytest.approx(4.0) and r.evidence["speedup"] is None
    assert "GIL-bound" in r.evidence["reason"]


def test_a_free_gil_in_the_window_means_waiting_threads():
    c = Clocks()
    p = online(c, window=4)
    p.on_serial = lambda: pytest.fail("no serial phase needed")
    feed(p, c, n=6, wall=0.010, cpu=0.005, gil=0.00001)
    r = p.result
    assert r.executor == "thread" and r.num_workers == 4  # ceil(2 / 0.5)
    assert "GIL mostly free" in r.evidence["reason"]


def test_a_gil_fight_below_one_core_busy_still_picks_processes():
    # GIL hand-offs cost CPU time: a GIL-bound pool can burn under 0.7 cores of samples
    c = Clocks()
    p = online(c, window=4)
    feed(p, c, n=6, wall=0.020, cpu=0.006, gil=0.003)
    assert p.result.executor == "process"


def test_an_unclear_gil_wait_falls_back_to_the_serial_phase():
    c = Clocks()
    p = online(c, window=4, serial=2)
    feed(p, c, n=6, wall=0.020, cpu=0.010, gil=0.0005)
    assert p.result is None and p.wanted_workers == 1


def test_one_core_busy_but_waiting_alone_stays_on_threads():
    c = Clocks()
    p = online(c, window=4, serial=2)
    feed(p, c, n=6, wall=0.010, cpu=0.005)
    assert p.wanted_workers == 1
    feed(p, c, n=3, wall=0.010, cpu=0.005, live=1, workers=1)
    r = p.result
    assert r.executor == "thread" and r.num_workers == 4  # ceil(2 cores / 0.5)
    assert r.evidence["speedup"] == pytest.approx(2.0)
    assert p.wanted_workers == 4


def test_slow_samples_close_a_phase_after_two_once_long_enough():
    c = Clocks()
    p = online(c, window=8, serial=4, enough_s=0.03)
    feed(p, c, n=2, wall=0.05, cpu=0.025)
    feed(p, c, n=2, wall=0.05, cpu=0.025)  # 2 samples, 50 ms, one core busy: enough
    assert p.wanted_workers == 1
    feed(p, c, n=3, wall=0.05, cpu=0.05, live=1, workers=1)  # 1 skipped + 2
    assert p.result is not None and p.result.executor == "process"


def test_tiny_samples_load_inline():
    c = Clocks()
    p = online(c, threads=4, cpu_count=8, window=8)
    feed(p, c, n=12, wall=0.0002, cpu=0.00005, workers=4)
    r = p.result
    assert r.executor == "thread" and r.num_workers == 0
    assert "tiny samples" in r.evidence["reason"]


def test_one_thread_only_sizes_the_pool():
    c = Clocks()
    p = online(c, threads=1, cpu_count=1, window=4)
    feed(p, c, n=5, wall=0.020, cpu=0.005, workers=1, live=1)
    r = p.result
    assert r.executor == "thread" and r.num_workers == 6  # ceil(1.5 * 1 / 0.25)
    assert r.evidence["threads"] == 0 and r.evidence["speedup"] is None


def test_finish_decides_with_what_was_seen():
    c = Clocks()
    p = online(c)
    r = p.finish()  # nothing seen
    assert r.executor == "thread" and r.num_workers == 2 and "too few" in r.evidence["reason"]
    c2 = Clocks()
    p2 = online(c2, window=8)
    feed(p2, c2, n=4, wall=0.010, cpu=0.010)  # a partial window
    assert p2.finish().num_workers == 2 and p2.result.evidence["process_cores"] == 2.0
    c3 = Clocks()
    p3 = online(c3, window=4, serial=4)
    feed(p3, c3, n=6, wall=0.010, cpu=0.005)  # ambiguous, no serial sample yet
    assert p3.finish().executor == "thread"
    assert p3.finish() is p3.result  # decided once


def test_online_probe_validation():
    c = Clocks()
    for kw, name in (({"threads": 0}, "threads=0"), ({"window": 1}, "window=1"),
                     ({"serial": 0}, "serial=0"), ({"enough_s": 0}, "enough_s=0")):
        with pytest.raises(ValueError, match=name):
            online(c, **kw)


def test_observe_is_safe_from_many_threads():
    c = Clocks()
    c_lock = threading.Lock()  # the fake clock is advanced by several threads
    p = OnlineProbe(threads=4, cpu_count=4, window=40, clock=lambda: c.wall())

    def worker(wid: int) -> None:
        for _ in range(50):
            with c_lock:
                c.run(0.001)
            p.observe(wid, wall_s=0.004, cpu_s=0.0035, live_workers=4)

    threads = [threading.Thread(target=worker, args=(w,), name=f"test-observe-{w}")
               for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.result is not None and p.result.executor == "thread" and p.result.num_workers == 4
    assert p.result.evidence["process_cores"] == pytest.approx(3.5)


# ------------------------------------------------------------------ the pool it resizes


def _pool(n: int, fetch, finish=lambda b, s: setattr(b, "payload", list(b.results)),
          **kw):
    return ThreadPool(num_workers=n, fetch=fetch, finish=finish, telemetry=LoaderTelemetry(),
                      in_order=True, on_progress=lambda: None, name="resize", **kw)


def _names() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("lts-resize-")}


def test_pool_grows_and_shrinks_without_losing_a_task():
    gate = threading.Event()
    entered = threading.Semaphore(0)

    def fetch(index, batch, stats, stop):
        entered.release()
        gate.wait()
        return index

    pool = _pool(1, fetch)
    try:
        batches = [BatchState(o, list(range(o * 4, o * 4 + 4))) for o in range(4)]
        for b in batches:
            pool.submit(b, list(range(4)))
        pool.resize(3)
        assert pool.target == 3 and pool.running_workers() == 3
        for _ in range(3):  # every worker holds a sample: all three really run
            entered.acquire()
        pool.resize(1)  # two retire after the sample they hold
        assert pool.target == 1
        gate.set()
        got = {}
        for o in range(4):
            item = None
            while item is None:  # take() may return early when another batch lands
                item = pool.ready.take(lambda o=o: [o], timeout=60)
            got[item[0]] = item[1].payload
        assert got == {o: list(range(o * 4, o * 4 + 4)) for o in range(4)}
        for t, _ in pool.workers[1:]:  # the retired ones exit at their next loop turn
            t.join(timeout=30)
            assert not t.is_alive()
        assert pool.running_workers() == 1 and len(_names()) == 1
    finally:
        gate.set()
        assert pool.close() == []
    assert _names() == set()
    pool.resize(4)  # after close: nothing starts
    assert _names() == set()


def test_pool_rejects_a_size_below_one():
    pool = _pool(1, lambda *a: 0)
    try:
        with pytest.raises(ValueError, match="num_workers=0"):
            pool.resize(0)
    finally:
        pool.close()


def test_withdraw_untouched_takes_only_batches_no_worker_started():
    q: PriorityWorkQueue[BatchState] = PriorityWorkQueue()
    a, b, c = (BatchState(o, [o * 2, o * 2 + 1]) for o in range(3))
    for batch in (a, b, c):
        q.put_batch(batch.ordinal, [0, 1], batch)
    first = q.get(1.0)  # a worker took one task of batch 0
    assert first[0][2] is a
    assert q.withdraw_untouched(lambda x: len(x.indices)) == [b, c]
    assert len(q) == 1  # batch 0's other task stays queued
    assert q.withdraw_untouched(lambda x: len(x.indices)) == []


# ------------------------------------------------------------------ the loader switching


class ScriptedProbe:
    """Stands in for OnlineProbe: decides ``result`` after ``after`` samples were
    observed, optionally asking for a serial phase (one worker) first."""

    def __init__(self, threads: int, result: ProbeResult, after: int,
                 serial_first: bool = False) -> None:
        self.threads = threads
        self.wanted_workers = threads
        self.result: ProbeResult | None = None
        self._final = result
        self._after = after
        self._serial_first = serial_first
        self._lock = threading.Lock()  # guards seen/live_seen (workers call observe)
        self.seen = 0
        self.live_seen: list[int] = []
        self.on_serial = lambda: None  # replaced by the loader (shrinks its pool)

    def observe(self, worker: int, *, wall_s: float, cpu_s: float, live_workers: int,
                gil_wait_s: float | None = None) -> None:
        with self._lock:
            self.seen += 1
            self.live_seen.append(live_workers)
            if self.result is not None:
                return
            if self._serial_first and self.wanted_workers != 1:
                self.wanted_workers = 1
                self.on_serial()  # as OnlineProbe does, under its lock
                return
            if self.seen >= self._after and (not self._serial_first or live_workers == 1):
                if self._final.executor == "thread" and self._final.num_workers > 0:
                    self.wanted_workers = self._final.num_workers
                self.result = self._final

    def finish(self) -> ProbeResult:
        with self._lock:
            self.result = self.result or self._final
            return self.result


def _auto_loader(ds, probe, **kw):
    loader = ThreadedDataLoader(ds, num_workers="auto", prefetch_factor="auto",
                                executor="auto", **kw)
    loader._online_probe = lambda: probe  # the decision is scripted: the switch is tested
    return loader


def _by_index(batches):
    out = {}
    for b in batches:
        for i, x in zip(b["index"].tolist(), b["x"]):
            out[i] = x
    return out


@pytest.mark.parametrize("in_order", [True, False])
def test_switch_to_processes_mid_epoch_delivers_exactly_the_static_batches(in_order):
    ds = AugmentedDataset(64, max_delay_ms=2.0)
    ref = list(ThreadedDataLoader(ds, batch_size=4, shuffle=True, seed=3, num_workers=2))
    probe = ScriptedProbe(2, ProbeResult("process", 2, 2, {"reason": "scripted"}), after=6)
    loader = _auto_loader(ds, probe, batch_size=4, shuffle=True, seed=3, in_order=in_order)
    got = list(loader)
    if in_order:
        assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in ref]
        assert all(torch.equal(a["x"], b["x"]) for a, b in zip(got, ref))
    else:
        want, have = _by_index(ref), _by_index(got)
        assert sorted(have) == sorted(want) == list(range(64))
        assert all(torch.equal(have[i], want[i]) for i in want)
        assert sorted(b["index"].tolist() for b in got) == sorted(
            b["index"].tolist() for b in ref)
    report = loader.get_thread_safety_performance_report()
    assert report["settings"]["executor"] == "process"
    assert report["settings"]["num_workers"] == 2 and report["settings"]["prefetch_factor"] == 2
    assert report["totals"]["samples"] == 64  # threads' and processes' samples, each once
    # the next epoch starts on processes directly
    assert collections.Counter(flat_indices(list(loader), "index")) == collections.Counter(
        range(64))


def test_switch_to_inline_mid_epoch_retires_the_threads():
    ds = RangeDataset(200)
    probe = ScriptedProbe(2, ProbeResult("thread", 0, 2, {"reason": "scripted tiny"}), after=4)
    loader = _auto_loader(ds, probe, batch_size=4)
    it = iter(loader)
    got = [next(it) for _ in range(10)]
    assert probe.result is not None
    # the pool is gone once its admitted batches were delivered: loading is inline now
    got += [next(it) for _ in range(10)]
    assert not [t for t in threading.enumerate() if t.name.startswith("lts-worker-")]
    got += list(it)
    assert torch.cat(got).flatten().tolist() == list(range(200))
    assert loader.get_thread_safety_performance_report()["settings"]["num_workers"] == 0


def test_threads_decision_grows_the_pool_and_keeps_the_batches():
    ds = AugmentedDataset(80, max_delay_ms=1.0)
    probe = ScriptedProbe(2, ProbeResult("thread", 5, 3, {"reason": "scripted"}), after=4)
    loader = _auto_loader(ds, probe, batch_size=4, seed=8)
    it = iter(loader)
    got = [next(it) for _ in range(6)]
    running = {t.name for t in threading.enumerate() if t.name.startswith("lts-worker-")}
    got += list(it)
    assert len(running) == 5
    ref = list(ThreadedDataLoader(ds, batch_size=4, seed=8, num_workers=2))
    assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in ref]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(got, ref))
    s = loader.get_thread_safety_performance_report()["settings"]
    assert (s["num_workers"], s["prefetch_factor"], s["executor"]) == (5, 3, "thread")


def test_serial_phase_runs_on_one_worker_before_the_decision():
    ds = AugmentedDataset(60, max_delay_ms=1.0)
    probe = ScriptedProbe(2, ProbeResult("thread", 3, 2, {"reason": "scripted"}), after=8,
                          serial_first=True)
    loader = _auto_loader(ds, probe, batch_size=4)
    assert sorted(flat_indices(list(loader), "index")) == list(range(60))
    assert 1 in probe.live_seen  # the other worker really left before the decision
    assert loader.get_thread_safety_performance_report()["settings"]["num_workers"] == 3


def test_resume_after_a_mid_epoch_switch_to_processes():
    ds = AugmentedDataset(48)

    def make(probe=None):
        if probe is None:
            return ThreadedDataLoader(ds, batch_size=4, shuffle=True, seed=5, num_workers=2)
        return _auto_loader(ds, probe, batch_size=4, shuffle=True, seed=5)

    full = list(make())
    loader = make(ScriptedProbe(2, ProbeResult("process", 2, 2, {"reason": "s"}), after=4))
    it = iter(loader)
    head = [next(it) for _ in range(7)]
    state = loader.state_dict()
    del it
    assert len(state["delivered"]) == 7
    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert [b["index"].tolist() for b in head + tail] == [b["index"].tolist() for b in full]


def test_an_epoch_shorter_than_the_probe_still_resolves_the_settings():
    loader = ThreadedDataLoader(RangeDataset(6), batch_size=2, num_workers="auto",
                                prefetch_factor="auto", executor="auto")
    assert torch.cat(list(loader)).flatten().tolist() == list(range(6))
    s = loader.get_thread_safety_performance_report()["settings"]
    assert isinstance(s["num_workers"], int) and isinstance(s["prefetch_factor"], int)
    assert s["executor"] in ("thread", "process")
    assert torch.cat(list(loader)).flatten().tolist() == list(range(6))


def test_real_online_probe_on_sleeping_samples_picks_threads():
    # Real clocks: a 10 ms sleep burns no CPU, so the samples are unambiguously waiting
    # however loaded the machine is. No timing assertions.
    class Sleepy(RangeDataset):
        def __getitem__(self, i):
            threading.Event().wait(0.01)  # workload: a GIL-free wait, like remote storage
            return super().__getitem__(i)

    loader = ThreadedDataLoader(Sleepy(64), batch_size=4, num_workers="auto",
                                prefetch_factor="auto", executor="auto")
    assert torch.cat(list(loader)).flatten().tolist() == list(range(64))
    probe = loader.get_thread_safety_performance_report()["probe"]
    assert probe["executor"] == "thread" and probe["num_workers"] > 2
    assert probe["evidence"]["online"] is True


# ------------------------------------------------------------- where the probe must run first


def test_settings_needed_before_loading_follow_rules_and_load_nothing_twice():
    """No pool to probe in (num_workers=0 fixed): "auto" resolves by rule, nothing is preloaded."""
    ds = AugmentedDataset(24, max_delay_ms=1.0)
    ref = list(ThreadedDataLoader(ds, batch_size=4, seed=2))
    loader = ThreadedDataLoader(ds, batch_size=4, seed=2, num_workers=0, executor="auto",
                                prefetch_factor="auto")
    got = list(loader)
    assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in ref]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(got, ref))
    report = loader.get_thread_safety_performance_report()
    assert "online" not in report["probe"]["evidence"]
    assert report["settings"]["executor"] == "thread" and report["settings"]["num_workers"] == 0
    assert report["totals"]["samples"] == 24  # each sample loaded once


def test_explicit_processes_with_auto_workers_take_one_per_core():
    ds = AugmentedDataset(24)
    ref = list(ThreadedDataLoader(ds, batch_size=4, seed=2))
    loader = ThreadedDataLoader(ds, batch_size=4, seed=2, num_workers="auto",
                                executor="process")
    got = list(loader)
    assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in ref]
    s = loader.get_thread_safety_performance_report()["settings"]
    assert s["executor"] == "process" and s["num_workers"] == len(os.sched_getaffinity(0))


def test_prefetch_auto_alone_resolves_without_probing():
    ds = RangeDataset(40)
    loader = ThreadedDataLoader(ds, batch_size=4, num_workers=3, prefetch_factor="auto")
    assert torch.cat(list(loader)).flatten().tolist() == list(range(40))
    report = loader.get_thread_safety_performance_report()
    assert report["settings"]["num_workers"] == 3 and report["settings"]["prefetch_factor"] == 2
    assert "2 batches in flight per worker" in report["probe"]["evidence"]["reason"]


def test_failed_and_skipped_samples_are_not_reported_to_the_probe():
    from _helpers import FailingDataset

    seen = []
    lock = threading.Lock()  # guards seen (workers report concurrently)

    class Recording(ScriptedProbe):
        def observe(self, worker, *, wall_s, cpu_s, live_workers, gil_wait_s=None):
            with lock:
                seen.append(wall_s)
            super().observe(worker, wall_s=wall_s, cpu_s=cpu_s, live_workers=live_workers,
                            gil_wait_s=gil_wait_s)

    ds = FailingDataset(40, {3, 17})
    probe = Recording(2, ProbeResult("thread", 2, 2, {"reason": "s"}), after=10**6)
    loader = _auto_loader(ds, probe, batch_size=4, on_error="skip")
    assert sorted(torch.cat(list(loader)).flatten().tolist()) == sorted(set(range(40)) - {3, 17})
    assert len(seen) == 38  # every clean load, and only those


def test_pause_waits_for_workers_to_leave_user_code_and_holds_them_out():
    inside = threading.Event()
    release = threading.Event()
    calls = []
    calls_lock = threading.Lock()  # guards calls (workers append)

    def fetch(index, batch, stats, stop):
        with calls_lock:
            calls.append(index)
        if index == 0:
            inside.set()
            release.wait(timeout=60)
        return index

    pool = _pool(2, fetch, guarded=True)
    try:
        b0, b1 = BatchState(0, [0]), BatchState(1, [1, 2, 3])
        pool.submit(b0, [0])
        assert inside.wait(timeout=60)  # a worker is inside user code with index 0
        assert pool.pause(timeout=0.2) is False  # it cannot leave: pause gives up, resumes
        paused = []
        t = threading.Thread(target=lambda: paused.append(pool.pause(timeout=60)),
                             name="test-pauser")
        t.start()
        release.set()  # index 0 returns; now no worker is inside user code
        t.join(timeout=60)
        assert paused == [True]
        pool.submit(b1, [0, 1, 2])  # queued while paused: nobody may start loading them
        with calls_lock:
            assert calls == [0]
        pool.resume()
        for ordinal, want in ((0, [0]), (1, [1, 2, 3])):
            item = None
            while item is None:  # take() may return early when another batch lands
                item = pool.ready.take(lambda o=ordinal: [o], timeout=60)
            assert item[1].payload == want
    finally:
        release.set()
        pool.close()
