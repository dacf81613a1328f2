"""Reliability suite: tries to break the loader and checks that it fails clearly or not at all.

Sections (each test's docstring says what it proves):

1. Stress -- 20 000 samples, mixed GIL-releasing / GIL-holding work, 32 threads,
   shuffle, ``in_order`` on and off, a memory budget small enough to throttle:
   exactly once per epoch for 3 epochs, identical batches across runs.
2. Fault injection -- exceptions at the first / last / every 7th index and in
   collate, a blocking sample (stall), ``KeyboardInterrupt`` / ``SystemExit`` in a
   sample, garbage from ``collate_fn``; inline (``num_workers=0``), threads and
   processes: a clear error or the configured skip/retry, no hang, no leak.
3. Kill and resume -- a real Lightning training run in a subprocess is SIGKILLed
   at several points and resumed with ``ckpt_path="last"``: every sample of every
   epoch is *trained* exactly once in the final model's lineage.
4. Memory -- large samples under a small budget: the ready buffer never exceeds
   the budget by more than one batch; everything is still delivered once.
5. Bad input -- property-based (hypothesis): invalid loader / ``LoaderConfig``
   values are rejected at construction naming the field; valid ones construct
   and deliver every index once; bad YAML values fail the CLI naming the field.
6. Interpreter exit -- a process that abandons an iterator mid-epoch exits 0.

No test sleeps to synchronise: delays inside datasets are workload, waits are
on events, pipes or conditions with deadlines. No test asserts on wall time;
subprocess timeouts are hang guards.
"""

from __future__ import annotations

import collections
import contextlib
import io
import multiprocessing
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from _faults import (
    BigSampleDataset,
    GatedDataset,
    GilStressDataset,
    RaisingDataset,
    TripwireBatch,
    collate_returns_none,
    collate_returns_tripwire,
    collate_returns_unsized_mapping,
)
from _helpers import RangeDataset, flat_indices
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from lightning_threadsafe import (
    LoaderConfig,
    LoaderStallError,
    SampleLoadError,
    ThreadedDataLoader,
    ThreadedDataModule,
)
from lightning_threadsafe.config import ERROR_POLICIES, EXECUTORS

TESTS_DIR = Path(__file__).resolve().parent
MiB = 1 << 20
SEED = 20240611


def _lts_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lts-")]


def _assert_no_workers_left() -> None:
    """No ``lts-*`` thread and no worker process survives the failed/finished iteration."""
    assert not _lts_threads()
    assert not multiprocessing.active_children()


# =============================================================================== 1. stress

N_STRESS = 20_000
STRESS_EPOCHS = 3
STRESS_BATCH = 32
# One batch is 32 * (8 B index + 16 B x) = 768 B: 4 KiB holds ~5 batches while the
# configured depth is 64 (prefetch 2 x 32 threads), so the governor must throttle.
STRESS_BUDGET = 4096

Batch = tuple[tuple[int, ...], bytes]


def _stress_run(*, in_order: bool, num_workers: int = 32) -> tuple[list[list[Batch]], dict[str, Any]]:
    """Three epochs of the stress dataset; returns each epoch's batches and the final report."""
    loader = ThreadedDataLoader(
        GilStressDataset(N_STRESS), batch_size=STRESS_BATCH, shuffle=True, num_workers=num_workers,
        in_order=in_order, seed=SEED, memory_budget=STRESS_BUDGET, prefetch_factor=2,
    )
    epochs = []
    with loader:
        for _ in range(STRESS_EPOCHS):
            epochs.append([(tuple(b["index"].tolist()), b["x"].numpy().tobytes()) for b in loader])
        report = loader.get_thread_safety_performance_report()
    return epochs, report


@pytest.fixture(scope="module")
def stress_reference() -> tuple[list[list[Batch]], dict[str, Any]]:
    """The in-order run both stress tests compare against (computed once per module)."""
    return _stress_run(in_order=True)


def _check_stress_epochs(epochs: list[list[Batch]], report: dict[str, Any]) -> None:
    for batches in epochs:
        indices = [i for idx, _ in batches for i in idx]
        assert len(indices) == N_STRESS and sorted(indices) == list(range(N_STRESS))
    orders = {tuple(idx for idx, _ in batches) for batches in epochs}
    assert len(orders) == STRESS_EPOCHS, "each epoch must reshuffle"
    assert report["memory"]["throttle_events"] > 0, "the budget must have throttled prefetching"
    assert report["totals"]["samples"] == N_STRESS * STRESS_EPOCHS
    assert report["errors"]["raised"] == report["errors"]["skipped"] == 0
    assert report["memory"]["bytes_in_flight"] == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("in_order", [True, False], ids=["in_order", "as_completed"])
def test_stress_exactly_once_throttled_and_identical_across_runs(in_order, stress_reference):
    """20 000 samples x 3 epochs, 32 threads, mixed GIL work, throttled: exactly once, repeatable.

    ``in_order=True``: a second run with the same seed gives bit-identical batches
    (indices and per-sample random augmentation) in the same order.
    ``in_order=False``: the run gives the same batches as the in-order reference,
    as a multiset per epoch (delivery order is completion order).
    """
    reference, reference_report = stress_reference
    _check_stress_epochs(reference, reference_report)
    epochs, report = _stress_run(in_order=in_order)
    _check_stress_epochs(epochs, report)
    for got, want in zip(epochs, reference, strict=True):
        if in_order:
            assert got == want
        else:
            assert collections.Counter(got) == collections.Counter(want)
    assert not _lts_threads()


# =============================================================================== 2. faults

EXECUTOR_CASES = [
    pytest.param("thread", 0, id="inline"),
    pytest.param("thread", 3, id="threads"),
    pytest.param("process", 2, id="processes"),
]


def _loader(dataset: Any, executor: str, num_workers: int, **kwargs: Any) -> ThreadedDataLoader[Any]:
    kwargs.setdefault("batch_size", 4)
    return ThreadedDataLoader(dataset, num_workers=num_workers, executor=executor, **kwargs)


