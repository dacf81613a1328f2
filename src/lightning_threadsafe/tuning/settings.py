"""The knobs the tuners turn, one tuner decision, and the checks both tuners share.

:class:`Settings` (``num_workers``, ``prefetch``, ``executor``) is what the
hill-climber (:mod:`~lightning_threadsafe.tuning.hill_climb`) and the probe
(:mod:`~lightning_threadsafe.tuning.rules`) hand to the loader;
:class:`Decision` is one step of the hill-climber. Both are plain data
(``to_dict``), so tuned settings survive a checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["EXECUTORS", "LATENCY_HEADROOM", "Decision", "Settings", "changes", "check_int",
           "default_max_workers"]

EXECUTORS = ("thread", "process")
# Threads for latency-bound samples: cores / (cpu/wall) would just fill the cores if the
# samples' CPU cost stayed as measured alone; it grows under contention (cache, GIL
# hand-offs), and an idle thread waiting on I/O costs nothing, so plan 1.5x that.
# Shared by the probe's sizing and the hill-climber's I/O move.
LATENCY_HEADROOM = 1.5


def default_max_workers(cpu_count: int) -> int:
    """The thread cap of the tuner and the probe: 8 per core, at most 64.

    Args:
        cpu_count: usable cores.

    Returns:
        ``min(64, 8 * cpu_count)``.
    """
    return min(64, 8 * cpu_count)


def check_int(name: str, value: Any, minimum: int) -> None:
    """Reject anything but an ``int`` (``bool`` excluded) of at least ``minimum``.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        minimum: the smallest value allowed.

    Raises:
        ValueError: naming the argument and the bound.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


@dataclass
class Settings:
    """The knobs the tuner turns.

    Attributes:
        num_workers: threads (thread executor) or worker processes.
        prefetch: look-ahead in batches, per worker (torch's ``prefetch_factor``) or in
            total, as the tuner's ``prefetch_per_worker`` says.
        executor: ``"thread"`` or ``"process"``.

    Raises:
        ValueError: for a value out of range, naming the field.
    """

    num_workers: int
    prefetch: int
    executor: str = "thread"

    def __post_init__(self) -> None:
        check_int("num_workers", self.num_workers, 0)
        check_int("prefetch", self.prefetch, 1)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor={self.executor!r} must be one of 'thread', 'process'")

    def key(self) -> tuple[int, int, str]:
        """The settings as a hashable ``(num_workers, prefetch, executor)``."""
        return (self.num_workers, self.prefetch, self.executor)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"num_workers", "prefetch", "executor"}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        """The settings :meth:`to_dict` returned.

        Raises:
            KeyError: for a missing field.
            ValueError: for a value out of range.
        """
        return cls(int(d["num_workers"]), int(d["prefetch"]), str(d["executor"]))


@dataclass(frozen=True)
class Decision:
    """One tuner step: what was, what should be, and why.

    Attributes:
        before: the settings the window ran with.
        after: the settings to apply.
        changed: ``{field: (old, new)}`` for the fields that differ.
        reason: one line explaining the decision with the measured numbers.
        action: ``"hold"``, ``"workers+"``, ``"prefetch+"``, ``"prefetch-"``,
            ``"executor"``, ``"revert"``, ``"clamp"``, or ``"wait"`` (the previous
            change has not taken effect yet; ``after`` repeats it).
        verdict_code: the code of the verdict the decision followed.
        verdict_name: that verdict's name.
        throughput: samples/s measured over the window.
    """

    before: Settings
    after: Settings
    changed: dict[str, tuple[Any, Any]]
    reason: str
    action: str
    verdict_code: int
    verdict_name: str
    throughput: float

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples become lists)."""
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "changed": {k: [old, new] for k, (old, new) in self.changed.items()},
            "reason": self.reason,
            "action": self.action,
            "verdict_code": self.verdict_code,
            "verdict_name": self.verdict_name,
            "throughput": self.throughput,
        }


def changes(before: Settings, after: Settings) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` for the fields in which ``after`` differs from ``before``."""
    return {f: (getattr(before, f), getattr(after, f))
            for f in ("num_workers", "prefetch", "executor")
            if getattr(before, f) != getattr(after, f)}
