"""Exceptions raised by the loader, each naming what went wrong and where.

All three accept a single message string as their only positional argument, so
they survive being re-created by torch's process workers (``ExceptionWrapper``
rebuilds an exception as ``type(message)``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

__all__ = ["LoaderStallError", "PotentialDeadlockError", "SampleLoadError", "as_raised"]


class SampleLoadError(RuntimeError):
    """A sample (or the collate of a batch) raised.

    The consumer sees a user's exception as its own type *and* this one (see
    :func:`as_raised`): ``except KeyError`` and ``except SampleLoadError`` both catch it.

    Attributes:
        detail: the loader's description: the index, the batch and the original error.
        index: the dataset index that failed (``None`` when collate failed).
        batch_indices: the indices of the batch the sample belonged to.
        batch_ordinal: the position of that batch in the epoch.
        attempts: how many times the sample was tried.

    The original exception is chained as ``__cause__`` with its traceback.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        batch_indices: Sequence[int] | None = None,
        batch_ordinal: int | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.detail = message  # the loader's description (also kept by as_raised's copies)
        self.index = index
        self.batch_indices = list(batch_indices) if batch_indices is not None else None
        self.batch_ordinal = batch_ordinal
        self.attempts = attempts

    def __reduce__(self):  # keep the fields across pickling (process workers)
        return (
            _rebuild_sample_error,
            (str(self), self.index, self.batch_indices, self.batch_ordinal, self.attempts),
        )


def _rebuild_sample_error(message, index, batch_indices, batch_ordinal, attempts):
    return SampleLoadError(
        message,
        index=index,
        batch_indices=batch_indices,
        batch_ordinal=batch_ordinal,
        attempts=attempts,
    )


# The exceptions never given the original's type: StopIteration would end the consumer's
# ``for`` loop silently (a lost batch), the others are the interpreter's own signals.
_NEVER_DUAL = (StopIteration, StopAsyncIteration, GeneratorExit)

# {original exception class: its dual class (subclass of it and of SampleLoadError), or None
# when no such class can be made}. Guarded by _DUAL_LOCK (written once per class).
_DUAL: dict[type[BaseException], type[BaseException] | None] = {}
_DUAL_LOCK = threading.Lock()


def _dual_class(cls: type[BaseException]) -> type[BaseException] | None:
    with _DUAL_LOCK:
        if cls in _DUAL:
            return _DUAL[cls]
        try:
            dual: type[BaseException] | None = type(cls.__name__, (cls, SampleLoadError), {
                "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                "__reduce__": _reduce_dual, "__init__": BaseException.__init__,
            })
        except TypeError:  # a layout conflict (C-level fields), a final class, ...
            dual = None
        _DUAL[cls] = dual
        return dual


def _reduce_dual(self: BaseException) -> tuple[object, ...]:
    # Pickles as the original type (a dual class cannot be found by name).
    original = self.__cause__ if self.__cause__ is not None else RuntimeError(str(self))
    return (_identity, (original,))


def _identity(obj: object) -> object:
    return obj


def as_raised(err: BaseException) -> BaseException:
    """The exception the consumer sees for a loader failure ``err``.

    A :class:`SampleLoadError` caused by the user's exception (``dataset[i]`` or
    ``collate_fn`` raised ``KeyError``, ...) becomes an instance of a class that
    derives from *both* the original type and :class:`SampleLoadError`: ``except
    KeyError`` keeps working as with torch's DataLoader, and ``except SampleLoadError``
    still catches it with ``index``, ``batch_indices``, ``batch_ordinal`` and
    ``attempts``. It has the original's ``args`` and attributes (so ``str()`` is
    the original message), the loader's message as a note (Python >= 3.11), and the
    original exception, with its traceback, chained as ``__cause__``.

    Everything else is returned unchanged: errors of the loader itself, exceptions
    that are not ``Exception`` (``KeyboardInterrupt``), ``StopIteration`` raised by
    user code (kept a plain ``SampleLoadError``, so it cannot end a ``for`` loop
    early and silently), and types no subclass can be made of.
    """
    if type(err) is not SampleLoadError or getattr(err, "_raised_as", None) is not None:
        return getattr(err, "_raised_as", None) or err
    original = err.__cause__
    if not isinstance(original, Exception) or isinstance(original, (SampleLoadError,
                                                                    *_NEVER_DUAL)):
        return err
    dual = _dual_class(type(original))
    if dual is None:
        return err
    new = dual.__new__(dual, *original.args)
    new.args = original.args
    try:
        new.__dict__.update(getattr(original, "__dict__", {}))
    except (AttributeError, TypeError):  # pragma: no cover - exotic exception types
        pass
    if isinstance(original, OSError):  # C-level fields, parsed by OSError.__init__ only
        for name in ("errno", "strerror", "filename", "filename2"):
            if getattr(original, name) is not None:
                setattr(new, name, getattr(original, name))
    new.detail = str(err)  # type: ignore[attr-defined]
    new.index = err.index  # type: ignore[attr-defined]
    new.batch_indices = err.batch_indices  # type: ignore[attr-defined]
    new.batch_ordinal = err.batch_ordinal  # type: ignore[attr-defined]
    new.attempts = err.attempts  # type: ignore[attr-defined]
    add_note = getattr(new, "add_note", None)
    if add_note is not None:
        add_note(str(err))
    new.__cause__ = original
    err._raised_as = new  # type: ignore[attr-defined]  # the same error raised twice: one object
    return new


class LoaderStallError(RuntimeError):
    """No sample completed for ``stall_timeout`` seconds.

    Attributes:
        stall_timeout: the configured limit in seconds.
        stuck: ``{thread name: index or None}``, the index each worker holds.
        stacks: ``{thread name: formatted stack}`` of every worker thread.
    """

    def __init__(
        self,
        message: str,
        *,
        stall_timeout: float | None = None,
        stuck: dict[str, int | None] | None = None,
        stacks: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.stall_timeout = stall_timeout
        self.stuck = dict(stuck or {})
        self.stacks = dict(stacks or {})


class PotentialDeadlockError(RuntimeError):
    """Two locks were taken in opposite orders by different code paths.

    Attributes:
        first_lock, second_lock: names of the two locks forming the cycle.
        site: ``file:line`` of the acquisition that would close the cycle.
        conflicting_site: ``file:line`` where the opposite order was recorded.
        cycle: the full cycle of lock names, first lock repeated at the end.
    """

    def __init__(
        self,
        message: str,
        *,
        first_lock: str | None = None,
        second_lock: str | None = None,
        site: str | None = None,
        conflicting_site: str | None = None,
        cycle: Sequence[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.first_lock = first_lock
        self.second_lock = second_lock
        self.site = site
        self.conflicting_site = conflicting_site
        self.cycle = list(cycle or [])
