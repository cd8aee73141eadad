"""The engine of ``alloter-mp run``: the third runner behind the batch rules.

The rules of a run (the first failure ends it, ``--keep-going``, ``--retries``, a
job's own ``--job-timeout``, the ``--timeout`` of the whole run, what is skipped and
how each job ends) are :class:`~alloter_mp._batch.Batch`'s, as for ``exec`` on the
worker pool or on Ray. Each input is a slot of one open batch; this module starts
a process for each slot the batch hands out, reports facts to the batch (the job
exited 0, exited with status N, was killed, could not be started) and acts on what
the batch decides: once it is ``ending``, every running job is ended (SIGTERM to
its process group, SIGKILL at ``grace_deadline``, through :mod:`._proctree`); a
slot ``ended_alone`` (its job timeout passed) is ended the same way on its own.

Everything happens on the main thread, in one selector loop::

    inputs (stdin records as they arrive, or ::: args) -> slots of the open batch,
        read only while few slots wait, so an endless input costs flat memory
    loop:
      start a job for each slot the batch hands out, at most ``limit`` at once
      select() on: stdin, every job's stdout/stderr pipe and pidfd (its exit),
                   the signal wake-up pipe; timeout = the nearest timer (the
                   deadline, a job timeout, a kill escalation, the RSS sampling)
      pipe data   -> the output writer (:mod:`._cli_output`): never interleaved
      job exited  -> reap it, drain its pipes, tell the batch
      then act on the batch: end the running jobs if it is ending, end a job
      whose timeout passed, escalate to SIGKILL when a grace is over
      SIGINT/TERM/HUP -> cancel the batch (a second one: SIGKILL at once)

A job runs in a session of its own, so ending a job means its whole process group,
and descendants that moved to groups of their own (found with psutil first). What a
failed job leaves running in its group is ended too; what a job that succeeded
leaves running is not touched.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, TextIO

import psutil

from . import _proctree
from ._batch import Batch, Slot
from ._cli_output import STDERR, STDOUT, OutputWriter
from ._cli_report import ReportFile, job_status
from ._errors import Cancelled, TaskError, TaskTimeout, signal_name
from ._options import CallOptions
from ._states import FINAL, EndKind, TaskStatus
from ._timeline import Span, TraceWriter

__all__ = [
    "PLACEHOLDER",
    "RunOptions",
    "build_argv",
    "resume_key",
    "run_jobs",
    "split_inputs",
]

PLACEHOLDER = "{}"
"""The text in a command's arguments that is replaced by the job's input."""

_SAMPLE_EVERY = 0.05  # seconds between RSS samples of the running jobs' trees
_RECHECK_EVERY = 0.05  # seconds between checks that an ended job's group is gone
_READ_SIZE = 65536  # bytes read from stdin at a time
_RUSAGE_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB else


def build_argv(template: Sequence[str], item: str) -> list[str]:
    """The command line of one job: ``{}`` replaced by ``item``, or ``item`` appended."""
    if any(PLACEHOLDER in arg for arg in template):
        return [arg.replace(PLACEHOLDER, item) for arg in template]
    return [*template, item]


def split_inputs(data: bytes, *, null: bool = False) -> list[str]:
    """Split raw input into items: one per line (or per NUL-terminated record).

    A final separator does not start an empty item; a ``\\r`` before ``\\n`` is
    dropped. Bytes that are not UTF-8 survive the round trip to argv.
    """
    records, rest = _records(data, null)
    if rest:
        records.append(_item(rest, null))
    return records


def _records(data: bytes, null: bool) -> tuple[list[str], bytes]:
    """The whole records in ``data``, and the unfinished rest."""
    parts = data.split(b"\0" if null else b"\n")
    rest = parts.pop()
    return [_item(p, null) for p in parts], rest


def _item(raw: bytes, null: bool) -> str:
    if not null and raw.endswith(b"\r"):
        raw = raw[:-1]
    return os.fsdecode(raw)


def resume_key(item: str, argv: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """What ``--resume`` compares: the input and the command it made."""
    return item, tuple(argv)


@dataclass
class RunOptions:
    """What ``alloter-mp run`` was asked to do (already validated).

    ``inputs`` are the ``:::`` arguments; ``None`` reads records from ``stdin`` as
    they arrive. ``done`` holds the hashes of :func:`resume_key` for inputs that
    already succeeded (``--resume``): they are not run again.
    """

    command: list[str]
    inputs: Iterable[str] | None
    limit: int
    stdin: BinaryIO | None = None
    null: bool = False
    timeout: float | None = None
    job_timeout: float | None = None
    retries: int = 0
    keep_going: bool = False
    progress: bool = False
    report: ReportFile | None = None
    done: dict[int, Any] | None = None
    trace: TextIO | None = None
    grace: float = 1.0
    ordered: bool = True


class JobFailed(TaskError):
    """A job exited with a non-zero status, or died by a signal it was not sent."""

    def __init__(self, index: int, returncode: int) -> None:
        super().__init__(index, f"the command ended with {describe(returncode)}")
        self.returncode = returncode


class NotRun(TaskError):
    """A job's command could not be started (``status``: 127 not found, 126 else)."""

    def __init__(self, index: int, status: int, why: str) -> None:
        super().__init__(index, why)
        self.status = status


