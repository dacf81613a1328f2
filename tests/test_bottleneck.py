"""BottleneckDetector rules, their order and boundaries, driven by scripted windows."""

from __future__ import annotations

import json

import pytest

from lightning_threadsafe.bottleneck import Bottleneck, BottleneckDetector, Verdict
from lightning_threadsafe.telemetry import TelemetrySnapshot, TelemetryWindow


def win(*, threads: int = 4, samples: int = 400, wall_ms: float = 20.0, cpu_ms: float = 1.0,
        wait: float = 0.5, duration: float = 1.0, batches: int = 25, process_cores: float | None = None,
        **extra: float) -> TelemetryWindow:
    """A window of ``samples`` samples, each ``wall_ms`` long of which ``cpu_ms`` on CPU.

    ``wait`` is the consumer's wait fraction; process CPU defaults to the samples' CPU.
    """
    fetch_cpu = samples * cpu_ms / 1000.0
    return TelemetryWindow(
        duration_s=duration, samples=samples, batches=batches,
        fetch_wall_s=samples * wall_ms / 1000.0, fetch_cpu_s=fetch_cpu,
        wait_s=wait * duration, consumer_s=(1.0 - wait) * duration,
        process_cpu_s=(process_cores * duration if process_cores is not None else fetch_cpu),
        threads=threads, **extra,
    )


def verdict_of(*windows: TelemetryWindow, **kw) -> Verdict:
    det = BottleneckDetector(cpu_count=kw.pop("cpu_count", 4), **kw)
    for w in windows:
        det.update(w)
    return det.compute()


# ----------------------------------------------------------------- no data / NONE
def test_empty_window_is_none_with_no_data_evidence():
    det = BottleneckDetector(cpu_count=4)
    v = det.compute()
    assert v.code is Bottleneck.NONE and v.name == "no-data"
    assert v.evidence["reason"] == "no data"
    det.update(TelemetryWindow(duration_s=1.0, wait_s=1.0, threads=4))  # a window, no samples
    assert det.compute().evidence["reason"] == "no data"


def test_consumer_not_waiting_is_none_even_for_io_samples():
    v = verdict_of(win(wait=0.01))
    assert v.code is Bottleneck.NONE and v.name == "compute-bound"
    assert "no change" in v.recommendation


def test_wait_threshold_boundary():
    assert verdict_of(win(wait=0.049)).code is Bottleneck.NONE
    assert verdict_of(win(wait=0.05)).code is Bottleneck.IO
    assert verdict_of(win(wait=0.15), wait_threshold=0.2).code is Bottleneck.NONE


# ------------------------------------------------------------------------- IO
def test_io_latency_names_num_workers():
    # 4 threads, 20 ms samples with 1 ms CPU: latency-bound, cores nearly idle.
    v = verdict_of(win(threads=4, samples=200, wall_ms=20.0, cpu_ms=1.0, wait=0.9))
    assert v.code is Bottleneck.IO and v.name == "io-latency"
    assert "num_workers" in v.recommendation and "95%" in v.recommendation
    assert v.evidence["cpu_wall_ratio"] == pytest.approx(0.05)
    assert v.window_batches == 25


def test_io_ratio_boundary():
    # 1 thread: samples 49% vs 51% on CPU.
    assert verdict_of(win(threads=1, samples=50, wall_ms=20, cpu_ms=9.8)).code is Bottleneck.IO
    assert verdict_of(win(threads=1, samples=50, wall_ms=20, cpu_ms=10.2)).code is Bottleneck.CPU


def test_idle_workers_recommend_prefetch_first():
    # 8 threads but only ~1 busy on average: the look-ahead starves them.
    v = verdict_of(win(threads=8, samples=50, wall_ms=20.0, cpu_ms=1.0, wait=0.8))
    assert v.code is Bottleneck.IO
    assert v.recommendation.startswith("raise prefetch")
    assert v.evidence["worker_utilisation"] == pytest.approx(1.0 / 8)


