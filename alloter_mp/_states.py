"""The named states of the package: what became of a task, how a call ended, why a
worker is killed.

Task statuses are strings to their users (``report.tasks[0].status == "ok"``, JSON
reports), so :class:`TaskStatus` is a string enum: each member *is* its string, and
strict typing still catches a misspelt state inside the package.
"""

from __future__ import annotations

import enum
import sys

__all__ = ["FINAL", "EndKind", "KillReason", "StrEnum", "TaskStatus"]

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:

    class StrEnum(str, enum.Enum):
        """A string enum for Python 3.10: ``str()`` and ``format()`` give the value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


class TaskStatus(StrEnum):
    """Where a task is, or how it ended (the last six are final)."""

    QUEUED = "queued"  # waiting for a worker (also a retry waiting for its delay)
    RUNNING = "running"  # handed to a worker
    OK = "ok"  # returned
    ERROR = "error"  # raised, or its result could not travel
    CRASHED = "crashed"  # its worker died (the memory limit included)
    TIMEOUT = "timeout"  # its own task timeout, or the call's deadline, passed while it ran
    CANCELLED = "cancelled"  # running when the call was cancelled (a sibling failed, ...)
    SKIPPED = "skipped"  # never started


FINAL = frozenset(
    {
        TaskStatus.OK,
        TaskStatus.ERROR,
        TaskStatus.CRASHED,
        TaskStatus.TIMEOUT,
        TaskStatus.CANCELLED,
        TaskStatus.SKIPPED,
    }
)


class EndKind(enum.Enum):
    """Why a call ended before all its tasks returned."""

    FAILURE = "failure"  # a task failed (first failure wins)
    TIMEOUT = "timeout"  # the call's deadline passed
    CANCELLED = "cancelled"  # cancelled from outside: context, interruption, close


class KillReason(enum.Enum):
    """Why the pool kills a worker process."""

    END = "end"  # its call ended and the task outlived the grace period
    TASK = "task"  # its task alone was ended (task timeout, a future killed) after the grace
    MEMORY = "memory"  # the task passed the memory limit
    CLOSE = "close"  # the pool is closing
