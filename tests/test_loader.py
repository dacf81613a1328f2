"""ThreadedDataLoader: torch parity, exactly-once, determinism, errors, shutdown, resume."""

from __future__ import annotations

import collections
import io
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from _helpers import (
    AugmentedDataset,
    BlockingDataset,
    FailingDataset,
    RangeDataset,
    RecordingDataset,
    flat_indices,
)
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

from lightning_threadsafe import LoaderStallError, SampleLoadError, ThreadedDataLoader


def _lts_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("lts-")]


def _as_lists(loader) -> list[list[int]]:
    return [b.flatten().tolist() for b in loader]


# --------------------------------------------------------------------------- parity with torch


@pytest.mark.parametrize("num_workers", [0, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 1},
        {"batch_size": 7},
        {"batch_size": 7, "drop_last": True},
        {"batch_size": 10, "drop_last": True},
        {"batch_size": 64},
        {"batch_size": None},
    ],
)
def test_sequential_order_batches_and_len_match_torch(kwargs, num_workers):
    ds = RangeDataset(50)
    ours = ThreadedDataLoader(ds, num_workers=num_workers, **kwargs)
    theirs = DataLoader(ds, **kwargs)
    assert len(ours) == len(theirs)
    got = [b.tolist() for b in ours]
    want = [b.tolist() for b in theirs]
    assert got == want


@pytest.mark.parametrize("num_workers", [0, 4])
def test_shuffle_with_generator_matches_torch_order(num_workers):
    ds = RangeDataset(97)
    g1 = torch.Generator().manual_seed(123)
    g2 = torch.Generator().manual_seed(123)
    theirs = DataLoader(ds, batch_size=8, shuffle=True, generator=g1)
    ours = ThreadedDataLoader(ds, batch_size=8, shuffle=True, generator=g2, num_workers=num_workers)
    for _ in range(2):  # two epochs: the generator advances the same way
        assert _as_lists(ours) == _as_lists(theirs)


def test_an_unused_iterator_gives_back_the_generator_draws():
    # Lightning calls iter() on a loader to check it, then throws the iterator away.
    ds = RangeDataset(40)
    theirs = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7))
    ours = ThreadedDataLoader(ds, batch_size=8, shuffle=True, num_workers="auto",
                              generator=torch.Generator().manual_seed(7))
    iter(ours).close()
    assert _as_lists(ours) == _as_lists(theirs)


def test_custom_sampler_and_batch_sampler_match_torch():
    ds = RangeDataset(30)
    sampler = list(reversed(range(30)))
    assert _as_lists(ThreadedDataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)) == \
        _as_lists(DataLoader(ds, batch_size=4, sampler=sampler))
    bs = [[0, 5], [9, 8, 7], [29]]
    assert _as_lists(ThreadedDataLoader(ds, batch_sampler=bs, num_workers=2)) == \
        _as_lists(DataLoader(ds, batch_sampler=bs))
    bsampler = BatchSampler(SequentialSampler(ds), batch_size=6, drop_last=True)
    ours = ThreadedDataLoader(ds, batch_sampler=bsampler, num_workers=2)
    assert len(ours) == 5 and _as_lists(ours) == _as_lists(DataLoader(ds, batch_sampler=bsampler))


class _Structured(Dataset):
    def __len__(self):
        return 9

    def __getitem__(self, i):
        return {
            "img": np.full((2, 2), i, dtype=np.float32),
            "pair": (i, torch.tensor(float(i))),
            "nested": {"name": f"s{i}", "vals": [i, i * 2]},
        }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_collate_of_numpy_dict_tuple_nested_and_strings_matches_torch(num_workers):
    ds = _Structured()
    ours = list(ThreadedDataLoader(ds, batch_size=4, num_workers=num_workers))
    theirs = list(DataLoader(ds, batch_size=4))
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert torch.equal(a["img"], b["img"]) and a["img"].dtype == b["img"].dtype
        assert torch.equal(a["pair"][0], b["pair"][0]) and torch.equal(a["pair"][1], b["pair"][1])
        assert a["nested"]["name"] == b["nested"]["name"]
        assert all(torch.equal(x, y) for x, y in zip(a["nested"]["vals"], b["nested"]["vals"]))