# ------------------------------------------------------------------------ CPU
def test_cpu_bound_with_one_thread_says_more_threads_not_gil():
    # One thread at 100% CPU: CPU-bound and GIL-bound look alike; say "more threads".
    v = verdict_of(win(threads=1, samples=100, wall_ms=10.0, cpu_ms=10.0))
    assert v.code is Bottleneck.CPU
    assert "num_workers" in v.recommendation


def test_cpu_saturated_cores_beat_low_cpu_wall():
    # 16 threads on 4 cores, GIL-free: each sample waits for a core, so cpu/wall is
    # low and would read as IO; the process burns all 4 cores, so it is CPU.
    w = win(threads=16, samples=400, wall_ms=40.0, cpu_ms=10.0, wait=0.6)
    assert w.fetch_cpu_s / w.duration_s == pytest.approx(4.0)
    v = verdict_of(w, cpu_count=4)
    assert v.code is Bottleneck.CPU
    assert "cheaper" in v.recommendation and "4 cores" in v.recommendation


def test_cpu_saturation_boundary():
    # 4 threads, cpu/wall 0.2 (IO by ratio) with process CPU at 84% / 85% of 4 cores.
    base = dict(threads=4, samples=100, wall_ms=30.0, cpu_ms=6.0)
    assert verdict_of(win(**base, process_cores=3.36)).code is Bottleneck.IO
    assert verdict_of(win(**base, process_cores=3.4)).code is Bottleneck.CPU


def test_cpu_bound_at_core_count_says_cheaper_transforms():
    # Threads = cores, samples CPU-heavy but process below saturation (e.g. waits elsewhere).
    v = verdict_of(win(threads=4, samples=200, wall_ms=10.0, cpu_ms=8.0, process_cores=2.0))
    assert v.code is Bottleneck.CPU
    assert "cheaper" in v.recommendation


def test_one_core_machine_never_reports_gil():
    v = verdict_of(win(threads=4, samples=100, wall_ms=40.0, cpu_ms=10.0), cpu_count=1)
    assert v.code is Bottleneck.CPU


# ------------------------------------------------------------------------ GIL
def gil_window(threads: int = 4) -> TelemetryWindow:
    # `threads` threads always busy, samples take threads x 10 ms of wall for 10 ms of CPU:
    # sample CPU is pinned at one core.
    return win(threads=threads, samples=100, wall_ms=10.0 * threads, cpu_ms=10.0, wait=0.7)


def test_gil_bound_without_baseline():
    v = verdict_of(gil_window())
    assert v.code is Bottleneck.GIL and v.name == "gil-bound"
    assert "executor='process'" in v.recommendation
    assert v.evidence["fetch_cpu_cores"] == pytest.approx(1.0)
    assert v.evidence["busy_threads"] == pytest.approx(4.0)


def test_gil_needs_more_than_one_busy_thread():
    # Two threads configured but on average only 1.2 busy.
    w = win(threads=2, samples=100, wall_ms=12.0, cpu_ms=10.0)
    assert verdict_of(w).code is Bottleneck.CPU


def test_gil_band_boundaries():
    # Sample CPU of 0.65 cores (below the band) or 1.3 cores (above): not GIL.
    below = win(threads=4, samples=65, wall_ms=40.0 * 100 / 65, cpu_ms=10.0)
    above = win(threads=4, samples=130, wall_ms=40.0 * 100 / 130, cpu_ms=10.0)
    assert verdict_of(below).code is Bottleneck.IO
    assert verdict_of(above).code is not Bottleneck.GIL
    assert verdict_of(gil_window(), gil_high=0.9).code is not Bottleneck.GIL


