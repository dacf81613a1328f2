"""CudaStreamScheduler: passthrough, nested batches, stream/event ordering, concurrency.

The ordering logic is tested on CPU with ``FakeBackend``, which records every
CUDA call in order together with the calling thread's current device and
stream. Real staging is tested only where CUDA exists (``@pytest.mark.gpu``).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
import torch

from lightning_threadsafe.cuda_stream import CudaStreamScheduler, Staged

_JOIN_S = 30.0


# --------------------------------------------------------------------------- fakes


class FakeStream:
    def __init__(self, backend: FakeBackend, name: str, device: torch.device | None) -> None:
        self.backend = backend
        self.name = name
        self.device = device

    def wait_event(self, event: FakeEvent) -> None:
        self.backend.append("wait_event", self.name, event.name)

    def synchronize(self) -> None:
        self.backend.append("stream_synchronize", self.name)

    def query(self) -> bool:
        return True


class FakeEvent:
    def __init__(self, backend: FakeBackend, name: str) -> None:
        self.backend = backend
        self.name = name

    def record(self, stream: Any = None) -> None:
        current = self.backend.current_stream_name()
        self.backend.append("event_record", self.name, stream.name, current)

    def synchronize(self) -> None:
        self.backend.append("event_synchronize", self.name)

    def query(self) -> bool:
        return True


class FakeBackend:
    """Records every call as a tuple in ``log`` (thread-safe, in call order).

    ``copy`` returns a CPU clone and remembers (source, copy); ``pin`` returns a
    clone and remembers it as pinned. Current device and stream are kept per
    thread, like CUDA's.
    """

    def __init__(self, device_count: int = 1, current_device: int = 0,
                 widen_init_race: bool = False) -> None:
        self._count = device_count
        # Set by a second caller of device_count(); the first caller waits on it
        # (bounded) to hold the scheduler's first-use window open.
        self._second_init = threading.Event() if widen_init_race else None
        self._current_device = current_device
        self._lock = threading.Lock()  # guards log, copies, counters (any test thread)
        self._tls = threading.local()  # per-thread current device and stream
        self.log: list[tuple[Any, ...]] = []
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pinned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.streams: list[FakeStream] = []
        self.in_new_stream = 0
        self.max_in_new_stream = 0
        self.consumer = FakeStream(self, "consumer", None)
        self._events = 0

    def append(self, *entry: Any) -> None:
        with self._lock:
            self.log.append(entry)

    def current_stream_name(self) -> str:
        stream = getattr(self._tls, "stream", None)
        return stream.name if stream is not None else "consumer"

    def current_device_name(self) -> str | None:
        return getattr(self._tls, "device", None)

    def calls(self, kind: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [e for e in self.log if e[0] == kind]

    # StreamBackend ------------------------------------------------------------------

    def device_count(self) -> int:
        with self._lock:
            first = not any(e[0] == "device_count" for e in self.log)
            self.log.append(("device_count",))
        if self._second_init is not None:
            if first:
                # Correct locking: no other stager can get here, the wait times
                # out. Without it, another stager arrives and releases us at once.
                self._second_init.wait(timeout=0.25)
            else:
                self._second_init.set()
        return self._count

    def current_device_index(self) -> int:
        self.append("current_device_index")
        return self._current_device

    def new_stream(self, device: torch.device) -> FakeStream:
        with self._lock:
            self.in_new_stream += 1
            self.max_in_new_stream = max(self.max_in_new_stream, self.in_new_stream)
            stream = FakeStream(self, f"side{len(self.streams)}", device)
            self.streams.append(stream)
            self.log.append(("new_stream", stream.name, str(device), self.current_device_name()))
            self.in_new_stream -= 1
        return stream

    def new_event(self) -> FakeEvent:
        with self._lock:
            self._events += 1
            event = FakeEvent(self, f"ev{self._events}")
            self.log.append(("new_event", event.name))
        return event

    def current_stream(self, device: torch.device) -> FakeStream:
        stream = getattr(self._tls, "stream", None)
        self.append("current_stream", str(device))
        return stream if stream is not None else self.consumer

    @contextmanager
    def device_context(self, device: torch.device) -> Iterator[None]:
        previous = getattr(self._tls, "device", None)
        self._tls.device = str(device)
        self.append("enter_device", str(device), threading.current_thread().name)
        try:
            yield
        finally:
            self.append("exit_device", str(device), threading.current_thread().name)
            self._tls.device = previous

    @contextmanager
    def stream_context(self, stream: FakeStream) -> Iterator[None]:
        previous = getattr(self._tls, "stream", None)
        self._tls.stream = stream
        self.append("enter_stream", stream.name, threading.current_thread().name)
        try:
            yield
        finally:
            self.append("exit_stream", stream.name, threading.current_thread().name)
            self._tls.stream = previous

    def copy(self, tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
        out = tensor.clone()
        with self._lock:
            self.copies.append((tensor, out))
            self.log.append(("copy", id(tensor), id(out), self.current_stream_name(),
                             self.current_device_name(), str(device), non_blocking,
                             threading.current_thread().name))
        return out

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.append("record_stream", id(tensor), stream.name)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        with self._lock:
            self.pinned.append((tensor, out))
            self.log.append(("pin", id(tensor), self.current_device_name()))
        return out


class Pair(NamedTuple):
    left: torch.Tensor
    tag: str


@dataclass(frozen=True)
class Box:
    value: torch.Tensor
    label: str
    extras: list[int] = field(default_factory=list)


class TaggedList(list):
    pass


def _nested_batch() -> dict[str, Any]:
    image = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    return {
        "image": image,
        "meta": {"names": ["a", "b"], "index": torch.tensor([3, 7]), "n": 2, "none": None},
        "pair": Pair(torch.ones(2, dtype=torch.bool), "left"),
        "box": Box(torch.full((2,), 5, dtype=torch.int16), "box", [1, 2]),
        "ordered": OrderedDict(z=torch.zeros(1), a="text"),
        "default": defaultdict(list, {"k": torch.tensor([1.5])}),
        "tuple": (torch.tensor(9), None, 1.5),
        "tagged": TaggedList([torch.tensor([2, 4])]),
        "alias": image,  # the same tensor twice: copied once, stays aliased
    }


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, Box):
        return [obj.value]
    return []


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(timeout=_JOIN_S)
    assert not [t.name for t in threads if t.is_alive()]


# --------------------------------------------------------------------------- passthrough


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")])
def test_disabled_scheduler_is_an_exact_passthrough(device: Any) -> None:
    fake = FakeBackend()
    threads_before = threading.active_count()
    sched = CudaStreamScheduler(device, backend=fake)
    batch = _nested_batch()

    assert not sched.enabled
    assert sched.pin(batch) is batch
    staged = sched.stage(batch, 0)
    assert staged.batch is batch
    assert staged.event is None and staged.nbytes == 0 and staged.copies == ()
    assert sched.handoff(staged) is batch
    assert sched.handoff(batch) is batch
    assert sched.stage_and_handoff(batch) is batch
    sched.close()
    sched.close()

    assert fake.log == []  # no copy, no stream, no CUDA call of any kind
    assert threading.active_count() == threads_before


def test_default_backend_passthrough_needs_no_cuda() -> None:
    sched = CudaStreamScheduler()
    batch = {"x": torch.ones(2)}
    assert sched.device is None and not sched.enabled
    assert sched.stage_and_handoff(batch) is batch


def test_constructing_for_cuda_touches_nothing() -> None:
    fake = FakeBackend()
    sched = CudaStreamScheduler("cuda:0", backend=fake)
    assert sched.enabled and sched.device == torch.device("cuda:0")
    assert fake.log == []


def test_constructing_for_cuda_does_not_initialise_cuda() -> None:
    # In a fresh interpreter: nothing may initialise CUDA before the first stage.
    code = (
        "import torch\n"
        "from lightning_threadsafe.cuda_stream import CudaStreamScheduler\n"
        "s = CudaStreamScheduler('cuda:0', num_streams=4)\n"
        "s.close()\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- structures


def test_nested_batch_every_tensor_copied_once_structure_preserved() -> None:
    fake = FakeBackend()
    sched = CudaStreamScheduler("cuda:0", backend=fake)
    batch = _nested_batch()
    distinct = {id(t): t for t in _tensors(batch)}

    staged = sched.stage(batch, 0)
    out = sched.handoff(staged)

    copied_sources = [id(src) for src, _ in fake.copies]
    assert sorted(copied_sources) == sorted(distinct)  # each distinct tensor exactly once
    copy_ids = {id(dst) for _, dst in fake.copies}
    assert all(id(t) in copy_ids for t in _tensors(out))  # every output tensor is a copy
    assert staged.nbytes == sum(t.numel() * t.element_size() for t in distinct.values())
    assert staged.transfer_s >= 0.0

    # Types preserved.
    assert type(out) is dict
    assert type(out["pair"]) is Pair and out["pair"].tag == "left"
    assert type(out["box"]) is Box and out["box"].label == "box"
    assert type(out["ordered"]) is OrderedDict and list(out["ordered"]) == ["z", "a"]
    assert type(out["default"]) is defaultdict and out["default"].default_factory is list
    assert type(out["tuple"]) is tuple and type(out["tagged"]) is TaggedList
    # Non-tensors are the very same objects; tensor-free containers are not rebuilt.
    assert out["meta"]["names"] is batch["meta"]["names"]
    assert out["box"].extras is batch["box"].extras
    assert out["ordered"]["a"] is batch["ordered"]["a"]
    assert out["tuple"][1:] == (None, 1.5) and out["meta"]["none"] is None
    # Aliases stay aliased; values equal; the input batch is untouched.
    assert out["alias"] is out["image"]
    for src, dst in zip(_tensors(batch), _tensors(out)):
        assert dst is not src and torch.equal(dst, src) and dst.dtype == src.dtype
    assert batch["image"] is batch["alias"] and batch["box"].value.dtype == torch.int16


def test_batch_without_tensors_is_staged_without_an_event() -> None:
    fake = FakeBackend()
    sched = CudaStreamScheduler("cuda:0", backend=fake)
    batch = {"names": ["a"], "n": 1}
    staged = sched.stage(batch, 0)
    assert staged.batch is batch and staged.event is None
    assert sched.handoff(staged) is batch
    assert fake.calls("copy") == [] and fake.calls("wait_event") == []


def test_pin_pins_each_cpu_tensor_once_inside_the_device_context() -> None:
    fake = FakeBackend()
    sched = CudaStreamScheduler("cuda:0", backend=fake)
    batch = _nested_batch()
    pinned = sched.pin(batch)
    assert sorted(id(s) for s, _ in fake.pinned) == sorted({id(t) for t in _tensors(batch)})
    assert all(dev == "cuda:0" for _, _, dev in fake.calls("pin"))
    assert pinned["alias"] is pinned["image"] and type(pinned["box"]) is Box

    unpinned = CudaStreamScheduler("cuda:0", pin_memory=False, backend=FakeBackend())
    assert unpinned.pin(batch) is batch


# --------------------------------------------------------------------------- ordering


def _check_stage_order(fake: FakeBackend, staged: Staged[Any], stream: str) -> None:
    """Copies of this batch inside ``stream``'s context, then its event, on that stream."""
    log = fake.log
    copy_ids = {id(t) for t in staged.copies}
    copy_pos = [i for i, e in enumerate(log) if e[0] == "copy" and e[2] in copy_ids]
    assert len(copy_pos) == len(copy_ids) > 0
    for i in copy_pos:
        _, _, _, cur_stream, cur_device, target, non_blocking, _ = log[i]
        assert (cur_stream, cur_device, target, non_blocking) == (stream, "cuda:0", "cuda:0", True)
    (record_pos,) = [i for i, e in enumerate(log)
                     if e[0] == "event_record" and e[1] == staged.event.name]
    assert log[record_pos][2:] == (stream, stream)  # recorded on, and inside, the side stream
    assert record_pos > max(copy_pos)


