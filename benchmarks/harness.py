"""The benchmark harness: runs W1-W8 of ``BENCHMARKS.md`` and O1 (loader overhead, issue 11)
and evaluates the targets.

Each workload function builds its dataset, calibrates the single-thread cost
(for the physical limits), runs a short static sweep of our loader to find its
best static setting, then measures every contender in interleaved rounds (see
:mod:`benchmarks.measure`) and returns a :class:`WorkloadResult`. After all
workloads, :func:`evaluate_targets` turns the results into PASS / FAIL / N/A
rows. Nothing here asserts a time: a failed target is a finding, not an error.

Cross-workload inputs: W5 reuses W1's best static setting, W7 and W8 reuse
W2's; when that workload was not selected a documented default is used.

Entry point: :func:`run_benchmarks` (used by ``python -m benchmarks`` and by
the smoke test).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.contenders import (
    Contender,
    LoaderHandle,
    LoaderSpec,
    bare_threads,
    batch_pool,
    ours,
    torch_dl,
    torchdata_nodes,
)
from benchmarks.measure import (
    Measurement,
    MemorySampler,
    RoundsOutcome,
    batch_len,
    interleaved_rounds,
    measure_first_batch,
    measure_throughput,
    plain,
    report_extra,
    summarize,
)
from benchmarks.settings import BenchSettings
from benchmarks.workloads import (
    BigSamples,
    Calibration,
    GilBound,
    TinyTensor,
    VolumeCrops,
    calibrate,
    calibrate_gil_iterations,
    first_item_collate,
    make_volume,
    usable_cores,
)

__all__ = ["WORKLOADS", "Context", "Row", "WorkloadResult", "evaluate_targets", "run_workloads"]

MiB = 1024**2
AUTO = {"num_workers": "auto", "prefetch_factor": "auto", "executor": "auto"}
# Used by W5/W7/W8 when the workload that sweeps for them (W1/W2) was not selected.
DEFAULT_STATIC = {"W1": {"num_workers": 2, "prefetch_factor": 2, "executor": "thread"},
                  "W2": {"num_workers": 16, "prefetch_factor": 2, "executor": "thread"}}
DEFAULT_TORCHDATA_W2 = 16


@dataclass
class Row:
    """One contender's line in a workload table (values in the workload's base unit)."""

    name: str
    family: str
    params: dict[str, Any]
    status: str = "ok"  # "ok" | "skipped" | "error"
    message: str = ""
    values: list[float] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    workers: int | None = None
    limit: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def stats(self) -> dict[str, Any]:
        return summarize(self.values)

    @property
    def median(self) -> float | None:
        return self.stats["median"]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "params": plain(self.params),
                "status": self.status, "message": self.message, "values": self.values,
                **self.stats, "workers": self.workers, "limit": self.limit,
                "pct_of_limit": (None if self.limit is None or self.median is None or self.limit <= 0
                                 else self.median / self.limit),
                "ratios": self.ratios, "note": self.note, "extras": plain(self.extras)}


@dataclass
class WorkloadResult:
    """Everything one workload measured.

    Attributes:
        unit: the base unit of ``Row.values`` (``samples/s``, ``batches/s``,
            ``s``, ``bytes``, ``fraction``).
        display_unit / display_scale: how the tables show it (``ms`` = s x 1e3).
        limits: labelled physical limits, in the base unit.
        ratio_refs: ratio column label -> name of the row it divides by.
    """

    id: str
    title: str
    unit: str
    higher_is_better: bool
    display_unit: str
    display_scale: float = 1.0
    rows: list[Row] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)
    ratio_refs: dict[str, str] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def best(self, family: str) -> Row | None:
        """The row of ``family`` with the best median (highest or lowest by unit)."""
        rows = [r for r in self.rows if r.family == family and r.median is not None]
        if not rows:
            return None
        key = (lambda r: r.median) if self.higher_is_better else (lambda r: -r.median)
        return max(rows, key=key)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "display_unit": self.display_unit,
                "display_scale": self.display_scale, "limits": self.limits,
                "ratio_refs": self.ratio_refs, "rows": [r.to_dict() for r in self.rows],
                "sweep": plain(self.sweep), "notes": self.notes, "elapsed_s": self.elapsed_s}


@dataclass
class Context:
    """State shared by the workloads of one run."""

    settings: BenchSettings
    cache_dir: Path
    log: Callable[[str], None]
    cores: int = field(default_factory=usable_cores)
    results: dict[str, WorkloadResult] = field(default_factory=dict)
    best_static: dict[str, dict[str, Any]] = field(default_factory=dict)
    _volume: Path | None = None

    def volume(self) -> Path:
        """The W1 volume, created once, then read through once to warm the page cache."""
        if self._volume is None:
            path = make_volume(self.settings.volume_side, self.cache_dir)
            with open(path, "rb") as f:
                while f.read(1 << 22):
                    pass
            self._volume = path
        return self._volume

    def static_for(self, wid: str) -> dict[str, Any]:
        return dict(self.best_static.get(wid, DEFAULT_STATIC[wid]))


# ------------------------------------------------------------------------ helpers


def _fmt_rate(v: float) -> str:
    return f"{v:,.1f}"


def _settings_note(row: Row) -> str:
    """For ours: the settings it ran with (what "auto" resolved to)."""
    for extra in row.extras:
        s = extra.get("settings")
        if isinstance(s, dict):
            return f"nw={s.get('num_workers')} pf={s.get('prefetch_factor')} {s.get('executor')}"
    return ""


def _workers_from(extras: Sequence[dict[str, Any]]) -> int | None:
    for extra in extras:
        s = extra.get("settings")
        if isinstance(s, dict) and isinstance(s.get("num_workers"), int):
            return max(1, s["num_workers"])
    return None


def _build_rows(contenders: Sequence[Contender], outcome: RoundsOutcome | None,
                calib: Calibration | None, cores: int) -> list[Row]:
    rows = []
    for c in contenders:
        row = Row(c.name, c.family, dict(c.params))
        if c.unavailable is not None:
            row.status, row.message = "skipped", c.unavailable
            rows.append(row)
            continue
        ms = outcome.measurements.get(c.name, []) if outcome else []
        row.values = [m.value for m in ms]
        row.extras = [m.extra for m in ms]
        if outcome and c.name in outcome.errors:
            row.message = outcome.errors[c.name]
            if not ms:
                row.status = "error"
        row.workers = c.workers if c.workers is not None else _workers_from(row.extras)
        if calib is not None and row.workers is not None:
            row.limit = calib.limit(cores, row.workers)
        if c.family == "ours":
            row.note = _settings_note(row)
        left = sorted({n for e in row.extras for n in e.get("threads_left_after_close", ())})
        if left:
            row.message = (row.message + "; " if row.message else "") + \
                f"threads alive after close: {', '.join(left[:4])}"
        rows.append(row)
    return rows


def _apply_ratios(result: WorkloadResult, refs: dict[str, str | None]) -> None:
    """Fill ``Row.ratios``: each row's median divided by the reference row's median."""
    for label, ref_name in refs.items():
        ref = result.row(ref_name) if ref_name else None
        if ref is None or not ref.median or ref.name in result.ratio_refs.values():
            continue  # unmeasured, or already a column under another label
        result.ratio_refs[label] = ref.name
        for row in result.rows:
            if row.median is not None:
                row.ratios[label] = row.median / ref.median


def _standard_refs(result: WorkloadResult, *extra: str) -> dict[str, str | None]:
    best_torch = result.best("torch")
    best_td = result.best("torchdata")
    refs: dict[str, str | None] = {
        "best torch": best_torch.name if best_torch else None,
        "best torchdata": best_td.name if best_td else None,
    }
    for name in extra:
        refs[name] = name
    return refs


def _sweep_static(ctx: Context, wid: str, candidates: Sequence[dict[str, Any]],
                  measure: Callable[[Contender], Measurement],
                  higher_is_better: bool = True) -> tuple[Contender | None, list[dict[str, Any]]]:
    """One short measurement of each static candidate of ours; the best becomes a contender."""
    records: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any]] | None = None
    n_threads = torch.get_num_threads()  # restored after each run, as in the rounds
    for kwargs in candidates:
        c = ours(**kwargs)
        if c.unavailable is not None:
            return None, [{"skipped": c.unavailable}]
        try:
            value = measure(c).value
        except Exception as exc:
            records.append({"settings": kwargs, "error": f"{type(exc).__name__}: {exc}"})
            ctx.log(f"[{wid}] sweep {c.name}: [red]error[/] {exc}")
            continue
        finally:
            torch.set_num_threads(n_threads)
        records.append({"settings": kwargs, "value": value})
        ctx.log(f"[{wid}] sweep {c.name}: {value:.4g}")
        score = value if higher_is_better else -value
        if best is None or score > best[0]:
            best = (score, kwargs)
    if best is None:
        return None, records
    ctx.best_static[wid] = dict(best[1])
    return ours(**best[1]), records



def _peers(s: BenchSettings, torchdata_threads: Sequence[int]) -> list[Contender]:
    return [*(torch_dl(n) for n in s.torch_workers), *(torchdata_nodes(t) for t in torchdata_threads)]


def _ours_missing_row(rows: list[Row], sweep: Sequence[dict[str, Any]],
                      name: str = "ours static (best of sweep)") -> None:
    """A placeholder row when the sweep produced no static contender (skipped or all failed)."""
    reason = ours(**AUTO).unavailable
    if reason is not None:
        rows.append(Row(name, "ours", {}, status="skipped", message=reason))
        return
    errors = [r["error"] for r in sweep if "error" in r]
    rows.append(Row(name, "ours", {}, status="error",
                    message=errors[0] if errors else "the static sweep measured nothing"))


# ---------------------------------------------------------------- throughput W1-W4


def _throughput_workload(ctx: Context, wid: str, title: str, spec: LoaderSpec,
                         calib: Calibration | None, torchdata_threads: Sequence[int],
                         sweep: Sequence[dict[str, Any]], per: str,
                         extra_refs: Sequence[str] = (),
                         references: Sequence[Contender] = ()) -> WorkloadResult:
    s = ctx.settings
    unit = f"{per}/s"
    result = WorkloadResult(wid, title, unit, True, unit)
    # One single-worker batch time: the burst of first batches that all workers
    # finish together stays out of the window.
    warmup_s = spec.batch_size * calib.wall_s if calib is not None else 0.0

    def measure(c: Contender, duration: float = s.duration_s) -> Measurement:
        return measure_throughput(c, spec, duration=duration, warmup_batches=s.warmup_batches,
                                  warmup_s=warmup_s, per=per)

    static, result.sweep = _sweep_static(
        ctx, wid, sweep, lambda c: measure(c, s.sweep_duration_s))
    contenders = [*_peers(s, torchdata_threads), ours(**AUTO)]
    if static is not None:
        contenders.append(static)
    contenders.extend(references)
    outcome = interleaved_rounds(contenders, measure, s.rounds, ctx.log, wid, _fmt_rate)
    result.rows = _build_rows(contenders, outcome, calib, ctx.cores)
    if static is None:
        _ours_missing_row(result.rows, result.sweep)
    _apply_ratios(result, _standard_refs(result, *extra_refs))
    result.notes.append(
        f"throughput window {s.duration_s:g} s after a warm-up of >= {s.warmup_batches} batches"
        + (f" and >= {warmup_s * 1e3:.0f} ms (one single-worker batch time)" if warmup_s else ""))
    return result


def _calibration_notes(result: WorkloadResult, calib: Calibration, cores: int) -> None:
    result.limits["CPU limit (cores x 1-thread rate)"] = calib.cpu_limit(cores)
    result.limits["1-thread rate"] = calib.cpu_rate
    result.notes.append(
        f"1-thread cost per sample: {calib.wall_s * 1e3:.2f} ms wall, {calib.cpu_s * 1e3:.2f} ms "
        f"CPU ({calib.samples} samples, torch.set_num_threads(1)); cores = {cores}")


def run_w1(ctx: Context) -> WorkloadResult:
    s = ctx.settings
    ds = VolumeCrops(ctx.volume(), s.w1_length, crop=s.crop)
    spec = LoaderSpec(ds, s.batch_size)
    calib = calibrate(ds, seconds=s.calibration_s)
    result = _throughput_workload(ctx, "W1", "random crops from a memory-mapped volume", spec,
                                  calib, s.w1_torchdata, s.w1_sweep, "samples",
                                  references=(bare_threads(ctx.cores),))
    _calibration_notes(result, calib, ctx.cores)
    result.notes.append("limit column: min(CPU limit, workers / 1-thread wall time per sample)")
    bare = result.row(f"bare threads={ctx.cores} (no loader)")
    if bare is not None and bare.median:
        result.limits["measured ceiling (bare threads, no loader)"] = bare.median
        result.notes.append(
            f"bare threads = {ctx.cores} threads calling dataset[i] directly (no collate, no "
            "ordering): the rate this machine reaches on this dataset at all, measured in the "
            "same rounds; every loader's rate is at most this")
    return result


def run_w2(ctx: Context) -> WorkloadResult:
    s = ctx.settings
    ds = VolumeCrops(ctx.volume(), s.w1_length, crop=s.crop, latency_s=s.latency_s)
    spec = LoaderSpec(ds, s.batch_size)
    calib = calibrate(ds, seconds=max(s.calibration_s, 10 * s.latency_s))
    result = _throughput_workload(
        ctx, "W2", f"W1 + {s.latency_s * 1e3:.0f} ms GIL-free latency per sample", spec, calib,
        s.w2_torchdata, s.w2_sweep, "samples", extra_refs=("torch nw=4",))
    _calibration_notes(result, calib, ctx.cores)
    result.limits["latency limit per worker (1 / wall per sample)"] = calib.latency_limit(1)
    result.notes.append("limit column: min(CPU limit, workers / (latency + CPU per sample))")
    return result


def run_w3(ctx: Context) -> WorkloadResult:
    s = ctx.settings
    iters = calibrate_gil_iterations(s.w3_gil_ms / 1e3)
    ds = GilBound(s.w3_length, iters)
    spec = LoaderSpec(ds, s.w3_batch_size)
    calib = calibrate(ds, seconds=s.calibration_s)
    result = _throughput_workload(
        ctx, "W3", f"pure-Python loop holding the GIL (~{s.w3_gil_ms:g} ms)", spec, calib,
        s.w3_torchdata, s.w3_sweep, "samples")
    _calibration_notes(result, calib, ctx.cores)
    result.notes.append(f"{iters:,} loop iterations per sample; threads cannot exceed the "
                        "1-thread rate (one GIL), processes can reach the CPU limit")
    return result


def run_w4(ctx: Context) -> WorkloadResult:
    s = ctx.settings
    ds = TinyTensor(s.w4_length)
    spec = LoaderSpec(ds, s.w4_batch_size)
    result = _throughput_workload(ctx, "W4", "preallocated small tensor (loader overhead)",
                                  spec, None, s.w4_torchdata, s.w4_sweep, "batches",
                                  extra_refs=("torch nw=0", "torch nw=2"))
    # Serial ceiling: index + collate on this thread, no loader at all.
    collate, bs = spec.collate, s.w4_batch_size
    t0, n, i = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < max(0.05, s.calibration_s):
        collate([ds[j] for j in range(i, i + bs)])
        i, n = (i + bs) % (len(ds) - bs), n + 1
    result.limits["serial, no loader (1 thread)"] = n / (time.perf_counter() - t0)
    result.notes.append(f"batch_size={bs}; figures are batches/s")
    return result


# ----------------------------------------------------------------------- W5 start-up


def run_w5(ctx: Context) -> WorkloadResult:
    s = ctx.settings
    ds = VolumeCrops(ctx.volume(), s.w1_length, crop=s.crop)
    spec = LoaderSpec(ds, s.batch_size)
    calib = calibrate(ds, seconds=s.calibration_s)
    result = WorkloadResult("W5", "time to first batch on W1", "s", False, "ms", 1e3)
    static_kwargs = ctx.static_for("W1")
    contenders = [*_peers(s, s.w5_torchdata), ours(**AUTO), ours(**static_kwargs)]

    def measure(c: Contender) -> Measurement:
        return measure_first_batch(c, spec)

    outcome = interleaved_rounds(contenders, measure, s.rounds, ctx.log, "W5",
                                 lambda v: f"{v * 1e3:.1f} ms")
    result.rows = _build_rows(contenders, outcome, None, ctx.cores)
    _apply_ratios(result, _standard_refs(result, "torch nw=2"))
    result.limits["one batch, serial"] = s.batch_size * calib.wall_s
    result.limits["one batch over all cores"] = s.batch_size * calib.cpu_s / ctx.cores
    result.notes.append("from the loader's constructor to the first batch in hand (fresh "
                        "loader each round, nothing excluded); lower is better")
    result.notes.append(f"ours static = W1's best static setting {static_kwargs}"
                        + ("" if "W1" in ctx.best_static else " (default: W1 not run)"))
    return result


# ------------------------------------------------------------------------ W6 memory


def _touch(batch: Any) -> None:
    """Read one float per 4 KiB page, so that every page of the batch is mapped here."""
    if isinstance(batch, torch.Tensor):
        float(batch.reshape(-1)[::1024].sum())


def _wait_for_plateau(mem: MemorySampler, *, step: int, max_s: float,
                      settle_s: float = 0.15) -> None:
    """Sleep until the peak memory has not grown by half a sample for ``settle_s`` (or ``max_s``).

    The pause then lasts as long as the producer keeps filling its buffers, on a
    fast machine or a loaded one, and no longer.
    """
    start = last_change = time.perf_counter()
    level = mem.peak
    while True:
        time.sleep(0.025)
        now = time.perf_counter()
        if mem.peak > level + step // 2:
            level, last_change = mem.peak, now
        if now - last_change >= settle_s or now - start >= max_s:
            return


def run_w6(ctx: Context) -> WorkloadResult:
    s = ctx.settings
    sample = s.w6_sample_mib * MiB
    budget = s.w6_budget_mib * MiB
    ds = BigSamples(s.w6_samples, sample)
    spec = LoaderSpec(ds, 1, first_item_collate)
    result = WorkloadResult(
        "W6", f"{s.w6_sample_mib} MiB samples, prefetch {s.w6_prefetch}, budget "
        f"{s.w6_budget_mib} MiB", "bytes", False, "MiB", 1 / MiB)
    knobs = {"num_workers": s.w6_workers, "prefetch_factor": s.w6_prefetch, "executor": "thread"}
    with_budget = f"ours budget {s.w6_budget_mib} MiB"
    without = "ours no budget"
    contenders = [
        torch_dl(0), torch_dl(2, s.w6_prefetch), torchdata_nodes(s.w6_workers, s.w6_prefetch),
        ours(with_budget, memory_budget=budget, **knobs),
        ours(without, memory_budget=None, **knobs),
    ]

    def measure(c: Contender) -> Measurement:
        shm = c.family == "torch" and bool(c.params.get("num_workers"))
        with MemorySampler(include_shm=shm) as mem:
            t0 = time.perf_counter()
            handle = c.open(spec)
            try:
                n = 0
                for batch in handle.iter():
                    _touch(batch)
                    n += 1
                    if n == 1:
                        # A stalled consumer after the first batch (think: a long first
                        # step): the producer runs as far ahead as it is allowed to.
                        _wait_for_plateau(mem, step=sample, max_s=s.w6_pause_s)
                    else:
                        time.sleep(s.w6_consumer_s)
                extra = report_extra(handle)
            finally:
                handle.close()
                del handle
            elapsed = time.perf_counter() - t0
        extra.update(samples=n, elapsed_s=elapsed, memory_samples=mem.samples,
                     includes_shm=shm)
        return Measurement(float(mem.peak_growth), extra)

    outcome = interleaved_rounds(contenders, measure, s.rounds, ctx.log, "W6",
                                 lambda v: f"{v / MiB:.0f} MiB")
    result.rows = _build_rows(contenders, outcome, None, ctx.cores)
    for row in result.rows:
        peaks = [e.get("memory", {}).get("peak_bytes_in_flight") for e in row.extras]
        peaks = [p for p in peaks if isinstance(p, (int, float))]
        if peaks:
            row.note = (f"{row.note}; " if row.note else "") + \
                f"peak in flight {max(peaks) / MiB:.0f} MiB (loader's report)"
        if row.extras and row.extras[0].get("includes_shm"):
            row.note = "RSS + /dev/shm growth (in-flight batches live in shared memory)"
    result.limits["budget"] = float(budget)
    result.limits["budget + one batch"] = float(budget + sample)
    result.limits["all samples"] = float(s.w6_samples * sample)
    result.notes.append(
        f"figure: peak growth of this process's RSS (sampled every 2 ms) over one epoch of "
        f"{s.w6_samples} samples; the consumer touches every page of a batch, stops after the "
        f"first batch until memory stops growing (at most {s.w6_pause_s:g} s), then pauses "
        f"{s.w6_consumer_s * 1e3:.0f} ms per batch, so an unbounded prefetch holds nearly the "
        "whole epoch; lower is better")
    return result


# ---------------------------------------------------------------- W7 Lightning fit


class _Preloaded:
    """The floor of the wait measurement: the same batch object, ready at once."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self) -> Any:
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


