"""A batch: the rules of one call, whatever runs its tasks.

A :class:`Batch` is one ``exec`` (or ``map``/``imap``) call. It owns its slots, its
first failure, its deadline and its cancelled state, and it is the *only* place that
knows the contract's rules:

* the first failure decides the outcome (fast return) and ends the siblings;
* queued tasks of an ended batch never start (``skipped``);
* a task running when the batch ends is ``timeout`` (the deadline passed) or
  ``cancelled`` (a sibling failed, the context was cancelled, the caller was
  interrupted), whether it then returns by itself or is killed;
* when every task returned, the outcome is the list of results in task order.

The code that runs tasks (the local worker pool, or another engine) only reports
facts to the batch — "slot 3 started", "slot 3 returned this", "slot 3's process
died" — and reacts to ``ending``: tell the running tasks, and kill those still
running at ``grace_deadline``. Deciding methods are thread-safe and the first one wins.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._errors import Cancelled, ExecTimeout
from ._states import FINAL, EndKind, TaskStatus

__all__ = ["MAIN_THREAD_SLICE", "Batch", "Slot", "wait_interruptibly"]

QUEUED = TaskStatus.QUEUED
RUNNING = TaskStatus.RUNNING
OK = TaskStatus.OK
ERROR = TaskStatus.ERROR
CRASHED = TaskStatus.CRASHED
TIMEOUT = TaskStatus.TIMEOUT
CANCELLED = TaskStatus.CANCELLED
SKIPPED = TaskStatus.SKIPPED

_ids = itertools.count(1)

# A task whose worker died before starting it goes back to the queue at most this
# many times; after that the death is blamed on it (a worker that cannot start
# tasks must not be replaced forever).
REQUEUE_MOST = 3


class Slot:
    """One task of a batch and what became of it."""

    __slots__ = (
        "base",
        "cpu_s",
        "error",
        "index",
        "payload",
        "peak_rss",
        "pid",
        "requeued",
        "result",
        "size",
        "started",
        "status",
        "wall_s",
    )

    def __init__(self, index: int, payload: Any) -> None:
        self.index = index
        # The position reported in errors: a chunk of a map reports its first item
        # plus the offset of the failing item within the chunk.
        self.base = index
        self.size = 1  # how many items it stands for (a chunk of a map: its length)
        # The pickled task (None when it travels in the batch's blob); kept until the
        # task settles, since a task its worker never started is sent again.
        self.payload = payload
        self.status: TaskStatus = QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.peak_rss = 0
        self.pid: int | None = None
        self.started = 0.0  # monotonic time it was handed to a worker
        self.requeued = 0  # times it went back to the queue unstarted


class Batch:
    """The state and rules of one call. See the module docstring."""

    def __init__(
        self,
        payloads: list[Any],
        *,
        deadline: float | None = None,
        cancel_grace: float = 0.5,
        timeout_message: str = "the call did not finish before its deadline",
        measure: bool = False,
        memory_limit: int | None = None,
        open_input: bool = False,
    ) -> None:
        self.id = next(_ids)
        self.deadline = deadline
        self.cancel_grace = cancel_grace
        self.timeout_message = timeout_message
        self.measure = measure
        self.memory_limit = memory_limit
        self.slots = [Slot(i, p) for i, p in enumerate(payloads)]
        # All tasks pickled together (slots then carry no payload of their own).
        self.blob: bytes | None = None
        # The tasks are even chunks of one map: sending two ahead is safe.
        self.chunked = False
        self._queued: deque[int] = deque(range(len(payloads)))
        self._lock = threading.Lock()
        self._open = open_input
        self._unsettled = len(payloads)
        self._ok = 0
        self.outcome: BaseException | None = None
        self.end_kind: EndKind | None = None
        self.ended_at = 0.0
        self.decided = threading.Event()
        self.settled = threading.Event()
        # Set by whatever runs the tasks: called (from any thread) when the batch ends
        # or when it has new input, so the runner wakes up and acts.
        self.notify: Callable[[], None] = _nothing
        # Called with a finished slot (from the runner's thread), e.g. for progress bars.
        self.on_slot_done: Callable[[Slot], None] | None = None
        # Called (from the deciding thread) once the outcome is known.
        self.on_decided: Callable[[], None] | None = None
        if not payloads and not open_input:
            self.decided.set()
            self.settled.set()

    # -- questions -----------------------------------------------------------

    @property
    def ending(self) -> bool:
        """``True`` once the outcome is a failure, a timeout or a cancellation."""
        return self.end_kind is not None

    @property
    def grace_deadline(self) -> float | None:
        """When tasks still running after the end are to be killed."""
        if self.end_kind is None:
            return None
        return self.ended_at + self.cancel_grace

    def has_queued(self) -> bool:
        return bool(self._queued)

    def queued_count(self) -> int:
        return len(self._queued)

    # -- input ---------------------------------------------------------------

    def append(self, payload: Any, base: int | None = None, size: int = 1) -> int | None:
        """Add a task to an open batch; returns its index, or ``None`` if it ended."""
        with self._lock:
            if self.end_kind is not None or not self._open:
                return None
            index = len(self.slots)
            slot = Slot(index, payload)
            if base is not None:
                slot.base = base
            slot.size = size
            self.slots.append(slot)
            self._queued.append(index)
            self._unsettled += 1
        self.notify()
        return index

    def close_input(self) -> None:
        """No more tasks will be appended; the batch may now succeed."""
        with self._lock:
            self._open = False
            self._check_success()
        self.notify()

    # -- the runner takes work -----------------------------------------------

    def take(self, most: int) -> list[Slot]:
        """Up to ``most`` queued slots, now running; none once the batch has ended."""
        taken: list[Slot] = []
        now = time.monotonic()
        with self._lock:
            while self._queued and len(taken) < most and self.end_kind is None:
                slot = self.slots[self._queued.popleft()]
                slot.status = RUNNING
                slot.started = now
                taken.append(slot)
        return taken

    def requeue(self, slot: Slot) -> bool:
        """A task its worker never started goes back to the queue (this is no retry).

        It goes first, as it was taken first; once the batch has ended it is skipped.
        ``False`` when it went back too often already: the runner then blames it.
        """
        with self._lock:
            if slot.status in FINAL:
                return True
            if self.end_kind is None and slot.requeued >= REQUEUE_MOST:
                return False
            if self.end_kind is None:
                slot.requeued += 1
                slot.status = QUEUED
                slot.pid = None
                self._queued.appendleft(slot.index)
                skipped = False
            else:
                self._finish(slot, SKIPPED)
                skipped = True
        if skipped:
            self._slot_done(slot)
        else:
            self.notify()
        return True

    # -- deciding (thread-safe; the first decision wins) ------------------------

    def fail(self, error: BaseException) -> bool:
        """Record the first failure and end the siblings. ``False`` if already decided."""
        return self._end(EndKind.FAILURE, error)

    def expire(self) -> bool:
        """The deadline passed: end everything with :class:`ExecTimeout`."""
        return self._end(EndKind.TIMEOUT, ExecTimeout(self.timeout_message))

    def cancel(self, error: BaseException | None = None) -> bool:
        """Cancel from outside (context, interruption, close)."""
        return self._end(EndKind.CANCELLED, error or Cancelled("the call was cancelled"))

    def _end(self, kind: EndKind, error: BaseException) -> bool:
        with self._lock:
            if self.decided.is_set():
                return False
            self.outcome = error
            self.end_kind = kind
            self.ended_at = time.monotonic()
            skipped = []
            while self._queued:
                slot = self.slots[self._queued.popleft()]
                slot.status = SKIPPED
                skipped.append(slot)
            self._unsettled -= len(skipped)
            self._open = False
            self.decided.set()
            self._check_settled()
        self.notify()
        for slot in skipped:
            self._slot_done(slot)
        if self.on_decided is not None:
            self.on_decided()
        return True

    # -- facts reported by the runner ------------------------------------------

    def _ended_error(self) -> BaseException | None:
        """What a task ended by the batch's end is told: the timeout, or a cancellation."""
        if self.end_kind is EndKind.TIMEOUT or isinstance(self.outcome, Cancelled):
            return self.outcome
        index = getattr(self.outcome, "index", None)
        return Cancelled(f"cancelled because task {index} failed first")

    def _end_status(self) -> TaskStatus:
        return TIMEOUT if self.end_kind is EndKind.TIMEOUT else CANCELLED

    def _finish(self, slot: Slot, status: TaskStatus) -> None:
        # Caller holds the lock.
        slot.status = status
        slot.payload = None  # settled: it will not be sent again
        self._unsettled -= 1
        self._check_settled()

    def task_returned(self, slot: Slot, result: Any) -> None:
        with self._lock:
            if slot.status in FINAL:
                return
            slot.result = result
            status = OK if self.end_kind is None else self._end_status()
            if status == OK:
                self._ok += 1
            self._finish(slot, status)
            self._check_success()
        self._slot_done(slot)

    def task_failed(self, slot: Slot, error: BaseException, *, crashed: bool = False) -> None:
        """The task raised (or its result could not travel), or its worker died."""
        with self._lock:
            if slot.status in FINAL:
                return
            slot.error = error
            if self.end_kind is None:
                self._finish(slot, CRASHED if crashed else ERROR)
                first = True
            else:
                self._finish(slot, self._end_status())
                first = False
        if first:
            self.fail(error)
        self._slot_done(slot)

    def task_killed(self, slot: Slot) -> None:
        """The runner killed this task because the batch ended (grace over, timeout)."""
        with self._lock:
            if slot.status in FINAL:
                return
            if slot.error is None:
                slot.error = self._ended_error()
            self._finish(slot, self._end_status())
        self._slot_done(slot)

    def task_skipped(self, slot: Slot) -> None:
        """The runner dropped a task it had taken but never started."""
        with self._lock:
            if slot.status in FINAL:
                return
            self._finish(slot, SKIPPED)
        self._slot_done(slot)

    def abandon(self) -> None:
        """Settle every task still open: the runner can no longer report on them."""
        with self._lock:
            open_slots = [s for s in self.slots if s.status not in FINAL]
            for slot in open_slots:
                if slot.error is None:
                    slot.error = self._ended_error()
                self._finish(slot, self._end_status() if slot.status == RUNNING else SKIPPED)
            self._open = False
            self._check_settled()
        for slot in open_slots:
            self._slot_done(slot)

    def _slot_done(self, slot: Slot) -> None:
        if self.on_slot_done is not None:
            self.on_slot_done(slot)

    def _check_success(self) -> None:
        # Caller holds the lock.
        if (
            not self._open
            and self.end_kind is None
            and self._ok == len(self.slots)
            and not self.decided.is_set()
        ):
            self.decided.set()
            self._check_settled()

    def _check_settled(self) -> None:
        if self._unsettled == 0 and not self._open:
            self.settled.set()

    # -- for the caller --------------------------------------------------------

    def wait_decided(self) -> None:
        """Block until the outcome is known, expiring the batch at its deadline.

        The caller's own wait enforces the deadline, so the timeout is exact even if
        the runner is busy; the runner enforces it too for callers that do not wait.
        """
        while not self.decided.is_set():
            if self.deadline is None:
                wait_interruptibly(self.decided)
                continue
            remaining = self.deadline - time.monotonic()
            if (remaining <= 0 or not wait_interruptibly(self.decided, remaining)) and (
                time.monotonic() >= self.deadline
            ):
                self.expire()

    def results(self) -> list[Any]:
        """The results in task order, or raise the outcome."""
        self.wait_decided()
        if self.outcome is not None:
            raise self.outcome
        return [slot.result for slot in self.slots]


def _nothing() -> None:
    return None


# How long the main thread blocks at a stretch: a KeyboardInterrupt is raised only
# when it runs Python code again, and a SIGINT delivered to another thread (or
# ``_thread.interrupt_main()``) does not wake a blocked lock.
MAIN_THREAD_SLICE = 0.05


def wait_interruptibly(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)``, in short slices when called from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return event.wait(timeout)
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        left = MAIN_THREAD_SLICE if end is None else min(MAIN_THREAD_SLICE, end - time.monotonic())
        if event.wait(max(0.0, left)):
            return True
        if end is not None and time.monotonic() >= end:
            return False