def test_copies_then_event_on_side_stream_and_wait_before_record_stream() -> None:
    fake = FakeBackend()
    sched = CudaStreamScheduler("cuda:0", num_streams=2, backend=fake)
    results: dict[int, Staged[Any]] = {}

    def worker() -> None:  # stage in a worker thread, as the loader does
        for ordinal in range(4):
            results[ordinal] = sched.stage(_nested_batch(), ordinal)

    t = threading.Thread(target=worker, name="lts-test-stager-0", daemon=True)
    t.start()
    _join([t])

    for ordinal, staged in sorted(results.items()):
        assert staged.stream_index == ordinal % 2
        _check_stage_order(fake, staged, f"side{ordinal % 2}")

        mark = len(fake.log)
        out = sched.handoff(staged)
        tail = fake.log[mark:]
        assert out is staged.batch
        waits = [i for i, e in enumerate(tail) if e[0] == "wait_event"]
        records = [i for i, e in enumerate(tail) if e[0] == "record_stream"]
        # The consumer's own stream waits on this batch's event, once, before
        # any record_stream and before handoff returns.
        assert [tail[i][1:] for i in waits] == [("consumer", staged.event.name)]
        assert records and min(records) > waits[0]
        assert sorted(tail[i][1] for i in records) == sorted(id(c) for c in staged.copies)
        assert all(tail[i][2] == "consumer" for i in records)