def _collect_until_error(loader: ThreadedDataLoader[Any]) -> tuple[list[list[int]], BaseException]:
    got: list[list[int]] = []
    with pytest.raises(BaseException) as info:  # the caller checks the type
        for b in loader:
            got.append(b.flatten().tolist())
    return got, info.value


def _assert_cause(err: BaseException, executor: str, exc_type: type[BaseException], text: str) -> None:
    """The consumer sees the original type; the original exception is chained (from a worker
    process: rebuilt from its pickle, with the worker's traceback text chained to it)."""
    if issubclass(exc_type, Exception):  # interrupts stay a SampleLoadError (they end the epoch)
        assert isinstance(err, exc_type) and str(err) == str(err.__cause__)
    cause = err.__cause__
    assert cause is not None
    if executor == "process":
        assert type(cause) is exc_type and text in str(cause)
        assert exc_type.__name__ in str(cause.__cause__)
    else:
        assert type(cause) is exc_type and text in str(cause)
        assert cause.__traceback__ is not None


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), EXECUTOR_CASES)
@pytest.mark.parametrize(
    ("fail_at", "first_bad", "delivered_before"),
    [
        pytest.param({0}, 0, 0, id="first-index"),
        pytest.param({19}, 19, 4, id="last-index"),
        pytest.param({i for i in range(20) if i % 7 == 6}, 6, 1, id="every-7th"),
    ],
)
def test_sample_exception_raises_naming_the_first_failing_index(
    executor, num_workers, fail_at, first_bad, delivered_before
):
    """``on_error="raise"``: the batches before the first failing one arrive, then a SampleLoadError.

    The error names the index, its batch and the batch's position, and chains
    the original exception; no thread or worker process is left behind.
    """
    ds = RaisingDataset(20, fail_at)
    loader = _loader(ds, executor, num_workers)
    got, err = _collect_until_error(loader)
    assert isinstance(err, SampleLoadError), err
    assert err.index == first_bad and err.batch_ordinal == first_bad // 4
    assert err.batch_indices == list(range(first_bad // 4 * 4, first_bad // 4 * 4 + 4))
    assert f"index={first_bad}" in err.detail
    _assert_cause(err, executor, ValueError, f"boom at {first_bad}")
    assert got == [list(range(4 * k, 4 * k + 4)) for k in range(delivered_before)]
    assert loader.get_thread_safety_performance_report()["errors"]["raised"] == 1
    _assert_no_workers_left()


@pytest.mark.timeout(60)
def test_many_failures_as_completed_raise_one_of_them():
    """``in_order=False`` with every 7th index failing: the error names *a* failing index."""
    fail_at = {i for i in range(200) if i % 7 == 6}
    loader = ThreadedDataLoader(RaisingDataset(200, fail_at), batch_size=4, num_workers=8,
                                in_order=False, shuffle=True, seed=SEED)
    got, err = _collect_until_error(loader)
    assert isinstance(err, SampleLoadError) and err.index in fail_at
    assert err.index in err.batch_indices
    delivered = [i for b in got for i in b]
    assert len(delivered) == len(set(delivered)) and not set(delivered) & fail_at
    _assert_no_workers_left()


EVERY_7TH = frozenset(i for i in range(50) if i % 7 == 6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), EXECUTOR_CASES)
@pytest.mark.parametrize(
    ("policy", "times", "expect_skipped", "expect_retries"),
    [
        pytest.param({"on_error": "skip"}, None, EVERY_7TH, 0, id="skip"),
        pytest.param({"on_error": "retry", "max_retries": 2}, 1, frozenset(), len(EVERY_7TH),
                     id="retry-recovers"),
        pytest.param({"on_error": "retry", "max_retries": 2, "skip_after_retries": True}, None,
                     EVERY_7TH, 2 * len(EVERY_7TH), id="retry-then-skip"),
    ],
)
def test_many_failures_follow_the_configured_policy(
    executor, num_workers, policy, times, expect_skipped, expect_retries
):
    """Every 7th index fails: skip drops exactly those (reported), retry recovers or skips them.

    Every other index arrives exactly once, in sampler order, and the report's
    counts are exact.
    """
    ds = RaisingDataset(50, EVERY_7TH, times=times)
    loader = _loader(ds, executor, num_workers, **policy)
    delivered = [i for b in loader for i in b.flatten().tolist()]
    assert delivered == [i for i in range(50) if i not in expect_skipped]
    errors = loader.get_thread_safety_performance_report()["errors"]
    assert sorted(errors["skipped_indices"]) == sorted(expect_skipped)
    assert errors["skipped"] == len(expect_skipped) and errors["raised"] == 0
    assert errors["retries"] == expect_retries
    if executor == "thread":  # process workers count attempts in their own memory
        want = 1 + policy.get("max_retries", 0) if times is None else 2
        assert {ds.attempts[i] for i in EVERY_7TH} == {want}
    _assert_no_workers_left()


def _collate_failing_on_9(samples: list[torch.Tensor]) -> torch.Tensor:
    if any(int(s) == 9 for s in samples):
        raise TypeError("cannot collate a batch holding 9")
    return torch.stack(samples)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), EXECUTOR_CASES)
def test_collate_exception_names_the_batch(executor, num_workers):
    """``collate_fn`` raising: SampleLoadError naming the batch (no single index), original chained."""
    loader = _loader(RangeDataset(20), executor, num_workers, collate_fn=_collate_failing_on_9,
                     on_error="skip")  # a collate failure is not a sample failure: never skipped
    got, err = _collect_until_error(loader)
    assert isinstance(err, SampleLoadError)
    assert err.index is None and err.batch_ordinal == 2 and err.batch_indices == [8, 9, 10, 11]
    assert "collate_fn failed for batch 2" in err.detail
    _assert_cause(err, executor, TypeError, "cannot collate a batch holding 9")
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]
    _assert_no_workers_left()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), EXECUTOR_CASES[1:])
