"""Turning tasks, results and exceptions into bytes and back.

Tasks and results travel with cloudpickle, so lambdas and closures defined in
``__main__`` or in a test module work with every start method. Exceptions travel as
two pieces: the pickled exception (when it pickles *and* unpickles) and the formatted
traceback as text. The parent rebuilds the original exception when it can, and a
:class:`RemoteError` with the type name and message when it cannot, so a failure is
never lost and never hangs the pool.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Sequence
from types import TracebackType
from typing import Any, NamedTuple

import cloudpickle

from ._errors import RemoteError

__all__ = ["ExceptionInfo", "capture_exception", "dumps", "loads", "rebuild_exception"]

PROTOCOL = pickle.HIGHEST_PROTOCOL
# A chunk runner marks a failing item's offset on the exception under this name.
OFFSET_ATTR = "_alloter_mp_offset"


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` as cloudpickle would (functions by value where they must be).

    Plain pickle is tried first: it is several times cheaper, and where it succeeds
    without touching ``__main__`` it writes the same by-reference pickle cloudpickle
    would. Lambdas, closures, ``__main__`` objects and modules registered to travel
    by value go through cloudpickle.
    """
    if not cloudpickle.list_registry_pickle_by_value():
        try:
            data = pickle.dumps(obj, PROTOCOL)
        except Exception:
            pass
        else:
            if b"__main__" not in data:
                return data
    return cloudpickle.dumps(obj, protocol=PROTOCOL)  # type: ignore[no-any-return]


def dumps_result(obj: Any) -> bytes:
    """Pickle a result: plain pickle when it can, else cloudpickle.

    Unlike a task, a result may refer to ``__main__`` by reference: the parent's
    ``__main__`` is the program that defined it, so its classes stay its own.
    """
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return dumps(obj)


def dumps_tasks(tasks: Sequence[Any]) -> bytes:
    """Pickle a whole task list at once: shared code and globals are written once."""
    return dumps(list(tasks))


def loads(data: Any) -> Any:
    """Unpickle bytes made by :func:`dumps`; plain pickle reads cloudpickle's output.

    A pickle that came with shared segments (an ``alloter_mp._shm.Received``) loads
    itself on them.
    """
    if isinstance(data, bytes):
        return pickle.loads(data)
    return data.load()


class ExceptionInfo(NamedTuple):
    """An exception made ready to travel: pickled form (or None) plus its text."""

    pickled: bytes | None
    type_name: str
    message: str
    traceback: str
    offset: int = 0  # for a chunk of items: which item failed


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "__main__", None):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not lose the error
        return f"<{type(exc).__name__} with an unprintable message>"


def capture_exception(
    exc: BaseException, tb: TracebackType | None = None, *, skip_frames: int = 0
) -> ExceptionInfo:
    """Capture ``exc`` for sending: it is pickled only if it also unpickles here."""
    offset = exc.__dict__.pop(OFFSET_ATTR, 0) if hasattr(exc, "__dict__") else 0
    if tb is None:
        tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:  # formatting can fail on exotic exceptions
        text = f"{_type_name(exc)}: {_safe_str(exc)}\n"
    pickled: bytes | None
    try:
        pickled = dumps(exc)
        pickle.loads(pickled)  # an exception whose __init__ cannot rebuild it fails here
    except Exception:
        pickled = None
    return ExceptionInfo(pickled, _type_name(exc), _safe_str(exc), text, offset)


def rebuild_exception(info: ExceptionInfo) -> BaseException:
    """The original exception if it can be rebuilt here, else a :class:`RemoteError`."""
    if info.pickled is not None:
        try:
            exc = pickle.loads(info.pickled)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            return exc
    return RemoteError(info.type_name, info.message, info.traceback)
