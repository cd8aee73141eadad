"""The error tree of alloter_mp.

Every error here can be pickled and unpickled (they cross process boundaries in the
command-line tool and in users' own code), so each one rebuilds itself from its
fields through ``__reduce__`` rather than from ``args``. A pickle names only the
public class (``alloter_mp.TaskError``) and its ``_restore`` method, never a private
module, so moving code between files never breaks a stored error.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = [
    "AlloterError",
    "Cancelled",
    "ExecTimeout",
    "InitializerFailed",
    "MemoryLimitExceeded",
    "RemoteError",
    "SerializationError",
    "TaskError",
    "TaskTimeout",
    "WorkerCrashed",
    "describe_exitcode",
    "signal_name",
]


def signal_name(signum: int) -> str:
    """``"SIGKILL"`` for 9; ``"signal 99"`` for a number with no name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exitcode(exitcode: int | None) -> str:
    """Say in words how a process ended, from a ``Process.exitcode``-style value."""
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        return f"{signal_name(-exitcode)} (exit code {exitcode})"
    return f"exit code {exitcode}"


class AlloterError(Exception):
    """Base class of every error alloter_mp raises on its own account."""


class RemoteError(Exception):
    """Stand-in for a task's exception that could not be rebuilt in the parent.

    It carries the original exception's type name, its message and the worker's
    formatted traceback, so nothing about the failure is lost.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class TaskError(AlloterError):
    """A task failed: it raised, its worker died, or its result could not travel.

    ``index`` is the task's position in the call, ``remote_traceback`` the worker's
    formatted traceback (``""`` when there is none, as for a crash), and
    ``__cause__`` the original exception when it could be rebuilt in the parent,
    otherwise a :class:`RemoteError`. With ``capture_output=True``, ``stdout`` and
    ``stderr`` are what the task wrote to its descriptors 1 and 2 (the last 1 MiB
    of each, as text); otherwise they are ``None``.
    """

    # Set on the instance when the task's output was captured (so they pickle with it).
    stdout: str | None = None
    stderr: str | None = None

    def __init__(
        self,
        index: int,
        message: str,
        remote_traceback: str = "",
        *,
        type_name: str | None = None,
    ) -> None:
        super().__init__(index, message)
        self.index = index
        self.message = message
        self.remote_traceback = remote_traceback
        self.type_name = type_name

    def __str__(self) -> str:
        if self.type_name:
            return f"task {self.index} raised {self.type_name}: {self.message}"
        return f"task {self.index}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._restore, (self.__dict__.copy(),))

    @classmethod
    def _restore(cls, state: dict[str, Any]) -> Any:
        return _rebuild(cls, state)


class InitializerFailed(TaskError):
    """The worker's initializer raised, so the task could not run there.

    Not part of the public tree (it is a :class:`TaskError` to its users); it lets
    an executor tell this failure apart, since it breaks the executor.
    """


class WorkerCrashed(TaskError):
    """The worker process running task ``index`` died (segfault, ``os._exit``, a signal).

    ``exitcode`` follows ``multiprocessing.Process.exitcode``: ``-N`` for death by
    signal N, ``None`` where the platform did not report it.
    """

    def __init__(
        self, index: int, exitcode: int | None, pid: int | None = None, message: str = ""
    ) -> None:
        if not message:
            who = f"worker process {pid}" if pid else "its worker process"
            message = f"{who} died with {describe_exitcode(exitcode)}"
        super().__init__(index, message)
        self.exitcode = exitcode
        self.pid = pid


class MemoryLimitExceeded(WorkerCrashed):
    """Task ``index`` pushed its worker's resident memory past ``limit`` bytes.

    The worker was killed; ``peak_rss`` is the highest resident size seen, in bytes.
    """

    def __init__(
        self,
        index: int,
        limit: int,
        peak_rss: int,
        pid: int | None = None,
        exitcode: int | None = None,
    ) -> None:
        message = (
            f"worker process {pid} passed the memory limit of {limit:,} bytes "
            f"(peak {peak_rss:,} bytes) and was killed"
        )
        super().__init__(index, exitcode, pid, message)
        self.limit = limit
        self.peak_rss = peak_rss


class TaskTimeout(TaskError, TimeoutError):
    """Task ``index`` ran longer than its own ``task_timeout`` (``timeout`` seconds).

    It was told through :func:`alloter_mp.cancelled` and, if it did not return within
    ``cancel_grace``, its worker was killed with every process it started.
    """

    def __init__(self, index: int, timeout: float, message: str = "") -> None:
        super().__init__(
            index, message or f"ran longer than its task_timeout of {timeout:g} s and was ended"
        )
        self.timeout = timeout


class ExecTimeout(AlloterError, TimeoutError):
    """The overall timeout of a call (or its context's deadline) passed."""


class Cancelled(AlloterError):
    """The call was cancelled: its context was cancelled, or the caller was interrupted."""


class SerializationError(AlloterError):
    """Task ``index`` could not be pickled, so nothing was started."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(index, message)
        self.index = index
        self.message = message

    def __str__(self) -> str:
        return f"task {self.index} cannot be pickled: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._restore, (self.__dict__.copy(),))

    @classmethod
    def _restore(cls, state: dict[str, Any]) -> Any:
        return _rebuild(cls, state)


def _rebuild(cls: type[BaseException], state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls)
    exc.__dict__.update(state)
    exc.args = (state.get("index"), state.get("message"))
    return exc