def test_streams_assigned_round_robin() -> None:
    fake = FakeBackend()
    sched = CudaStreamScheduler("cuda:0", num_streams=3, backend=fake)
    staged = [sched.stage({"x": torch.ones(1)}, ordinal) for ordinal in range(7)]
    assert [s.stream_index for s in staged] == [0, 1, 2, 0, 1, 2, 0]
    used = [e[3] for e in fake.calls("copy")]
    assert used == ["side0", "side1", "side2", "side0", "side1", "side2", "side0"]

    # stage_and_handoff numbers its own batches.
    fake2 = FakeBackend()
    sched2 = CudaStreamScheduler("cuda:0", num_streams=2, backend=fake2)
    for _ in range(4):
        sched2.stage_and_handoff({"x": torch.ones(1)})
    assert [e[3] for e in fake2.calls("copy")] == ["side0", "side1", "side0", "side1"]
    assert len(fake2.calls("wait_event")) == 4


def test_concurrent_first_stage_creates_streams_once() -> None:
    fake = FakeBackend(widen_init_race=True)
    sched = CudaStreamScheduler("cuda:0", num_streams=3, backend=fake)
    n = 8
    barrier = threading.Barrier(n, timeout=_JOIN_S)  # releases all stagers at once
    results: dict[int, Staged[Any]] = {}
    errors: list[BaseException] = []

    def worker(ordinal: int) -> None:
        try:
            barrier.wait()
            results[ordinal] = sched.stage({"x": torch.full((4,), ordinal)}, ordinal)
        except BaseException as exc:  # carried to the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), name=f"lts-test-stager-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    _join(threads)

    assert errors == []
    assert len(fake.streams) == 3 and fake.max_in_new_stream == 1
    assert len(fake.calls("device_count")) == 1
    assert all(e[3] == "cuda:0" for e in fake.calls("new_stream"))  # created on the device
    for ordinal, staged in results.items():
        _check_stage_order(fake, staged, f"side{ordinal % 3}")
        assert torch.equal(staged.batch["x"], torch.full((4,), ordinal))