def run_w7(ctx: Context) -> WorkloadResult:
    from benchmarks.fit import run_fit  # imports Lightning: only when W7 runs

    s = ctx.settings
    steps = s.w7_steps + s.w7_warmup_steps
    ds = VolumeCrops(ctx.volume(), (steps + 4) * s.batch_size, crop=s.crop, latency_s=s.latency_s)
    spec = LoaderSpec(ds, s.batch_size)
    result = WorkloadResult("W7", f"Lightning fit, ~{s.w7_step_ms:g} ms step, W2-style data",
                            "fraction", False, "% wait", 100.0)
    ready = spec.collate([ds[i] for i in range(s.batch_size)])
    preloaded = Contender("preloaded (floor)", "reference", {"batches": steps},
                          lambda _spec: LoaderHandle(_Preloaded(ready, steps + 2)))
    static_kwargs = ctx.static_for("W2")
    contenders = [*(torch_dl(n) for n in s.w7_torch_workers)]
    if s.w7_torchdata:
        best_td = ctx.results["W2"].best("torchdata") if "W2" in ctx.results else None
        contenders.append(torchdata_nodes(best_td.params["threads"] if best_td
                                          else DEFAULT_TORCHDATA_W2))
    contenders.append(ours(**AUTO))
    if s.w7_ours_static:
        contenders.append(ours(**static_kwargs))
    contenders.append(preloaded)
    monitor_ok = [True]

    def measure(c: Contender) -> Measurement:
        handle = c.open(spec)
        try:
            with_monitor = c.name == "ours auto" and monitor_ok[0]
            try:
                r = run_fit(handle.iterable, steps=steps, step_s=s.w7_step_ms / 1e3,
                            warmup_steps=s.w7_warmup_steps, with_monitor=with_monitor)
            except Exception as exc:
                if not with_monitor:
                    raise
                monitor_ok[0] = False  # the monitor broke the fit: measure without it
                result.notes.append(f"LoaderMonitor failed ({type(exc).__name__}: {exc}); "
                                    "ours measured without it")
                handle.close()
                handle = c.open(spec)
                r = run_fit(handle.iterable, steps=steps, step_s=s.w7_step_ms / 1e3,
                            warmup_steps=s.w7_warmup_steps, with_monitor=False)
            extra = report_extra(handle)
        finally:
            handle.close()
        return Measurement(r["wait_fraction"], {**r, **extra})

    outcome = interleaved_rounds(contenders, measure, s.rounds, ctx.log, "W7",
                                 lambda v: f"{v * 100:.1f}% wait")
    result.rows = _build_rows(contenders, outcome, None, ctx.cores)
    for row in result.rows:
        if not row.extras:
            continue
        step = sorted(e["step_ms_mean"] for e in row.extras)[len(row.extras) // 2]
        wait = sorted(e["wait_ms_mean"] for e in row.extras)[len(row.extras) // 2]
        parts = [row.note] if row.note else []
        parts.append(f"step {step:.1f} ms, wait {wait:.1f} ms")
        mon = [e["monitor_wait_fraction"] for e in row.extras if "monitor_wait_fraction" in e]
        if mon:
            parts.append(f"LoaderMonitor {100 * sorted(mon)[len(mon) // 2]:.1f}%")
        own = [e.get("rates", {}).get("wait_fraction") for e in row.extras]
        own = [w for w in own if isinstance(w, (int, float))]
        if own:
            parts.append(f"loader telemetry {100 * sorted(own)[len(own) // 2]:.1f}%")
        row.note = "; ".join(parts)
    result.notes.append(
        f"simulated step: {s.w7_step_ms:g} ms sleep + the conv net's CPU time; batch_size="
        f"{s.batch_size}, {s.latency_s * 1e3:.0f} ms latency per sample")
    result.notes.append(
        "wait = gap from on_train_batch_end to the next on_train_batch_start (Lightning fetches "
        "the next batch there); wait_fraction = sum(wait) / (sum(wait) + sum(step)) after "
        f"{s.w7_warmup_steps} warm-up steps; 'preloaded' is the floor of this method")
    if not any(isinstance(e.get("monitor_wait_fraction"), float)
               for r in result.rows for e in r.extras):
        result.notes.append("lightning_threadsafe.callbacks.LoaderMonitor not available or "
                            "reported nothing: ours measured with the gap timer only")
    if s.w7_ours_static:
        result.notes.append(f"ours static = W2's best static setting {static_kwargs}"
                            + ("" if "W2" in ctx.best_static else " (default: W2 not run)"))
    return result


# -------------------------------------------------------------------- W8 auto-tuning


def _decision_summary(decision: Any) -> dict[str, Any]:
    if not isinstance(decision, dict):
        return {"decision": plain(decision)}
    keep = ("changed", "settings", "reason", "throughput", "applied")
    out = {k: plain(decision[k]) for k in keep if k in decision}
    verdict = decision.get("verdict")
    if isinstance(verdict, dict):
        out["verdict"] = plain({k: verdict[k] for k in ("code", "name", "reason") if k in verdict})
    return out


def run_w8(ctx: Context) -> WorkloadResult:
    s = ctx.settings
    bs = s.w8_batch_size
    ds = VolumeCrops(ctx.volume(), s.w8_batches_per_epoch * bs, crop=s.crop,
                     latency_s=s.latency_s)
    spec = LoaderSpec(ds, bs)
    result = WorkloadResult("W8", "auto-tuning from nw=1, pf=1 on W2", "samples/s", True,
                            "samples/s (last epoch)")
    static_kwargs = ctx.static_for("W2")
    tuned_name = "ours tuned (from nw=1, pf=1)"
    static_name = "ours static best"
    contenders = [torch_dl(4), ours(**AUTO), ours(static_name, **static_kwargs),
                  ours(tuned_name, num_workers=1, prefetch_factor=1, executor="thread")]

    def measure(c: Contender) -> Measurement:
        tune = c.name == tuned_name
        handle = c.open(spec)
        try:
            loader = handle.iterable
            n_batches = math.ceil(len(ds) / bs)
            window = n_batches // s.w8_windows_per_epoch if s.w8_windows_per_epoch > 1 else 0
            rates: list[float] = []
            decisions: list[dict[str, Any]] = []
            for _epoch in range(s.w8_epochs):
                t0, n = time.perf_counter(), 0
                for i, batch in enumerate(handle.iter()):
                    n += batch_len(batch)
                    if tune and window and (i + 1) % window == 0 and i + 1 < n_batches:
                        decisions.append(_decision_summary(loader.optimize_thread_safety_settings()))
                rates.append(n / (time.perf_counter() - t0))
                if tune:  # the epoch end: outside the timed epoch
                    decisions.append(_decision_summary(loader.optimize_thread_safety_settings()))
            extra = report_extra(handle)
        finally:
            handle.close()
        extra.update(epoch_rates=rates, decisions=decisions)
        return Measurement(rates[-1], extra)

    outcome = interleaved_rounds(contenders, measure, s.rounds, ctx.log, "W8", _fmt_rate)
    result.rows = _build_rows(contenders, outcome, None, ctx.cores)
    for row in result.rows:
        if row.extras:
            first = row.extras[len(row.extras) // 2]["epoch_rates"]
            row.note = "; ".join(x for x in (
                row.note, "epochs " + " -> ".join(f"{r:.0f}" for r in first)) if x)
    _apply_ratios(result, {"static best": static_name, "best torch": "torch nw=4"})
    result.notes.append(
        f"{s.w8_epochs} epochs of {s.w8_batches_per_epoch} batches of {bs}; figure = the last "
        "epoch's samples/s (epoch wall time, fresh pipeline each epoch for every contender)")
    result.notes.append(
        "tuning: optimize_thread_safety_settings() at each epoch end"
        + (f" and {s.w8_windows_per_epoch - 1}x within each epoch" if s.w8_windows_per_epoch > 1
           else " (the loader applies thread-count changes from the next epoch, so shorter "
                "windows would judge changes that have not taken effect)"))
    result.notes.append(f"static best = W2's best static setting {static_kwargs}"
                        + ("" if "W2" in ctx.best_static else " (default: W2 not run)"))
    return result


# ------------------------------------------------------------------ O1 loader overhead

O1_THREADS_TARGET_S = 4e-6  # ours with threads: <= 4 us per sample (issue 11, item 4)
O1_INLINE_TARGET_S = 2e-6   # ours inline (num_workers=0): <= 2 us per sample
O1_INLINE = "ours inline (nw=0)"


def _o1_ours_name(threads: int) -> str:
    return f"ours threads={threads}"


def run_o1(ctx: Context) -> WorkloadResult:
    """Loader overhead: microseconds per sample on a trivial dataset (batch 64).

    The dataset returns one preallocated 16-float tensor, so what remains is each
    loader's own per-sample and per-batch work (index, seeding context, hand-off,
    collate). Rows: ours inline and with 1/2/4 threads, torch nw=0, and the bare
    batch-granular ``ThreadPoolExecutor``; lower is better.
    """
    s = ctx.settings
    ds = TinyTensor(s.o1_length)
    spec = LoaderSpec(ds, s.o1_batch_size)
    result = WorkloadResult("O1", "loader overhead on a trivial dataset", "s/sample", False,
                            "us/sample", 1e6)
    contenders = [torch_dl(0), ours(O1_INLINE, num_workers=0),
                  *(ours(_o1_ours_name(t), num_workers=t, executor="thread")
                    for t in s.o1_threads),
                  *(batch_pool(t) for t in s.o1_pool_threads)]

    def measure(c: Contender) -> Measurement:
        m = measure_throughput(c, spec, duration=s.duration_s, warmup_batches=s.warmup_batches,
                               per="samples")
        return Measurement(1.0 / m.value, m.extra)

    rounds = max(s.rounds, s.o1_min_rounds)
    outcome = interleaved_rounds(contenders, measure, rounds, ctx.log, "O1",
                                 lambda v: f"{v * 1e6:.2f} us/sample")
    result.rows = _build_rows(contenders, outcome, None, ctx.cores)
    pools = [r for r in result.rows if r.family == "reference" and r.median is not None]
    best_pool = min(pools, key=lambda r: r.median) if pools else None  # type: ignore[arg-type,return-value]
    _apply_ratios(result, {"torch nw=0": "torch nw=0",
                           "best bare pool": best_pool.name if best_pool else None})
    result.notes.append(
        f"TinyTensor (one preallocated 16-float tensor), batch_size={s.o1_batch_size}, "
        f"{s.o1_length:,} samples, default collate; figure = seconds per delivered sample "
        f"after {s.warmup_batches} warm-up batches, over {s.duration_s:g} s or the epoch; "
        f"median of {rounds} interleaved rounds")
    result.notes.append(
        "bare pool = concurrent.futures.ThreadPoolExecutor, one task per batch "
        "(dataset.__getitem__ for its indices + collate), 2 x threads batches in flight: no seeding "
        "context, error policy, memory budget or telemetry")
    return result


def _o1_targets(r: WorkloadResult) -> list[dict[str, str]]:
    torch0 = r.row("torch nw=0")
    ref = f"; torch nw=0 {torch0.median * 1e6:.2f} us" if torch0 and torch0.median else ""
    pools = [row for row in r.rows if row.family == "reference" and row.median is not None]
    if pools:
        ref += "; bare pool " + ", ".join(f"{row.params['threads']}t {row.median * 1e6:.2f}"
                                          for row in pools) + " us"
    out = []
    text = f"ours threads <= {O1_THREADS_TARGET_S * 1e6:g} us/sample (worst of threads)"
    rows = [row for row in r.rows if row.name.startswith("ours threads=")]
    problems = [p for p in (_ours_problem(row, row.name) for row in rows) if p]
    if not rows or problems:
        status, detail = problems[0] if problems else ("N/A", "no threaded row")
        out.append(_target("O1", text, status, detail=detail))
    else:
        worst = max(rows, key=_median)
        out.append(_target("O1", text, "PASS" if _median(worst) <= O1_THREADS_TARGET_S else "FAIL",
                           f"{_median(worst) * 1e6:.2f} us",
                           ", ".join(f"{row.name.split('=')[1]}t {_median(row) * 1e6:.2f}"
                                     for row in rows) + " us" + ref))
    text = f"ours inline <= {O1_INLINE_TARGET_S * 1e6:g} us/sample"
    row = r.row(O1_INLINE)
    problem = _ours_problem(row, O1_INLINE)
    if problem:
        out.append(_target("O1", text, problem[0], detail=problem[1]))
    else:
        v = _median(row)
        out.append(_target("O1", text, "PASS" if v <= O1_INLINE_TARGET_S else "FAIL",
                           f"{v * 1e6:.2f} us", ref.lstrip("; ")))
    return out


# -------------------------------------------------------------------------- targets


def _target(tid: str, text: str, status: str, measured: str = "", detail: str = "") -> dict[str, str]:
    return {"id": tid, "target": text, "measured": measured, "status": status, "detail": detail}


def _median(row: Row | None) -> float:
    """The median of a row that :func:`_ours_problem` accepted."""
    if row is None or row.median is None:
        raise ValueError(f"row={row!r} has no measurement")
    return row.median


def _ours_problem(row: Row | None, what: str = "ours auto") -> tuple[str, str] | None:
    """(status, detail) when ``row`` cannot be judged: skipped -> N/A, error -> FAIL."""
    if row is None:
        return "N/A", f"no '{what}' row"
    if row.status == "skipped":
        return "N/A", row.message
    if row.median is None:
        return "FAIL", f"{what} failed: {row.message}"
    return None


def _ratio_target(tid: str, text: str, res: WorkloadResult, row: Row | None, ref: Row | None,
                  threshold: float, at_least: bool = True) -> dict[str, str]:
    problem = _ours_problem(row)
    if problem:
        return _target(tid, text, problem[0], detail=problem[1])
    if ref is None or ref.median is None:
        return _target(tid, text, "N/A", detail="reference not measured"
                       + (f" ({ref.message})" if ref is not None and ref.message else ""))
    ratio = _median(row) / ref.median
    ok = ratio >= threshold if at_least else ratio <= threshold
    return _target(tid, text, "PASS" if ok else "FAIL", f"{ratio:.2f}x",
                   f"{row.name} vs {ref.name}")


def evaluate_targets(results: dict[str, WorkloadResult], settings: BenchSettings) -> list[dict[str, str]]:
    """PASS / FAIL / N/A for each target of ``BENCHMARKS.md`` whose workload ran."""
    out: list[dict[str, str]] = []
    if (r := results.get("W1")) is not None:
        auto = r.row("ours auto")
        out.append(_ratio_target("W1", ">= 1.2x best torch", r, auto, r.best("torch"), 1.2))
        out.append(_ratio_target("W1", ">= 1.1x best torchdata.nodes", r, auto,
                                 r.best("torchdata"), 1.1))
        out.append(_limit_target("W1", ">= 85% of CPU limit", auto,
                                 r.limits.get("CPU limit (cores x 1-thread rate)"), 0.85))
    if (r := results.get("W2")) is not None:
        auto = r.row("ours auto")
        out.append(_ratio_target("W2", ">= 3x torch nw=4", r, auto, r.row("torch nw=4"), 3.0))
        out.append(_ratio_target("W2", ">= 1.1x best torchdata.nodes thread count", r, auto,
                                 r.best("torchdata"), 1.1))
        out.append(_limit_target("W2", ">= 80% of min(CPU limit, threads / latency)", auto,
                                 auto.limit if auto else None, 0.80))
    if (r := results.get("W3")) is not None:
        auto = r.row("ours auto")
        t = _ratio_target("W3", ">= 0.9x best torch (auto must pick processes)", r, auto,
                          r.best("torch"), 0.9)
        if auto is not None and auto.note:
            t["detail"] += f"; auto chose {auto.note}"
        out.append(t)
    if (r := results.get("W4")) is not None:
        auto = r.row("ours auto")
        out.append(_ratio_target("W4", ">= 0.5x torch nw=0 (batches/s)", r, auto,
                                 r.row("torch nw=0"), 0.5))
        out.append(_ratio_target("W4", ">= 5x torch nw=2 (batches/s)", r, auto,
                                 r.row("torch nw=2"), 5.0))
    if (r := results.get("W5")) is not None:
        out.append(_ratio_target("W5", "<= 0.25x torch nw=2 time to first batch", r,
                                 r.row("ours auto"), r.row("torch nw=2"), 0.25, at_least=False))
    if (r := results.get("W6")) is not None:
        out.extend(_memory_targets(r, settings))
    if (r := results.get("W7")) is not None:
        out.append(_wait_target(r, results.get("W2"), settings))
    if (r := results.get("W8")) is not None:
        out.append(_ratio_target("W8", ">= 90% of the best static setting within 2 epochs", r,
                                 r.row("ours tuned (from nw=1, pf=1)"), r.row("ours static best"),
                                 0.9))
    if (r := results.get("O1")) is not None:
        out.extend(_o1_targets(r))
    gpu = ("measured by `python benchmarks/gpu_check.py`, not by this harness"
           if torch.cuda.is_available()
           else "no CUDA device here; `python benchmarks/gpu_check.py` measures it on a GPU")
    out.append(_target("G1", "copy of batch N+1 overlaps step N: step time ratio <= 1.05", "N/A",
                       detail=gpu))
    out.append(_target("G2", "staging bandwidth >= 80% of a raw pinned copy_", "N/A", detail=gpu))
    return out


def _limit_target(tid: str, text: str, row: Row | None, limit: float | None,
                  threshold: float) -> dict[str, str]:
    problem = _ours_problem(row)
    if problem:
        return _target(tid, text, problem[0], detail=problem[1])
    if not limit:
        return _target(tid, text, "N/A", detail="limit unknown")
    median = _median(row)
    frac = median / limit
    note = f" ({row.note})" if row is not None and row.note else ""
    return _target(tid, text, "PASS" if frac >= threshold else "FAIL", f"{frac:.0%}",
                   f"{median:,.0f} of {limit:,.0f} samples/s{note}")


def _memory_targets(r: WorkloadResult, s: BenchSettings) -> list[dict[str, str]]:
    budget = s.w6_budget_mib * MiB
    batch = s.w6_sample_mib * MiB
    out = []
    text = "peak RSS growth <= budget + one batch"
    row = r.row(f"ours budget {s.w6_budget_mib} MiB")
    problem = _ours_problem(row, "ours with budget")
    if problem:
        out.append(_target("W6", text, problem[0], detail=problem[1]))
    elif row is not None:
        peak = max(row.values)  # the worst round, not the median: a bound must hold every time
        out.append(_target("W6", text, "PASS" if peak <= budget + batch else "FAIL",
                           f"{peak / MiB:.0f} MiB", f"worst round; limit {(budget + batch) / MiB:.0f} MiB"
                           + (f"; {row.note}" if row.note else "")))
    text = "without the budget the same run exceeds it"
    row = r.row("ours no budget")
    problem = _ours_problem(row, "ours without budget")
    if problem:
        out.append(_target("W6", text, problem[0], detail=problem[1]))
    else:
        median = _median(row)
        out.append(_target("W6", text, "PASS" if median > budget else "FAIL",
                           f"{median / MiB:.0f} MiB", f"median; budget {budget / MiB:.0f} MiB"))
    return out


def _wait_target(r: WorkloadResult, w2: WorkloadResult | None, s: BenchSettings) -> dict[str, str]:
    text = "wait_fraction <= 3% once capacity exceeds the step rate"
    auto = r.row("ours auto")
    problem = _ours_problem(auto)
    if problem:
        return _target("W7", text, problem[0], detail=problem[1])
    median = _median(auto)
    steps = sorted(e["step_ms_mean"] for e in auto.extras)
    step_rate = 1e3 / steps[len(steps) // 2]
    capacity = None
    source = ""
    if w2 is not None and (w2auto := w2.row("ours auto")) is not None and w2auto.median:
        capacity, source = w2auto.median / s.batch_size, "ours auto in W2"
    elif w2 is not None and w2.limits:
        capacity = w2.limits["CPU limit (cores x 1-thread rate)"] / s.batch_size
        source = "W2 CPU limit"
    measured = f"{median:.1%}"
    if capacity is not None and capacity <= step_rate:
        return _target("W7", text, "N/A", measured,
                       f"capacity {capacity:.1f} batches/s ({source}) <= step rate {step_rate:.1f}/s")
    detail = (f"capacity {capacity:.1f} batches/s ({source}) > step rate {step_rate:.1f}/s"
              if capacity is not None else "capacity unknown (W2 not run); judged anyway")
    return _target("W7", text, "PASS" if median <= 0.03 else "FAIL", measured, detail)


# ------------------------------------------------------------------------- driver

WORKLOADS: dict[str, Callable[[Context], WorkloadResult]] = {
    "W1": run_w1, "W2": run_w2, "W3": run_w3, "W4": run_w4,
    "W5": run_w5, "W6": run_w6, "W7": run_w7, "W8": run_w8, "O1": run_o1,
}


def run_workloads(ctx: Context, ids: Sequence[str],
                  on_result: Callable[[WorkloadResult], None] | None = None) -> dict[str, WorkloadResult]:
    """Run the selected workloads in W1..W8, O1 order; a crashing workload is recorded, not fatal."""
    for wid in WORKLOADS:
        if wid not in ids:
            continue
        t0 = time.perf_counter()
        try:
            result = WORKLOADS[wid](ctx)
        except Exception as exc:
            result = WorkloadResult(wid, "workload failed", "", True, "")
            result.notes.append(f"the workload itself failed: {type(exc).__name__}: {exc}")
            ctx.log(f"[{wid}] [red]failed[/]: {type(exc).__name__}: {exc}")
        result.elapsed_s = time.perf_counter() - t0
        ctx.results[wid] = result
        if on_result is not None:
            on_result(result)
    return ctx.results