def test_serial_baseline_separates_gil_from_latency():
    # Latency-bound samples (10% CPU alone) whose GIL-free CPU adds up to one core with
    # 10 threads: no inflation over the serial baseline, so IO, not GIL.
    det = BottleneckDetector(cpu_count=4)
    det.update(win(threads=1, samples=50, wall_ms=20.0, cpu_ms=2.0, wait=0.95))
    assert det.serial_cpu_ratio == pytest.approx(0.1)
    det.reset()
    det.update(win(threads=10, samples=500, wall_ms=20.0, cpu_ms=2.0, wait=0.5))
    v = det.compute()
    assert v.evidence["wall_inflation"] == pytest.approx(1.0)
    assert v.code is Bottleneck.IO
    # The same one-core pattern after a CPU-heavy baseline (100% CPU alone) is GIL.
    det2 = BottleneckDetector(cpu_count=4, serial_cpu_ratio=1.0)
    det2.update(gil_window())
    v2 = det2.compute()
    assert v2.code is Bottleneck.GIL and v2.evidence["wall_inflation"] == pytest.approx(4.0)


@pytest.mark.parametrize("serial_cpu_ratio", [None, 1.0])
def test_gil_rule_is_off_when_the_gil_is_disabled(monkeypatch, serial_cpu_ratio):
    # Free-threaded Python: the same one-core pattern cannot be the GIL. The window goes
    # on to the other rules: 4 threads at cpu/wall 0.25 wait (IO), 2 threads at 0.5
    # compute (CPU, more threads) -- never GIL, whatever the serial baseline says.
    assert verdict_of(gil_window(), serial_cpu_ratio=serial_cpu_ratio).code is Bottleneck.GIL
    monkeypatch.setattr("lightning_threadsafe.bottleneck.gil_enabled", lambda: False)
    v = verdict_of(gil_window(), serial_cpu_ratio=serial_cpu_ratio)
    assert v.code is Bottleneck.IO and v.evidence["gil_enabled"] is False
    assert "executor='process'" not in v.recommendation
    two = win(threads=2, samples=100, wall_ms=20.0, cpu_ms=10.0, wait=0.7)
    v2 = verdict_of(two, serial_cpu_ratio=serial_cpu_ratio)
    assert v2.code is Bottleneck.CPU and "raise num_workers" in v2.recommendation
    monkeypatch.setattr("lightning_threadsafe.bottleneck.gil_enabled", lambda: True)
    assert verdict_of(two, serial_cpu_ratio=serial_cpu_ratio).code is Bottleneck.GIL
    assert verdict_of(gil_window()).evidence["gil_enabled"] is True


def test_learned_baseline_overrides_given_and_survives_reset():
    det = BottleneckDetector(cpu_count=4, serial_cpu_ratio=0.9)
    assert det.serial_cpu_ratio == 0.9
    det.update(win(threads=1, samples=10, wall_ms=10.0, cpu_ms=5.0))
    det.reset()
    assert det.serial_cpu_ratio == pytest.approx(0.5)
    assert det.window == TelemetryWindow()


# ------------------------------------------------------------ MEMORY / TRANSFER
def test_memory_throttling_comes_first():
    w = win(threads=4, samples=200, wall_ms=20.0, cpu_ms=1.0, throttled_s=0.3, throttle_events=5,
            transfer_s=5.0)
    v = verdict_of(w)
    assert v.code is Bottleneck.MEMORY and v.name == "memory-throttled"
    assert "prefetch" in v.recommendation and "memory_budget" in v.recommendation
    assert verdict_of(win(throttled_s=0.099)).code is Bottleneck.IO
    assert verdict_of(win(throttled_s=0.1)).code is Bottleneck.MEMORY