# --------------------------------------------------------------------------- lifecycle, devices, args


def test_close_is_idempotent_and_staged_batches_survive_it() -> None:
    fake = FakeBackend()
    with CudaStreamScheduler("cuda:0", backend=fake) as sched:
        staged = sched.stage({"x": torch.ones(2)}, 0)
    sched.close()
    assert sched.handoff(staged) is staged.batch
    assert len(fake.calls("wait_event")) == 1
    with pytest.raises(RuntimeError, match="closed"):
        sched.stage({"x": torch.ones(2)}, 1)
    with pytest.raises(RuntimeError, match="closed"):
        sched.pin({"x": torch.ones(2)})


def test_closed_disabled_scheduler_rejects_new_work() -> None:
    sched = CudaStreamScheduler(None)
    sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        sched.stage_and_handoff({"x": 1})


def test_unindexed_cuda_resolves_to_the_callers_current_device() -> None:
    fake = FakeBackend(device_count=2, current_device=1)
    sched = CudaStreamScheduler("cuda", backend=fake)
    staged = sched.stage({"x": torch.ones(1)}, 0)
    assert sched.device == torch.device("cuda:1")
    (entry,) = fake.calls("copy")
    assert entry[4:6] == ("cuda:1", "cuda:1")
    assert sched.handoff(staged) is staged.batch
    assert fake.calls("current_stream") == [("current_stream", "cuda:1")]