def test_custom_collate_fn_runs_in_a_worker_thread():
    threads = set()

    def collate(samples):
        threads.add(threading.current_thread().name)
        return torch.cat(samples)

    out = _as_lists(ThreadedDataLoader(RangeDataset(12), batch_size=4, num_workers=2,
                                       collate_fn=collate))
    assert out == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert threads and all(n.startswith("lts-worker-") for n in threads)


def test_worker_init_fn_called_once_per_worker_thread():
    calls = []
    lock = threading.Lock()  # guards calls

    def init(wid):
        with lock:
            calls.append((wid, threading.current_thread().name))

    list(ThreadedDataLoader(RangeDataset(20), batch_size=2, num_workers=3, worker_init_fn=init))
    assert sorted(w for w, _ in calls) == [0, 1, 2]
    assert {n for _, n in calls} == {"lts-worker-0", "lts-worker-1", "lts-worker-2"}


class _Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


def test_iterable_dataset_single_producer_matches_torch():
    ours = ThreadedDataLoader(_Stream(10), batch_size=3, num_workers=2)
    assert _as_lists(ours) == _as_lists(DataLoader(_Stream(10), batch_size=3))
    assert len(ours) == 4
    dropped = ThreadedDataLoader(_Stream(10), batch_size=3, drop_last=True)
    assert _as_lists(dropped) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


# --------------------------------------------------------------------------- exactly once, determinism


def _run(ds, **kw):
    loader = ThreadedDataLoader(ds, batch_size=5, shuffle=True, seed=7, **kw)
    return list(loader)


def _by_index(batches):
    out = {}
    for b in batches:
        for i, x in zip(b["index"].tolist(), b["x"]):
            assert i not in out, f"index {i} delivered twice"
            out[i] = x
    return out


def test_exactly_once_and_bit_identical_across_thread_counts_and_order():
    ds = AugmentedDataset(60, max_delay_ms=3.0)
    reference = _run(ds, num_workers=0)
    ref_map = _by_index(reference)
    assert sorted(ref_map) == list(range(60))
    for nw in (1, 2, 8, 32):
        for in_order in (True, False):
            got = _run(ds, num_workers=nw, in_order=in_order)
            got_map = _by_index(got)
            assert sorted(got_map) == list(range(60)), (nw, in_order)
            assert all(torch.equal(got_map[i], ref_map[i]) for i in ref_map), (nw, in_order)
            if in_order:  # same batches, same order, bit-identical
                assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in reference]
                assert all(torch.equal(a["x"], b["x"]) for a, b in zip(got, reference))
            else:  # same batches as sets
                assert sorted(tuple(b["index"].tolist()) for b in got) == \
                    sorted(tuple(b["index"].tolist()) for b in reference)


def test_process_executor_gives_the_same_batches_as_threads():
    ds = AugmentedDataset(24)
    threads = _run(ds, num_workers=2)
    procs = _run(ds, num_workers=2, executor="process")
    assert [b["index"].tolist() for b in procs] == [b["index"].tolist() for b in threads]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(procs, threads))
    procs_unordered = _run(ds, num_workers=2, executor="process", in_order=False)
    assert sorted(_by_index(procs_unordered)) == list(range(24))


def test_epochs_reshuffle_deterministically_with_seed():
    ds = RangeDataset(40)
    a = ThreadedDataLoader(ds, batch_size=4, shuffle=True, seed=3, num_workers=2)
    b = ThreadedDataLoader(ds, batch_size=4, shuffle=True, seed=3, num_workers=0)
    e0a, e1a = _as_lists(a), _as_lists(a)
    e0b, e1b = _as_lists(b), _as_lists(b)
    assert e0a == e0b and e1a == e1b and e0a != e1a
    a.set_epoch(0)
    assert _as_lists(a) == e0a


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("num_workers", [0, 3])
def test_raise_names_index_and_chains_original(num_workers):
    loader = ThreadedDataLoader(FailingDataset(20, {13}), batch_size=4, num_workers=num_workers)
    seen = []
    with pytest.raises(SampleLoadError) as info:
        for b in loader:
            seen.append(b.flatten().tolist())
    err = info.value
    assert err.index == 13 and err.batch_indices == [12, 13, 14, 15] and err.batch_ordinal == 3
    assert isinstance(err.__cause__, ValueError) and "boom at 13" in str(err.__cause__)
    assert err.__cause__.__traceback__ is not None
    assert "index=13" in err.detail and str(err) == "boom at 13"  # the original's message
    assert isinstance(err, ValueError)  # except ValueError still works, as with torch
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    report = loader.get_thread_safety_performance_report()
    assert report["errors"]["raised"] == 1 and report["errors"]["records"][0]["index"] == 13
    assert not _lts_threads()


