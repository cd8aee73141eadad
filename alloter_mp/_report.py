"""What ran: per-task reports of a call, and their table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from ._batch import Batch
from ._states import TaskStatus

if TYPE_CHECKING:
    from ._timeline import Span

__all__ = ["Report", "TaskReport"]

# The statuses a report counts, in the order its table lists them.
STATUSES = (
    TaskStatus.OK,
    TaskStatus.ERROR,
    TaskStatus.CRASHED,
    TaskStatus.TIMEOUT,
    TaskStatus.CANCELLED,
    TaskStatus.SKIPPED,
)
_FAILED = frozenset({TaskStatus.ERROR, TaskStatus.CRASHED})


@dataclass
class TaskReport:
    """What became of one task: its status, result or error, and what it cost.

    ``status`` is ``"ok"``, ``"error"``, ``"crashed"``, ``"timeout"``, ``"cancelled"``
    or ``"skipped"``. ``wall_s`` and ``cpu_s`` (user + system of the worker) are
    seconds spent in the task; ``peak_rss`` is the worker's peak resident memory
    during the task, in bytes; ``pid`` the worker that ran it (``None`` if none did).
    ``attempts`` counts its runs (more than one when it was retried; 0 if it never
    started); ``start_s`` is when it first started, in seconds from the call's start
    (``None`` if it never started). With ``capture_output=True``, ``stdout`` and
    ``stderr`` are what its last run wrote to descriptors 1 and 2 (the last 1 MiB of
    each, as text); otherwise, or if it never ran, ``None``.
    """

    index: int
    status: TaskStatus
    result: Any = None
    error: BaseException | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss: int = 0
    pid: int | None = None
    attempts: int = 0
    start_s: float | None = None
    stdout: str | None = None
    stderr: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (without the result; with the captured output)."""
        error = None
        if self.error is not None:
            error = {"type": _error_type(self.error), "message": str(self.error)}
        return {
            "index": self.index,
            "status": str(self.status),
            "error": error,
            "wall_s": round(self.wall_s, 6),
            "cpu_s": round(self.cpu_s, 6),
            "peak_rss": self.peak_rss,
            "pid": self.pid,
            "attempts": self.attempts,
            "start_s": None if self.start_s is None else round(self.start_s, 6),
            "stdout": self.stdout,
            "stderr": self.stderr,
        }


