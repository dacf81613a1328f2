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

__all__ = ["LoaderConfig", "parse_size"]

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
