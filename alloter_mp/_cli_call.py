"""The engine of ``alloter-mp call``: a Python function over JSON lines, in workers.

Parent (this process):
  read every stdin line as JSON (a bad line is a user error: status 2)
  import MODULE and find FUNCTION here first (not found: status 2)
  --resume: inputs whose result the report file has are not called again
  one open batch on a ProcessAlloter (``--timeout``, ``--job-timeout`` as its
      task_timeout, ``--retries``; ``--keep-going`` is the batch's keep_going),
      one task per input, fed a few ahead of the output; the batch's rules decide
  one JSON line out per input, in input order, as results come; without
      --keep-going the first failure prints its remote traceback and ends the
      rest (status 1); with it a failure becomes an ``{"error": ...}`` line
      (status 1 at the end)
  a report line (--report) and a trace event (--trace) per input as it settles

Worker: :func:`call_one` imports the module (with the caller's directory on
``sys.path``, as ``python -m`` has it), calls the function with ``print()``
sent to stderr so that stdout stays JSON lines, and returns the result as JSON
text, so a result JSON cannot hold fails in the worker with a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from . import _transport
from ._batch import MAIN_THREAD_SLICE, Slot, wait_interruptibly
from ._cli_report import ReportFile, job_status
from ._errors import Cancelled, ExecTimeout, TaskError, TaskTimeout
from ._states import TaskStatus

if TYPE_CHECKING:
    from alloter_mp import ProcessAlloter

__all__ = [
    "Target",
    "UsageError",
    "call_command",
    "call_one",
    "parse_target",
    "report_keep",
    "report_key",
    "resolve",
]

_PREFIX = "alloter-mp call"


class UsageError(Exception):
    """A mistake of the user's (target, input): one line, status 2."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be so that it ends the calls the same way."""


@dataclass(frozen=True)
class Target:
    """The function to call: ``module`` and the dotted ``qualname`` inside it.

    ``path`` is the directory put first on ``sys.path`` (the caller's current
    directory), in the parent and in every worker.
    """

    module: str
    qualname: str
    path: str


def parse_target(text: str, path: str | None = None) -> Target:
    """Read ``MODULE:FUNCTION`` (``FUNCTION`` may be dotted, e.g. ``Class.method``)."""
    module, sep, qualname = text.partition(":")
    if not sep or not module or not qualname:
        raise UsageError(f"expected MODULE:FUNCTION, got {text!r}")
    if module.endswith(".py") or os.sep in module:
        raise UsageError(
            f"expected a module name, not a file name: {module!r} "
            "(run from the module's directory and write e.g. tools:main)"
        )
    return Target(module, qualname, os.getcwd() if path is None else path)


def resolve(target: Target) -> Callable[..., Any]:
    """Import the target's module and return the function (:class:`UsageError` if not)."""
    if target.path not in sys.path:
        sys.path.insert(0, target.path)
    try:
        obj: Any = importlib.import_module(target.module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and target.module.startswith(exc.name):
            raise UsageError(f"no module named {target.module!r}") from None
        raise UsageError(f"cannot import {target.module!r}: {_one_line(exc)}") from None
    except Exception as exc:  # the module itself failed: still the user's error
        raise UsageError(f"cannot import {target.module!r}: {_one_line(exc)}") from None
    for part in target.qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"module {target.module!r} has no function {target.qualname!r}"
            ) from None
    if not callable(obj):
        raise UsageError(f"{target.module}:{target.qualname} is not callable")
    function: Callable[..., Any] = obj
    return function


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())


def call_one(target: Target, value: Any) -> str:
    """Call the target with one input value and return the result as JSON text.

    A list is spread as positional arguments, an object as keyword arguments,
    anything else is the only argument. Runs in a worker process.
    """
    function = resolve(target)
    lines = _WholeLines()
    try:
        with contextlib.redirect_stdout(lines):
            if isinstance(value, list):
                result = function(*value)
            elif isinstance(value, dict):
                result = function(**value)
            else:
                result = function(value)
    finally:
        lines.flush(final=True)
    return json.dumps(result)


