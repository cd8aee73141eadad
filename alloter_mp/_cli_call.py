"""The engine of ``alloter-mp call``: a Python function over JSON lines, in workers.

Parent (this process):
  read every stdin line as JSON (a bad line is a user error: status 2)
  import MODULE and find FUNCTION here first (not found: status 2)
  fail-fast: ``ProcessAlloter.imap`` over the values, one JSON line out per
      result in input order; the first failure prints its remote traceback
      and ends the rest (status 1)
  --keep-going: one ``exec_with_context`` per value from ``limit`` threads, all
      under one Context carrying the deadline; a failure becomes an
      ``{"error": ...}`` line (status 1 at the end)

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
import signal
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from alloter_mp import ProcessAlloter

__all__ = ["Target", "UsageError", "call_command", "call_one", "parse_target", "resolve"]

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


def call_one_caught(target: Target, value: Any) -> tuple[bool, str, str]:
    """:func:`call_one` for ``--keep-going``: ``(ok, json_line, traceback_text)``.

    An exception of the function becomes an ``{"error": ...}`` line instead of
    failing the task, so it never ends the other calls.
    """
    try:
        return True, call_one(target, value), ""
    except Exception as exc:
        # Leave out the frames of this module: the user's own code is what matters.
        tb = exc.__traceback__
        if tb is not None and tb.tb_next is not None and tb.tb_next.tb_next is not None:
            tb = tb.tb_next.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        return False, _error_line(type(exc).__name__, str(exc)), text


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


def _fail_fast(
    alloter: ProcessAlloter, target: Target, values: list[tuple[int, Any]], out: _Output
) -> int:
    from alloter_mp import TaskError

    results: Iterator[str] = alloter.imap(
        functools.partial(call_one, target), (value for _, value in values)
    )
    try:
        for text in results:
            out.line(text)
    except TaskError as err:
        if err.remote_traceback:
            out.error(err.remote_traceback)
        kind, message = _describe(err)
        out.error(f"{_PREFIX}: the input on line {values[err.index][0]} failed: {kind}: {message}")
        return 1
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    return 0


def _keep_going(
    alloter: ProcessAlloter,
    target: Target,
    values: list[tuple[int, Any]],
    out: _Output,
    timeout: float | None,
) -> int:
    from alloter_mp import Context, TaskError

    ctx = Context(timeout=timeout)
    task = functools.partial(call_one_caught, target)

    def one(value: Any) -> tuple[bool, str, str]:
        try:
            result: tuple[bool, str, str] = alloter.exec_with_context(
                ctx, functools.partial(task, value)
            )[0]
        except TaskError as err:  # its worker died, or the like: still only this input
            kind, message = _describe(err)
            return False, _error_line(kind, message), err.remote_traceback
        return result

    failed = 0
    pending: deque[tuple[int, Future[tuple[bool, str, str]]]] = deque()
    feed = iter(values)
    limit = alloter.limit or 1  # a ProcessAlloter always has one
    with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="alloter-call") as pool:
        try:
            while True:
                while len(pending) < 2 * limit:
                    item = next(feed, None)
                    if item is None:
                        break
                    pending.append((item[0], pool.submit(one, item[1])))
                if not pending:
                    break
                number, future = pending.popleft()
                ok, text, tb = future.result()
                if not ok:
                    failed += 1
                    if tb:
                        out.error(tb)
                    error = json.loads(text)["error"]
                    out.error(
                        f"{_PREFIX}: the input on line {number} failed: "
                        f"{error['type']}: {error['message']}"
                    )
                out.line(text)
        except BaseException:
            ctx.cancel()
            for _, future in pending:
                future.cancel()
            raise
    if failed:
        out.error(f"{_PREFIX}: {failed} of {len(values)} calls failed")
        return 1
    return 0


def call_command(
    target_text: str,
    *,
    limit: int | None = None,
    timeout: float | None = None,
    keep_going: bool = False,
    progress: bool = False,
) -> int:
    """Run ``alloter-mp call``: read stdin, call, write stdout; return the exit status."""
    try:
        target = parse_target(target_text)
        resolve(target)
        values = read_values(sys.stdin.buffer)
    except UsageError as exc:
        sys.stderr.write(f"{_PREFIX}: error: {exc}\n")
        return 2
    if not values:
        return 0

    from alloter_mp import ExecTimeout, ProcessAlloter

    restore = _raise_on_sigterm()
    out = _Output(len(values), progress)
    try:
        with ProcessAlloter(limit, timeout=None if keep_going else timeout) as alloter:
            if keep_going:
                return _keep_going(alloter, target, values, out, timeout)
            return _fail_fast(alloter, target, values, out)
    except ExecTimeout:
        out.error(f"{_PREFIX}: timed out after {timeout:g} s")
        return 124
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