def test_raise_in_process_executor_names_index_and_keeps_traceback_text():
    loader = ThreadedDataLoader(FailingDataset(12, {5}), batch_size=4, num_workers=2,
                                executor="process")
    with pytest.raises(SampleLoadError) as info:
        list(loader)
    assert info.value.index == 5 and "boom at 5" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, ValueError)
    assert "ValueError" in str(info.value.__cause__.__cause__)  # the worker's traceback text


@pytest.mark.parametrize("num_workers", [0, 3])
def test_skip_keeps_the_batch_and_records_the_index(num_workers):
    loader = ThreadedDataLoader(FailingDataset(12, {1, 6, 7}), batch_size=4, num_workers=num_workers,
                                on_error="skip")
    assert _as_lists(loader) == [[0, 2, 3], [4, 5], [8, 9, 10, 11]]
    errs = loader.get_thread_safety_performance_report()["errors"]
    assert sorted(errs["skipped_indices"]) == [1, 6, 7] and errs["skipped"] == 3


def test_skip_of_a_whole_batch_delivers_the_rest():
    loader = ThreadedDataLoader(FailingDataset(8, {4, 5, 6, 7}), batch_size=4, num_workers=2,
                                on_error="skip")
    assert _as_lists(loader) == [[0, 1, 2, 3]]
    assert sorted(loader.get_thread_safety_performance_report()["errors"]["skipped_indices"]) == \
        [4, 5, 6, 7]


def test_retry_recovers_transient_failures_and_counts_them():
    ds = FailingDataset(10, {2, 3}, times=2)
    loader = ThreadedDataLoader(ds, batch_size=5, num_workers=2, on_error="retry", max_retries=2)
    assert _as_lists(loader) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert ds.attempts[2] == 3 and ds.attempts[3] == 3
    assert loader.get_thread_safety_performance_report()["totals"]["retries"] == 4


def test_retry_exhausted_raises_or_skips_as_configured():
    ds = FailingDataset(6, {4}, times=5)
    with pytest.raises(SampleLoadError) as info:
        list(ThreadedDataLoader(ds, batch_size=3, num_workers=2, on_error="retry", max_retries=1))
    assert info.value.attempts == 2 and info.value.index == 4
    ds2 = FailingDataset(6, {4}, times=5)
    loader = ThreadedDataLoader(ds2, batch_size=3, num_workers=2, on_error="retry", max_retries=1,
                                skip_after_retries=True)
    assert _as_lists(loader) == [[0, 1, 2], [3, 5]]


def test_collate_error_names_the_batch():
    def bad(samples):
        raise TypeError("cannot collate")

    with pytest.raises(SampleLoadError) as info:
        list(ThreadedDataLoader(RangeDataset(8), batch_size=4, num_workers=2, collate_fn=bad))
    assert info.value.batch_indices == [0, 1, 2, 3] and "collate_fn failed" in info.value.detail
    assert isinstance(info.value.__cause__, TypeError)


def test_keyboard_interrupt_in_a_sample_is_never_skipped():
    loader = ThreadedDataLoader(FailingDataset(8, {3}, exc=KeyboardInterrupt), batch_size=4,
                                num_workers=2, on_error="skip")
    with pytest.raises(SampleLoadError) as info:
        list(loader)
    assert isinstance(info.value.__cause__, KeyboardInterrupt)


def test_worker_init_fn_failure_reaches_the_consumer():
    def init(wid):
        raise OSError("no device")

    with pytest.raises(SampleLoadError, match="no device"):
        list(ThreadedDataLoader(RangeDataset(8), batch_size=2, num_workers=2, worker_init_fn=init))