def test_blocked_sample_raises_stall_error_then_recovers(executor, num_workers):
    """A sample that never returns: LoaderStallError after ``stall_timeout``, not a hang.

    With threads the error names the stuck index and shows the stuck thread's
    stack. Once the sample is released the same loader runs a full epoch again.
    (``num_workers=0`` is not covered: the sample blocks the consumer's own
    thread, where nothing can observe the stall -- documented behaviour.)
    """
    ds = GatedDataset(16, block_at=6)
    # 2 s: long enough that starting workers under load is never mistaken for a stall
    loader = _loader(ds, executor, num_workers, stall_timeout=2.0)
    try:
        try:
            got, err = _collect_until_error(loader)
        finally:
            ds.open()  # release the blocked sample so its worker can exit
            loader.cleanup_thread_safety_resources()
        assert isinstance(err, LoaderStallError), err
        assert err.stall_timeout == 2.0 and ds.wait_entered(timeout=0)
        assert got == [[0, 1, 2, 3]]
        if executor == "thread":
            stuck = [name for name, index in err.stuck.items() if index == 6]
            assert len(stuck) == 1 and "select" in err.stacks[stuck[0]]
            assert f"--- {stuck[0]} (index 6) ---" in str(err)
            assert loader.get_thread_safety_performance_report()["stalls"]
        assert flat_indices(list(loader)) == list(range(16))
        _assert_no_workers_left()
    finally:
        ds.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), EXECUTOR_CASES)
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize(
    "policy",
    [
        pytest.param({"on_error": "skip"}, id="skip"),
        pytest.param({"on_error": "retry", "max_retries": 3, "skip_after_retries": True},
                     id="retry-then-skip"),
    ],
)
def test_interrupts_in_a_sample_are_never_skipped_or_retried(executor, num_workers, exc, policy):
    """KeyboardInterrupt / SystemExit in a sample: SampleLoadError chaining it, whatever the policy."""
    ds = RaisingDataset(12, {5}, exc=exc)
    loader = _loader(ds, executor, num_workers, **policy)
    got, err = _collect_until_error(loader)
    assert isinstance(err, SampleLoadError), err
    assert err.index == 5 and err.attempts == 1
    _assert_cause(err, executor, exc, "boom at 5")
    assert got == [[0, 1, 2, 3]]
    errors = loader.get_thread_safety_performance_report()["errors"]
    assert errors["skipped"] == 0 and errors["retries"] == 0
    if executor == "thread":
        assert ds.attempts[5] == 1
    _assert_no_workers_left()


# -- garbage from collate_fn -------------------------------------------------------------
#
# What "clear" means here. The loader does not judge what collate_fn returns: like
# torch's DataLoader it hands the object over untouched, once per batch, and never
# hangs or loses a batch because of it; a broken object fails where the *user*
# touches it, with the object's own error. When the loader itself must handle
# the object (measuring it for the memory budget, sending it from a worker
# process), a failure there is the loader's to report: a SampleLoadError naming
# the batch, with the original error chained -- never a bare error from inside
# the library, and never a silent stall.


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), EXECUTOR_CASES)
def test_collate_returning_none_is_passed_through_like_torch(executor, num_workers):
    """``collate_fn`` forgot its ``return``: one ``None`` per batch, exactly as torch yields."""
    loader = _loader(RangeDataset(10), executor, num_workers, collate_fn=collate_returns_none)
    torch_batches = list(DataLoader(RangeDataset(10), batch_size=4, collate_fn=collate_returns_none))
    assert list(loader) == torch_batches == [None, None, None]
    _assert_no_workers_left()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), EXECUTOR_CASES)
def test_collate_returning_a_broken_object_fails_where_it_is_used(executor, num_workers):
    """An object that breaks when used is delivered intact; using it raises its own error."""
    loader = _loader(RangeDataset(10), executor, num_workers, collate_fn=collate_returns_tripwire,
                     shuffle=True, seed=SEED)
    batches = list(loader)
    assert all(isinstance(b, TripwireBatch) for b in batches)
    assert sorted(i for b in batches for i in b.indices) == list(range(10))
    with pytest.raises(RuntimeError, match="tripwire"):
        len(batches[0])
    _assert_no_workers_left()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("executor", "num_workers"), [EXECUTOR_CASES[0], EXECUTOR_CASES[2]])
def test_collate_result_nothing_measures_is_passed_through(executor, num_workers):
    """Inline and process batches are not sized for the budget: an unwalkable batch arrives intact."""
    loader = _loader(RangeDataset(8), executor, num_workers, memory_budget="1GiB",
                     collate_fn=collate_returns_unsized_mapping)
    batches = list(loader)
    assert [dict.__getitem__(b, "index").flatten().tolist() for b in batches] == \
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(RuntimeError, match="tripwire"):
        batches[0].values()
    _assert_no_workers_left()


@pytest.mark.timeout(60)
def test_collate_result_that_breaks_memory_accounting_names_the_batch():
    """Threads size each batch for the budget; a batch that cannot be sized: SampleLoadError naming it."""
    loader = _loader(RangeDataset(8), "thread", 3, memory_budget="1GiB",
                     collate_fn=collate_returns_unsized_mapping)
    _, err = _collect_until_error(loader)
    assert isinstance(err, SampleLoadError), repr(err)
    assert err.batch_ordinal == 0 and err.batch_indices == [0, 1, 2, 3]
    assert isinstance(err.__cause__, RuntimeError) and "tripwire" in str(err.__cause__)
    _assert_no_workers_left()


def _collate_unpicklable(samples: list[torch.Tensor]) -> dict[str, Any]:
    return {"x": torch.stack(samples), "lock": threading.Lock()}


@pytest.mark.timeout(60)
def test_unpicklable_collate_result_in_worker_process_names_the_batch():
    """Process workers: a batch that cannot be sent back is reported as such, not as a stall."""
    loader = ThreadedDataLoader(RangeDataset(8), batch_size=4, num_workers=2, executor="process",
                                collate_fn=_collate_unpicklable, stall_timeout=3.0)
    _, err = _collect_until_error(loader)
    assert isinstance(err, SampleLoadError), repr(err)
    assert err.batch_ordinal is not None and "pickle" in str(err).lower()
    _assert_no_workers_left()