@dataclass(eq=False)
class _Ending:
    """A process group being ended: SIGTERM sent, SIGKILL due at ``kill_at``."""

    pgid: int
    extras: list[psutil.Process]
    kill_at: float
    reaped: bool = False  # its leader has been reaped (what is left may linger)
    killed: bool = False
    give_up_at: float = 0.0


@dataclass(eq=False)
class _Job:
    """One input: its command, and the process of its current attempt."""

    position: int  # in the input
    input: str
    argv: list[str]
    slot: Slot | None = None
    pid: int = 0
    pidfd: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    pipes: dict[int, tuple[int, IO[bytes]]] = field(default_factory=dict)  # fd -> (1|2, pipe)
    lane: int = 0
    started: float = 0.0
    ended: float = 0.0
    returncode: int | None = None
    peak_rss: int = 0
    ending: _Ending | None = None  # we are ending this attempt
    not_run: int = 0  # 126/127: the command could not be started
    timed_out: bool = False  # its own --job-timeout ended the last attempt


@dataclass
class _Failure:
    """What the summary line and the exit status need of a failed job."""

    position: int
    input: str
    status: int  # the tool's exit status if this failure decides it
    how: str
    not_run: bool


def exit_status(returncode: int) -> int:
    """A job's status as a shell reports it: ``128 + N`` for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int | None) -> str:
    """Say in words how a job ended."""
    if returncode is None:
        return "never ran"
    if returncode < 0:
        return f"killed by {signal_name(-returncode)}"
    return f"exit code {returncode}"


def _short(text: str, most: int = 60) -> str:
    return repr(text if len(text) <= most else text[: most - 3] + "...")


class _Input:
    """The inputs as they arrive: ``:::`` arguments, or records read from stdin."""

    def __init__(self, items: Iterable[str] | None, stream: BinaryIO | None, null: bool) -> None:
        self._items: Iterator[str] | None = None if items is None else iter(items)
        self.fd: int | None = None
        self.ended = False
        self._null = null
        self._rest = b""
        self._stream = stream
        if items is None:
            assert stream is not None
            try:
                self.fd = stream.fileno()
            except (OSError, ValueError, AttributeError):
                self.fd = None  # not a real file (a test's BytesIO): read it whole

    def pull(self, most: int) -> list[str]:
        """Some more items (``[]`` with :attr:`ended` set at the end of the input)."""
        if self._items is not None:
            taken = [item for _, item in zip(range(most), self._items, strict=False)]
            self.ended = len(taken) < most
            return taken
        if self.fd is None:
            assert self._stream is not None
            self.ended = True
            return split_inputs(self._stream.read(), null=self._null)
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self.ended = True
            rest, self._rest = self._rest, b""
            return [_item(rest, self._null)] if rest else []
        records, self._rest = _records(self._rest + data, self._null)
        return records


class _Engine:
    """One ``run`` invocation: the batch, the jobs, the loop and the outcome."""

    def __init__(self, opts: RunOptions, out: BinaryIO, err: BinaryIO) -> None:
        self.opts = opts
        now = time.monotonic()
        self.t0 = now
        options = CallOptions.checked(
            task_timeout=opts.job_timeout,
            cancel_grace=opts.grace,
            retries=opts.retries,
            # A job that fails by itself or passes its job timeout is tried again;
            # one whose command cannot be started is not.
            retry_on=(JobFailed, TaskTimeout),
        )
        self.batch = Batch(
            [],
            deadline=None if opts.timeout is None else now + opts.timeout,
            options=options,
            keep_going=opts.keep_going,
            open_input=True,
            forget_settled=True,  # an endless input must not pile up settled slots
        )
        self.batch.started_at = now
        self.batch.on_slot_done = self._slot_done
        self.input = _Input(opts.inputs, opts.stdin, opts.null)
        total = None
        if isinstance(opts.inputs, Sequence) and not opts.done:
            total = len(opts.inputs)
        self.writer = OutputWriter(
            out, err, ordered=opts.ordered, progress=opts.progress, total=total
        )
        self.trace = None if opts.trace is None else TraceWriter(opts.trace, "alloter-mp run")
        self.jobs: dict[int, _Job] = {}  # slot index -> job, until it has settled
        self.running: dict[int, _Job] = {}  # pid -> job
        self.endings: list[_Ending] = []
        self.pending: deque[str] = deque()  # inputs read, not yet slots
        self.read_ahead = max(64, 2 * opts.limit)
        self.positions = 0  # inputs seen
        self.appended = 0  # inputs that became slots
        self.resumed = 0  # inputs not run: done already (--resume)
        self.lanes: list[int] = []  # free job slots (a heap), for the trace
        self.next_lane = 1
        self.sel = selectors.DefaultSelector()
        self.stdin_registered = False
        self.stdin_always_ready = False
        self.signals: list[int] = []
        self.stop_signal = 0
        self.interrupted = False
        self.hurry = False  # asked twice: no more grace
        self.input_closed = False
        self.deciding: _Failure | None = None  # the failure that ended the batch
        self.first_in_order: _Failure | None = None  # keep-going: the first failed input
        self.failed = 0
        self.ended_by_us = 0
        self.skipped = 0
        self.messages: set[str] = set()
        self.next_sample = 0.0
        self.use_pidfd = hasattr(os, "pidfd_open")

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.sel.register(wake_r, selectors.EVENT_READ, None)
        restore = self._install_signals(wake_w)
        try:
            self._loop(wake_r)
        finally:
            try:
                self._abandon()
            finally:
                restore()
                self.sel.close()
                os.close(wake_r)
                os.close(wake_w)
                self.writer.finish()
                if self.trace is not None:
                    self.trace.close()
        self._summarise()
        return self._exit_code()

    def _loop(self, wake_r: int) -> None:
        batch = self.batch
        while True:
            self._feed()
            self._start_jobs()
            if batch.settled.is_set() and not self.running and not self.endings:
                return
            for key, _ in self.sel.select(self._next_timeout()):
                data = key.data
                if data is None:
                    with contextlib.suppress(OSError):
                        while os.read(wake_r, 512):
                            pass
                elif data == "stdin":
                    self._read_input()
                else:
                    job, fd = data
                    if fd is None:
                        if job.pidfd is not None:
                            self._try_reap(job)
                    elif fd in job.pipes:  # not closed by an earlier event of this round
                        self._read(job, fd)
            if self.stdin_always_ready and self._wants_input():
                self._read_input()
            self._handle_signals()
            if self.writer.out_broken and not self.stop_signal:
                self.stop_signal = signal.SIGPIPE
                batch.cancel(Cancelled("the reader of the output went away"))
            if not self.use_pidfd:
                for job in list(self.running.values()):
                    self._try_reap(job)
            now = time.monotonic()
            self._check_timers(now)
            self._act(now)
            if self.opts.report is not None and self.running and now >= self.next_sample:
                self._sample_rss()
                self.next_sample = now + _SAMPLE_EVERY

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        soon: list[float] = []
        batch = self.batch
        if not batch.ending:
            if batch.deadline is not None:
                soon.append(batch.deadline)
            ready = batch.next_ready_at()
            if ready is not None:
                soon.append(ready)
            if batch.task_timeout is not None:
                for job in self.running.values():
                    if job.ending is None:
                        soon.append(job.started + batch.task_timeout)
        for ending in self.endings:
            soon.append(ending.kill_at if not ending.killed else now + _RECHECK_EVERY)
            if ending.reaped:
                soon.append(now + _RECHECK_EVERY)
        if self.running and not self.use_pidfd:
            soon.append(now + _RECHECK_EVERY)
        if self.opts.report is not None and self.running:
            soon.append(self.next_sample)
        if self.stdin_always_ready and self._wants_input():
            soon.append(now)
        return max(0.0, min(soon) - now) if soon else None

    # -- input ------------------------------------------------------------------------

    def _wants_input(self) -> bool:
        return (
            not self.input.ended and not self.batch.ending and len(self.pending) < self.read_ahead
        )

    def _read_input(self) -> None:
        if not self._wants_input():
            return
        self.pending.extend(self.input.pull(self.read_ahead))

    def _feed(self) -> None:
        """Turn read inputs into slots while few slots wait; watch stdin as needed."""
        batch = self.batch
        if self.input.fd is None and self._wants_input():
            self._read_input()  # a list, or a stream without a descriptor: never waits
        while self.pending and not batch.ending and batch.queued_count() < self.opts.limit:
            item = self.pending.popleft()
            position = self.positions
            self.positions += 1
            argv = build_argv(self.opts.command, item)
            if self.opts.done and hash(resume_key(item, argv)) in self.opts.done:
                self.resumed += 1
                continue
            index = batch.append(None)
            if index is None:  # the batch has ended
                break
            self.appended += 1
            self.jobs[index] = _Job(position, item, argv)
            self.writer.open(index)
        if self.input.ended and not self.pending and not self.input_closed:
            self.input_closed = True
            batch.close_input()
            self.writer.set_total(self.appended)
        elif batch.ending:
            self.pending.clear()
        if self.input.fd is not None and not self.stdin_always_ready:
            self._watch_stdin(self._wants_input())

    def _watch_stdin(self, wanted: bool) -> None:
        fd = self.input.fd
        assert fd is not None
        if wanted and not self.stdin_registered:
            try:
                self.sel.register(fd, selectors.EVENT_READ, "stdin")
            except (PermissionError, ValueError, OSError):
                # A regular file cannot be waited for (and never has to be).
                self.stdin_always_ready = True
                return
            self.stdin_registered = True
        elif not wanted and self.stdin_registered:
            self.sel.unregister(fd)
            self.stdin_registered = False

    # -- starting and settling jobs -------------------------------------------------

    def _start_jobs(self) -> None:
        batch = self.batch
        while len(self.running) < self.opts.limit and not batch.ending:
            taken = batch.take(1)
            if not taken:
                return
            slot = taken[0]
            job = self.jobs[slot.index]
            job.slot = slot
            self._spawn(job, slot)

    def _spawn(self, job: _Job, slot: Slot) -> None:
        job.started = time.monotonic()
        job.returncode = None
        job.ending = None
        job.timed_out = False
        job.peak_rss = 0
        try:
            proc = subprocess.Popen(
                job.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                code, why = 127, "command not found"
            else:  # as shells do: found but could not be run
                code, why = 126, exc.strerror or str(exc)
            self._note(slot.index, f"alloter-mp: {job.argv[0]}: {why}\n")
            job.not_run = code
            job.returncode = code
            job.ended = time.monotonic()
            self.batch.task_failed(slot, NotRun(slot.index, code, why))
            return
        job.popen, job.pid = proc, proc.pid
        self.running[job.pid] = job
        job.lane = heapq.heappop(self.lanes) if self.lanes else self._new_lane()
        self.batch.started(slot, job.started)
        assert proc.stdout is not None and proc.stderr is not None
        for stream, target in ((proc.stdout, STDOUT), (proc.stderr, STDERR)):
            fd = stream.fileno()
            os.set_blocking(fd, False)
            job.pipes[fd] = (target, stream)
            self.sel.register(fd, selectors.EVENT_READ, (job, fd))
        if self.use_pidfd:
            try:
                job.pidfd = os.pidfd_open(job.pid)
            except OSError:  # a kernel without pidfd: fall back to polling
                self.use_pidfd = False
            else:
                self.sel.register(job.pidfd, selectors.EVENT_READ, (job, None))
        if self.opts.report is not None:
            with contextlib.suppress(psutil.Error):
                job.peak_rss = psutil.Process(job.pid).memory_info().rss

    def _new_lane(self) -> int:
        self.next_lane += 1
        return self.next_lane - 1

    def _read(self, job: _Job, fd: int) -> bool:
        """Move what the pipe holds to the job's output; False once it is empty."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_pipe(job, fd)
            return False
        assert job.slot is not None
        self.writer.write(job.slot.index, job.pipes[fd][0], data)
        return True

    def _close_pipe(self, job: _Job, fd: int) -> None:
        self.sel.unregister(fd)
        _, stream = job.pipes.pop(fd)
        stream.close()

    def _try_reap(self, job: _Job) -> None:
        try:
            pid, status, usage = os.wait4(job.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: its status is lost
            pid, status, usage = job.pid, 255 << 8, None
        if pid == 0:
            return
        if usage is not None:
            # Until exec, the child shares (vfork) or copies (fork) our memory, and
            # its high-water mark counts that: believe it only above our own peak.
            peak = usage.ru_maxrss * _RUSAGE_UNIT
            if peak > resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RUSAGE_UNIT:
                job.peak_rss = max(job.peak_rss, peak)
        returncode = os.waitstatus_to_exitcode(status)
        del self.running[job.pid]
        heapq.heappush(self.lanes, job.lane)
        if job.popen is not None:
            job.popen.returncode = returncode  # reaped by us, not by Popen
            job.popen = None
        if job.pidfd is not None:
            self.sel.unregister(job.pidfd)
            os.close(job.pidfd)
            job.pidfd = None
        # What the process wrote before it exited is in the pipes: take all of it,
        # but do not wait for descendants that still hold them open.
        for fd in list(job.pipes):
            while fd in job.pipes and self._read(job, fd):
                pass
            if fd in job.pipes:
                self._close_pipe(job, fd)
        self._settle(job, returncode)

    def _settle(self, job: _Job, returncode: int) -> None:
        """The job's process is gone: tell the batch what happened to it."""
        slot = job.slot
        assert slot is not None
        job.ended = time.monotonic()
        job.returncode = returncode
        job.timed_out = slot.ended_alone is TaskStatus.TIMEOUT
        ending = job.ending
        if ending is not None:
            ending.reaped = True
        elif returncode != 0:  # what it left running in its group goes with it
            self._end_group(job.pid, [], time.monotonic() + self.opts.grace, reaped=True)
        batch = self.batch
        if ending is not None:
            batch.task_killed(slot)
        elif returncode == 0:
            batch.task_returned(slot, 0)
        else:
            batch.task_failed(slot, JobFailed(slot.index, returncode))
        if self.trace is not None:
            if slot.status in FINAL:
                status = job_status(slot.status)
            else:  # it will be tried again: this attempt failed
                status = "timeout" if job.timed_out else "failed"
            self._trace(job, slot, status)
        job.ending = None

    def _trace(self, job: _Job, slot: Slot, status: str) -> None:
        assert self.trace is not None
        args: dict[str, Any] = {
            "index": job.position,
            "input": job.input,
            "command": job.argv,
            "exit_code": job.returncode,
            "pid": job.pid,
            "attempt": slot.attempts,
        }
        self.trace.add(
            Span(
                f"#{job.position} {status}: {_short(job.input, 40)[1:-1]}",
                status,
                f"job slot {job.lane}",
                job.started - self.t0,
                job.ended - job.started,
                label=str(job.position),
                args=args,
            )
        )

    # -- what the batch decided -----------------------------------------------------

    def _slot_done(self, slot: Slot) -> None:
        """A slot has settled (from the batch, on this thread): count it, report it."""
        job = self.jobs.pop(slot.index)
        status = slot.status
        ran = job.returncode is not None
        failure: _Failure | None = None
        if status in (TaskStatus.ERROR, TaskStatus.CRASHED) or (
            status is TaskStatus.TIMEOUT and job.timed_out
        ):
            failure = self._failure(job)
            self.failed += 1
            if self.first_in_order is None or job.position < self.first_in_order.position:
                self.first_in_order = failure
            if slot.error is not None and slot.error is self.batch.outcome:
                self.deciding = failure
        elif status is TaskStatus.SKIPPED:
            self.skipped += 1
        self.writer.tick(failed=failure is not None)
        report = self.opts.report
        if report is None:
            self.writer.close_job(slot.index)
            return
        line = {
            "index": job.position,
            "input": job.input,
            "command": job.argv,
            "status": job_status(status),
            "exit_code": job.returncode if ran else None,
            "wall_s": round(job.ended - job.started, 6) if ran else 0.0,
            "peak_rss": job.peak_rss if ran else 0,
            "attempts": slot.attempts,
        }
        self.writer.close_job(slot.index, lambda: report.write(line))

    def _failure(self, job: _Job) -> _Failure:
        if job.timed_out:
            how = f"ran longer than --job-timeout {self.opts.job_timeout:g} s"
            return _Failure(job.position, job.input, 124, how, False)
        if job.not_run:
            return _Failure(job.position, job.input, job.not_run, "could not be run", True)
        rc = job.returncode
        assert rc is not None
        return _Failure(job.position, job.input, exit_status(rc) or 1, describe(rc), False)

    def _check_timers(self, now: float) -> None:
        batch = self.batch
        if batch.ending:
            return
        if batch.deadline is not None and now >= batch.deadline:
            batch.expire()
            return
        if batch.task_timeout is not None:
            for job in list(self.running.values()):
                if job.ending is None and now >= job.started + batch.task_timeout:
                    # The batch decides; _act then ends it as the batch says.
                    assert job.slot is not None
                    batch.end_task(job.slot, TaskStatus.TIMEOUT)

    def _act(self, now: float) -> None:
        """End what the batch says must end; escalate to SIGKILL when a grace is over."""
        batch = self.batch
        if batch.ending:
            grace = batch.grace_deadline
            assert grace is not None
            for job in self.running.values():
                if job.ending is None:
                    self.ended_by_us += 1
                    job.ending = self._end_group(job.pid, None, grace)
        elif batch.alone:
            for job in self.running.values():
                slot = job.slot
                if job.ending is None and slot is not None and slot.ended_alone is not None:
                    job.ending = self._end_group(job.pid, None, slot.ended_at + self.opts.grace)
        self._advance_endings(now)

    def _end_group(
        self, pgid: int, extras: list[psutil.Process] | None, kill_at: float, reaped: bool = False
    ) -> _Ending:
        """SIGTERM the group (and ``extras``, by default its leader's descendants)."""
        if extras is None:
            extras = _proctree.descendants(pgid)
        if self.hurry:
            kill_at = time.monotonic()
        ending = _Ending(pgid, extras, kill_at, reaped=reaped)
        if _proctree.signal_group(pgid, signal.SIGTERM, extras) or not reaped:
            self.endings.append(ending)
            if kill_at <= time.monotonic():
                self._advance_endings(time.monotonic())
        return ending

    def _advance_endings(self, now: float) -> None:
        for ending in list(self.endings):
            if not ending.killed and now >= ending.kill_at:
                _proctree.signal_group(ending.pgid, _proctree.SIGKILL, ending.extras)
                ending.killed = True
                ending.give_up_at = now + max(1.0, self.opts.grace)  # how long we wait for it
            if not ending.reaped:
                continue
            gone = not _proctree.group_alive(ending.pgid) and not _proctree.any_alive(ending.extras)
            if gone or (ending.killed and now >= ending.give_up_at):
                self.endings.remove(ending)

    def _abandon(self) -> None:
        """Leave nothing behind, whatever made the loop end."""
        for job in list(self.running.values()):
            _proctree.signal_group(job.pid, _proctree.SIGKILL, [])
            with contextlib.suppress(ChildProcessError):
                os.waitpid(job.pid, 0)
            if job.popen is not None:
                job.popen.returncode = -signal.SIGKILL
            for fd in list(job.pipes):
                self._close_pipe(job, fd)
        for ending in self.endings:
            _proctree.signal_group(ending.pgid, _proctree.SIGKILL, ending.extras)
        if not self.batch.settled.is_set():
            self.batch.cancel(Cancelled("the run was abandoned"))
            self.batch.abandon()

    # -- signals ----------------------------------------------------------------------

    def _install_signals(self, wake_w: int) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: object) -> None:
            self.signals.append(signum)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            current = signal.getsignal(signum)
            if current == signal.SIG_IGN:
                continue  # started with it ignored (nohup, background job): keep it so
            previous[signum] = current
            signal.signal(signum, on_signal)
        old_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if not self.interrupted and not self.batch.ending:
                self.interrupted = True
                self.stop_signal = signum
                self.batch.cancel(Cancelled(f"interrupted by {signal_name(signum)}"))
            else:  # asked again: do not wait for the grace period
                now = time.monotonic()
                for ending in self.endings:
                    ending.kill_at = min(ending.kill_at, now)
                self.hurry = True
                self._act(now)

    # -- memory -----------------------------------------------------------------------

    def _sample_rss(self) -> None:
        """Add up the resident memory of each running job's process tree."""
        procs: dict[int, psutil.Process] = {}
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            ppid = proc.info.get("ppid")
            if ppid is None:
                continue
            procs[proc.pid] = proc
            children.setdefault(ppid, []).append(proc.pid)
        for job in self.running.values():
            total, stack = 0, [job.pid]
            while stack:
                pid = stack.pop()
                stack.extend(children.get(pid, ()))
                member = procs.get(pid)
                if member is not None:
                    with contextlib.suppress(psutil.Error):
                        total += member.memory_info().rss
            job.peak_rss = max(job.peak_rss, total)

    # -- output -----------------------------------------------------------------------

    def _note(self, key: int, message: str) -> None:
        """A message of ours about a job, written with the job's stderr (once)."""
        if message not in self.messages:
            if len(self.messages) >= 1000:  # an endless run: keep the set small
                self.messages.clear()
            self.messages.add(message)
            self.writer.write(key, STDERR, message.encode())

    # -- the outcome ------------------------------------------------------------------

    def _summarise(self) -> None:
        say = self.writer.say
        if self.resumed:
            say(f"--resume: {self.resumed} input(s) already done, not run again")
        ended, skipped = self.ended_by_us, self.skipped
        tail = f"ended {ended} running job(s), skipped {skipped}"
        kind = self.batch.end_kind
        if self.stop_signal == signal.SIGPIPE:
            return
        if self.stop_signal:
            say(f"interrupted by {signal.Signals(self.stop_signal).name}; {tail}")
        elif kind is EndKind.TIMEOUT:
            say(f"timed out after {self.opts.timeout:g} s; {tail}")
        elif kind is EndKind.FAILURE and self.deciding is not None:
            failure = self.deciding
            if not failure.not_run and (ended or skipped or failure.status == 124):
                say(f"input {_short(failure.input)} failed ({failure.how}); {tail}")
        elif self.first_in_order is not None and (self.appended > 1 or self.failed > 1):
            failure = self.first_in_order
            say(
                f"{self.failed} of {self.appended} jobs failed; the first in input order: "
                f"{_short(failure.input)} ({failure.how})"
            )
        elif self.first_in_order is not None and self.first_in_order.status == 124:
            failure = self.first_in_order
            say(f"input {_short(failure.input)} failed ({failure.how})")

    def _exit_code(self) -> int:
        if self.stop_signal:
            return 128 + self.stop_signal
        kind = self.batch.end_kind
        if kind is EndKind.TIMEOUT:
            return 124
        if kind is EndKind.FAILURE and self.deciding is not None:
            return self.deciding.status
        if self.first_in_order is not None:
            return self.first_in_order.status
        return 0


def run_jobs(opts: RunOptions, out: BinaryIO | None = None, err: BinaryIO | None = None) -> int:
    """Run the jobs of ``opts``; return the tool's exit status."""
    return _Engine(
        opts, out if out is not None else sys.stdout.buffer, err or sys.stderr.buffer
    ).run()
