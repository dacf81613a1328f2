"""``LoaderConfig``: the loader's knobs as a YAML-friendly dataclass, and validation.

Every check raises ``ValueError``/``TypeError`` naming the field, its value and
what is allowed, e.g. ``prefetch_factor=0 must be a positive int or 'auto'``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["LoaderConfig", "check_loader_args", "parse_size"]

ExecutorName = Literal["thread", "process", "auto"]
ErrorPolicy = Literal["raise", "skip", "retry"]

EXECUTORS = ("thread", "process", "auto")
ERROR_POLICIES = ("raise", "skip", "retry")

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str | None, *, name: str = "memory_budget") -> int | float | None:
    """Parse a memory size.

    Returns ``None`` for ``None``/``"none"``/``"off"``; an ``int`` byte count for
    ints (>= 1), strings such as ``"4GiB"``, ``"512MB"``, ``"1048576"``; a
    ``float`` in (0, 1] for a fraction of available memory (``0.25`` or ``"25%"``);
    ``"auto"`` is returned unchanged by callers before reaching here.

    Raises:
        ValueError: naming ``name`` and the value, for anything else.
    """
    allowed = (
        "bytes as a positive int, a size string like '4GiB' or '512MB', a fraction "
        "of available memory in (0, 1] like 0.25 or '25%', or None"
    )
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be {allowed}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name}={value!r} must be {allowed}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} must be {allowed}")
        if value <= 1:
            return value
        if not value.is_integer():
            raise ValueError(f"{name}={value!r} must be {allowed}")
        return int(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("none", "off", "null"):
            return None
        if s.endswith("%"):
            try:
                frac = float(s[:-1]) / 100.0
            except ValueError:
                raise ValueError(f"{name}={value!r} must be {allowed}") from None
            if not (0 < frac <= 1):
                raise ValueError(f"{name}={value!r} must be {allowed}")
            return frac
        m = _SIZE_RE.match(s)
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"{name}={value!r} must be {allowed}")
        n = float(m.group(1)) * _UNITS[m.group(2)]
        if n < 1:
            raise ValueError(f"{name}={value!r} must be {allowed}")
        return int(n)
    raise TypeError(f"{name}={value!r} must be {allowed}")


def check_int(name: str, value: Any, *, minimum: int, auto: bool = False, none: bool = False) -> None:
    """Raise unless ``value`` is an int >= ``minimum`` (or 'auto'/None when allowed)."""
    if auto and value == "auto":
        return
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        extra = (" or 'auto'" if auto else "") + (" or None" if none else "")
        raise ValueError(f"{name}={value!r} must be {kind}{extra}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(repr(c) for c in choices)}")


def check_timeout(name: str, value: Any, *, none: bool = True, zero: bool = True) -> None:
    if none and value is None:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > 0 or (zero and value == 0))
    )
    if not ok:
        allowed = "a number of seconds " + (">= 0" if zero else "> 0") + (" or None" if none else "")
        raise ValueError(f"{name}={value!r} must be {allowed}")


def _is_iterable_dataset(dataset: Any) -> bool:
    from torch.utils.data import IterableDataset

    return isinstance(dataset, IterableDataset) or (
        not hasattr(dataset, "__getitem__") and hasattr(dataset, "__iter__"))


def check_loader_args(a: dict[str, Any]) -> bool:
    """Judge ``ThreadedDataLoader``'s arguments as torch's DataLoader does, plus our extras.

    ``a``: the constructor's arguments by name. Combinations torch rejects raise the
    same exception type (``ValueError``), and values torch accepts (``shuffle=1``,
    ``pin_memory=1``) are accepted. Every message names the argument, its value and
    what is allowed. Returns whether the dataset is iterable-style.

    Raises:
        ValueError / TypeError: the first argument that is not allowed.
    """
    dataset = a["dataset"]
    if dataset is None:
        raise TypeError("dataset=None must be a map-style dataset (with __getitem__) or an iterable")
    iterable = _is_iterable_dataset(dataset)
    if not iterable and not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"dataset={type(dataset).__name__} must be a map-style dataset (with __getitem__) "
            "or an iterable-style dataset (with __iter__)")
    nw, pf = a["num_workers"], a["prefetch_factor"]
    check_int("num_workers", nw, minimum=0, auto=True)
    if pf is not None:
        check_int("prefetch_factor", pf, minimum=1, auto=True)
        if nw == 0 and pf != "auto":
            raise ValueError(f"prefetch_factor={pf!r} needs num_workers > 0 (got num_workers=0); "
                             "leave it None to load in the calling thread")
    if a["persistent_workers"] and nw == 0:
        raise ValueError("persistent_workers=True needs num_workers > 0 (got num_workers=0)")
    check_mp_context(a["multiprocessing_context"], nw)
    check_timeout("timeout", a["timeout"], none=False)
    check_choice("executor", a["executor"], EXECUTORS)
    check_choice("on_error", a["on_error"], ERROR_POLICIES)
    check_int("max_retries", a["max_retries"], minimum=0)
    check_int("cuda_streams", a["cuda_streams"], minimum=1)
    check_timeout("stall_timeout", a["stall_timeout"], zero=False)
    if a["seed"] is not None:
        check_int("seed", a["seed"], minimum=0)
    for name in ("debug", "skip_after_retries"):
        if not isinstance(a[name], bool):
            raise TypeError(f"{name}={a[name]!r} must be True or False")
    if not (isinstance(a["distributed"], bool) or a["distributed"] == "auto"):
        raise ValueError(f"distributed={a['distributed']!r} must be True, False or 'auto'")
    for name in ("collate_fn", "worker_init_fn"):
        if a[name] is not None and not callable(a[name]):
            raise TypeError(f"{name}={a[name]!r} must be callable or None")
    import torch

    gen = a["generator"]
    if gen is not None and not isinstance(gen, torch.Generator):
        raise TypeError(f"generator={gen!r} must be a torch.Generator or None")
    if a["memory_budget"] != "auto":
        parse_size(a["memory_budget"], name="memory_budget")
    _check_batching(a, iterable)
    return iterable


def check_mp_context(ctx: Any, num_workers: int | str) -> None:
    """``multiprocessing_context`` as torch judges it: a start method's name or a context,
    and only with workers."""
    if ctx is None:
        return
    if num_workers == 0:
        raise ValueError(f"multiprocessing_context={ctx!r} needs num_workers > 0 "
                         "(got num_workers=0)")
    import multiprocessing
    import multiprocessing.context

    if isinstance(ctx, str):
        methods = multiprocessing.get_all_start_methods()
        if ctx not in methods:
            raise ValueError(f"multiprocessing_context={ctx!r} must be one of "
                             f"{', '.join(map(repr, methods))} or a multiprocessing context")
    elif not isinstance(ctx, multiprocessing.context.BaseContext):
        raise TypeError(f"multiprocessing_context={ctx!r} must be a start method's name "
                        "(str) or a multiprocessing context")


def _check_batching(a: dict[str, Any], iterable: bool) -> None:
    bs, shuffle, sampler, batch_sampler, drop_last = (
        a["batch_size"], a["shuffle"], a["sampler"], a["batch_sampler"], a["drop_last"])
    if iterable:
        for name, value in (("shuffle", shuffle), ("sampler", sampler),
                            ("batch_sampler", batch_sampler)):
            if value not in (None, False):
                raise ValueError(f"{name}={value!r} is not allowed with an iterable-style dataset "
                                 "(it decides its own order)")
    if sampler is not None and shuffle:
        raise ValueError(f"shuffle={shuffle!r} must be False or None when a sampler is given "
                         "(sampler and shuffle are mutually exclusive)")
    if batch_sampler is not None:
        if bs != 1 or shuffle or sampler is not None or drop_last:
            raise ValueError(
                "batch_sampler is mutually exclusive with batch_size, shuffle, sampler and "
                f"drop_last (got batch_size={bs!r}, shuffle={shuffle!r}, sampler={sampler!r}, "
                f"drop_last={drop_last!r})")
        return
    if bs is None:
        if drop_last:
            raise ValueError(f"drop_last={drop_last!r} needs automatic batching; "
                             "batch_size=None disables it")
        return
    check_int("batch_size", bs, minimum=1, none=True)
    if not isinstance(drop_last, bool):
        raise ValueError(f"drop_last={drop_last!r} must be True or False")


@dataclass
class LoaderConfig:
    """The loader's knobs, as plain YAML-friendly values.

    ``"auto"`` is accepted for ``num_workers``, ``prefetch_factor`` and
    ``executor`` (the online probe picks values during the first batches, the auto-tuner
    refines them).
    ``memory_budget`` takes bytes, ``"4GiB"``/``"512MB"``, a fraction of
    available memory (``0.25``), ``"auto"`` (half of available memory split
    among local ranks) or ``None`` (no budget).

    Example (YAML under ``data.init_args.loader``)::

        loader:
          num_workers: auto
          prefetch_factor: 4
          executor: thread
          memory_budget: 2GiB
          on_error: skip

    Raises:
        ValueError / TypeError: naming the field, its value and what is allowed.
    """

    num_workers: Union[int, Literal["auto"]] = "auto"  # noqa: UP007 (jsonargparse)
    prefetch_factor: Union[int, Literal["auto"]] = "auto"  # noqa: UP007
    executor: ExecutorName = "thread"
    in_order: bool = True
    pin_memory: bool = False
    persistent_workers: bool = False
    timeout: float = 0.0
    memory_budget: Union[int, float, str, None] = "auto"  # noqa: UP007
    on_error: ErrorPolicy = "raise"
    max_retries: int = 2
    skip_after_retries: bool = False
    seed: Union[int, None] = None  # noqa: UP007
    device: Union[str, None] = None  # noqa: UP007
    cuda_streams: int = 2
    stall_timeout: Union[float, None] = 300.0  # noqa: UP007
    debug: bool = False
    distributed: Union[bool, Literal["auto"]] = "auto"  # noqa: UP007

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_int("num_workers", self.num_workers, minimum=0, auto=True)
        check_int("prefetch_factor", self.prefetch_factor, minimum=1, auto=True)
        if self.num_workers == 0 and self.prefetch_factor != "auto":
            raise ValueError(f"prefetch_factor={self.prefetch_factor!r} needs num_workers > 0 "
                             "(got num_workers=0); leave it 'auto' to load in the calling thread")
        check_choice("executor", self.executor, EXECUTORS)
        check_choice("on_error", self.on_error, ERROR_POLICIES)
        check_int("max_retries", self.max_retries, minimum=0)
        check_int("cuda_streams", self.cuda_streams, minimum=1)
        check_timeout("timeout", self.timeout, none=False)
        check_timeout("stall_timeout", self.stall_timeout, zero=False)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0)
        if not (isinstance(self.distributed, bool) or self.distributed == "auto"):
            raise ValueError(f"distributed={self.distributed!r} must be True, False or 'auto'")
        for flag in ("in_order", "pin_memory", "persistent_workers", "debug", "skip_after_retries"):
            v = getattr(self, flag)
            if not isinstance(v, bool):
                raise TypeError(f"{flag}={v!r} must be True or False")
        if self.memory_budget != "auto":
            parse_size(self.memory_budget, name="memory_budget")
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"device={self.device!r} must be a device string like 'cuda:0' or None")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"device={self.device!r} must be a torch device such as 'cuda:0', 'cpu' or None"
                ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`ThreadedDataLoader` (all fields)."""
        return self.to_dict()