def test_unpicklable_collate_result_is_fine_with_threads():
    """The same collate_fn works with threads (nothing is pickled): the process case is the outlier."""
    batches = list(ThreadedDataLoader(RangeDataset(8), batch_size=4, num_workers=2,
                                      collate_fn=_collate_unpicklable))
    assert [b["x"].flatten().tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]


# =============================================================================== 3. kill and resume

KILL_N, KILL_BATCH, KILL_EPOCHS = 48, 4, 2
STEPS_PER_EPOCH = KILL_N // KILL_BATCH
TOTAL_STEPS = STEPS_PER_EPOCH * KILL_EPOCHS

_TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading
    sys.path.insert(0, {tests!r})
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from _faults import LoggingDataset, append_line
    from lightning_threadsafe import LoaderConfig, ThreadedDataModule

    out, kill_at = sys.argv[1], sys.argv[2]  # kill_at: "" | train:<step> | ckpt:<step> | load:<n>
    LOADED, TRAINED = os.path.join(out, "loaded.log"), os.path.join(out, "trained.log")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class KillingDataset(LoggingDataset):
        # SIGKILLs the process (from a loader worker thread) at the n-th load of this run.
        def __init__(self, *args):
            super().__init__(*args)
            self.lock, self.loads = threading.Lock(), 0

        def __getitem__(self, i):
            sample = super().__getitem__(i)
            with self.lock:
                self.loads += 1
                n = self.loads
            if kill_at == f"load:{{n}}":
                die()
            return sample

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def on_train_start(self):
            append_line(TRAINED, f"start {{self.global_step}}")

        def training_step(self, batch, batch_idx):
            idx = " ".join(str(i) for i in batch["index"].tolist())
            append_line(TRAINED, f"{{self.current_epoch}} {{self.global_step}} {{idx}}")
            if kill_at == f"train:{{self.global_step}}":
                die()  # trained, but its checkpoint is never written
            return self.net(batch["x"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Checkpoint(ModelCheckpoint):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            super().on_train_batch_end(trainer, *args, **kwargs)
            if kill_at == f"ckpt:{{trainer.global_step}}":
                die()  # right after the checkpoint of this step was written

    dm = ThreadedDataModule(
        train_dataset=KillingDataset({n}, LOADED), batch_size={batch}, shuffle=True, seed={seed},
        loader=LoaderConfig(num_workers=2, prefetch_factor=2, memory_budget=None),
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs={epochs}, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out, num_sanity_val_steps=0,
        callbacks=[Checkpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=1,
                              save_top_k=0, save_last=True)],
    )
    trainer.fit(Tiny(), datamodule=dm, ckpt_path="last")
    append_line(TRAINED, "done")
    """
)


class _Run:
    """One training subprocess writing into ``out``."""

    def __init__(self, out: Path, script: Path, kill_at: str = "") -> None:
        self.err_path = out / f"stderr-{len(list(out.glob('stderr-*')))}.txt"
        self._err = open(self.err_path, "wb")  # closed in wait()
        self.proc = subprocess.Popen([sys.executable, str(script), str(out), kill_at],
                                     stdout=subprocess.DEVNULL, stderr=self._err)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._err.close()

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.wait()

    def stderr_tail(self) -> str:
        return self.err_path.read_text(errors="replace")[-4000:]


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def _wait_for(condition: Callable[[], bool], run: _Run, deadline_s: float = 120.0) -> bool:
    """Poll ``condition`` until it holds, the run ends, or the deadline passes (a hang guard)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if run.proc.poll() is not None:
            return condition()
        time.sleep(0.002)  # polling interval of a condition wait with a deadline
    raise AssertionError(f"condition not reached within {deadline_s}s:\n{run.stderr_tail()}")


def _steps_in(lines: list[str]) -> list[tuple[int, int, list[int]]]:
    out = []
    for line in lines:
        if line[0].isdigit():
            epoch, step, *indices = (int(v) for v in line.split())
            out.append((epoch, step, indices))
    return out


def _check_trained_lineage(trained_log: Path, runs: int) -> None:
    """Every sample of every epoch was trained exactly once in the final model's lineage.

    A run resumed at global step G rolls back whatever an earlier run trained at
    steps >= G (that work died with the process before its checkpoint). What
    remains must be steps 0..TOTAL_STEPS-1 once each, and each epoch's samples
    must be every index once. A step that was trained twice (before and after a
    kill) must have trained the same batch both times (exact resume).
    """
    lines = _read_lines(trained_log)
    assert lines[-1] == "done", lines[-5:]
    starts = [int(line.split()[1]) for line in lines if line.startswith("start")]
    assert len(starts) == runs, starts
    committed: list[tuple[int, int, list[int]]] = []
    for line in lines:
        if line.startswith("start"):
            resume_step = int(line.split()[1])
            committed = [c for c in committed if c[1] < resume_step]
        else:
            committed.extend(_steps_in([line]))
    steps = sorted(step for _, step, _ in committed)
    assert steps == list(range(TOTAL_STEPS)), f"trained steps {steps}; runs started at {starts}"
    per_epoch: dict[int, list[int]] = collections.defaultdict(list)
    for epoch, _, indices in committed:
        per_epoch[epoch].extend(indices)
    assert sorted(per_epoch) == list(range(KILL_EPOCHS))
    for epoch, indices in per_epoch.items():
        assert sorted(indices) == list(range(KILL_N)), f"epoch {epoch}: {sorted(indices)}"
    by_step: dict[int, set[tuple[int, ...]]] = collections.defaultdict(set)
    for _, step, indices in _steps_in(lines):
        by_step[step].add(tuple(indices))
    assert all(len(v) == 1 for v in by_step.values()), "a redone step trained a different batch"


@pytest.fixture
def train_script(tmp_path: Path) -> Path:
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT.format(tests=str(TESTS_DIR), n=KILL_N, batch=KILL_BATCH,
                                           seed=SEED, epochs=KILL_EPOCHS))
    return script


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_points_then_resume_trains_every_sample_once(tmp_path, train_script):
    """A Lightning run SIGKILLed 3 times from outside, at pseudo-random points, then resumed.

    Kill points (seeded): once the trained log reaches a step in 2..3 (epoch 0),
    once the *load* log has grown by 2..8 lines after the second run started
    training (mid-load: the loader runs ahead of training), and once the trained
    log reaches a step in 16..20 (epoch 1). Where exactly the process dies
    depends on timing; the invariant must hold wherever it does. The points stay
    clear of the epoch boundary, which has its own deterministic test below.
    Each run resumes from ``last.ckpt``; the fourth one finishes.
    """
    out = tmp_path / "run"
    out.mkdir()
    trained, loaded = out / "trained.log", out / "loaded.log"
    rng = random.Random(SEED)
    first_stop, load_growth, last_stop = rng.randint(2, 3), rng.randint(2, 8), rng.randint(16, 20)

    def reached(step: int) -> Callable[[], bool]:
        return lambda: any(s >= step for _, s, _ in _steps_in(_read_lines(trained)))

    def runs_started() -> int:
        return sum(line.startswith("start") for line in _read_lines(trained))

    run = _Run(out, train_script)
    assert _wait_for(reached(first_stop), run), run.stderr_tail()
    assert run.kill() == -signal.SIGKILL

    run = _Run(out, train_script)
    assert _wait_for(lambda: runs_started() == 2, run), run.stderr_tail()
    base = len(_read_lines(loaded))  # the second run has started training: count its loads
    assert _wait_for(lambda: len(_read_lines(loaded)) >= base + load_growth, run), run.stderr_tail()
    assert run.kill() == -signal.SIGKILL

    run = _Run(out, train_script)
    assert _wait_for(reached(last_stop), run), run.stderr_tail()
    assert run.kill() == -signal.SIGKILL

    run = _Run(out, train_script)
    assert run.wait() == 0, run.stderr_tail()
    _check_trained_lineage(trained, runs=4)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_exact_points_then_resume_trains_every_sample_once(tmp_path, train_script):
    """The same run, killed by itself at exact, adversarial points, then resumed.

    1. ``load:22`` -- in a loader worker thread, at the 22nd sample load (the
       loader is batches ahead of training);
    2. ``train:7`` -- inside ``training_step`` of global step 7, after it was
       logged as trained but before its checkpoint (the step must be redone,
       with the same batch);
    3. ``ckpt:12`` -- right after the checkpoint of the last step of epoch 0 (the
       resume must start epoch 1 from its first batch).
    """
    out = tmp_path / "run"
    out.mkdir()
    for kill_at in ("load:22", "train:7", "ckpt:12"):
        run = _Run(out, train_script, kill_at)
        assert run.wait() == -signal.SIGKILL, f"{kill_at} never triggered:\n{run.stderr_tail()}"
    run = _Run(out, train_script)
    assert run.wait() == 0, run.stderr_tail()
    _check_trained_lineage(out / "trained.log", runs=4)


