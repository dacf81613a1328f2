"""Benchmark harness of lightning-threadsafe (``python -m benchmarks --help``).

Measures ``lightning_threadsafe.ThreadedDataLoader`` against its peers --
``torch.utils.data.DataLoader`` at num_workers 0/1/2/4 and torchdata.nodes
thread pipelines -- on the workloads W1-W8 of ``BENCHMARKS.md`` and O1 (loader overhead), in the same
run, on the same data, in interleaved rounds, and reports medians, spreads,
ratios to the peers and the physical limits (CPU and latency) beside them.

Modules, in data-flow order:

* :mod:`benchmarks.settings` -- sizes of every workload (full / quick / smoke),
* :mod:`benchmarks.workloads` -- the datasets and their single-thread calibration,
* :mod:`benchmarks.contenders` -- building, iterating and closing each loader,
* :mod:`benchmarks.measure` -- throughput, time to first batch, peak memory, rounds,
* :mod:`benchmarks.fit` -- W7's Lightning fit and its data-wait timer,
* :mod:`benchmarks.harness` -- the workloads W1-W8, O1 and the targets,
* :mod:`benchmarks.report` -- tables, JSON, plot; :mod:`benchmarks.cli` -- the command.

Speed is never a test assertion: a failed target is reported, and the
command still exits 0.
"""

from benchmarks.cli import main, run_benchmarks

__all__ = ["main", "run_benchmarks"]