def test_missing_cuda_device_fails_at_first_use_naming_the_device() -> None:
    no_cuda = CudaStreamScheduler("cuda:0", backend=FakeBackend(device_count=0))
    with pytest.raises(RuntimeError, match=r"device='cuda:0'.*not available"):
        no_cuda.stage({"x": torch.ones(1)}, 0)
    too_high = CudaStreamScheduler("cuda:3", backend=FakeBackend(device_count=2))
    with pytest.raises(RuntimeError, match=r"device='cuda:3'.*2 CUDA device"):
        too_high.pin({"x": torch.ones(1)})


@pytest.mark.parametrize("num_streams", [0, -1])
def test_bad_num_streams_raises_value_error(num_streams: int) -> None:
    with pytest.raises(ValueError, match=rf"num_streams={num_streams}\b.*positive int"):
        CudaStreamScheduler("cuda:0", num_streams=num_streams)


@pytest.mark.parametrize("device", ["bogus", "cuda:x", ""])
def test_bad_device_string_raises_value_error(device: str) -> None:
    with pytest.raises(ValueError, match=r"device=.*must be a device string"):
        CudaStreamScheduler(device)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"num_streams": True}, "num_streams"), ({"num_streams": 1.5}, "num_streams"),
     ({"device": 3.5}, "device"), ({"pin_memory": "yes"}, "pin_memory")],
)
def test_wrong_argument_types_raise_type_error(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name}="):
        CudaStreamScheduler(**kwargs)


def test_bad_ordinal_raises_type_error() -> None:
    sched = CudaStreamScheduler("cuda:0", backend=FakeBackend())
    with pytest.raises(TypeError, match="ordinal="):
        sched.stage({"x": torch.ones(1)}, "0")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_staging_matches_plain_to_device() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    sched = CudaStreamScheduler(device, num_streams=2)
    resident = torch.arange(5, device=device)
    host = {
        "image": torch.randn(4, 1, 32, 32, 32),
        "mask": torch.randint(0, 255, (4, 32, 32), dtype=torch.uint8),
        "pair": Pair(torch.rand(3) > 0.5, "tag"),
        "box": Box(torch.arange(6, dtype=torch.int16), "b"),
        "resident": resident,
        "names": ["a", "b", "c", "d"],
    }
    expected = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in host.items()}
    staged_holder: dict[str, Staged[Any]] = {}

    def worker() -> None:  # pin and stage in a worker thread, hand off on this one
        staged_holder["s"] = sched.stage(sched.pin(host), 0)

    t = threading.Thread(target=worker, name="lts-test-gpu-stager", daemon=True)
    t.start()
    _join([t])
    out = sched.handoff(staged_holder["s"])

    assert out["resident"] is resident  # already on the device: not copied
    assert out["names"] is host["names"]
    for key in ("image", "mask"):
        assert out[key].device == device and torch.equal(out[key], expected[key])
    assert type(out["pair"]) is Pair and torch.equal(out["pair"].left, host["pair"].left.to(device))
    assert type(out["box"]) is Box and torch.equal(out["box"].value, host["box"].value.to(device))
    again = sched.stage_and_handoff(host)
    assert torch.equal(again["image"], expected["image"])
    torch.cuda.synchronize(device)
    sched.close()
