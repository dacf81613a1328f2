"""Output: rich tables, the summary of targets, the JSON file and the PNG plot.

Table columns per workload: median and spread (min-max, and the IQR when there
are at least 4 rounds) in the workload's display unit, one ratio column per
reference (the contender's median divided by the reference's median: above 1 is
faster for rates, below 1 is faster for times), the physical limit for that
contender's worker count and the share of it reached, and a note (what "auto"
chose, memory in flight, step/wait times...).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.harness import WorkloadResult

__all__ = ["machine_info", "render_summary", "render_workload", "write_json", "write_plot"]

_STATUS_STYLE = {"PASS": "bold green", "FAIL": "bold red", "N/A": "dim"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """Cores, memory, versions, date and load: what a reader needs to judge the figures."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cores_usable": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_total_gib": round(psutil.virtual_memory().total / 1024**3, 2),
        "memory_available_gib": round(psutil.virtual_memory().available / 1024**3, 2),
        "load_average": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "lightning": _version("lightning"),
        "numpy": _version("numpy"),
        "torchdata": _version("torchdata"),
        "lightning_threadsafe": _version("lightning-threadsafe"),
        "git_commit": _git_commit(),
        "cuda": torch.cuda.is_available(),
    }


# ----------------------------------------------------------------------- tables


def _num(v: float | None, scale: float = 1.0) -> str:
    if v is None:
        return "-"
    x = v * scale
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def render_workload(result: WorkloadResult, console: Console) -> None:
    """One table for one workload, with its limits and notes underneath."""
    sc = result.display_scale
    table = Table(title=f"{result.id}: {result.title}  [{result.display_unit}, "
                        f"{'higher' if result.higher_is_better else 'lower'} is better]",
                  title_justify="left", show_lines=False)
    table.add_column("contender")
    table.add_column("median", justify="right")
    table.add_column("min-max", justify="right")
    table.add_column("IQR", justify="right")
    for label, ref in result.ratio_refs.items():
        header = f"x {label}" if label == ref else f"x {label}\n({ref})"
        table.add_column(header, justify="right")
    has_limit = any(r.limit is not None for r in result.rows)
    if has_limit:
        table.add_column("limit", justify="right")
        table.add_column("% limit", justify="right")
    table.add_column("note / status")
    for row in result.rows:
        st = row.stats
        if row.status != "ok":
            cells = [row.name, "-", "-", "-", *["-" for _ in result.ratio_refs]]
            if has_limit:
                cells += ["-", "-"]
            style = "yellow" if row.status == "skipped" else "red"
            cells.append(f"[{style}]{row.status}: {row.message}[/]")
            table.add_row(*cells)
            continue
        iqr = f"{_num(st['q1'], sc)}-{_num(st['q3'], sc)}" if st["n"] >= 4 else "-"
        cells = [row.name, _num(st["median"], sc), f"{_num(st['min'], sc)}-{_num(st['max'], sc)}",
                 iqr]
        cells += [f"{row.ratios[label]:.2f}" if label in row.ratios else "-"
                  for label in result.ratio_refs]
        if has_limit:
            pct = (f"{100 * st['median'] / row.limit:.0f}%"
                   if row.limit and st["median"] is not None else "-")
            cells += [_num(row.limit, sc), pct]
        note = row.note
        if row.message:
            note = (note + "; " if note else "") + f"[red]{row.message}[/]"
        cells.append(note)
        table.add_row(*cells)
    console.print(table)
    for label, value in result.limits.items():
        console.print(f"  limit - {label}: {_num(value, sc)} {result.display_unit}")
    for note in result.notes:
        console.print(f"  note - {note}")
    console.print(f"  ({result.elapsed_s:.1f} s)\n")


def render_summary(targets: list[dict[str, str]], console: Console) -> None:
    """The targets of BENCHMARKS.md with PASS / FAIL / N/A."""
    table = Table(title="Targets (ours with auto settings unless stated)", title_justify="left")
    for col in ("id", "target", "measured", "status", "detail"):
        table.add_column(col, justify="right" if col == "measured" else "left")
    for t in targets:
        style = _STATUS_STYLE.get(t["status"], "")
        table.add_row(t["id"], t["target"], t["measured"], f"[{style}]{t['status']}[/]",
                      t["detail"])
    console.print(table)


# ------------------------------------------------------------------ JSON, plot


def write_json(payload: dict[str, Any], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
    return path


def write_plot(results: dict[str, WorkloadResult], out_dir: Path, stem: str) -> tuple[Path | None, str]:
    """One PNG: a horizontal bar chart per workload (median, min-max whiskers).

    Returns ``(path, "")`` or ``(None, why)`` when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"plot skipped: matplotlib is not importable ({exc})"
    shown = [r for r in results.values() if any(row.median is not None for row in r.rows)]
    if not shown:
        return None, "plot skipped: nothing was measured"
    colors = {"torch": "#4c72b0", "torchdata": "#dd8452", "ours": "#55a868", "reference": "#8c8c8c"}
    ncols = 2 if len(shown) > 1 else 1
    nrows = (len(shown) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 2.6 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    for ax, res in zip(axes.flat, shown):
        rows = [r for r in res.rows if r.median is not None]
        sc = res.display_scale
        med = [r.median * sc for r in rows]
        lo = [(r.median - r.stats["min"]) * sc for r in rows]
        hi = [(r.stats["max"] - r.median) * sc for r in rows]
        ax.barh(range(len(rows)), med, xerr=[lo, hi], capsize=3,
                color=[colors.get(r.family, "#999999") for r in rows])
        ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=7)
        ax.invert_yaxis()
        better = "higher" if res.higher_is_better else "lower"
        ax.set_title(f"{res.id}: {res.title}", fontsize=8)
        ax.set_xlabel(f"{res.display_unit} ({better} is better)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""