class _IndexRecorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.trained: dict[int, list[int]] = collections.defaultdict(list)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.trained[self.current_epoch].extend(batch["index"].tolist())
        return self.net(batch["x"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _IndexedDataset(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "x": torch.full((8,), float(i))}


@pytest.mark.timeout(120)
def test_trainer_epochs_follow_the_loaders_epoch_shuffles(tmp_path):
    """Under a Trainer, epoch e trains the loader's own epoch-e order (so epochs differ).

    Lightning calls ``iter(loader)`` twice before ``set_epoch(0)``
    (``_check_dataloader_iterable``, then ``FitLoop.setup_data``); neither call may
    use up an epoch. Same seed, same order as a standalone loader: that is what
    makes a resumed run (which restores the epoch from the checkpoint) bit-identical.
    """
    dm = ThreadedDataModule(train_dataset=_IndexedDataset(), batch_size=4, shuffle=True, seed=SEED,
                            loader=LoaderConfig(num_workers=2, memory_budget=None))
    model = _IndexRecorder()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    standalone = ThreadedDataLoader(_IndexedDataset(), batch_size=4, shuffle=True, seed=SEED)
    want = {epoch: [i for b in standalone for i in b["index"].tolist()] for epoch in range(2)}
    assert model.trained[0] != model.trained[1]
    assert dict(model.trained) == want


# =============================================================================== 4. memory


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_memory_budget_bounds_the_ready_buffer(batch_size):
    """8 MiB samples, 64 MiB budget, prefetch 8 x 4 threads (256 MiB if unbounded).

    The bytes held in the ready buffer never exceed budget + one batch; the
    governor throttled; every sample arrives once with its content intact.
    """
    budget, sample = 64 * MiB, 8 * MiB
    loader = ThreadedDataLoader(BigSampleDataset(48, sample), batch_size=batch_size, shuffle=True,
                                seed=SEED, num_workers=4, prefetch_factor=8, memory_budget=budget)
    seen = []
    with loader:
        for b in loader:
            # consumer-side work (and an integrity check): each sample is filled with its index
            want = b["index"].to(torch.float32)[:, None].expand_as(b["x"])
            assert torch.equal(b["x"], want)
            seen.extend(b["index"].tolist())
        memory = loader.get_thread_safety_performance_report()["memory"]
    assert sorted(seen) == list(range(48))
    batch_bytes = batch_size * (sample + 8)
    assert memory["budget_bytes"] == budget
    assert memory["peak_bytes_in_flight"] <= budget + batch_bytes, memory
    assert memory["throttle_events"] > 0
    assert memory["bytes_in_flight"] == 0
    assert not _lts_threads()


class _GrowingSamples(Dataset):
    """Samples 0..15 are 256 KiB, the rest 8 MiB; sample 15 is slow.

    Sample 15 (the last small one) waits until ``hold_until`` large samples have
    been loaded (a condition wait, bounded by ``max_wait_s``): the batches the
    loader admitted while every batch it had seen was small are then ready
    before the consumer can take batch 15.
    """

    def __init__(self, n: int, hold_until: int, max_wait_s: float = 20.0) -> None:
        self.n, self.hold_until, self.max_wait_s = n, hold_until, max_wait_s
        self._cv = threading.Condition()  # guards large_loaded; sample 15 waits on it
        self.large_loaded = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i == 15:
            with self._cv:
                self._cv.wait_for(lambda: self.large_loaded >= self.hold_until, self.max_wait_s)
        numel = (256 * 1024 if i < 16 else 8 * MiB) // 4
        x = torch.full((numel,), float(i))
        if i >= 16:
            with self._cv:
                self.large_loaded += 1
                self._cv.notify_all()
        return {"index": i, "x": x}


@pytest.mark.timeout(120)
def test_memory_budget_holds_when_samples_grow():
    """Small samples then large ones (variable crops): still at most budget + one batch buffered."""
    budget = 64 * MiB
    ds = _GrowingSamples(64, hold_until=11)
    loader = ThreadedDataLoader(ds, batch_size=1, num_workers=4, prefetch_factor=8,
                                memory_budget=budget)
    with loader:
        seen = [int(b["index"]) for b in loader]
        memory = loader.get_thread_safety_performance_report()["memory"]
    assert seen == list(range(64))
    assert memory["peak_bytes_in_flight"] <= budget + 8 * MiB + 8, memory


# =============================================================================== 5. bad input

HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])

