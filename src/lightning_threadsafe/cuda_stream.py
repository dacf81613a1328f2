"""Host-to-device staging of batches on side CUDA streams.

The loader's worker threads collate a batch, :meth:`CudaStreamScheduler.pin` it
and :meth:`CudaStreamScheduler.stage` it: every tensor is copied with
``non_blocking=True`` on side stream ``ordinal % num_streams`` and an event is
recorded on that stream after the copies. The consumer thread calls
:meth:`CudaStreamScheduler.handoff` right before the training step: its current
stream waits on the event (a device-side wait; the host does not block), so the
copy of batch N+k overlaps the compute of step N and no kernel queued after the
handoff can read a tensor before its copy has landed.

The consumer waits on the batch's *event*, not on the whole side stream
(``wait_stream``), so a step never waits for the copies of later batches that
other workers have already queued on the same stream.

Allocator lifetime: ``record_stream`` at handoff
-------------------------------------------------
A staged tensor is allocated by the caching allocator on the side stream. If the
training step dropped its last reference while kernels reading it were still
queued on the consumer stream, the allocator could hand the block to the next
copy on the side stream and that copy would overwrite data the step has not
read yet. :meth:`~CudaStreamScheduler.handoff` therefore calls
``tensor.record_stream(consumer_stream)`` on every tensor it staged; the
allocator then reuses the block only after the work queued on the consumer
stream up to the moment of the free has completed.

The alternative, preallocated slots reused under events (FFCV), was rejected:

* batches here are arbitrary nested structures whose shapes and dtypes change
  from batch to batch (random crops, variable-length samples), so fixed slots
  would have to be sized for the largest batch and held for the whole run;
* explicit slot reuse is only correct if nothing outlives the step: a step that
  keeps a reference (``self.last_batch = batch``, logging, an EMA of inputs)
  would see its tensors overwritten. ``record_stream`` ties reuse to the
  tensor's real lifetime, so retained references stay valid.

The known cost of ``record_stream`` -- freed blocks stay reserved while the
consumer stream lags, which grows memory without bound when the CPU runs far
ahead -- is bounded here: look-ahead is limited by the loader's prefetch depth
and by the memory governor's budget (it accounts the bytes of every batch in
flight; :attr:`Staged.nbytes` is the device share), and blocks are held only
until the consumer stream passes the step that used them.

Host buffers
------------
``stage()`` returns once the copies are *issued*. :meth:`~CudaStreamScheduler.pin`
returns a pinned *copy* of a pageable tensor, so the caller may overwrite its
own pageable buffers as soon as ``pin()`` returns; a pageable tensor staged
without pinning has been read when ``stage()`` returns (CUDA stages pageable
sources through its own pinned buffer before the asynchronous copy returns).
A tensor that was *already pinned* by the caller (a recycled pinned ring
buffer) is read asynchronously: it must not be written until
``staged.event.synchronize()`` has returned (or ``event.query()`` is true).
Freeing it early is safe: torch's pinned-memory allocator keeps the block until
the copy completes.

Devices
-------
Nothing touches CUDA until an enabled scheduler first pins or stages, so a
scheduler can be built before forking and before the device is set. Worker
threads start on ``cuda:0`` whatever device the main thread selected, so all
stream work runs inside ``device_context(self.device)``. An unindexed
``"cuda"`` is resolved, at that first use, to the current device of the calling
thread; pass an indexed device (Lightning's ``strategy.root_device`` is one)
when a worker thread may be the first caller.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

__all__ = [
    "CudaStreamScheduler",
    "EventLike",
    "Staged",
    "StreamBackend",
    "StreamLike",
    "TorchCudaBackend",
]

T = TypeVar("T")


class EventLike(Protocol):
    """The part of ``torch.cuda.Event`` the scheduler uses."""

    def record(self, stream: Any = None) -> None: ...

    def synchronize(self) -> None: ...

    def query(self) -> bool: ...


class StreamLike(Protocol):
    """The part of ``torch.cuda.Stream`` the scheduler uses."""

    def wait_event(self, event: Any) -> None: ...

    def synchronize(self) -> None: ...

    def query(self) -> bool: ...


class StreamBackend(Protocol):
    """Every CUDA call the scheduler makes, so its ordering can be tested on CPU.

    :class:`TorchCudaBackend` wraps ``torch.cuda``; tests inject a fake that
    records the calls. All methods may be called from several threads at once.
    """

    def device_count(self) -> int: ...

    def current_device_index(self) -> int: ...

    def new_stream(self, device: torch.device) -> StreamLike: ...

    def new_event(self) -> EventLike: ...

    def current_stream(self, device: torch.device) -> StreamLike: ...

    def device_context(self, device: torch.device) -> AbstractContextManager[Any]: ...

    def stream_context(self, stream: StreamLike) -> AbstractContextManager[Any]: ...

    def copy(self, tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor: ...

    def record_stream(self, tensor: torch.Tensor, stream: StreamLike) -> None: ...

    def pin(self, tensor: torch.Tensor) -> torch.Tensor: ...


class TorchCudaBackend:
    """The real backend: thin wrappers over ``torch.cuda``."""

    def device_count(self) -> int:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def current_device_index(self) -> int:
        return torch.cuda.current_device()

    def new_stream(self, device: torch.device) -> StreamLike:
        return torch.cuda.Stream(device=device)

    def new_event(self) -> EventLike:
        return torch.cuda.Event()

    def current_stream(self, device: torch.device) -> StreamLike:
        return torch.cuda.current_stream(device)

    def device_context(self, device: torch.device) -> AbstractContextManager[Any]:
        return torch.cuda.device(device)

    def stream_context(self, stream: StreamLike) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)  # type: ignore[arg-type]

    def copy(self, tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
        return tensor.to(device, non_blocking=non_blocking)

    def record_stream(self, tensor: torch.Tensor, stream: StreamLike) -> None:
        tensor.record_stream(stream)  # type: ignore[arg-type]

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_pinned() else tensor.pin_memory()


@dataclass(frozen=True, eq=False)
class Staged(Generic[T]):
    """A batch whose host-to-device copies have been issued but not handed off.

    Do not read :attr:`batch` on the consumer before
    :meth:`CudaStreamScheduler.handoff`: until then the copies may still be in
    flight. Dropping a ``Staged`` without handing it off is safe (its device
    memory was allocated on the stream that copies into it).

    Attributes:
        batch: the batch with every copied tensor replaced by its device copy.
        event: recorded on the side stream after the copies; ``None`` when
            nothing was copied.
        nbytes: bytes copied to the device (tensors already there not counted).
        transfer_s: wall seconds the staging thread spent issuing the copies.
        stream_index: the side stream used (``ordinal % num_streams``), or
            ``None`` when nothing was copied.
        copies: the device tensors this staging allocated (each distinct
            tensor once); :meth:`CudaStreamScheduler.handoff` records them on
            the consumer stream.
    """

    batch: T
    event: EventLike | None = None
    nbytes: int = 0
    transfer_s: float = 0.0
    stream_index: int | None = None
    copies: tuple[torch.Tensor, ...] = field(default=(), repr=False)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Rebuild ``obj`` with ``fn`` applied to each tensor it contains.

    Handles dicts (and other mappings), lists, tuples, namedtuples and
    dataclass instances, nested to any depth; everything else is returned as
    is. A container none of whose leaves changed is returned itself (identity),
    so structures without tensors cost no allocation.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (str, bytes, int, float, type(None))):
        return obj
    if isinstance(obj, Mapping):
        items = [(k, _map_tensors(v, fn)) for k, v in obj.items()]
        if all(new is old for (_, new), old in zip(items, obj.values())):
            return obj
        if type(obj) is dict:
            return dict(items)
        if isinstance(obj, MutableMapping):
            out = copy.copy(obj)  # keeps the subclass and its state (defaultdict's factory)
            for k, v in items:
                out[k] = v
            return out
        return type(obj)(items)  # type: ignore[call-arg]
    if isinstance(obj, (list, tuple)):
        items = [_map_tensors(v, fn) for v in obj]
        if all(new is old for new, old in zip(items, obj)):
            return obj
        if type(obj) is list:
            return items
        if type(obj) is tuple:
            return tuple(items)
        if isinstance(obj, tuple):
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        out_list = copy.copy(obj)  # list subclass: keep its type and attributes
        out_list[:] = items
        return out_list
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changed = {}
        for f in dataclasses.fields(obj):
            old = getattr(obj, f.name, None)
            new = _map_tensors(old, fn)
            if new is not old:
                changed[f.name] = new
        if not changed:
            return obj
        out = copy.copy(obj)  # shallow: no __init__/__post_init__ re-run
        for name, value in changed.items():
            object.__setattr__(out, name, value)  # also for frozen dataclasses
        return out
    return obj


class CudaStreamScheduler:
    """Stages batches onto a CUDA device on side streams, with correct ordering.

    Worker threads call :meth:`pin` and :meth:`stage`; the consumer thread calls
    :meth:`handoff` right before the training step. Sources that are not ours
    (a plain ``DataLoader``) use :meth:`stage_and_handoff`. The scheduler
    starts no threads; it runs in its callers' threads.

    Guarantees:
        * Disabled (``device`` is ``None`` or not CUDA): :meth:`pin`,
          :meth:`handoff` and :meth:`stage_and_handoff` return their argument
          itself and ``stage(b).batch is b``; no copy, no thread, no CUDA call.
        * Every tensor of a batch is copied exactly once (aliases stay aliased);
          tensors already on ``device`` and non-tensors are passed through;
          containers keep their types.
        * For each staged batch: copies are enqueued on side stream
          ``ordinal % num_streams`` before its event is recorded there, and
          :meth:`handoff` makes the consumer's current stream wait on that
          event before it returns the batch.
        * A staged tensor's memory is not reused before the work queued on the
          consumer stream before its free has completed (``record_stream``).
        * Side streams are created once per scheduler, lazily, at the first
          :meth:`pin` or :meth:`stage` (concurrent first calls included).

    Args:
        device: target device; ``None`` or a non-CUDA device disables staging.
        num_streams: side streams, assigned round robin by batch ordinal.
        pin_memory: whether :meth:`pin` pins CPU tensors.
        backend: the CUDA API to use; defaults to :class:`TorchCudaBackend`.

    Raises:
        ValueError: ``num_streams`` < 1, or ``device`` is not a device string.
        TypeError: an argument has the wrong type.

    Example::

        sched = CudaStreamScheduler("cuda:0", num_streams=2)
        staged = sched.stage(sched.pin(batch), ordinal=i)   # worker thread
        batch = sched.handoff(staged)                        # consumer thread
        loss = model(batch["image"])
        sched.close()
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        num_streams: int = 2,
        pin_memory: bool = True,
        backend: StreamBackend | None = None,
    ) -> None:
        if isinstance(num_streams, bool) or not isinstance(num_streams, int):
            raise TypeError(f"num_streams={num_streams!r} must be a positive int")
        if num_streams < 1:
            raise ValueError(f"num_streams={num_streams!r} must be a positive int")
        if not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory={pin_memory!r} must be a bool")
        self.device: torch.device | None = _parse_device(device)
        self.enabled: bool = self.device is not None and self.device.type == "cuda"
        self.num_streams = num_streams
        self.pin_memory = pin_memory
        self._backend: StreamBackend = backend if backend is not None else TorchCudaBackend()
        # Guards first-use initialisation (device resolution, _ready), _closed
        # and _next_ordinal. Held briefly by the first stager (while it creates the
        # streams), by close() and by stage_and_handoff(); concurrent first stagers
        # wait on it. Never held while waiting on anything else.
        self._lock = threading.Lock()
        # (resolved device, side streams): written once under _lock, read without
        # it (one reference load, atomic also on free-threaded Python, and the
        # tuple is complete before it is published). None until first use and
        # after close().
        self._ready: tuple[torch.device, tuple[StreamLike, ...]] | None = None
        self._closed = False
        self._next_ordinal = 0
        # One per side stream: guards the contiguous enqueue of one batch's copies
        # and its event on that stream, so a batch's event does not also cover
        # copies of another batch. Held by one stager for the issue time only
        # (non-blocking enqueues; a pageable copy may wait for earlier copies on
        # the same stream, which always complete); other stagers of that stream
        # wait.
        self._issue_locks = tuple(threading.Lock() for _ in range(num_streams))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(device={self.device!r}, num_streams={self.num_streams}, "
                f"pin_memory={self.pin_memory}, enabled={self.enabled})")

    def __enter__(self) -> CudaStreamScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pin(self, batch: T) -> T:
        """Pin every CPU tensor of ``batch`` (worker thread).

        Returns ``batch`` itself when disabled or ``pin_memory=False``. Pageable
        tensors are replaced by pinned copies, so the caller may reuse its own
        buffers once this returns; already pinned tensors are kept.

        Raises:
            RuntimeError: the scheduler is closed, or the CUDA device is missing.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if not self.enabled or not self.pin_memory:
            return batch
        device = self._ensure_ready()[0]
        backend = self._backend

        def pin_one(t: torch.Tensor) -> torch.Tensor:
            return backend.pin(t) if t.device.type == "cpu" else t

        # Pinned memory is tied to a device context: outside it a worker thread
        # would create a context on cuda:0 (every DDP rank on GPU 0).
        with backend.device_context(device):
            return _map_tensors(batch, _memoized(pin_one))

    def stage(self, batch: T, ordinal: int) -> Staged[T]:
        """Issue the host-to-device copies of ``batch`` on a side stream (worker thread).

        Args:
            batch: any nested structure of tensors and other objects.
            ordinal: the batch's position in the epoch; picks the side stream
                ``ordinal % num_streams``.

        Returns:
            A :class:`Staged` handle to pass to :meth:`handoff`. When disabled,
            or when nothing needs copying, ``Staged(batch)`` with the batch itself.

        Raises:
            RuntimeError: the scheduler is closed, or the CUDA device is missing.
            TypeError: ``ordinal`` is not an int.
        """
        if isinstance(ordinal, bool) or not isinstance(ordinal, int):
            raise TypeError(f"ordinal={ordinal!r} must be an int")
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if not self.enabled:
            return Staged(batch)
        device, streams = self._ensure_ready()
        index = ordinal % self.num_streams
        stream = streams[index]
        backend = self._backend
        copies: list[torch.Tensor] = []

        def copy_one(t: torch.Tensor) -> torch.Tensor:
            if t.device == device:
                return t
            out = backend.copy(t, device, True)
            copies.append(out)
            return out

        with self._issue_locks[index]:
            start = time.perf_counter()
            # The stream context must be built inside the device context (it reads
            # the current device when constructed).
            with backend.device_context(device), backend.stream_context(stream):
                staged_batch = _map_tensors(batch, _memoized(copy_one))
                if not copies:
                    return Staged(batch)
                event = backend.new_event()
                event.record(stream)
            transfer_s = time.perf_counter() - start
        nbytes = sum(t.numel() * t.element_size() for t in copies)
        return Staged(staged_batch, event, nbytes, transfer_s, index, tuple(copies))

    def handoff(self, staged: Staged[T] | T) -> T:
        """Make the batch safe to use on this thread's current stream (consumer thread).

        The current stream waits on the batch's event (the host does not block);
        then each staged tensor is ``record_stream``-ed on it so its memory
        outlives the kernels queued there. Works after :meth:`close` too, so
        batches already staged can be finished.

        Args:
            staged: a :class:`Staged` from this scheduler's :meth:`stage`;
                anything else is returned as is.

        Returns:
            The device batch (``staged.batch``), or ``staged`` itself when it is
            not a :class:`Staged`.
        """
        if not isinstance(staged, Staged):
            return staged
        if staged.event is None:
            return staged.batch
        # An event exists only if stage() ran on an enabled scheduler, which
        # resolved self.device first.
        consumer = self._backend.current_stream(self.device)  # type: ignore[arg-type]
        consumer.wait_event(staged.event)
        for t in staged.copies:
            self._backend.record_stream(t, consumer)
        return staged.batch

    def stage_and_handoff(self, batch: T) -> T:
        """Stage ``batch`` and hand it off at once (consumer thread).

        For sources that are not ours (a plain ``DataLoader``): the copy still
        runs on a side stream, ordered before the current stream's next kernels,
        without blocking the host. Returns ``batch`` itself when disabled.

        Raises:
            RuntimeError: the scheduler is closed.
        """
        with self._lock:
            ordinal = self._next_ordinal
            self._next_ordinal += 1
        staged = self.stage(batch, ordinal)
        return self.handoff(staged)

    def close(self) -> None:
        """Drop the side streams; later :meth:`pin`/:meth:`stage` calls raise. Idempotent.

        Does not block. Batches already staged stay valid and can still be
        handed off.
        """
        with self._lock:
            self._closed = True
            self._ready = None

    def _ensure_ready(self) -> tuple[torch.device, tuple[StreamLike, ...]]:
        """Resolve the device and create the side streams, once (double-checked)."""
        ready = self._ready
        if ready is not None:
            return ready
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._ready is None:
                device = self._resolve_device()
                with self._backend.device_context(device):
                    streams = tuple(self._backend.new_stream(device) for _ in range(self.num_streams))
                self._ready = (device, streams)
            return self._ready

    def _resolve_device(self) -> torch.device:
        """Called under ``_lock`` at first use: check the device, fix its index."""
        device = self.device
        if device is None:  # unreachable: only enabled schedulers get here
            raise RuntimeError("a disabled CudaStreamScheduler has no device")
        count = self._backend.device_count()
        if count == 0:
            raise RuntimeError(f"device={str(device)!r} was requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", self._backend.current_device_index())
            self.device = device
        if device.index >= count:
            raise RuntimeError(
                f"device={str(device)!r} was requested but only {count} CUDA device(s) exist"
            )
        return device


def _memoized(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` applied once per distinct tensor object, so aliases stay aliased."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def wrapped(t: torch.Tensor) -> torch.Tensor:
        hit = seen.get(id(t))
        if hit is None:
            hit = seen[id(t)] = (t, fn(t))  # keeps t alive so its id is not reused
        return hit[1]

    return wrapped


def _parse_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device={device!r} must be a device string like 'cuda:0', a torch.device or None")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device={device!r} must be a device string like 'cuda', 'cuda:0' or 'cpu', or None"
        ) from None
