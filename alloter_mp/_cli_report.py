"""The report file of ``alloter-mp run`` and ``alloter-mp call``, and ``--resume``.

Both commands write one JSON line per input to ``--report FILE`` and speak one
vocabulary in it, mapped here from the library's :class:`TaskStatus`: ``ok``,
``failed`` (the job or call failed by itself), ``killed`` (ended by the tool: a
sibling failed, the run was interrupted), ``timeout`` (its ``--job-timeout`` or the
run's ``--timeout`` passed while it ran) and ``skipped`` (never started).

With ``--resume`` the file is read first: an input whose *last* line in it says
``ok`` for the same command is not run again, and the new lines are appended, so the
file stays a journal of every attempt at the inputs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Hashable
from typing import Any, TextIO

from ._states import TaskStatus

__all__ = ["ReportFile", "job_status", "load_done"]

_JOB_STATUS = {
    TaskStatus.OK: "ok",
    TaskStatus.ERROR: "failed",
    TaskStatus.CRASHED: "failed",
    TaskStatus.TIMEOUT: "timeout",
    TaskStatus.CANCELLED: "killed",
    TaskStatus.SKIPPED: "skipped",
}


def job_status(status: TaskStatus) -> str:
    """The word a report line uses for a task's final ``status``."""
    return _JOB_STATUS[status]


class ReportFile:
    """``--report FILE``: truncated, or appended to with ``--resume``; a line per input.

    Each line is flushed at once, so a run that is killed leaves whole lines behind
    for the next ``--resume``.
    """

    def __init__(self, path: str, *, append: bool) -> None:
        self.path = path
        self._file: TextIO = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, line: dict[str, Any], raw: dict[str, str] | None = None) -> None:
        """Write ``line`` (``raw``: fields whose value is JSON text already)."""
        text = json.dumps(line)
        if raw:
            extra = ", ".join(f"{json.dumps(k)}: {v}" for k, v in raw.items())
            text = f"{text[:-1]}, {extra}}}" if line else f"{{{extra}}}"
        self._file.write(text + "\n")
        self._file.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


def load_done(
    path: str,
    key: Callable[[dict[str, Any]], Hashable | None],
    keep: Callable[[dict[str, Any]], Any] = lambda line: None,
) -> dict[int, Any]:
    """Read a report file for ``--resume``: the inputs whose last line says ``ok``.

    ``key`` names a line's input and command (``None``: not a line of this command).
    Returns ``{hash(key): keep(line)}`` for those inputs (only the hash of the key is
    kept, so a long file costs little memory); a missing file gives ``{}``, and lines
    that are not JSON objects (a line cut short by a crash) are passed over.
    """
    done: dict[int, Any] = {}
    try:
        stream = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        return done
    with stream:
        for text in stream:
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if not isinstance(line, dict):
                continue
            name = key(line)
            if name is None:
                continue
            if line.get("status") == "ok":
                done[hash(name)] = keep(line)
            else:
                done.pop(hash(name), None)
    return done
