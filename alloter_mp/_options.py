"""Checking options, in one place, and the options of a call.

Every public constructor and call validates its numbers through the functions
here, so that a bad value gets the same error type and wording wherever it is
given: ``TypeError`` for a value of the wrong type, ``ValueError`` for one out of
range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ._cpus import available_cpus
from ._errors import TaskTimeout, WorkerCrashed

__all__ = [
    "SHARE_THRESHOLD",
    "CallOptions",
    "check_bytes",
    "check_chunksize",
    "check_count",
    "check_errors",
    "check_fn",
    "check_limit",
    "check_positive",
    "check_seconds",
    "default_limit",
]


# Arguments' and results' buffers of this many bytes or more travel through shared
# memory (see alloter_mp._shm).
SHARE_THRESHOLD = 1 << 20


def default_limit() -> int:
    """How many tasks run at once when no limit is given: the CPUs this process may use."""
    return available_cpus()


def check_seconds(name: str, value: Any, *, allow_zero: bool = False) -> float | None:
    """A number of seconds (``> 0``, or ``>= 0`` with ``allow_zero``) or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, not {value!r}")
    return float(value)


def check_count(name: str, value: Any, *, allow_zero: bool = True) -> int:
    """A whole number ``>= 0`` (``> 0`` without ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, not {value}")
    return value


def check_positive(name: str, value: Any) -> int | None:
    """A whole number ``> 0``, or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, not {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, not {value}")
    return value


def check_limit(name: str, value: Any) -> int | None:
    """A concurrency limit: ``None`` or ``0`` (the default, returned as ``None``), or ``> 0``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    return value or None


def check_bytes(name: str, value: Any) -> int | None:
    """A positive number of bytes, or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (bytes) or None, not {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0 bytes, not {value}")
    return value


def check_chunksize(value: Any) -> int | None:
    """A map's chunk size: a positive int, or ``None`` to let the alloter pick."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("chunksize must be a positive int or None")
    if value <= 0:
        raise ValueError("chunksize must be > 0")
    return value


def check_errors(errors: object) -> bool:
    """A bulk call's ``errors``: ``"raise"`` -> ``False``, ``"return"`` -> ``True``
    (keep going)."""
    if errors == "raise":
        return False
    if errors == "return":
        return True
    raise ValueError(f'errors must be "raise" or "return", not {errors!r}')


def check_fn(fn: object) -> None:
    """A bulk call's function must be callable."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")


@dataclass(frozen=True)
class CallOptions:
    """The options that shape a call (not the workers); ``with_options`` replaces them."""

    timeout: float | None = None
    task_timeout: float | None = None
    cancel_grace: float = 0.5
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = (WorkerCrashed, TaskTimeout)
    retry_delay: float = 0.0
    memory_limit: int | None = None
    progress: bool = False
    share_threshold: int | None = SHARE_THRESHOLD
    relay_logs: bool = True
    capture_output: bool = False

    @classmethod
    def checked(cls, **values: Any) -> CallOptions:
        """Options from keyword values, each one validated."""
        return cls()._replace(**values)

    def _replace(self, **values: Any) -> CallOptions:
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}")
        checked: dict[str, Any] = {}
        for name, value in values.items():
            checked[name] = _CHECKS[name](value)
        return dataclasses.replace(self, **checked)

    def replace(self, **values: Any) -> CallOptions:
        """A copy with ``values`` replaced (validated; unknown names raise ``TypeError``)."""
        return self._replace(**values)


def _grace(value: Any) -> float:
    grace = check_seconds("cancel_grace", value, allow_zero=True)
    return 0.0 if grace is None else grace


def _retry_on(value: Any) -> tuple[type[BaseException], ...]:
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, tuple) or not all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in value
    ):
        raise TypeError(f"retry_on must be a tuple of exception classes, not {value!r}")
    return value


def _share_threshold(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"share_threshold must be an int (bytes) or None, not {value!r}")
    if value < 0:
        raise ValueError(f"share_threshold must be >= 0 bytes, not {value}")
    return value


def _retry_delay(value: Any) -> float:
    delay = check_seconds("retry_delay", value, allow_zero=True)
    return 0.0 if delay is None else delay


_CHECKS: dict[str, Any] = {
    "timeout": lambda v: check_seconds("timeout", v),
    "task_timeout": lambda v: check_seconds("task_timeout", v),
    "cancel_grace": _grace,
    "retries": lambda v: check_count("retries", v),
    "retry_on": _retry_on,
    "retry_delay": _retry_delay,
    "memory_limit": lambda v: check_bytes("memory_limit", v),
    "progress": bool,
    "share_threshold": _share_threshold,
    "relay_logs": bool,
    "capture_output": bool,
}
