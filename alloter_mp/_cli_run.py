"""The engine of ``alloter-mp run``: one command per input, with a limit.

Everything happens on one thread, in one event loop::

    inputs (stdin lines or ::: args) -> jobs, all known before the first one starts
    loop:
      start queued jobs in input order while fewer than ``limit`` run
      select() on: every job's stdout/stderr pipe, every job's pidfd (its exit),
                   the signal wake-up pipe; timeout = nearest of the overall
                   deadline, a kill escalation, the RSS sampling tick
      pipe data     -> the job's own buffer (or straight out, if it holds the output)
      job exited    -> reap it (os.wait4), drain its pipes, settle its status
      first failure -> end the running jobs, skip the queued ones
      deadline      -> the same, status "timeout", exit 124
      SIGINT/TERM   -> the same, exit 128 + signal

A job runs in a session of its own, so "ending a job" means its whole process
group: SIGTERM, then SIGKILL after ``grace`` seconds to whatever is left (and to
descendants that moved to groups of their own, found with psutil beforehand).

Output never interleaves: by default it is written in input order, the job at
the head of that order streaming live while later jobs wait in memory; with
``ordered=False`` each job's output is written whole when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, TextIO

import psutil

from ._errors import signal_name

__all__ = ["PLACEHOLDER", "RunOptions", "build_argv", "read_inputs", "run_jobs"]

PLACEHOLDER = "{}"
"""The text in a command's arguments that is replaced by the job's input."""

_SAMPLE_EVERY = 0.05  # seconds between RSS samples of the running jobs' trees
_RECHECK_EVERY = 0.05  # seconds between checks that an ended job's group is gone
_STDOUT, _STDERR = 1, 2
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
    sep = b"\0" if null else b"\n"
    if not data:
        return []
    parts = data.split(sep)
    if parts[-1] == b"":
        parts.pop()
    if not null:
        parts = [p[:-1] if p.endswith(b"\r") else p for p in parts]
    return [os.fsdecode(p) for p in parts]


def read_inputs(stream: BinaryIO, *, null: bool = False) -> list[str]:
    """Read every item from ``stream`` (see :func:`split_inputs`)."""
    return split_inputs(stream.read(), null=null)


@dataclass
class RunOptions:
    """What ``alloter-mp run`` was asked to do (already validated)."""

    command: list[str]
    inputs: list[str]
    limit: int
    timeout: float | None = None
    keep_going: bool = False
    progress: bool = False
    report: TextIO | None = None
    grace: float = 1.0
    ordered: bool = True


@dataclass(eq=False)
class _Job:
    index: int
    input: str
    argv: list[str]
    state: str = "queued"  # queued -> running -> done, or queued -> skipped
    status: str | None = None
    pid: int = 0
    pidfd: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    pipes: dict[int, tuple[int, IO[bytes]]] = field(default_factory=dict)  # fd -> (1|2, pipe)
    chunks: list[tuple[int, bytes]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    returncode: int | None = None
    peak_rss: int = 0
    ending: str | None = None  # "killed" / "timeout" once we decided to end it
    spawn_error: bool = False


@dataclass(eq=False)
class _Kill:
    """A process group being ended: SIGTERM sent, SIGKILL due at ``deadline``."""

    pgid: int
    job: _Job
    extras: list[psutil.Process]
    deadline: float
    escalated: bool = False


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


class _Runner:
    """One ``run`` invocation: the jobs, the loop, the output and the outcome."""

    def __init__(self, opts: RunOptions, out: BinaryIO, err: BinaryIO) -> None:
        self.opts = opts
        self.out = out
        self.err = err
        self.jobs = [
            _Job(i, item, build_argv(opts.command, item)) for i, item in enumerate(opts.inputs)
        ]
        self.queue: Iterator[_Job] = iter(self.jobs)
        self.next_job: _Job | None = next(self.queue, None)
        self.running: dict[int, _Job] = {}  # pid -> job
        self.kills: list[_Kill] = []
        self.sel = selectors.DefaultSelector()
        self.head = 0  # the first job whose output is not fully written
        self.stop: str | None = None  # "failed", "timeout", "signal", "broken-pipe"
        self.stop_signal = 0
        self.first_failure: _Job | None = None
        self.failed = 0
        self.ended_by_us = 0
        self.skipped = 0
        self.messages: set[str] = set()
        self.signals: list[int] = []
        self.deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
        self.next_sample = 0.0
        self.use_pidfd = hasattr(os, "pidfd_open")
        self.out_broken = False
        self.err_broken = False
        self.bar: Any = None

    # -- the loop ---------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.sel.register(wake_r, selectors.EVENT_READ, None)
        restore = self._install_signals(wake_w)
        if self.opts.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(self.jobs), unit="job", file=sys.stderr, dynamic_ncols=True)
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
                if self.bar is not None:
                    self.bar.close()
        for job in self.jobs:  # normally all written already
            self._write_chunks(job)
        self._write_report()
        self._summarise()
        return self._exit_code()

    def _loop(self, wake_r: int) -> None:
        while True:
            self._start_jobs()
            if not self.running and not self.kills and (self.stop or self.next_job is None):
                return
            timeout = self._next_timeout()
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        while os.read(wake_r, 512):
                            pass
                    continue
                job, fd = key.data
                if fd is None:
                    if job.pidfd is not None:
                        self._try_reap(job)
                elif fd in job.pipes:  # not closed by an earlier event of this round
                    self._read(job, fd)
            self._handle_signals()
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline and not self.stop:
                self._stop("timeout")
            if not self.use_pidfd:
                for job in list(self.running.values()):
                    self._try_reap(job)
            self._advance_kills(now)
            if self.opts.report is not None and self.running and now >= self.next_sample:
                self._sample_rss()
                self.next_sample = now + _SAMPLE_EVERY

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        soon: list[float] = []
        if self.deadline is not None and not self.stop:
            soon.append(self.deadline)
        for kill in self.kills:
            soon.append(kill.deadline if not kill.escalated else now + _RECHECK_EVERY)
        if self.kills or (self.running and not self.use_pidfd):
            soon.append(now + _RECHECK_EVERY)
        if self.opts.report is not None and self.running:
            soon.append(self.next_sample)
        return max(0.0, min(soon) - now) if soon else None

    # -- starting and settling jobs -------------------------------------------------

    def _start_jobs(self) -> None:
        while self.next_job is not None and not self.stop and len(self.running) < self.opts.limit:
            job = self.next_job
            self.next_job = next(self.queue, None)
            self._spawn(job)

    def _spawn(self, job: _Job) -> None:
        job.started = time.monotonic()
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
            self._note(job, f"alloter-mp: {job.argv[0]}: {why}\n")
            job.spawn_error = True
            job.state = "running"
            self._settle(job, code)
            return
        job.popen, job.pid, job.state = proc, proc.pid, "running"
        self.running[job.pid] = job
        assert proc.stdout is not None and proc.stderr is not None
        for stream, target in ((proc.stdout, _STDOUT), (proc.stderr, _STDERR)):
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
        self._emit(job, job.pipes[fd][0], data)
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
        if job.popen is not None:
            job.popen.returncode = returncode  # reaped by us, not by Popen
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
        job.ended = time.monotonic()
        job.returncode = returncode
        job.state = "done"
        if job.ending:
            job.status = job.ending
        elif returncode == 0:
            job.status = "ok"
        else:
            job.status = "failed"
            self.failed += 1
            if self.first_failure is None or (
                self.opts.keep_going and job.index < self.first_failure.index
            ):
                self.first_failure = job
            if not self.opts.keep_going and not self.stop:
                self._stop("failed")
            if job.pid:  # what it left running in its group goes with it
                self._end_group(job, already_reaped=True)
        if self.bar is not None:
            self.bar.update(1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
        self._job_output_done(job)

    # -- ending jobs ----------------------------------------------------------------

    def _stop(self, why: str) -> None:
        """End the batch: running jobs are ended, queued ones are skipped."""
        self.stop = why
        ending = "timeout" if why == "timeout" else "killed"
        for job in list(self.running.values()):
            if job.ending is None:
                job.ending = ending
                self.ended_by_us += 1
                self._end_group(job, already_reaped=False)
        while self.next_job is not None:
            job = self.next_job
            self.next_job = next(self.queue, None)
            job.state = job.status = "skipped"
            self.skipped += 1
            if self.bar is not None:
                self.bar.update(1)

    def _end_group(self, job: _Job, *, already_reaped: bool) -> None:
        pgid = job.pid
        extras: list[psutil.Process] = []
        if not already_reaped:
            with contextlib.suppress(psutil.Error):
                extras = psutil.Process(job.pid).children(recursive=True)
        if not _signal_group(pgid, signal.SIGTERM, extras) and already_reaped:
            return  # nothing was left of it
        self.kills.append(_Kill(pgid, job, extras, time.monotonic() + self.opts.grace))
        if self.opts.grace <= 0:
            self._advance_kills(time.monotonic())

    def _advance_kills(self, now: float) -> None:
        for kill in list(self.kills):
            if not kill.escalated and now >= kill.deadline:
                _signal_group(kill.pgid, signal.SIGKILL, kill.extras)
                kill.escalated = True
                kill.deadline = now + max(1.0, self.opts.grace)  # how long we wait for it to go
            if kill.job.state == "running":
                continue
            gone = not _group_alive(kill.pgid) and not any(_alive(p) for p in kill.extras)
            if gone or (kill.escalated and now >= kill.deadline):
                self.kills.remove(kill)

    def _abandon(self) -> None:
        """Leave nothing behind, whatever made the loop end."""
        for job in list(self.running.values()):
            _signal_group(job.pid, signal.SIGKILL, [])
            with contextlib.suppress(ChildProcessError):
                os.waitpid(job.pid, 0)
            if job.popen is not None:
                job.popen.returncode = -signal.SIGKILL
        for kill in self.kills:
            _signal_group(kill.pgid, signal.SIGKILL, kill.extras)

    # -- signals ----------------------------------------------------------------------

    def _install_signals(self, wake_w: int) -> Any:
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
            if not self.stop:
                self.stop_signal = signum
                self._stop("signal")
            else:  # asked again: do not wait for the grace period
                for kill in self.kills:
                    kill.deadline = min(kill.deadline, time.monotonic())
                self._advance_kills(time.monotonic())

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

    def _note(self, job: _Job, message: str) -> None:
        """A message of ours about a job, written with the job's stderr (once)."""
        if message not in self.messages:
            self.messages.add(message)
            self._emit(job, _STDERR, message.encode())

    def _emit(self, job: _Job, target: int, data: bytes) -> None:
        if self.opts.ordered and job.index == self.head:
            self._write(target, data)
        else:
            job.chunks.append((target, data))

    def _job_output_done(self, job: _Job) -> None:
        if self.opts.ordered:
            self._flush_head()
        else:
            self._write_chunks(job)

    def _flush_head(self) -> None:
        while self.head < len(self.jobs):
            job = self.jobs[self.head]
            self._write_chunks(job)
            if job.state not in ("done", "skipped"):
                return  # it holds the output now: what it writes goes straight out
            self.head += 1

    def _write_chunks(self, job: _Job) -> None:
        chunks, job.chunks = job.chunks, []
        for target, data in chunks:
            self._write(target, data)

    def _write(self, target: int, data: bytes) -> None:
        if self.bar is not None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stderr):
                self._write_raw(target, data)
        else:
            self._write_raw(target, data)

    def _write_raw(self, target: int, data: bytes) -> None:
        if target == _STDOUT:
            if self.out_broken:
                return
            try:
                self.out.write(data)
                self.out.flush()
            except BrokenPipeError:
                self.out_broken = True  # the reader went away: stop, as a pipeline would
                if not self.stop:
                    self.stop_signal = signal.SIGPIPE
                    self._stop("broken-pipe")
        elif not self.err_broken:
            try:
                self.err.write(data)
                self.err.flush()
            except BrokenPipeError:
                self.err_broken = True

    def _say(self, line: str) -> None:
        self._write(_STDERR, f"alloter-mp: {line}\n".encode())

    # -- the outcome ------------------------------------------------------------------

    def _summarise(self) -> None:
        ended, skipped = self.ended_by_us, self.skipped
        tail = f"ended {ended} running job(s), skipped {skipped}"
        if self.stop == "timeout":
            self._say(f"timed out after {self.opts.timeout:g} s; {tail}")
        elif self.stop == "signal":
            self._say(f"interrupted by {signal.Signals(self.stop_signal).name}; {tail}")
        elif self.stop == "failed" and self.first_failure is not None:
            job = self.first_failure
            if (ended or skipped) and not job.spawn_error:
                self._say(f"input {_short(job.input)} failed ({describe(job.returncode)}); {tail}")
        elif self.first_failure is not None and len(self.jobs) > 1:
            job = self.first_failure
            self._say(
                f"{self.failed} of {len(self.jobs)} jobs failed; the first in input order: "
                f"{_short(job.input)} ({describe(job.returncode)})"
            )

    def _exit_code(self) -> int:
        if self.stop == "timeout":
            return 124
        if self.stop in ("signal", "broken-pipe"):
            return 128 + self.stop_signal
        if self.first_failure is not None and self.first_failure.returncode is not None:
            return exit_status(self.first_failure.returncode) or 1
        return 0

    def _write_report(self) -> None:
        report = self.opts.report
        if report is None:
            return
        for job in self.jobs:
            ran = job.state == "done"
            line = {
                "index": job.index,
                "input": job.input,
                "command": job.argv,
                "status": job.status or "skipped",
                "exit_code": job.returncode if ran else None,
                "wall_s": round(job.ended - job.started, 6) if ran else 0.0,
                "peak_rss": job.peak_rss,
            }
            report.write(json.dumps(line) + "\n")
        report.flush()


def _signal_group(pgid: int, sig: int, extras: list[psutil.Process]) -> bool:
    """Send ``sig`` to process group ``pgid`` and to ``extras``; True if any was there."""
    hit = False
    try:
        os.killpg(pgid, sig)
        hit = True
    except (ProcessLookupError, PermissionError):
        pass
    for proc in extras:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            hit = True
    return hit


def _group_alive(pgid: int) -> bool:
    """Whether a living (not zombie) process is left in group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies count for kill(): they wait for their (new) parent to reap them,
    # which an init process may do late. Only the living matter here.
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_jobs(opts: RunOptions, out: BinaryIO | None = None, err: BinaryIO | None = None) -> int:
    """Run the jobs of ``opts``; return the tool's exit status."""
    return _Runner(
        opts, out if out is not None else sys.stdout.buffer, err or sys.stderr.buffer
    ).run()
