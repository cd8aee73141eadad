"""Seeing inside a pool worker's tasks: the log relay and output capture, wired in.

The building blocks are :mod:`alloter_mp._logrelay` and :mod:`alloter_mp._logreceive`
(records and warnings) and :mod:`alloter_mp._capture` (descriptors 1 and 2). This
module holds what a worker and its handle keep for them, so that the worker loop and
the supervisor each call a few methods:

* The parent makes a :class:`HandleSight` per worker: the log journal and the two
  capture files, anonymous files passed to the worker in its ``Process`` arguments
  (:meth:`HandleSight.worker_args`). It keeps its own descriptors to them, so it
  can read what a worker had not sent when it died.
* Before a worker's first task of a batch, the parent sends ``(CONFIG, snapshot,
  capture)`` when these differ from what that worker has (:meth:`HandleSight.config`):
  the batch's logging snapshot (``None``: no relay) and whether output is captured.
* The worker's :class:`WorkerSight` applies them, sends every message of the worker
  through the relay (so a task's records precede its result), marks each task's
  index on its records and, when capturing, sends ``(OUTPUT, batch_id, seq, offset,
  stdout, stderr)`` after each task (``offset`` -1) or each item of a chunk judged
  item by item (its offset), before the result it belongs to.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _transport
from ._capture import Capture, CaptureFiles
from ._logreceive import LogReceiver
from ._logrelay import LOGS, Snapshot, WorkerRelay

if TYPE_CHECKING:
    from ._batch import Batch

__all__ = ["CONFIG", "LOGS", "OUTPUT", "HandleSight", "WorkerSight", "position_in"]

# Message kinds beside those of alloter_mp._worker (which lists them too).
CONFIG = 7  # parent -> worker: (CONFIG, snapshot or None, capture)
OUTPUT = 8  # worker -> parent: (OUTPUT, batch_id, seq, offset, stdout, stderr)

Output = tuple[str, str]


class WorkerSight:
    """A pool worker's relay and capture (one per worker process)."""

    def __init__(self, send_bytes: Callable[[bytes], Any], args: Any, words: Any) -> None:
        journal, files = args
        self.relay = WorkerRelay(send_bytes, journal, words)
        #: Sends one message of the worker's, after the log frames waiting before it.
        self.send = self.relay.send
        self._files: CaptureFiles = files
        self._capture: Capture | None = None
        self._snap: Snapshot | None = None
        self._batch = 0
        self.capturing = False

    def configure(self, msg: tuple[Any, ...]) -> None:
        """A ``CONFIG`` message: applied from the next batch's tasks on."""
        _, self._snap, self.capturing = msg
        self._batch = 0

    def batch(self, batch_id: int) -> None:
        """A ``TASKS`` message of ``batch_id`` came: relay under its settings.

        Applied again for each batch, since a task may have changed the worker's
        logging (``basicConfig(force=True)`` removes the relay's handler).
        """
        if batch_id != self._batch:
            self._batch = batch_id
            self.relay.configure(self._snap)

    def before(self, index: int) -> None:
        """Task (or chunk) ``index`` of the batch starts."""
        self.relay.index = index
        if self.capturing:
            if self._capture is None:
                self._capture = Capture(self._files)
            self._capture.begin()

    def after(self, batch_id: int, seq: int, offset: int = -1) -> None:
        """It ended (``offset``: an item of a chunk): send what it wrote, if captured."""
        capture = self._capture
        if capture is not None and capture.active:
            out, err = capture.end()
            self.send(pickle.dumps((OUTPUT, batch_id, seq, offset, out, err), _transport.PROTOCOL))

    def resume(self) -> None:
        """After an item's outcome was sent: capture the next item's output."""
        if self.capturing and self._capture is not None:
            self._capture.begin()

    def stop(self) -> None:
        """The worker stops: send the frames still waiting."""
        self.relay.flush_quietly()


class HandleSight:
    """The parent's side for one worker: its journal, capture files and settings."""

    __slots__ = ("files", "item_output", "logs", "owed", "sent")

    def __init__(self) -> None:
        self.logs = LogReceiver.create()
        try:
            self.files = CaptureFiles.create()
        except BaseException:
            self.logs.close()
            raise
        # The (snapshot, capture) the worker was last sent; None: nothing yet.
        self.sent: tuple[Snapshot | None, bool] | None = None
        # The output of an item of a chunk, until its ITEM message (sent next) comes.
        self.item_output: tuple[int, int, Output] | None = None
        # The journal generation the worker still owes from before its batch ended.
        self.owed: int | None = None

    def worker_args(self) -> tuple[Any, CaptureFiles]:
        """What the worker's :class:`WorkerSight` needs (pass in the ``Process`` args)."""
        return self.logs.journal, self.files

    def config(self, batch: Batch) -> bytes | None:
        """The ``CONFIG`` message to send before ``batch``'s tasks, ``None`` if none is due."""
        snap, capture = batch.log_snapshot, batch.capture_output
        sent = self.sent
        # A snapshot is reused while nothing changed, so identity is the cheap test.
        if sent is not None and sent[0] is snap and sent[1] == capture:
            return None
        self.sent = (snap, capture)
        return pickle.dumps((CONFIG, snap, capture), _transport.PROTOCOL)

    def on_logs(self, msg: tuple[Any, ...], batch: Batch | None) -> None:
        """A ``LOGS`` message: its records and warnings to this process's logging."""
        self.logs.on_logs(msg, position_in(batch))
        if self.owed is not None and self.logs.last_gen >= self.owed:
            self.owed = None

    def recover(self, batch: Batch | None) -> None:
        """The worker died (its pipe read to the end): deliver what it had not sent."""
        self.logs.recover(position_in(batch))
        self.owed = None

    def owes(self) -> bool:
        """At its batch's end: whether the worker holds records not sent yet (noted)."""
        self.owed = self.logs.unsent()
        return self.owed is not None

    def on_item_output(self, seq: int, offset: int, output: Output) -> None:
        self.item_output = (seq, offset, output)

    def take_item_output(self, seq: int, offset: int) -> Output | None:
        """The output of item ``offset`` of task ``seq``, if it was captured."""
        found = self.item_output
        if found is None or found[0] != seq or found[1] != offset:
            return None
        self.item_output = None
        return found[2]

    def read_output(self) -> Output:
        """What the worker's task wrote before it died (``capture_output``)."""
        return self.files.read()

    def close(self) -> None:
        """Release this process's descriptors of the files."""
        self.logs.close()
        self.files.close()


def position_in(batch: Batch | None) -> Callable[[int, int], int] | None:
    """``record.task_index`` from a frame's task index and item offset: the position of
    the item in the call (a chunk's first item plus the offset)."""
    if batch is None:
        return None
    slots = batch.slots

    def position(index: int, offset: int) -> int:
        return slots[index].base + offset if 0 <= index < len(slots) else index + offset

    return position
