"""GPU check of ``CudaStreamScheduler``: correctness under a race window, G1 and G2.

One command on a CUDA machine (finishes in well under 3 minutes on an H200)::

    python benchmarks/gpu_check.py --out DIR

It prints a summary and writes ``DIR/gpu_check.json``. Sections:

1. Correctness (exit status 1 if any part fails):
   * race: a loader-like loop. Two worker threads pin and stage batch N+k
     (nested dict / namedtuple / dataclass batches, a tensor already on the
     device) and scribble over their pageable source buffers right after
     ``stage()``; the consumer hands batch N off, runs big matmuls on the
     current stream and only then snapshots the batch, while later copies land
     on the side streams. Every snapshot must be bit-equal to a plain
     ``.to(device)`` of the original data.
   * pinned ring: caller-owned pinned buffers recycled FFCV-style, refilled
     only after ``staged.event.synchronize()`` (the documented contract for
     host memory the caller pinned itself).
   * control (information, not a pass condition): the race loop again with
     ``record_stream`` switched off. Corrupted batches there show that the race
     window really exercises allocator reuse; none means the check was weaker.
2. G1 overlap efficiency: step time with staging of batch N+1 (from a worker
   thread) during step N, divided by the compute-only step time with the batch
   already resident. Target <= 1.05.
3. G2 staging bandwidth: pinned batches staged through the scheduler vs a raw
   pinned ``copy_`` of the same bytes into a preallocated device buffer, in the
   same run. Target >= 0.8. Also reports the pinned host-to-device bandwidth.

Times come from ``torch.cuda.Event``; every figure is the median of several
interleaved rounds after warm-up, with the spread. Exit status: 0 correct
(targets reported PASS/FAIL, not enforced), 1 a correctness failure, 2 no CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

_RESULT_TIMEOUT_S = 120.0  # no future is waited on forever
G1_TARGET = 1.05
G2_TARGET = 0.80


def _load_module() -> ModuleType:
    """This checkout's ``cuda_stream.py`` (torch + stdlib only), else the installed one."""
    path = Path(__file__).resolve().parents[1] / "src" / "lightning_threadsafe" / "cuda_stream.py"
    if path.is_file():
        spec = importlib.util.spec_from_file_location("_lts_cuda_stream", path)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            return module
    from lightning_threadsafe import cuda_stream

    return cuda_stream


# --------------------------------------------------------------------------- batches


class Pair(NamedTuple):
    left: torch.Tensor
    tag: str


@dataclass
class Extra:
    flags: torch.Tensor
    note: str


def _tree_map(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _tree_map(fn, v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_tree_map(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, v) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: _tree_map(fn, getattr(obj, f.name)) for f in fields(obj)})
    return obj


def _leaves(obj: Any) -> list[Any]:
    """Leaves in a fixed order, each container type included, for structural comparison."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [type(obj), *[x for k, v in obj.items() for x in (k, *_leaves(v))]]
    if isinstance(obj, (list, tuple)):
        return [type(obj), *[x for v in obj for x in _leaves(v)]]
    if is_dataclass(obj) and not isinstance(obj, type):
        return [type(obj), *[x for f in fields(obj) for x in _leaves(getattr(obj, f.name))]]
    return [obj]


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [x for x in _leaves(obj) if isinstance(x, torch.Tensor)]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _bit_equal(got: Any, want: Any) -> bool:
    a, b = _leaves(got), _leaves(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if (x.dtype, x.shape, x.device) != (y.dtype, y.shape, y.device):
                return False
            if not torch.equal(_as_bytes(x), _as_bytes(y)):
                return False
        elif x is not y and x != y:
            return False
    return True


def _race_batch(i: int, seed: int, batch: int, side: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    shape = (batch, 1, side, side, side)
    return {
        "image": torch.randn(shape, generator=g),
        "mask": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        "meta": {"index": torch.arange(batch, dtype=torch.int64) + i * batch,
                 "names": [f"b{i}s{k}" for k in range(batch)]},
        "pair": Pair(torch.randn(batch, 7, generator=g).to(torch.float16), "pair"),
        "extra": Extra(torch.rand(batch, generator=g) > 0.5, "extra"),
    }


def _timing_batch(batch: int, side: int) -> dict[str, Any]:
    shape = (batch, 1, side, side, side)
    return {
        "image": torch.randn(shape),
        "mask": torch.randint(0, 2, shape, dtype=torch.uint8),
        "index": torch.arange(batch),
        "names": [f"s{k}" for k in range(batch)],
    }


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


# --------------------------------------------------------------------------- compute step


class Step:
    """A compute-heavy training-step stand-in: reads the batch, then k big matmuls."""

    def __init__(self, device: torch.device, n: int = 4096) -> None:
        self.n = n
        self.w = torch.randn(n, n, device=device, dtype=torch.bfloat16) / math.sqrt(n)
        self.h0 = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.bufs = [torch.empty_like(self.h0), torch.empty_like(self.h0)]
        self.k = 1

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        row = image.reshape(-1)[: self.n].to(torch.bfloat16)  # the step depends on the copy
        h = torch.add(self.h0, row, out=self.bufs[0])
        for j in range(self.k):
            h = torch.mm(h, self.w, out=self.bufs[(j + 1) % 2])
        return h

    def calibrate(self, target_ms: float, device: torch.device) -> float:
        self.k = 20
        dummy = torch.zeros(self.n, device=device)
        self(dummy)
        per_mm = _cuda_ms(lambda: self(dummy), reps=3) / self.k
        self.k = max(1, min(5000, round(target_ms / per_mm)))
        return per_mm


def _cuda_ms(fn: Callable[[], Any], reps: int = 1) -> float:
    """Mean GPU milliseconds of ``fn`` on the current stream (events, after a sync)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": values}


