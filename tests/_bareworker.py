"""A bare worker process for the log relay and capture tests: no pool, just the parts.

The child serves ``run`` messages over a ``multiprocessing`` Pipe the way a pool
worker does: it configures its :class:`~alloter_mp._logrelay.WorkerRelay` with the
batch's snapshot, sets the task index, captures the task's output if asked, runs the
task and sends ``("done", index, outcome, output)`` through ``relay.send``, so the
task's log frames precede it on the pipe. The parent side, :class:`BareWorker`,
hands ``LOGS`` messages to its :class:`~alloter_mp._logreceive.LogReceiver` and,
when the child dies, recovers the journal and reads the capture files, as the pool
will.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import pickle
import signal
import time
from typing import Any

import cloudpickle

from alloter_mp._capture import Capture, CaptureFiles
from alloter_mp._logreceive import LogReceiver, snapshot
from alloter_mp._logrelay import LOGS, WorkerRelay
from alloter_mp._words import COUNT, ITEM

NOW = object()  # run(): take the parent's snapshot at the call


def _child(conn: Any, journal: Any, files: CaptureFiles, words: Any) -> None:
    # As a pool worker does: a segfault leaves its stack on descriptor 2, whatever
    # sys.stderr is (under fork, pytest's capture stream).
    faulthandler.enable(file=2)
    relay = WorkerRelay(conn.send_bytes, journal, words)
    capture: Capture | None = None
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg[0] == "stop":
            relay.flush_quietly()
            return
        _, index, snap, capture_on, offset, payload = msg
        relay.configure(snap)
        relay.index = index
        if words is not None:
            words[ITEM] = offset
        if capture_on:
            if capture is None:
                capture = Capture(files)
            capture.begin()
        try:
            outcome: tuple[str, Any] = ("ok", pickle.loads(payload)())
        except BaseException as exc:
            outcome = ("err", f"{type(exc).__name__}: {exc}")
        output = capture.end() if capture_on and capture is not None else None
        relay.send(pickle.dumps(("done", index, outcome, output)))


class Died(Exception):
    """The child died during the task; ``output`` is what the parent read of it."""

    def __init__(self, exitcode: int | None, output: tuple[str, str] | None) -> None:
        super().__init__(f"the bare worker died (exit code {exitcode})")
        self.exitcode = exitcode
        self.output = output


class BareWorker:
    """One child process running tasks with the log relay (and capture) of a pool worker."""

    def __init__(self, method: str = "forkserver", *, words: bool = False) -> None:
        ctx = multiprocessing.get_context(method)
        self.receiver = LogReceiver.create()
        self.files = CaptureFiles.create()
        self.words = ctx.RawArray("q", COUNT) if words else None
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_child, args=(child, self.receiver.journal, self.files, self.words)
        )
        self.proc.start()
        child.close()
        self.capturing = False

    def start(
        self, task: Any, index: int = 0, *, snap: Any = NOW, capture: bool = False, offset: int = 0
    ) -> None:
        """Send one task; :meth:`wait` reads what comes back."""
        if snap is NOW:
            snap = snapshot()
        self.capturing = capture
        payload = cloudpickle.dumps(task)
        self.conn.send_bytes(pickle.dumps(("run", index, snap, capture, offset, payload)))

    def poll_logs(self, timeout: float) -> bool:
        """Handle messages for up to ``timeout`` seconds; ``True`` once ``done`` came."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self.conn.poll(left):
                return False
            msg = self._next()
            if msg is not None:
                self.done = msg
                return True

    def wait(self, timeout: float = 30.0) -> tuple[Any, ...]:
        """``(outcome, output)`` of the task started; :class:`Died` if the child died."""
        end = time.monotonic() + timeout
        while True:
            if not self.conn.poll(max(0.0, end - time.monotonic())):
                raise TimeoutError("the bare worker did not answer")
            msg = self._next()
            if msg is not None:
                _, _index, outcome, output = msg
                return outcome, output

    def run(self, task: Any, index: int = 0, **kw: Any) -> tuple[Any, ...]:
        """:meth:`start` then :meth:`wait`."""
        self.start(task, index, **kw)
        return self.wait()

    def _next(self) -> tuple[Any, ...] | None:
        try:
            raw = self.conn.recv_bytes()
        except (EOFError, OSError):
            self.proc.join(10)
            self.receiver.recover()
            output = self.files.read() if self.capturing else None
            raise Died(self.proc.exitcode, output) from None
        msg = pickle.loads(raw)
        if msg[0] == LOGS:
            self.receiver.on_logs(msg)
            return None
        return msg  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the child (kill it if it does not stop) and release everything."""
        with contextlib.suppress(OSError):
            self.conn.send_bytes(pickle.dumps(("stop",)))
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll(5):  # the relay's last frames
                msg = pickle.loads(self.conn.recv_bytes())
                if msg[0] == LOGS:
                    self.receiver.on_logs(msg)
        self.proc.join(5)
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(5)
        self.conn.close()
        self.receiver.close()
        self.files.close()