_junk_text = st.text(alphabet="abcxyz -_%.!", min_size=0, max_size=8)


def _bad_int(minimum: int, *, auto: bool = False, none_ok: bool = False) -> st.SearchStrategy[Any]:
    """Values that are not an int >= ``minimum`` (nor ``'auto'``/``None`` where those are allowed)."""
    options = [
        st.integers(max_value=minimum - 1),
        st.floats(allow_nan=True, allow_infinity=True),  # 3.0 is a float, not an int
        st.booleans(),
        _junk_text,
        st.integers(min_value=minimum, max_value=64).map(str),  # "4": a str, not an int
        st.just([2]),
    ]
    if not none_ok:
        options.append(st.none())
    strategy = st.one_of(*options)
    return strategy.filter(lambda v: v != "auto") if auto else strategy


def _bad_choice(choices: tuple[str, ...]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(["fiber", "Thread", "PROCESS", "threads", "ignore", "", " raise"]),
        _junk_text, st.integers(), st.none(), st.booleans(),
    ).filter(lambda v: v not in choices)


def _bad_timeout(*, zero_ok: bool, none_ok: bool) -> st.SearchStrategy[Any]:
    options = [
        st.floats(max_value=-1e-9), st.integers(max_value=-1),
        st.just(float("nan")), st.just(float("inf")), st.booleans(), st.just("5"),
    ]
    if not zero_ok:
        options.append(st.sampled_from([0, 0.0]))
    if not none_ok:
        options.append(st.none())
    return st.one_of(*options)


_bad_size = st.one_of(
    st.sampled_from(["12 parsecs", "lots", "-3GiB", "0", "0B", "150%", "0%", "-5%", "4 GiB GiB",
                     "1e3", "GiB", "%", "0.0001KB", "nan", "inf", "many MB"]),
    st.integers(max_value=0), st.floats(max_value=0.0), st.just(float("nan")),
    st.just(float("inf")), st.booleans(), st.just([64]), st.just({"GiB": 1}),
)
_bad_flag = st.one_of(st.integers(), _junk_text, st.none(), st.floats(), st.just([True]))
_not_callable = st.one_of(st.integers(), _junk_text, st.just([len]))

LOADER_INVALID: dict[str, st.SearchStrategy[Any]] = {
    "batch_size": _bad_int(1, none_ok=True),
    "num_workers": _bad_int(0, auto=True),
    "prefetch_factor": _bad_int(1, auto=True, none_ok=True),
    "max_retries": _bad_int(0),
    "cuda_streams": _bad_int(1),
    "seed": _bad_int(0, none_ok=True),
    "executor": _bad_choice(EXECUTORS),
    "on_error": _bad_choice(ERROR_POLICIES),
    "timeout": _bad_timeout(zero_ok=True, none_ok=False),
    "stall_timeout": _bad_timeout(zero_ok=False, none_ok=True),
    "memory_budget": _bad_size,
    # in_order, pin_memory, persistent_workers and shuffle take any truthy value, as in torch
    # (tests/test_parity.py); LoaderConfig (YAML) stays strict about them below.
    "drop_last": _bad_flag,
    "debug": _bad_flag,
    "skip_after_retries": _bad_flag,
    "distributed": st.one_of(_junk_text, st.none(), st.integers(), st.floats(),
                             st.just([True])).filter(lambda v: v != "auto"),
    "device": st.sampled_from(["fiber", "gpu", "cuda:x", "", "cuda::0", "tpu0", "cpu:-1", "CPU"]),
    "collate_fn": _not_callable,
    "worker_init_fn": _not_callable,
    "generator": st.one_of(st.integers(), _junk_text, st.just(torch.Generator)),
}

CONFIG_INVALID: dict[str, st.SearchStrategy[Any]] = {
    **{k: LOADER_INVALID[k] for k in (
        "num_workers", "max_retries", "cuda_streams", "seed", "executor", "on_error", "timeout",
        "stall_timeout", "memory_budget", "debug")},
    **{k: _bad_flag for k in ("in_order", "pin_memory", "persistent_workers")},
    "prefetch_factor": _bad_int(1, auto=True),  # None is not a LoaderConfig value
    "device": st.one_of(st.integers(), st.floats(), st.just(["cuda:0"])),
}