@dataclass
class Report:
    """The report of one ``exec_report`` call: one :class:`TaskReport` per task, in order."""

    tasks: list[TaskReport]
    wall_s: float = 0.0
    outcome: BaseException | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """``True`` when every task returned (the call would have returned its results)."""
        return self.outcome is None

    @property
    def results(self) -> list[Any]:
        """The results in task order (``None`` where a task did not return)."""
        return [t.result for t in self.tasks]

    def raise_for_status(self) -> None:
        """Raise what ``exec`` would have raised for this call; nothing when it succeeded."""
        if self.outcome is not None:
            raise self.outcome

    def counts(self) -> dict[str, int]:
        """How many tasks ended in each status."""
        counts = {str(s): 0 for s in STATUSES}
        for t in self.tasks:
            counts[str(t.status)] = counts.get(str(t.status), 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: totals and one entry per task (no results)."""
        return {
            "ok": self.ok,
            "wall_s": round(self.wall_s, 6),
            "cpu_s": round(sum(t.cpu_s for t in self.tasks), 6),
            "peak_rss": max((t.peak_rss for t in self.tasks), default=0),
            "counts": self.counts(),
            "error": None
            if self.outcome is None
            else {"type": _error_type(self.outcome), "message": str(self.outcome)},
            "tasks": [t.to_dict() for t in self.tasks],
        }

    def __str__(self) -> str:
        header = ("task", "status", "wall s", "cpu s", "peak MiB", "pid", "error")
        rows = [header]
        for t in self.tasks:
            rows.append(
                (
                    str(t.index),
                    t.status,
                    f"{t.wall_s:.3f}",
                    f"{t.cpu_s:.3f}",
                    f"{t.peak_rss / 2**20:.1f}" if t.peak_rss else "-",
                    str(t.pid) if t.pid else "-",
                    _short(t.error) if t.status in _FAILED else "",
                )
            )
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        total_cpu = sum(t.cpu_s for t in self.tasks)
        peak = max((t.peak_rss for t in self.tasks), default=0)
        rows.append(
            (
                "total",
                f"{len(self.tasks)}",
                f"{self.wall_s:.3f}",
                f"{total_cpu:.3f}",
                f"{peak / 2**20:.1f}" if peak else "-",
                "",
                counts,
            )
        )
        return _table(rows)

    def to_chrome_trace(self, file: str | os.PathLike[str] | IO[str]) -> None:
        """Write the report as a Chrome trace to ``file`` (a path or a text stream).

        Open it in Perfetto (ui.perfetto.dev) or ``chrome://tracing``: a track per
        worker process, one event per task that started, named by its index and
        status, with its attempts, CPU time, peak memory and error as arguments.
        """
        from ._timeline import write_trace

        write_trace(_spans(self), file, process="alloter_mp")

    def plot(self, file: str | os.PathLike[str] | IO[bytes], *, title: str | None = None) -> None:
        """Draw the report as a timeline image in ``file`` (``.png``, ``.svg``, ``.pdf``).

        One row per worker process, one bar per task coloured by status, a legend,
        and a line where the first failure ended the call. Needs matplotlib
        (``pip install 'alloter-mp[plot]'``): an ``ImportError`` says so otherwise.
        """
        from ._timeline import plot

        spans = _spans(self)
        workers = len({s.track for s in spans})
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        if title is None:
            title = (
                f"{len(self.tasks)} tasks on {workers} worker process"
                f"{'' if workers == 1 else 'es'} in {self.wall_s:.2f} s ({counts})"
            )
        marks = []
        failed = getattr(self.outcome, "index", None)
        if isinstance(failed, int) and 0 <= failed < len(self.tasks):
            task = self.tasks[failed]
            if task.start_s is not None and task.status is not TaskStatus.CANCELLED:
                marks.append(
                    (
                        task.start_s + task.wall_s,
                        f"task {failed} failed here: running tasks cancelled, queued ones skipped",
                    )
                )
        skipped = [str(t.index) for t in self.tasks if t.start_s is None]
        note = ""
        if skipped:
            shown = ", ".join(skipped[:20]) + (", ..." if len(skipped) > 20 else "")
            note = f"never started (skipped): task{'' if len(skipped) == 1 else 's'} {shown}"
        plot(spans, file, title=title, marks=marks, note=note)


def _spans(report: Report) -> list[Span]:
    """The report's started tasks as timeline spans, a track per worker process."""
    from ._timeline import Span

    spans = []
    for t in report.tasks:
        if t.start_s is None:
            continue
        args: dict[str, Any] = {
            "index": t.index,
            "attempts": t.attempts,
            "cpu_s": round(t.cpu_s, 6),
            "peak_rss": t.peak_rss,
        }
        if t.error is not None:
            args["error"] = _short(t.error, 200)
        track = f"worker {t.pid}" if t.pid is not None else "worker ?"
        spans.append(
            Span(
                f"task {t.index} {t.status}",
                str(t.status),
                track,
                t.start_s,
                t.wall_s,
                label=f"task {t.index}",
                args=args,
            )
        )
    return spans


def build_report(batch: Batch, wall_s: float) -> Report:
    """The report of a settled batch."""
    tasks = [
        TaskReport(
            index=s.index,
            status=s.status,
            result=s.result,
            error=s.error,
            wall_s=s.wall_s,
            cpu_s=s.cpu_s,
            peak_rss=s.peak_rss,
            pid=s.pid if s.status is not TaskStatus.SKIPPED else None,
            attempts=s.attempts,
            start_s=None if s.start_at is None else max(0.0, s.start_at - batch.started_at),
            stdout=None if s.output is None else s.output[0],
            stderr=None if s.output is None else s.output[1],
        )
        for s in batch.slots
    ]
    return Report(tasks, wall_s, batch.outcome)


def _error_type(exc: BaseException) -> str:
    cause = exc.__cause__
    if cause is not None:
        name = getattr(cause, "type_name", None)
        return f"{type(exc).__name__}({name or type(cause).__name__})"
    return type(exc).__name__


def _short(exc: BaseException | None, width: int = 60) -> str:
    if exc is None:
        return ""
    text = str(exc).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if 1 < i < 6 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