class _WholeLines(io.TextIOBase):
    """What a function prints, sent to stderr a whole line per write.

    Workers share the tool's stderr; ``print("a", x)`` writes its pieces one by one,
    so without this the lines of two workers would mix mid-line.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            head, _, self._pending = self._pending.rpartition("\n")
            _write_stderr(head + "\n")
        return len(text)

    def flush(self, final: bool = False) -> None:
        if final and self._pending:
            _write_stderr(self._pending + "\n")
            self._pending = ""


def _write_stderr(text: str) -> None:
    sys.stderr.flush()
    data = text.encode(sys.stderr.encoding or "utf-8", "replace")
    while data:
        data = data[os.write(sys.stderr.fileno(), data) :]


def _describe(err: BaseException) -> tuple[str, str]:
    """The type name and message of a task's failure, without the task's index."""
    cause = err.__cause__
    if cause is not None and not hasattr(cause, "type_name"):
        return type(cause).__name__, str(cause)
    type_name = getattr(err, "type_name", None) or getattr(cause, "type_name", None)
    message = getattr(err, "message", None)
    return type_name or type(err).__name__, str(message if message is not None else err)


def _error_line(type_name: str, message: str) -> str:
    return json.dumps({"error": {"type": type_name, "message": message}})


def read_values(stream: BinaryIO) -> list[tuple[int, Any]]:
    """Every non-blank line of ``stream`` as ``(line_number, json_value)``."""
    values: list[tuple[int, Any]] = []
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"stdin line {number} is not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"stdin line {number} is not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
    return values


def report_key(line: dict[str, Any]) -> tuple[str, str] | None:
    """What ``--resume`` compares in a report line of ``call``: function and input."""
    function = line.get("function")
    if not isinstance(function, str) or "input" not in line:
        return None
    return function, _canonical(line["input"])


def report_keep(line: dict[str, Any]) -> str | None:
    """What ``--resume`` keeps of an ``ok`` line: the result, as JSON text."""
    return json.dumps(line["result"]) if "result" in line else None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class _Input:
    """One input line: where it was, its value, and its result if ``--resume`` has it."""

    line: int
    value: Any
    replay: str | None = None


class _Output:
    """Writes result lines to stdout, messages to stderr, and moves the progress bar."""

    def __init__(self, total: int, progress: bool) -> None:
        self.bar: Any = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True)

    def line(self, text: str) -> None:
        sys.stdout.buffer.write(text.encode() + b"\n")
        sys.stdout.buffer.flush()
        if self.bar is not None:
            self.bar.update(1)

    def error(self, text: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Calls:
    """One ``call`` run: an open batch with one task per input, fed ahead of the output.

    The batch's rules decide everything (the first failure ends the rest unless it
    keeps going, task timeouts, retries, the deadline); this class feeds it, writes
    the results in input order as they come, and writes a report line and a trace
    event for each input as it settles.
    """

    def __init__(
        self,
        alloter: ProcessAlloter,
        target: Target,
        target_text: str,
        inputs: list[_Input],
        out: _Output,
        *,
        keep_going: bool,
        timeout: float | None,
        job_timeout: float | None,
        report: ReportFile | None,
        trace: TextIO | None,
    ) -> None:
        from alloter_mp._calls import caller_of
        from alloter_mp._timeline import TraceWriter

        self.caller = caller_of(alloter)
        self.target = target
        self.target_text = target_text
        self.inputs = inputs
        self.out = out
        self.keep_going = keep_going
        self.timeout = timeout
        self.job_timeout = job_timeout
        self.report = report
        self.trace = None if trace is None else TraceWriter(trace, "alloter-mp call")
        self.done: queue.SimpleQueue[Slot | None] = queue.SimpleQueue()
        self.position: list[int] = []  # slot index -> input position
        self.settled: dict[int, Slot] = {}  # input position -> settled slot, until written
        self.failed = 0
        self.first_failed: int | None = None  # keep going: the first failed position
        self.first_timed_out = False  # ... and it ran past --job-timeout

    def run(self) -> int:
        caller = self.caller
        batch = caller.new_batch(
            [], None, open_input=True, keep_going=self.keep_going, measure=self.report is not None
        )
        self.batch = batch
        batch.on_slot_done = self.done.put
        batch.on_decided = lambda: self.done.put(None)
        launch = caller.launch(batch, None, None)
        try:
            return self._loop()
        finally:
            if not batch.decided.is_set():
                batch.cancel(Cancelled("the command was interrupted"))
            caller.finish(launch)
            self._drain()
            if self.trace is not None:
                self.trace.close()

    def _loop(self) -> int:
        batch = self.batch
        inputs = self.inputs
        # Enough in flight that the workers never wait for the next input (one task
        # per input makes tiny calls round trips otherwise); bounded: results wait
        # here for their turn in input order.
        ahead = max(256, 8 * self.caller.parallelism)
        fed = written = appended = 0
        closed = False
        while True:
            while fed < len(inputs) and appended - written < ahead and not batch.ending:
                item = inputs[fed]
                if item.replay is None:
                    task = functools.partial(call_one, self.target, item.value)
                    index = batch.append(_transport.dumps(task))
                    if index is None:
                        break
                    self.position.append(fed)
                    appended += 1
                fed += 1
            if fed == len(inputs) and not closed:
                closed = True
                batch.close_input()
            while written < len(inputs):
                item = inputs[written]
                if item.replay is not None:
                    self.out.line(item.replay)
                elif written in self.settled:
                    self._write(written, self.settled.pop(written))
                else:
                    break
                written += 1
            if written == len(inputs):
                return self._outcome()
            if batch.outcome is not None:
                return self._ended()
            slot = self._next_done()
            if slot is not None:
                self._settled(slot)

    def _next_done(self) -> Slot | None:
        """The next settled slot (``None``: the batch was decided, or a slice passed)."""
        deadline = self.batch.deadline
        timeout = MAIN_THREAD_SLICE
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.batch.expire()
                return None
            timeout = min(timeout, left)
        try:
            return self.done.get(timeout=timeout)
        except queue.Empty:
            return None

    def _settled(self, slot: Slot) -> None:
        position = self.position[slot.index]
        self.settled[position] = slot
        self._record(position, slot)

    def _drain(self) -> None:
        """Record what settled but was not taken from the queue yet."""
        while True:
            try:
                slot = self.done.get_nowait()
            except queue.Empty:
                return
            if slot is not None:
                self._record(self.position[slot.index], slot)

    def _write(self, position: int, slot: Slot) -> None:
        """Write the result line of a settled input (its turn in input order)."""
        if slot.status is TaskStatus.OK:
            self.out.line(slot.result)
            return
        error = slot.error
        if not self.keep_going or not isinstance(error, TaskError):
            return  # ended with the batch (cancelled, skipped): the outcome says why
        self.failed += 1
        if self.first_failed is None:  # input order: the first failed input decides
            self.first_failed = position
            self.first_timed_out = isinstance(error, TaskTimeout)
        if isinstance(error, TaskError) and error.remote_traceback:
            self.out.error(error.remote_traceback)
        kind, message = _describe(error)
        self.out.error(
            f"{_PREFIX}: the input on line {self.inputs[position].line} failed: {kind}: {message}"
        )
        self.out.line(_error_line(kind, message))

    def _outcome(self) -> int:
        """Every input was written: the exit status."""
        if not self.failed:
            return 0
        run = len(self.inputs) - sum(1 for i in self.inputs if i.replay is not None)
        self.out.error(f"{_PREFIX}: {self.failed} of {run} calls failed")
        return 124 if self.first_timed_out else 1

    def _ended(self) -> int:
        """The batch ended before every input was written: say why, and the status."""
        batch = self.batch
        outcome = batch.outcome
        if self.report is not None or self.trace is not None:
            # Every input gets its line: wait until the ended tasks are gone.
            wait_interruptibly(batch.settled)
            self._drain()
        if isinstance(outcome, ExecTimeout):
            self.out.error(f"{_PREFIX}: timed out after {self.timeout:g} s")
            return 124
        if isinstance(outcome, TaskError):
            if outcome.remote_traceback:
                self.out.error(outcome.remote_traceback)
            kind, message = _describe(outcome)
            line = self.inputs[self.position[outcome.index]].line
            self.out.error(f"{_PREFIX}: the input on line {line} failed: {kind}: {message}")
            return 124 if isinstance(outcome, TaskTimeout) else 1
        raise outcome if outcome is not None else AssertionError("no outcome")

    def _record(self, position: int, slot: Slot) -> None:
        """The report line and the trace event of a settled input."""
        item = self.inputs[position]
        status = job_status(slot.status)
        started = slot.start_at is not None
        start_s = None if slot.start_at is None else max(0.0, slot.start_at - self.batch.started_at)
        error = None
        if slot.error is not None and slot.status is not TaskStatus.OK:
            kind, message = _describe(slot.error)
            error = {"type": kind, "message": message}
        if self.report is not None:
            line = {
                "index": position,
                "line": item.line,
                "function": self.target_text,
                "input": item.value,
                "status": status,
                "error": error,
                "attempts": slot.attempts,
                "wall_s": round(slot.wall_s, 6),
                "cpu_s": round(slot.cpu_s, 6),
                "peak_rss": slot.peak_rss,
                "pid": slot.pid if started else None,
                "start_s": None if start_s is None else round(start_s, 6),
            }
            raw = {"result": slot.result} if slot.status is TaskStatus.OK else None
            self.report.write(line, raw)
        if self.trace is not None and start_s is not None:
            from alloter_mp._timeline import Span

            args: dict[str, Any] = {"index": position, "line": item.line, "attempts": slot.attempts}
            if error is not None:
                args["error"] = error
            self.trace.add(
                Span(
                    f"#{position} {status}",
                    status,
                    f"worker {slot.pid}",
                    start_s,
                    slot.wall_s,
                    label=str(position),
                    args=args,
                )
            )


def call_command(
    target_text: str,
    *,
    limit: int | None = None,
    timeout: float | None = None,
    keep_going: bool = False,
    progress: bool = False,
    job_timeout: float | None = None,
    retries: int = 0,
    report: ReportFile | None = None,
    done: dict[int, Any] | None = None,
    trace: TextIO | None = None,
) -> int:
    """Run ``alloter-mp call``: read stdin, call, write stdout; return the exit status.

    ``done`` (``--resume``) maps the hash of :func:`report_key` of inputs that already
    succeeded to their result's JSON text: those are written without a call.
    """
    try:
        target = parse_target(target_text)
        resolve(target)
        inputs = [_Input(number, value) for number, value in read_values(sys.stdin.buffer)]
    except UsageError as exc:
        sys.stderr.write(f"{_PREFIX}: error: {exc}\n")
        return 2
    if done:
        for item in inputs:
            item.replay = done.get(hash((target_text, _canonical(item.value))))
    if not inputs:
        return 0

    from alloter_mp import ProcessAlloter

    restore = _raise_on_sigterm()
    out = _Output(len(inputs), progress)
    try:
        with ProcessAlloter(
            limit,
            timeout=timeout,
            task_timeout=job_timeout,
            retries=retries,
            # As GNU parallel's --retries: whatever made a call fail, try it again.
            retry_on=(Exception,),
        ) as alloter:
            calls = _Calls(
                alloter,
                target,
                target_text,
                inputs,
                out,
                keep_going=keep_going,
                timeout=timeout,
                job_timeout=job_timeout,
                report=report,
                trace=trace,
            )
            return calls.run()
    except _Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    finally:
        out.close()
        restore()


def _raise_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into :class:`_Terminated` (a KeyboardInterrupt) while calls run."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return lambda: None

    def on_term(signum: int, frame: object) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, on_term)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