def _field_params(table: dict[str, Any], xfail: dict[str, pytest.MarkDecorator]) -> list[Any]:
    return [pytest.param(f, marks=[xfail[f]] if f in xfail else [], id=f) for f in table]


@pytest.mark.parametrize("field", _field_params(LOADER_INVALID, {}))
@HYPOTHESIS
@given(data=st.data())
def test_invalid_loader_argument_is_rejected_naming_it(field, data):
    """Any invalid value of one ThreadedDataLoader argument: ValueError/TypeError naming it."""
    value = data.draw(LOADER_INVALID[field], label=field)
    kwargs = {field: value}
    if field == "persistent_workers":
        kwargs["num_workers"] = 1
    with pytest.raises((ValueError, TypeError)) as info:
        ThreadedDataLoader(RangeDataset(10), **kwargs)
    assert field in str(info.value), (field, value, str(info.value))


@pytest.mark.parametrize("field", _field_params(CONFIG_INVALID, {}))
@HYPOTHESIS
@given(data=st.data())
def test_invalid_loader_config_field_is_rejected_naming_it(field, data):
    """Any invalid value of one LoaderConfig field: ValueError/TypeError naming it, at construction."""
    value = data.draw(CONFIG_INVALID[field], label=field)
    with pytest.raises((ValueError, TypeError)) as info:
        LoaderConfig(**{field: value})
    assert field in str(info.value), (field, value, str(info.value))


_MULTI_FIELDS = [f for f in LOADER_INVALID if f not in ("distributed", "persistent_workers")]


@HYPOTHESIS
@given(data=st.data())
def test_several_invalid_arguments_name_one_of_them(data):
    """Several invalid arguments at once: rejected, and the message names one of them."""
    fields = data.draw(st.lists(st.sampled_from(_MULTI_FIELDS), min_size=2, max_size=5, unique=True))
    kwargs = {f: data.draw(LOADER_INVALID[f], label=f) for f in fields}
    with pytest.raises((ValueError, TypeError)) as info:
        ThreadedDataLoader(RangeDataset(10), **kwargs)
    assert any(f in str(info.value) for f in fields), (kwargs, str(info.value))


@pytest.mark.parametrize("device", ["fiber", "cuda:x", "gpu0"])
def test_loader_config_rejects_an_invalid_device_string(device):
    with pytest.raises(ValueError, match="device"):
        LoaderConfig(device=device)


@pytest.mark.parametrize("value", [1.5, 2.75])
def test_fractional_memory_budget_above_one_is_rejected(value):
    with pytest.raises(ValueError, match="memory_budget"):
        ThreadedDataLoader(RangeDataset(10), memory_budget=value)


@pytest.mark.timeout(60)
def test_very_long_stall_timeout_works_with_process_workers():
    """``stall_timeout`` is validated as any finite number > 0; a huge one means "never" everywhere."""
    loader = ThreadedDataLoader(RangeDataset(10), batch_size=4, num_workers=1, executor="process",
                                stall_timeout=1e9)
    assert flat_indices(list(loader)) == list(range(10))


def test_very_long_stall_timeout_works_with_threads():
    loader = ThreadedDataLoader(RangeDataset(10), batch_size=4, num_workers=2, stall_timeout=1e9)
    assert flat_indices(list(loader)) == list(range(10))


_valid_budget = st.sampled_from([None, "auto", 1, 512, "64MiB", "1KiB", 0.25, "25%", 1.0, "off"])


@st.composite
def _valid_loader_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    num_workers = draw(st.sampled_from([0, 1, 2, 3, 4, "auto"]))
    threaded = num_workers != 0
    batch_size = draw(st.one_of(st.none(), st.integers(1, 12)))
    return {
        "batch_size": batch_size,
        "shuffle": draw(st.sampled_from([None, False, True])),
        "num_workers": num_workers,
        "executor": draw(st.sampled_from(["thread", "process", "auto"])) if threaded else "thread",
        "prefetch_factor": draw(st.one_of(st.none(), st.integers(1, 4), st.just("auto"))),
        "persistent_workers": draw(st.booleans()) if threaded else False,
        "drop_last": draw(st.booleans()) if batch_size is not None else False,
        "in_order": draw(st.booleans()),
        "memory_budget": draw(_valid_budget),
        "on_error": draw(st.sampled_from(ERROR_POLICIES)),
        "max_retries": draw(st.integers(0, 3)),
        "skip_after_retries": draw(st.booleans()),
        "seed": draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
        "timeout": draw(st.sampled_from([0, 0.0, 30, 60.5])),
        "stall_timeout": draw(st.sampled_from([None, 60, 3600.0])),
        "debug": draw(st.booleans()),
        "distributed": draw(st.sampled_from([False, "auto"])),
        "cuda_streams": draw(st.integers(1, 3)),
        "device": draw(st.sampled_from([None, "cpu"])),
    }


def _check_delivery(batches: list[Any], n: int, batch_size: int | None, drop_last: bool) -> None:
    got = flat_indices(batches)
    assert len(got) == len(set(got)), f"duplicates in {got}"
    if drop_last and batch_size is not None:
        assert len(got) == n // batch_size * batch_size and set(got) <= set(range(n))
    else:
        assert sorted(got) == list(range(n))


@pytest.mark.timeout(240)
@HYPOTHESIS
@given(kwargs=_valid_loader_kwargs())
def test_valid_loader_arguments_construct_and_deliver_every_index_once(kwargs):
    """Any valid combination constructs and delivers each of 10 indices once (twice: 2 epochs)."""
    with ThreadedDataLoader(RangeDataset(10), **kwargs) as loader:
        for _ in range(2):
            _check_delivery(list(loader), 10, kwargs["batch_size"], kwargs["drop_last"])
    _assert_no_workers_left()