def test_transfer_bound_when_staging_is_the_slowest_stage():
    # 4 threads load 25 batches in 2.0 s of sample wall -> 0.5 s of parallel loading;
    # staging takes 0.6 s: 55% of staging+loading.
    w = win(threads=4, samples=100, wall_ms=20.0, cpu_ms=1.0, transfer_s=0.6)
    v = verdict_of(w)
    assert v.code is Bottleneck.TRANSFER and v.name == "transfer-bound"
    assert "prefetch" in v.recommendation and "pin_memory" in v.recommendation
    assert v.evidence["transfer_share"] == pytest.approx(0.6 / 1.1)
    # 0.4 s of staging: loading is slower, not TRANSFER.
    assert verdict_of(win(threads=4, samples=100, transfer_s=0.4)).code is Bottleneck.IO


# ------------------------------------------------------------- accumulation etc.
def test_update_sums_counters_and_keeps_latest_gauges():
    det = BottleneckDetector(cpu_count=4)
    det.update(win(threads=2, samples=100, queue_depth=1))
    det.update(win(threads=8, samples=300, queue_depth=3))
    acc = det.window
    assert acc.samples == 400 and acc.duration_s == pytest.approx(2.0)
    assert acc.fetch_wall_s == pytest.approx(8.0)
    assert acc.threads == 8 and acc.queue_depth == 3
    det.reset()
    assert det.compute().evidence["reason"] == "no data"


def test_windows_from_snapshots():
    a = TelemetrySnapshot(time=10.0, samples=100, fetch_wall_s=2.0, fetch_cpu_s=0.1,
                          batches=10, wait_s=1.0, consumer_s=0.1, threads=4)
    b = TelemetrySnapshot(time=11.0, samples=300, fetch_wall_s=6.0, fetch_cpu_s=0.3,
                          batches=30, wait_s=1.9, consumer_s=0.2, threads=4)
    v = verdict_of(b.delta(a))
    assert v.code is Bottleneck.IO and v.window_batches == 20


def test_verdict_to_dict_is_plain_json():
    v = verdict_of(gil_window())
    d = v.to_dict()
    assert d["code"] == 3 and type(d["code"]) is int and d["name"] == "gil-bound"
    assert json.loads(json.dumps(d)) == d


def test_codes_are_the_public_metric_values():
    assert [int(b) for b in Bottleneck] == [0, 1, 2, 3, 4, 5]
    assert [b.name for b in Bottleneck] == ["NONE", "CPU", "IO", "GIL", "MEMORY", "TRANSFER"]


@pytest.mark.parametrize("kwargs, match", [
    ({"cpu_count": 0}, "cpu_count=0"),
    ({"cpu_count": True}, "cpu_count=True"),
    ({"wait_threshold": 0.0}, "wait_threshold=0.0"),
    ({"io_ratio": 1.5}, "io_ratio=1.5"),
    ({"gil_low": 1.3}, "gil_low=1.3"),
    ({"gil_inflation": 0.5}, "gil_inflation=0.5"),
    ({"serial_cpu_ratio": -1.0}, "serial_cpu_ratio=-1.0"),
])
def test_invalid_arguments_are_named(kwargs, match):
    kwargs.setdefault("cpu_count", 4)
    with pytest.raises(ValueError, match=match):
        BottleneckDetector(**kwargs)


def test_update_rejects_non_windows():
    with pytest.raises(TypeError, match="TelemetryWindow"):
        BottleneckDetector(cpu_count=2).update({"samples": 1})  # type: ignore[arg-type]


def test_default_cpu_count_is_usable_cores():
    import os
    assert BottleneckDetector().cpu_count == len(os.sched_getaffinity(0))


def test_cores_burnt_outside_the_loader_do_not_hide_io_latency():
    # One loader thread, 20 ms of latency per sample, but the process burns 2 of 2 cores
    # elsewhere (the training step, spinning intra-op pools): still an I/O-latency verdict.
    w = TelemetryWindow(duration_s=1.0, samples=48, fetch_wall_s=0.92, fetch_cpu_s=0.027,
                        batches=12, wait_s=0.9, consumer_s=0.05, process_cpu_s=1.9, threads=1)
    det = BottleneckDetector(cpu_count=2)
    det.update(w)
    assert det.compute().code is Bottleneck.IO
