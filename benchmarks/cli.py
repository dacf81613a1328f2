"""Command line: ``python -m benchmarks [--quick] [--workloads W1,W2] [--rounds N] [--out DIR]``.

Prints a rich table per workload as it finishes, then the summary of targets;
writes ``bench-<mode>-<UTC time>.json`` (machine info, settings, every round of
every contender, targets) and a PNG plot of the same name into ``--out``.
The exit code is 0 whatever the targets say (this is a measurement, not a
test); it is non-zero only when the harness itself fails (bad arguments or a
crash outside the per-workload error handling).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.harness import WORKLOADS, Context, evaluate_targets, run_workloads
from benchmarks.report import machine_info, render_summary, render_workload, write_json, write_plot
from benchmarks.settings import BenchSettings, preset

__all__ = ["main", "parse_args", "run_benchmarks"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1


def _workload_list(text: str) -> list[str]:
    ids = [w.strip().upper() for w in text.split(",") if w.strip()]
    unknown = [w for w in ids if w not in WORKLOADS]
    if unknown or not ids:
        raise argparse.ArgumentTypeError(
            f"--workloads={text!r} must be a comma-separated subset of {','.join(WORKLOADS)}")
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--rounds={text!r} must be a positive int")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark lightning-threadsafe against torch DataLoader and torchdata.nodes "
                    "(workloads W1-W8 of BENCHMARKS.md, O1: loader overhead).")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and 3 rounds: everything in under 3 minutes on 2 cores")
    p.add_argument("--workloads", type=_workload_list, default=list(WORKLOADS),
                   help="comma-separated subset, e.g. W1,W4 or O1 (default: all)")
    p.add_argument("--rounds", type=_positive_int, default=None,
                   help="interleaved rounds per figure (default 3 quick, 4 full; "
                        "fewer than 3 gives no meaningful spread)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"directory for the JSON and PNG (default {DEFAULT_OUT})")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the generated volume is cached (default: the temp dir)")
    p.add_argument("--tune-windows", type=_positive_int, default=None,
                   help="W8: optimize_thread_safety_settings() calls per epoch (default 1: "
                        "epoch ends only)")
    p.add_argument("--torch-threads", type=_positive_int, default=None,
                   help="torch.set_num_threads() for the whole run (default: torch's own, "
                        "usually the core count; worker processes always use 1)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no per-measurement progress lines")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests only
    return p.parse_args(argv)


def run_benchmarks(*, mode: str = "full", workloads: Sequence[str] | None = None,
                   rounds: int | None = None, out: Path | None = DEFAULT_OUT,
                   cache_dir: Path | None = None, plot: bool = True, quiet: bool = False,
                   tune_windows: int | None = None, torch_threads: int | None = None,
                   console: Console | None = None) -> dict[str, Any]:
    """Run the harness in-process and return the JSON payload (also written to ``out``).

    Args:
        mode: ``"quick"``, ``"full"`` or ``"smoke"`` (tiny sizes, for tests).
        workloads: subset of ``W1``..``W8`` (default all).
        rounds: override the preset's number of interleaved rounds.
        out: directory for the JSON and PNG; ``None`` writes nothing.
        cache_dir: where the generated volume is cached.
        plot: write the PNG (needs matplotlib).
        quiet: no progress lines.
        tune_windows: W8 tuning calls per epoch.
        torch_threads: intra-op threads of torch for the run (restored afterwards).
        console: where tables go (default: stdout).
    """
    settings = preset(mode)
    if rounds is not None:
        settings = settings.replace(rounds=rounds)
    if tune_windows is not None:
        settings = settings.replace(w8_windows_per_epoch=tune_windows)
    if torch_threads is not None:
        settings = settings.replace(torch_threads=torch_threads)
    ids = list(workloads) if workloads else list(WORKLOADS)
    # Piped output (a file, CI) would otherwise wrap the tables at 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 180)

    threads_before = torch.get_num_threads()
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    if "W7" in ids:
        importlib.import_module("benchmarks.fit")  # Lightning: imported before the freeze below
    # Every measurement ends with gc.collect() so that no contender pays for another's
    # garbage; with torch and Lightning loaded a full collection takes ~0.1-0.2 s. Freezing
    # the objects that exist now (modules, classes) takes them out of those collections.
    gc.collect()
    gc.freeze()
    try:
        return _run(settings, ids, out, cache_dir, plot, quiet, mode, console)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads_before)


def _run(settings: BenchSettings, ids: list[str], out: Path | None, cache_dir: Path | None,
         plot: bool, quiet: bool, mode: str, console: Console) -> dict[str, Any]:
    progress = Console(stderr=True, highlight=False)

    def log(msg: str) -> None:
        if not quiet:
            progress.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")

    info = machine_info()
    started = time.perf_counter()
    cache = cache_dir if cache_dir is not None else Path(tempfile.gettempdir())
    ctx = Context(settings=settings, cache_dir=cache, log=log)
    log(f"mode={mode} rounds={settings.rounds} workloads={','.join(ids)} cores={ctx.cores}")
    if settings.rounds < 3:
        log("[yellow]fewer than 3 rounds: spreads are not meaningful[/]")
    with warnings.catch_warnings():
        # torch's "this DataLoader will create 4 worker processes" hint: num_workers=4 on a
        # 2-core machine is a deliberate peer, not a mistake.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        results = run_workloads(ctx, ids, on_result=lambda r: render_workload(r, console))
    targets = evaluate_targets(results, settings)
    render_summary(targets, console)

    info["load_average_end"] = machine_info()["load_average"]
    payload: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "command": " ".join(["python -m benchmarks", *{"quick": ["--quick"], "smoke": ["--smoke"]}
                             .get(mode, []), "--workloads", ",".join(ids),
                             "--rounds", str(settings.rounds)]),
        "mode": mode,
        "machine": info,
        "settings": settings.to_dict(),
        "workloads": {wid: r.to_dict() for wid, r in results.items()},
        "targets": targets,
        "best_static": ctx.best_static,
        "elapsed_s": time.perf_counter() - started,
        "plot": None,
        "notes": [],
    }
    if out is not None:
        stem = f"bench-{mode}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
        if plot:
            path, why = write_plot(results, out, stem)
            payload["plot"] = str(path) if path else None
            if why:
                payload["notes"].append(why)
                console.print(f"[yellow]{why}[/]")
        json_path = write_json(payload, out, stem)
        payload["json"] = str(json_path)
        console.print(f"results: {json_path}" + (f"  plot: {payload['plot']}" if payload["plot"] else ""))
    console.print(f"total {payload['elapsed_s']:.0f} s")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    run_benchmarks(mode=mode, workloads=args.workloads, rounds=args.rounds, out=args.out,
                   cache_dir=args.cache_dir, plot=not args.no_plot, quiet=args.quiet,
                   tune_windows=args.tune_windows, torch_threads=args.torch_threads)
    return 0