# --------------------------------------------------------------------------- stalls and timeouts


def test_stall_watchdog_names_the_stuck_index_and_stacks():
    ds = BlockingDataset(16, block_at=5)
    loader = ThreadedDataLoader(ds, batch_size=4, num_workers=2, stall_timeout=0.3)
    got = []
    try:
        with pytest.raises(LoaderStallError) as info:
            for b in loader:
                got.append(b.flatten().tolist())
    finally:
        ds.release.set()  # let the stuck worker return so it can be joined
        loader.cleanup_thread_safety_resources()
    err = info.value
    assert 5 in err.stuck.values()
    stuck_thread = next(n for n, i in err.stuck.items() if i == 5)
    assert "release.wait" in err.stacks[stuck_thread]
    assert got == [[0, 1, 2, 3]]
    assert loader.get_thread_safety_performance_report()["stalls"]


def test_timeout_raises_like_torch():
    ds = BlockingDataset(4, block_at=0)
    loader = ThreadedDataLoader(ds, batch_size=2, num_workers=1, timeout=0.2)
    try:
        with pytest.raises(RuntimeError, match=r"timed out after 0\.2 seconds"):
            next(iter(loader))
    finally:
        ds.release.set()
        loader.cleanup_thread_safety_resources()


# --------------------------------------------------------------------------- shutdown


def test_no_threads_after_exhaustion_break_del_and_context_manager():
    ds = RangeDataset(100)
    list(ThreadedDataLoader(ds, batch_size=4, num_workers=4))
    assert not _lts_threads()

    loader = ThreadedDataLoader(ds, batch_size=4, num_workers=4)
    for _ in loader:
        break
    assert not _lts_threads()  # the abandoned iterator was collected and joined its workers

    it = iter(loader)
    next(it)
    assert len(_lts_threads()) == 4
    del it
    assert not _lts_threads()

    with ThreadedDataLoader(ds, batch_size=4, num_workers=4) as ld:
        it = iter(ld)
        next(it)
    assert not _lts_threads()
    assert list(it) == []  # a cleaned-up iterator is finished


def test_a_new_iteration_leaves_the_running_one_whole():
    """torch: a second iter() is an independent epoch; the first still yields all of its own."""
    loader = ThreadedDataLoader(RangeDataset(40), batch_size=4, num_workers=3)
    first = iter(loader)
    head = next(first)
    second = iter(loader)
    assert len(list(second)) == 10
    assert [head.flatten().tolist(), *_as_lists(first)] == [list(range(i, i + 4))
                                                            for i in range(0, 40, 4)]
    assert not _lts_threads()