@st.composite
def _valid_config(draw: st.DrawFn) -> LoaderConfig:
    num_workers = draw(st.sampled_from([0, 1, 2, 3, 4, "auto"]))
    return LoaderConfig(
        num_workers=num_workers,
        prefetch_factor=draw(st.one_of(st.integers(1, 4), st.just("auto")))
        if num_workers != 0 else "auto",  # torch: no prefetch_factor without workers
        executor=draw(st.sampled_from(EXECUTORS)) if num_workers != 0 else "thread",
        in_order=draw(st.booleans()),
        persistent_workers=draw(st.booleans()) if num_workers != 0 else False,
        timeout=draw(st.sampled_from([0.0, 30.0])),
        memory_budget=draw(_valid_budget),
        on_error=draw(st.sampled_from(ERROR_POLICIES)),
        max_retries=draw(st.integers(0, 3)),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**32))),
        device=draw(st.sampled_from([None, "cpu"])),
        cuda_streams=draw(st.integers(1, 3)),
        stall_timeout=draw(st.sampled_from([None, 60.0])),
        debug=draw(st.booleans()),
    )


@pytest.mark.timeout(240)
@HYPOTHESIS
@given(config=_valid_config(), batch_size=st.integers(1, 12), shuffle=st.booleans())
def test_valid_loader_config_builds_a_data_module_that_delivers_every_index_once(
    config, batch_size, shuffle
):
    """Any valid LoaderConfig round-trips through to_dict() and its data module's loader delivers once."""
    assert LoaderConfig(**config.to_dict()) == config
    dm = ThreadedDataModule(train_dataset=RangeDataset(10), batch_size=batch_size, shuffle=shuffle,
                            loader=config)
    try:
        _check_delivery(list(dm.train_dataloader()), 10, batch_size, drop_last=False)
    finally:
        dm.cleanup()
    _assert_no_workers_left()


# -- YAML through the console script -----------------------------------------------------

_CLI_CONFIG = """\
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
model:
  class_path: lightning_threadsafe.examples.UNet3D
  init_args:
    base_channels: 2
data:
  class_path: lightning_threadsafe.examples.EMVolumeDataModule
  init_args:
    crop: 8
    train_samples: 4
    val_samples: 2
    batch_size: 2
    loader:
      num_workers: 1
      {line}
"""


def _run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str) -> tuple[Any, str]:
    """Run ``lightning-threadsafe fit`` in-process on a config with one loader line; return (exit, stderr)."""
    monkeypatch.chdir(tmp_path)  # anything the CLI writes lands in tmp_path
    monkeypatch.setattr(sys, "argv", ["lightning-threadsafe"])  # not pytest's arguments
    path = tmp_path / "bad.yaml"
    path.write_text(_CLI_CONFIG.format(line=line))
    from lightning_threadsafe.cli import main

    err = io.StringIO()
    code: Any = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["fit", "--config", str(path), "--trainer.fast_dev_run=true",
                  f"--trainer.default_root_dir={tmp_path}"])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("num_workers: -3", "num_workers"),
        ("executor: fiber", "executor"),
        ("memory_budget: lots", "memory_budget"),
        ("memory_budget: 12 parsecs", "memory_budget"),
        ("on_error: ignore", "on_error"),
        ("prefetch_factor: 0", "prefetch_factor"),
        ("stall_timeout: -1", "stall_timeout"),
        ("timeout: -5", "timeout"),
        ("max_retries: 1.5", "max_retries"),
        ("in_order: maybe", "in_order"),
        ("cuda_streams: 0", "cuda_streams"),
        pytest.param("device: fiber", "device"),
    ],
)
def test_bad_loader_value_in_yaml_fails_the_cli_naming_the_field(tmp_path, monkeypatch, line, field):
    """A bad loader value in a LightningCLI YAML: the CLI exits with an error naming the field."""
    code, stderr = _run_cli(tmp_path, monkeypatch, line)
    assert code not in (None, 0), f"the CLI accepted {line!r}"
    assert field in stderr, stderr[-2000:]
    assert not _lts_threads()


# =============================================================================== 6. interpreter exit

_ABANDON_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from _faults import GilStressDataset
    from lightning_threadsafe import ThreadedDataLoader
    kind = sys.argv[1]
    if kind == "threads":
        ds = GilStressDataset(20_000, max_delay_ms=5.0, gil_every=13)
        loader = ThreadedDataLoader(ds, batch_size=8, shuffle=True, num_workers=16,
                                    in_order=False, memory_budget="1MiB", prefetch_factor=4)
    elif kind == "processes":
        ds = GilStressDataset(20_000, max_delay_ms=5.0, gil_every=13)
        loader = ThreadedDataLoader(ds, batch_size=8, shuffle=True, num_workers=2,
                                    executor="process")
    else:  # "stuck": every worker ends up blocked inside dataset[i], which never returns
        import os, select, torch
        from torch.utils.data import Dataset
        never_r, never_w = os.pipe()  # nothing is ever written: reads block up to the bound
        class Stuck(Dataset):
            def __len__(self):
                return 10_000
            def __getitem__(self, i):
                if i >= 8:
                    select.select([never_r], [], [], 600)
                return torch.tensor([i])
        loader = ThreadedDataLoader(Stuck(), batch_size=4, num_workers=16)
    it = iter(loader)
    next(it)
    next(it)
    keep = it  # still referenced at exit, mid-epoch
    print("abandoned", flush=True)
    """
)


def _run_abandon(tmp_path: Path, kind: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "abandon.py"
    script.write_text(_ABANDON_SCRIPT.format(tests=str(TESTS_DIR)))
    return subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True,
                          timeout=60)  # a hang guard, not a speed assertion


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_interpreter_exits_cleanly_after_abandoning_an_iterator_mid_epoch(tmp_path, kind):
    """16 busy, throttled threads (or 2 worker processes) abandoned mid-epoch: exit status 0."""
    proc = _run_abandon(tmp_path, kind)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "abandoned"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.timeout(120)
def test_interpreter_exits_with_workers_stuck_in_user_code(tmp_path):
    """16 workers blocked forever inside ``dataset[i]``: the interpreter still exits (they are daemons)."""
    proc = _run_abandon(tmp_path, "stuck")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "abandoned"

