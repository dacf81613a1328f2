"""Sizes of every workload in the three modes: ``full``, ``--quick`` and the internal ``smoke``.

``quick`` is sized to finish all workloads (W1-W8, O1) in under 3 minutes on a
2-core machine, ``full`` in under 20 minutes, ``smoke`` (tests only) in
seconds. Every knob is a plain field so that a run's JSON records exactly what
was measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["BenchSettings", "preset"]

_Kw = dict[str, Any]


def _static(nw: int, pf: int = 2, executor: str = "thread") -> _Kw:
    return {"num_workers": nw, "prefetch_factor": pf, "executor": executor}


@dataclass(frozen=True)
class BenchSettings:
    """Every size and sweep of one run (see :func:`preset`)."""

    mode: str
    rounds: int
    duration_s: float            # steady-state window of one throughput measurement
    warmup_batches: int          # batches discarded before the window starts
    sweep_duration_s: float      # window of one measurement in the static sweep of ours
    calibration_s: float         # single-thread calibration per workload
    torch_threads: int | None = None  # torch.set_num_threads for the run (None: as found)
    torch_workers: tuple[int, ...] = (0, 1, 2, 4)

    # W1/W2/W5/W7/W8 volume crops
    volume_side: int = 374       # 374^3 uint8 = 49.9 MiB
    crop: int = 48
    batch_size: int = 8
    latency_s: float = 0.020
    w1_length: int = 20_000
    w1_torchdata: tuple[int, ...] = (2, 4)
    w1_sweep: tuple[_Kw, ...] = (_static(2), _static(4))
    w2_torchdata: tuple[int, ...] = (4, 16, 32)
    w2_sweep: tuple[_Kw, ...] = (_static(16), _static(32))

    # W3 GIL-bound
    w3_gil_ms: float = 10.0
    w3_batch_size: int = 4
    w3_length: int = 5_000
    w3_torchdata: tuple[int, ...] = (2,)
    w3_sweep: tuple[_Kw, ...] = (_static(2, executor="process"), _static(2))

    # W4 loader overhead
    w4_batch_size: int = 8
    w4_length: int = 400_000
    w4_torchdata: tuple[int, ...] = (1, 2)
    w4_sweep: tuple[_Kw, ...] = (_static(1), _static(2))

    # W5 time to first batch
    w5_torchdata: tuple[int, ...] = (2, 4)

    # W6 memory pressure
    w6_sample_mib: int = 64
    w6_samples: int = 12
    w6_prefetch: int = 32
    w6_budget_mib: int = 512
    w6_workers: int = 2
    w6_pause_s: float = 2.0      # longest consumer stall after the first batch (see W6)
    w6_consumer_s: float = 0.01  # consumer pause after each later batch

    # W7 Lightning fit
    w7_steps: int = 25
    w7_warmup_steps: int = 5
    w7_step_ms: float = 20.0
    w7_torch_workers: tuple[int, ...] = (4,)
    w7_torchdata: bool = False
    w7_ours_static: bool = False

    # W8 auto-tuning
    w8_epochs: int = 2
    w8_batches_per_epoch: int = 16
    w8_batch_size: int = 4
    w8_windows_per_epoch: int = 1

    # O1 loader overhead (us per sample on a trivial dataset)
    o1_batch_size: int = 64
    o1_length: int = 64 * 2000
    o1_threads: tuple[int, ...] = (1, 2, 4)       # ours with threads (plus inline, nw=0)
    o1_pool_threads: tuple[int, ...] = (1, 2, 4)  # the bare batch-granular pool
    o1_min_rounds: int = 3                        # O1 always takes >= 3 interleaved rounds

    def replace(self, **changes: Any) -> BenchSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preset(mode: str) -> BenchSettings:
    """The settings of ``mode``: ``"quick"``, ``"full"`` or ``"smoke"``."""
    if mode == "quick":
        return BenchSettings(mode="quick", rounds=3, duration_s=0.3, warmup_batches=2,
                             sweep_duration_s=0.25, calibration_s=0.25, w3_gil_ms=5.0)
    if mode == "full":
        return BenchSettings(
            mode="full", rounds=4, duration_s=1.5, warmup_batches=3, sweep_duration_s=1.0,
            calibration_s=1.0,
            w1_torchdata=(1, 2, 4, 8),
            w1_sweep=(_static(2), _static(4), _static(8), _static(2, executor="process")),
            w2_torchdata=(2, 4, 8, 16, 32),
            w2_sweep=(_static(8), _static(16), _static(32), _static(48), _static(32, 4)),
            w3_torchdata=(2, 4),
            w3_sweep=(_static(2, executor="process"), _static(4, executor="process"), _static(2)),
            w4_length=1_000_000, w4_torchdata=(1, 2, 4),
            w4_sweep=(_static(1), _static(2), _static(2, 8), _static(4, 4)),
            w6_samples=24, w6_pause_s=4.0,
            w7_steps=60, w7_warmup_steps=10, w7_torch_workers=(2, 4), w7_torchdata=True,
            w7_ours_static=True,
            w8_batches_per_epoch=100, w8_batch_size=8,
            o1_length=64 * 5000,
        )
    if mode == "smoke":
        return BenchSettings(
            mode="smoke", rounds=1, duration_s=0.1, warmup_batches=1, sweep_duration_s=0.05,
            calibration_s=0.05, torch_workers=(0, 2), volume_side=96, crop=16, batch_size=4,
            latency_s=0.002, w1_length=2_000, w1_torchdata=(2,), w1_sweep=(_static(2),),
            w2_torchdata=(4,), w2_sweep=(_static(4),), w3_gil_ms=0.5, w3_length=500,
            w3_torchdata=(2,), w3_sweep=(_static(2),), w4_length=20_000, w4_torchdata=(2,),
            w4_sweep=(_static(2),), w5_torchdata=(2,), w6_sample_mib=4, w6_samples=12,
            w6_budget_mib=16, w6_pause_s=0.3, w6_consumer_s=0.002, w7_steps=8, w7_warmup_steps=2,
            w7_step_ms=2.0, w7_torch_workers=(1,), w8_batches_per_epoch=4, w8_batch_size=2,
            o1_length=64 * 60, o1_threads=(2,), o1_pool_threads=(2,),
        )
    raise ValueError(f"mode={mode!r} must be 'quick', 'full' or 'smoke'")
