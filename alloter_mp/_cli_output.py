"""What ``alloter-mp run`` writes: its jobs' output, never mixed, and its progress bar.

The engine captures each job's stdout and stderr and hands them here in pieces, as
they arrive. In input order (the default) the first job whose output is not all
written yet, the *head*, streams live, and the pieces of later jobs wait in memory
until their turn; unordered, each job's output is written whole when the job ends.
Either way the lines of two jobs never mix. What must follow a job's output (its
report line) is done once that output is written, so the report follows the same
order.

The writer also owns the progress bar (all writing goes around it) and notices a
reader that went away (``| head``): then it writes nothing more to stdout, and the
engine, seeing :attr:`OutputWriter.out_broken`, ends the run as a pipeline stage would.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

__all__ = ["STDERR", "STDOUT", "OutputWriter"]

STDOUT, STDERR = 1, 2


class _Held:
    """A job's output not written yet, and what to do once it is."""

    __slots__ = ("after", "chunks", "done")

    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes]] = []
        self.done = False
        self.after: Callable[[], None] | None = None


class OutputWriter:
    """Writes the jobs' output in input order (or whole per job), and the bar.

    Jobs are known by a key that grows in input order: :meth:`open` each job as it
    is read, :meth:`write` its pieces, :meth:`close_job` when it has ended.
    """

    def __init__(
        self,
        out: BinaryIO,
        err: BinaryIO,
        *,
        ordered: bool,
        progress: bool,
        total: int | None,
    ) -> None:
        self._out = out
        self._err = err
        self._ordered = ordered
        self._held: dict[int, _Held] = {}
        self._order: deque[int] = deque()  # open jobs in input order (ordered output)
        self.out_broken = False  # the reader of stdout went away
        self._err_broken = False
        self._failed = 0
        self._bar: Any = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="job", file=sys.stderr, dynamic_ncols=True)

    # -- jobs ------------------------------------------------------------------------

    def open(self, key: int) -> None:
        """A job is known (read from the input): its output takes its turn."""
        self._held[key] = _Held()
        if self._ordered:
            self._order.append(key)

    def write(self, key: int, target: int, data: bytes) -> None:
        """A piece of job ``key``'s stdout (``STDOUT``) or stderr (``STDERR``)."""
        if self._ordered and self._order and self._order[0] == key:
            self._write(target, data)  # the head streams live
        else:
            self._held[key].chunks.append((target, data))

    def close_job(self, key: int, after: Callable[[], None] | None = None) -> None:
        """Job ``key`` has ended: its output is complete; ``after`` runs once it is written."""
        held = self._held[key]
        held.done = True
        held.after = after
        if not self._ordered:
            self._release(key)
            return
        order = self._order
        while order and self._held[order[0]].done:
            self._release(order.popleft())
        if order:  # the new head streams live from now on: first what it has so far
            self._flush(self._held[order[0]])

    def _release(self, key: int) -> None:
        held = self._held.pop(key)
        self._flush(held)
        if held.after is not None:
            held.after()

    def _flush(self, held: _Held) -> None:
        chunks, held.chunks = held.chunks, []
        for target, data in chunks:
            self._write(target, data)

    # -- the tool's own lines and the bar ------------------------------------------------

    def say(self, line: str) -> None:
        """A line of the tool's own on stderr (``alloter-mp: ...``)."""
        self._write(STDERR, f"alloter-mp: {line}\n".encode())

    def tick(self, *, failed: bool) -> None:
        """One more job has ended (``failed``: by failing)."""
        if self._bar is None:
            return
        if failed:
            self._failed += 1
            self._bar.set_postfix(failed=self._failed, refresh=False)
        self._bar.update(1)

    def set_total(self, total: int) -> None:
        """The number of jobs, once the end of the input is known."""
        if self._bar is not None and self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()

    def finish(self) -> None:
        """Write whatever is still held (a job that never closed) and close the bar."""
        for key in list(self._held):
            self._flush(self._held[key])
        self._held.clear()
        self._order.clear()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- writing ------------------------------------------------------------------------

    def _write(self, target: int, data: bytes) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stderr):
                self._write_raw(target, data)
        else:
            self._write_raw(target, data)

    def _write_raw(self, target: int, data: bytes) -> None:
        if target == STDOUT:
            if self.out_broken:
                return
            try:
                self._out.write(data)
                self._out.flush()
            except BrokenPipeError:
                self.out_broken = True
        elif not self._err_broken:
            try:
                self._err.write(data)
                self._err.flush()
            except BrokenPipeError:
                self._err_broken = True