# --------------------------------------------------------------------------- correctness


class _NoRecordStream:
    """The real backend with ``record_stream`` switched off (control run only)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        return None


def check_race(mod: ModuleType, device: torch.device, step: Step, args: argparse.Namespace,
               backend: Any = None) -> dict[str, Any]:
    """Loader-like loop; see the module docstring. Returns counts of failures."""
    n, prefetch = args.race_batches, args.prefetch
    truth = [_race_batch(i, args.seed, args.race_batch, args.race_side) for i in range(n)]
    sources = [_tree_map(torch.clone, b) for b in truth]  # what the "dataset" owns and reuses
    resident = torch.arange(11, device=device)
    for b in sources:
        b["resident"] = resident  # already on the device: must be passed through
    sched = mod.CudaStreamScheduler(device, num_streams=2, pin_memory=True, backend=backend)

    def produce(i: int) -> Any:  # worker thread: pin, stage, then overwrite the source
        staged = sched.stage(sched.pin(sources[i]), i)
        for t in _tensors(sources[i]):
            if t.device.type == "cpu":
                _as_bytes(t).bitwise_not_()  # contiguous, so this writes the buffer itself
        return staged

    snapshots, not_resident = [], 0
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="lts-gpucheck-stager") as pool:
        futures: dict[int, Future[Any]] = {i: pool.submit(produce, i) for i in range(min(prefetch, n))}
        for i in range(n):
            staged = futures.pop(i).result(timeout=_RESULT_TIMEOUT_S)
            if i + prefetch < n:
                futures[i + prefetch] = pool.submit(produce, i + prefetch)
            batch = sched.handoff(staged)
            not_resident += batch["resident"] is not resident
            step(batch["image"])  # long: later copies land meanwhile
            snapshots.append(_tree_map(torch.clone, {k: v for k, v in batch.items() if k != "resident"}))
            del batch, staged  # freed while the step is still queued on the GPU
    torch.cuda.synchronize(device)
    sched.close()
    want = [_tree_map(lambda t: t.to(device), b) for b in truth]
    bad = [i for i in range(n) if not _bit_equal(snapshots[i], want[i])]
    return {"batches": n, "mismatched": bad, "resident_copied": not_resident,
            "ok": not bad and not_resident == 0}


def check_pinned_ring(mod: ModuleType, device: torch.device, step: Step,
                      args: argparse.Namespace) -> dict[str, Any]:
    """Caller-pinned buffers recycled once ``staged.event`` has completed."""
    n = args.race_batches
    truth = [_race_batch(i, args.seed + 1, args.race_batch, args.race_side) for i in range(n)]
    keys = ("image", "mask")
    ring = [{k: torch.empty_like(truth[0][k]).pin_memory() for k in keys} for _ in range(2)]
    last: list[Any] = [None, None]
    sched = mod.CudaStreamScheduler(device, num_streams=2)
    snapshots = []
    for i in range(n):
        slot = i % 2
        if last[slot] is not None and last[slot].event is not None:
            last[slot].event.synchronize()  # the copy out of this slot has completed
        for k in keys:
            ring[slot][k].copy_(truth[i][k])
        last[slot] = staged = sched.stage(ring[slot], i)
        batch = sched.handoff(staged)
        step(batch["image"])
        snapshots.append({k: batch[k].clone() for k in keys})
        del batch, staged
    torch.cuda.synchronize(device)
    sched.close()
    bad = [i for i in range(n)
           if not _bit_equal(snapshots[i], {k: truth[i][k].to(device) for k in keys})]
    return {"batches": n, "mismatched": bad, "ok": not bad}


# --------------------------------------------------------------------------- G1, G2


def measure_g1(mod: ModuleType, device: torch.device, step: Step, host: list[Any],
               args: argparse.Namespace) -> dict[str, Any]:
    sched = mod.CudaStreamScheduler(device, num_streams=2)
    resident = _tree_map(lambda t: t.to(device), host[0])
    steps = args.g1_steps
    ordinal = 0

    def run(staging: bool, pool: ThreadPoolExecutor) -> float:
        nonlocal ordinal

        def next_batch() -> Any:
            nonlocal ordinal
            ordinal += 1
            return sched.stage(host[ordinal % len(host)], ordinal) if staging else resident

        cur = pool.submit(next_batch).result(timeout=_RESULT_TIMEOUT_S)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        previous_done = None
        for _ in range(steps):
            batch = sched.handoff(cur)
            step(batch["image"])
            done = torch.cuda.Event()
            done.record()
            if previous_done is not None:
                previous_done.synchronize()  # keep the host one step ahead: the GPU runs step N now
            # Batch N+1 is staged by a worker thread while step N computes.
            cur = pool.submit(next_batch).result(timeout=_RESULT_TIMEOUT_S)
            previous_done = done
            del batch
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / steps

    compute, staged = [], []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lts-gpucheck-g1") as pool:
        for r in range(args.warmup + args.rounds):
            c, s = run(False, pool), run(True, pool)
            if r >= args.warmup:
                compute.append(c)
                staged.append(s)
    sched.close()
    ratio = statistics.median(staged) / statistics.median(compute)
    return {"step_ms_compute_only": _summary(compute), "step_ms_with_staging": _summary(staged),
            "ratio": ratio, "target": G1_TARGET, "pass": ratio <= G1_TARGET,
            "matmuls_per_step": step.k, "steps_per_round": steps}


def measure_g2(mod: ModuleType, device: torch.device, host: list[Any],
               args: argparse.Namespace) -> dict[str, Any]:
    nbytes = _nbytes(host[0])
    flats = [torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in host]
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    sched = mod.CudaStreamScheduler(device, num_streams=2)
    copies = args.g2_copies

    def raw() -> None:
        for j in range(copies):
            dst.copy_(flats[j % len(flats)], non_blocking=True)

    def staged() -> None:
        for j in range(copies):
            sched.handoff(sched.stage(host[j % len(host)], j))

    raw_ms, staged_ms = [], []
    for r in range(args.warmup + args.rounds):
        a, b = _cuda_ms(raw), _cuda_ms(staged)
        if r >= args.warmup:
            raw_ms.append(a)
            staged_ms.append(b)
    sched.close()
    total = nbytes * copies
    raw_gbs = [total / (ms * 1e-3) / 1e9 for ms in raw_ms]
    staged_gbs = [total / (ms * 1e-3) / 1e9 for ms in staged_ms]
    ratio = statistics.median(staged_gbs) / statistics.median(raw_gbs)
    return {"batch_bytes": nbytes, "copies_per_round": copies,
            "pinned_h2d_gbs": _summary(raw_gbs), "staged_gbs": _summary(staged_gbs),
            "ratio": ratio, "target": G2_TARGET, "pass": ratio >= G2_TARGET}


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Check CudaStreamScheduler on a CUDA GPU: correctness under a race window, "
                    "G1 overlap efficiency and G2 staging bandwidth. Writes DIR/gpu_check.json.")
    p.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json")
    p.add_argument("--device", default="cuda", help="CUDA device (default: the current one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per figure (median)")
    p.add_argument("--warmup", type=int, default=2, help="discarded rounds before measuring")
    p.add_argument("--race-batches", type=int, default=48, help="batches in the race loop")
    p.add_argument("--race-batch", type=int, default=4, help="samples per race batch")
    p.add_argument("--race-side", type=int, default=64, help="crop side of race batches")
    p.add_argument("--prefetch", type=int, default=4, help="batches staged ahead in the race loop")
    p.add_argument("--batch", type=int, default=16, help="samples per G1/G2 batch")
    p.add_argument("--side", type=int, default=96, help="crop side of G1/G2 batches")
    p.add_argument("--g1-steps", type=int, default=12, help="steps per G1 round")
    p.add_argument("--g2-copies", type=int, default=8, help="batches copied per G2 round")
    p.add_argument("--min-step-ms", type=float, default=5.0, help="shortest calibrated step")
    return p


def _run_section(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:
        results[name] = {"ok": False, "pass": False, "error": repr(exc),
                         "traceback": traceback.format_exc()}
    results[name]["wall_s"] = time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "gpu_check.json"
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available; nothing checked.")
        out_file.write_text(json.dumps({"env": env, "status": "no-cuda"}, indent=2))
        return 2
    t_start = time.perf_counter()
    mod = _load_module()
    device = torch.device(args.device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    env.update(device=str(device), name=torch.cuda.get_device_name(device),
               module=getattr(mod, "__file__", None))

    results: dict[str, Any] = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}}
    with mod.CudaStreamScheduler(device) as pinner:
        host = [pinner.pin(_timing_batch(args.batch, args.side)) for _ in range(3)]
    flat = torch.empty(_nbytes(host[0]), dtype=torch.uint8).pin_memory()
    flat_dst = torch.empty_like(flat, device=device)
    copy_ms = statistics.median(
        _cuda_ms(lambda: flat_dst.copy_(flat, non_blocking=True)) for _ in range(5))
    step = Step(device)
    per_mm = step.calibrate(max(args.min_step_ms, 4 * copy_ms), device)
    results["calibration"] = {"batch_bytes": _nbytes(host[0]), "batch_copy_ms": copy_ms,
                              "matmul_ms": per_mm, "matmuls_per_step": step.k,
                              "step_ms_estimate": per_mm * step.k}

    _run_section(results, "race", lambda: check_race(mod, device, step, args))
    _run_section(results, "pinned_ring", lambda: check_pinned_ring(mod, device, step, args))
    _run_section(results, "control_no_record_stream", lambda: check_race(
        mod, device, step, args, backend=_NoRecordStream(mod.TorchCudaBackend())))
    _run_section(results, "G1", lambda: measure_g1(mod, device, step, host, args))
    _run_section(results, "G2", lambda: measure_g2(mod, device, host, args))

    correct = bool(results["race"].get("ok")) and bool(results["pinned_ring"].get("ok"))
    results["correctness_pass"] = correct
    results["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    results["wall_s"] = time.perf_counter() - t_start
    out_file.write_text(json.dumps(results, indent=2, default=str))

    def verdict(ok: Any) -> str:
        return "PASS" if ok else "FAIL"

    cal = results["calibration"]
    print(f"gpu_check on {env['name']} ({device}), torch {env['torch']}, CUDA {env['cuda']}")
    print(f"  batch {cal['batch_bytes'] / 2**20:.1f} MiB, copy {cal['batch_copy_ms']:.2f} ms, "
          f"step {cal['step_ms_estimate']:.2f} ms ({step.k} matmuls)")
    for name in ("race", "pinned_ring"):
        r = results[name]
        detail = r.get("error") or f"{len(r['mismatched'])}/{r['batches']} batches differ"
        if r.get("resident_copied"):
            detail += f", {r['resident_copied']} resident tensors were copied"
        print(f"  correctness {name:<12} {verdict(r.get('ok'))}  ({detail})")
    ctl = results["control_no_record_stream"]
    if "error" in ctl:
        print(f"  control without record_stream: error {ctl['error']}")
    else:
        seen = len(ctl["mismatched"])
        note = "race window exercised" if seen else "WARNING: race window not exercised"
        print(f"  control without record_stream: {seen}/{ctl['batches']} batches corrupted ({note})")
    g1, g2 = results["G1"], results["G2"]
    if "error" in g1:
        print(f"  G1 overlap efficiency   FAIL  (error {g1['error']})")
    else:
        print(f"  G1 overlap efficiency   {verdict(g1['pass'])}  {g1['ratio']:.3f} (target <= "
              f"{G1_TARGET}); step {g1['step_ms_with_staging']['median']:.2f} ms with staging vs "
              f"{g1['step_ms_compute_only']['median']:.2f} ms compute only")
    if "error" in g2:
        print(f"  G2 staging bandwidth    FAIL  (error {g2['error']})")
    else:
        print(f"  G2 staging bandwidth    {verdict(g2['pass'])}  {g2['ratio']:.3f} of raw copy_ "
              f"(target >= {G2_TARGET}); staged {g2['staged_gbs']['median']:.1f} GB/s")
        print(f"  pinned H2D bandwidth    {g2['pinned_h2d_gbs']['median']:.1f} GB/s "
              f"(min {g2['pinned_h2d_gbs']['min']:.1f}, max {g2['pinned_h2d_gbs']['max']:.1f})")
    print(f"  correctness overall     {verdict(correct)}   wall {results['wall_s']:.1f} s -> {out_file}")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