def test_interpreter_exits_promptly_with_an_abandoned_iterator(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time, torch
        sys.path.insert(0, {tests!r})
        from _helpers import AugmentedDataset
        from lightning_threadsafe import ThreadedDataLoader
        loader = ThreadedDataLoader(AugmentedDataset(10_000, max_delay_ms=5), batch_size=8,
                                    num_workers=8)
        it = iter(loader)
        next(it); next(it)
        keep = it  # still referenced at exit, mid-epoch
        print("ok", flush=True)
        """
    ).format(tests=str(__import__("pathlib").Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("num_workers", [0, 3])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(in_order, num_workers):
    ds = AugmentedDataset(53, max_delay_ms=1.0)

    def make():
        return ThreadedDataLoader(ds, batch_size=4, shuffle=True, seed=11, num_workers=num_workers,
                                  in_order=in_order)

    full = list(make())
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    del it
    # plain data: survives torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed)
    got = _by_index(head + tail)
    want = _by_index(full)
    assert sorted(got) == list(range(53))
    assert all(torch.equal(got[i], want[i]) for i in want)
    if in_order:
        assert [b["index"].tolist() for b in head + tail] == [b["index"].tolist() for b in full]
    # the epoch after the resumed one is the loader's next epoch
    nxt = make()
    list(nxt)
    after_resume = [tuple(b["index"].tolist()) for b in resumed]
    second_epoch = [tuple(b["index"].tolist()) for b in nxt]
    if not in_order:  # completion order varies; the batches themselves do not
        after_resume, second_epoch = sorted(after_resume), sorted(second_epoch)
    assert after_resume == second_epoch


def test_state_between_epochs_points_at_the_next_epoch():
    loader = ThreadedDataLoader(RangeDataset(10), batch_size=5, shuffle=True, seed=1)
    list(loader)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["delivered"] == []
    assert state["settings"]["num_workers"] == 0


def test_resume_with_user_generator_restores_its_state():
    ds = RangeDataset(30)
    ref = ThreadedDataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(9))
    full = _as_lists(ref)
    loader = ThreadedDataLoader(ds, batch_size=4, shuffle=True,
                                generator=torch.Generator().manual_seed(9), num_workers=2)
    it = iter(loader)
    head = [next(it).flatten().tolist() for _ in range(3)]
    state = loader.state_dict()
    del it
    other = ThreadedDataLoader(ds, batch_size=4, shuffle=True,
                               generator=torch.Generator().manual_seed(0), num_workers=2)
    other.load_state_dict(state)
    assert head + _as_lists(other) == full


# --------------------------------------------------------------------------- extras


@pytest.mark.parametrize("num_workers", [0, 4])
def test_load_batches_concurrently_returns_batches_in_given_order(num_workers):
    loader = ThreadedDataLoader(RangeDataset(50), num_workers=num_workers)
    batches = [[9, 3], [0], [49, 48, 47], [3, 3]]
    out = loader.load_batches_concurrently(batches)
    assert [b.flatten().tolist() for b in out] == batches
    with pytest.raises(ValueError, match="empty batch"):
        loader.load_batches_concurrently([[1], []])


def test_priority_serves_the_batch_needed_next_first():
    ds = RecordingDataset(64)
    loader = ThreadedDataLoader(ds, batch_size=8, num_workers=2, prefetch_factor=4)
    it = iter(loader)
    first = next(it)
    assert first.flatten().tolist() == list(range(8))
    # Every sample of batch 0 was started before any sample of a later batch.
    order = list(ds.seen)
    assert set(order[:8]) == set(range(8))
    it.close()


def test_report_has_documented_keys():
    loader = ThreadedDataLoader(RangeDataset(20), batch_size=4, num_workers=2)
    list(loader)
    r = loader.get_thread_safety_performance_report()
    for key in ("settings", "totals", "rates", "memory", "errors", "resources", "stalls", "tuning"):
        assert key in r
    assert r["totals"]["samples"] == 20 and r["totals"]["batches"] == 5
    assert r["settings"]["num_workers"] == 2 and r["memory"]["peak_bytes_in_flight"] > 0
    assert 0.0 <= r["rates"]["wait_fraction"] <= 1.0


def test_pin_memory_without_cuda_warns_and_still_loads():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning is real")
    with pytest.warns(UserWarning, match="pin_memory"):
        loader = ThreadedDataLoader(RangeDataset(4), batch_size=2, pin_memory=True)
    assert _as_lists(loader) == [[0, 1], [2, 3]]


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_workers": -1}, ValueError, "num_workers=-1"),
        ({"num_workers": 1.5}, ValueError, "num_workers=1.5"),
        ({"num_workers": 2, "prefetch_factor": 0}, ValueError, "prefetch_factor=0"),
        ({"batch_size": 0}, ValueError, "batch_size=0"),
        ({"executor": "fiber"}, ValueError, "executor='fiber'"),
        ({"on_error": "ignore"}, ValueError, "on_error='ignore'"),
        ({"max_retries": -2}, ValueError, "max_retries=-2"),
        ({"timeout": -1}, ValueError, "timeout=-1"),
        ({"stall_timeout": 0}, ValueError, "stall_timeout=0"),
        ({"seed": -5}, ValueError, "seed=-5"),
        ({"cuda_streams": 0}, ValueError, "cuda_streams=0"),
        ({"memory_budget": "lots"}, ValueError, "memory_budget='lots'"),
        ({"device": "gpu7"}, ValueError, "device='gpu7'"),
        ({"shuffle": True, "sampler": [0, 1]}, ValueError, "shuffle=True"),
        ({"batch_sampler": [[0]], "batch_size": 2}, ValueError, "batch_sampler"),
        ({"batch_size": None, "drop_last": True}, ValueError, "drop_last=True"),
        ({"persistent_workers": True}, ValueError, "persistent_workers=True"),
        ({"collate_fn": 3}, TypeError, "collate_fn=3"),
        ({"distributed": "maybe"}, ValueError, "distributed='maybe'"),
    ],
)
def test_bad_arguments_are_rejected_with_the_argument_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ThreadedDataLoader(RangeDataset(4), **kwargs)


def test_non_dataset_is_rejected():
    with pytest.raises(TypeError, match="dataset="):
        ThreadedDataLoader(42)


def test_shuffle_with_iterable_dataset_is_rejected():
    with pytest.raises(ValueError, match="shuffle=True"):
        ThreadedDataLoader(_Stream(3), shuffle=True)


def test_counts_are_exact_under_many_threads():
    ds = RecordingDataset(500)
    loader = ThreadedDataLoader(ds, batch_size=7, shuffle=True, num_workers=16, seed=0,
                                in_order=False)
    got = flat_indices(list(loader))
    assert collections.Counter(got) == collections.Counter(range(500))
    assert collections.Counter(ds.seen) == collections.Counter(range(500))


# --------------------------------------------------------------------------- "auto"


@pytest.mark.parametrize("batch_size", [3, 16])
def test_auto_settings_keep_the_probed_samples_and_the_exact_batches(batch_size):
    ds = AugmentedDataset(40, max_delay_ms=1.0)
    ref = list(ThreadedDataLoader(ds, batch_size=batch_size, shuffle=True, seed=4))
    loader = ThreadedDataLoader(ds, batch_size=batch_size, shuffle=True, seed=4,
                                num_workers="auto", prefetch_factor="auto", executor="auto")
    got = list(loader)
    assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in ref]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(got, ref))
    report = loader.get_thread_safety_performance_report()
    assert report["probe"]["executor"] in ("thread", "process")
    assert isinstance(report["settings"]["num_workers"], int)
    # the probe's 8 samples were not loaded twice
    assert report["totals"]["samples"] == 40


def test_a_failing_sample_inside_the_probe_window_gets_the_error_policy():
    ds = FailingDataset(20, {2})
    loader = ThreadedDataLoader(ds, batch_size=4, num_workers="auto", on_error="skip")
    assert _as_lists(loader) == [[0, 1, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15],
                                 [16, 17, 18, 19]]
    report = loader.get_thread_safety_performance_report()
    assert report["probe"]["evidence"]["online"] is True  # the probe ran inside the pool
    assert report["errors"]["skipped_indices"] == [2]


# ------------------------------------------------------------------ intra-op threads


class _ThreadCountDataset(Dataset):
    """Records torch.get_num_threads() as seen inside each sample load."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: list[int] = []
        self._lock = threading.Lock()  # guards seen (several worker threads)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        with self._lock:
            self.seen.append(torch.get_num_threads())
        return i


def test_worker_threads_run_torch_on_one_intra_op_thread_and_leave_others_alone():
    from lightning_threadsafe import _intraop

    if _intraop._omp_setter() is None:  # pragma: no cover - a torch without OpenMP
        pytest.skip("no OpenMP runtime found: the limit is a documented no-op")
    before = torch.get_num_threads()
    ds = _ThreadCountDataset(32)
    list(ThreadedDataLoader(ds, batch_size=4, num_workers=3))
    assert set(ds.seen) == {1}  # like torch's worker processes
    assert torch.get_num_threads() == before  # the consumer thread is untouched
    # threads created afterwards start from the process-wide default, not from 1
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()), name="fresh")
    t.start()
    t.join()
    assert fresh == [before]


def test_worker_init_fn_runs_after_the_limit_and_may_change_it():
    ds = _ThreadCountDataset(8)
    loader = ThreadedDataLoader(ds, batch_size=4, num_workers=1,
                                worker_init_fn=lambda wid: torch.set_num_threads(2))
    before = torch.get_num_threads()
    try:
        list(loader)
    finally:
        torch.set_num_threads(before)  # set_num_threads also moved the process default
    assert set(ds.seen) == {2}
