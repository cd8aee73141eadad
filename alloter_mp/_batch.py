"""A batch: the rules of one call, whatever runs its tasks.

A :class:`Batch` is one ``exec`` (or ``map``/``imap``, an executor's stream of
futures, a command-line run) call. It owns its slots, its first failure, its deadline
and its cancelled state, and it is the *only* place that knows the contract's rules:

* the first failure decides the outcome (fast return) and ends the siblings, unless
  the batch keeps going (``errors="return"``): then a failure is that task's outcome
  and the others run on;
* a failure that matches ``retry_on`` is retried (the task goes back to the queue
  after ``retry_delay * 2**(k-1)``) while attempts remain and the deadline allows;
  a failure that will be retried ends nothing;
* a task that runs longer than ``task_timeout`` is ended on its own (the runner tells
  it, then kills it after the grace) and fails with :class:`TaskTimeout`;
* queued tasks of an ended batch never start (``skipped``); a task its worker never
  started goes back to the queue (that is no retry);
* a task running when the batch ends is ``timeout`` (the deadline passed) or
  ``cancelled`` (a sibling failed, the context was cancelled, the caller was
  interrupted), whether it then returns by itself or is killed;
* when every task has settled without ending the batch, the outcome is the list of
  results in task order (with a keep-going batch, a failed task's
  :class:`TaskError` in its place).

The code that runs tasks (the local worker pool, Ray, the command line's engine) only
reports facts to the batch — "slot 3 returned this", "slot 3's process died", "slot 3
was never started" — and reacts to what the batch decides: ``ending`` (tell the
running tasks, kill those still running at ``grace_deadline``) and a slot's
``ended_alone`` (the same for one task). Deciding methods are thread-safe and the
first decision wins.

A map's chunk is one slot standing for ``size`` items. When the batch judges items
one by one (:attr:`Batch.per_item`: keep-going, a task timeout or retries), the
runner reports each item's outcome, and a chunk interrupted part-way goes back to
the queue with only the items still to run (:attr:`Slot.todo`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._errors import Cancelled, ExecTimeout, RemoteError, TaskError, TaskTimeout
from ._logreceive import snapshot
from ._options import CallOptions
from ._states import FINAL, EndKind, TaskStatus

__all__ = ["MAIN_THREAD_SLICE", "REQUEUE_MOST", "Batch", "Latch", "Slot", "wait_interruptibly"]

QUEUED = TaskStatus.QUEUED
RUNNING = TaskStatus.RUNNING
OK = TaskStatus.OK
ERROR = TaskStatus.ERROR
CRASHED = TaskStatus.CRASHED
TIMEOUT = TaskStatus.TIMEOUT
CANCELLED = TaskStatus.CANCELLED
SKIPPED = TaskStatus.SKIPPED

_ids = itertools.count(1)

# How long a caller waits, after its batch ended, for the records of its tasks that
# were written but not yet sent (a worker sends them within a few tens of ms).
LOGS_WAIT = 0.25

# A task whose worker died before starting it goes back to the queue at most this
# many times; after that the death is blamed on it (a worker that cannot start
# tasks must not be replaced forever).
REQUEUE_MOST = 3

# An item's state in a chunk judged item by item.
_PENDING, _DONE, _FAILED = 0, 1, 2


class Slot:
    """One task of a batch (or one chunk of a map's items) and what became of it."""

    __slots__ = (
        "attempts",
        "base",
        "cpu_s",
        "ended_alone",
        "ended_at",
        "ended_item",
        "error",
        "index",
        "item_attempts",
        "item_state",
        "items",
        "not_before",
        "output",
        "owner",
        "payload",
        "peak_rss",
        "pending_failure",
        "pid",
        "requeued",
        "result",
        "size",
        "start_at",
        "started",
        "status",
        "todo",
        "unstarted_only",
        "wall_s",
    )

    def __init__(self, index: int, payload: Any) -> None:
        self.index = index
        # The position reported in errors: a chunk of a map reports its first item
        # plus the offset of the failing item within the chunk.
        self.base = index
        self.size = 1  # how many items it stands for (a chunk of a map: its length)
        # The pickled task (None when it travels in the batch's blob); kept until the
        # task settles, since it may be sent again (never started, or retried).
        self.payload = payload
        self.status: TaskStatus = QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.peak_rss = 0
        self.pid: int | None = None
        self.started = 0.0  # monotonic time it was last handed to a worker
        self.start_at: float | None = None  # monotonic time it first really started
        self.attempts = 0  # how many times it ran
        self.requeued = 0  # times it went back to the queue unstarted
        self.not_before = 0.0  # a retry waits until then
        # The failure a retry would replace: what the task's last attempt gave, and
        # what counts if the batch ends before the retry runs (queued, or handed to a
        # worker that never started it).
        self.pending_failure: tuple[BaseException, TaskStatus] | None = None
        # Ended on its own (a task timeout: TIMEOUT; a killed future: CANCELLED): the
        # runner tells it and kills it at ended_at + the grace.
        self.ended_alone: TaskStatus | None = None
        self.ended_at = 0.0
        self.ended_item = 0  # which item of a chunk was ended
        # Ended alone only if it has not started yet (shutdown(cancel_futures=True)):
        # the runner skips it if it can, and spares it (see spare()) if it started.
        self.unstarted_only = False
        # Whatever the caller attached to the task (an executor's future); the batch
        # only carries it.
        self.owner: Any = None
        # A chunk judged item by item: each item's state, result or error, attempts,
        # and the offsets to run when it is next handed over (None: all).
        self.item_state: bytearray | None = None
        self.items: list[Any] | None = None
        self.item_attempts: list[int] | None = None
        self.todo: list[int] | None = None
        # capture_output: what its last run wrote to stdout and stderr.
        self.output: tuple[str, str] | None = None


class Batch:
    """The state and rules of one call. See the module docstring."""

    def __init__(
        self,
        payloads: list[Any],
        *,
        deadline: float | None = None,
        options: CallOptions | None = None,
        timeout_message: str = "the call did not finish before its deadline",
        measure: bool = False,
        open_input: bool = False,
        keep_going: bool = False,
        chunked: bool = False,
        items_alone: bool = False,
        forget_settled: bool = False,
    ) -> None:
        options = options if options is not None else CallOptions()
        self.id = next(_ids)
        self.started_at = time.monotonic()  # the call's start, for TaskReport.start_s
        self.deadline = deadline
        self.cancel_grace = options.cancel_grace
        self.task_timeout = options.task_timeout
        self.retries = options.retries
        self.retry_on = options.retry_on
        self.retry_delay = options.retry_delay
        self.memory_limit = options.memory_limit
        self.timeout_message = timeout_message
        self.measure = measure or options.memory_limit is not None
        # Seeing inside the tasks: the caller's logging levels and warning filters,
        # taken now, for the workers to apply (None: records and warnings are not
        # relayed), and whether each task's stdout and stderr are captured.
        self.log_snapshot = snapshot() if options.relay_logs else None
        self.capture_output = options.capture_output
        # Set by a runner that relays logs once the records that tasks running at the
        # batch's end had written by then were handed over (see wait_logs).
        self.logs_drained: Latch | None = None
        self.keep_going = keep_going
        # The tasks are chunks of a map's items.
        self.chunked = chunked
        # They are even chunks of one map, cut for the workers: sending two ahead is safe.
        self.even = False
        # Items of a chunk are judged one by one (reported, retried, timed out alone),
        # unless each chunk is one item (``items_alone``): then the chunk is the item.
        self.per_item = (
            chunked
            and not items_alone
            and (keep_going or options.task_timeout is not None or options.retries > 0)
        )
        # A worker may skip the rest of the batch at its first failure.
        self.fail_fast = not keep_going and options.retries == 0
        self.slots = [Slot(i, p) for i, p in enumerate(payloads)]
        # A batch that lives long keeps only its open slots, in ``_live``: ``slots``
        # stays empty and ``results()`` is not available (an executor's stream of
        # futures; the command line's engine reading ``tail -f``). The runner or the
        # owner holds what it still needs of a settled slot.
        self._forget = forget_settled
        self._live: dict[int, Slot] = {}
        self._count = len(payloads)  # slots made so far: the next one's index
        if forget_settled:
            self._live = dict(enumerate(self.slots))
            self.slots = []
        # All tasks pickled together (slots then carry no payload of their own); or,
        # for a map on the pool, its function (each slot's payload: its items).
        self.blob: Any = None
        # The shared segments of the tasks' big buffers (an alloter_mp._shm.Outbox)
        # and the size from which results' buffers are shared (None: never).
        self.outbox: Any = None
        self.share_threshold = options.share_threshold
        # Set by the runner once no worker holds those segments (None: none was sent).
        self.segments_freed: Latch | None = None
        # Ready slots in order. A slot taken out early (withdraw) stays in the deque,
        # no longer QUEUED, and is passed over when reached: taking it out would
        # cost a walk of the deque.
        self._queued: deque[Slot] = deque(self.slots)
        # Retries waiting for their delay: (not_before, index, slot), a heap.
        self._delayed: list[tuple[float, int, Slot]] = []
        self._lock = threading.Lock()
        self._open = open_input
        # Slots ended alone and not settled yet: the runner tells them and kills them.
        self.alone: set[int] = set()
        self._unsettled = len(payloads)
        self._ok = 0
        self.outcome: BaseException | None = None
        self.end_kind: EndKind | None = None
        self.ended_at = 0.0
        # Running tasks of an ended batch are killed with SIGKILL at once, not
        # SIGTERM first (an executor's kill_workers()).
        self.kill_at_once = False
        self.decided = Latch()
        self.settled = Latch()
        # Set by whatever runs the tasks: called (from any thread) when the batch ends,
        # has new input, or a task of it was ended alone, so the runner wakes and acts.
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
        """Whether a task is ready to be handed over now (retries whose delay has
        passed included)."""
        # Read without the lock: the lists are replaced, never emptied in place.
        delayed = self._delayed
        if delayed and delayed[0][0] <= time.monotonic():
            self._release_delayed()
        queued = self._queued
        if queued and queued[0].status is not QUEUED:
            with self._lock:
                while queued and queued[0].status is not QUEUED:
                    queued.popleft()  # withdrawn meanwhile
        return bool(queued)

    def queued_count(self) -> int:
        """About how many tasks are ready (withdrawn ones not passed over yet count)."""
        return len(self._queued)

    def open_slots(self) -> list[Slot]:
        """The slots not settled yet."""
        with self._lock:
            if self._forget:
                return list(self._live.values())
            return [s for s in self.slots if s.status not in FINAL]

    def next_ready_at(self) -> float | None:
        """When the next retry waiting for its delay may be handed over, if any."""
        delayed = self._delayed
        return delayed[0][0] if delayed and self.end_kind is None else None

    def task_deadline(self, start: float) -> float | None:
        """When a task (or chunk item) that started at ``start`` has run too long."""
        return None if self.task_timeout is None else start + self.task_timeout

    # -- input ---------------------------------------------------------------

    def append(self, payload: Any, base: int | None = None, size: int = 1) -> int | None:
        """Add a task to an open batch; returns its index, or ``None`` if it ended."""
        slot = self.add(payload, base=base, size=size)
        return None if slot is None else slot.index

    def add(
        self, payload: Any, *, base: int | None = None, size: int = 1, owner: Any = None
    ) -> Slot | None:
        """Add a task to an open batch; returns its slot, or ``None`` if the batch
        ended or its input was closed. ``owner`` is carried on the slot."""
        with self._lock:
            if self.end_kind is not None or not self._open:
                return None
            index = self._count
            self._count += 1
            slot = Slot(index, payload)
            if base is not None:
                slot.base = base
            slot.size = size
            slot.owner = owner
            if self._forget:
                self._live[index] = slot
            else:
                self.slots.append(slot)
            self._queued.append(slot)
            self._unsettled += 1
        self.notify()
        return slot

    def close_input(self) -> None:
        """No more tasks will be appended; the batch may now succeed."""
        with self._lock:
            self._open = False
            self._check_success()
        self.notify()

    # -- the runner takes work -----------------------------------------------

    def take(self, most: int) -> list[Slot]:
        """Up to ``most`` ready slots, now running; none once the batch has ended."""
        taken: list[Slot] = []
        now = time.monotonic()
        with self._lock:
            if self._delayed and self._delayed[0][0] <= now:
                self._release_delayed_locked(now)
            queued = self._queued
            while queued and len(taken) < most and self.end_kind is None:
                slot = queued.popleft()
                if slot.status is not QUEUED:
                    continue  # withdrawn
                slot.status = RUNNING
                slot.started = now
                slot.output = None
                taken.append(slot)
        return taken

    def withdraw(self, slot: Slot) -> bool:
        """Take a queued task out before it starts (it ends ``skipped``); ``False`` if
        it was already handed over or settled."""
        with self._lock:
            if slot.status is not QUEUED:
                return False
            self._withdraw_locked(slot)
        self._slot_done(slot)
        self.notify()  # the runner may forget a batch that has settled so
        return True

    def _withdraw_locked(self, slot: Slot) -> None:
        # It stays in _queued or _delayed, passed over when reached.
        self._finish(slot, SKIPPED)
        self._check_success()

    def cancel_task(self, slot: Slot, *, running: bool) -> bool:
        """Cancel one task on its own, whatever its state: a queued one is taken out
        (it ends ``skipped``); with ``running``, one handed over is ended as by
        :meth:`end_task` with ``CANCELLED`` (one ended only if unstarted is now
        ended in any case). ``False`` if it settled, or runs and not ``running``.
        """
        with self._lock:
            if slot.status is QUEUED:
                self._withdraw_locked(slot)
                withdrawn = True
            elif slot.status is RUNNING and running:
                if slot.ended_alone is None:
                    self._end_alone_locked(slot, CANCELLED, 0)
                elif slot.unstarted_only:
                    slot.unstarted_only = False
                else:
                    return slot.ended_alone is CANCELLED
                withdrawn = False
            else:
                return False
        if withdrawn:
            self._slot_done(slot)
        self.notify()
        return True

    def end_unstarted(self) -> None:
        """End every task that has not started: queued ones are taken out (they end
        ``skipped``); those handed over are ended alone if they have not started
        yet (``unstarted_only``: the runner skips them, or spares one that started).
        """
        with self._lock:
            if self._forget:
                open_slots = list(self._live.values())
            else:
                open_slots = [s for s in self.slots if s.status not in FINAL]
            withdrawn = []
            for slot in open_slots:
                if slot.status is QUEUED:
                    self._withdraw_locked(slot)
                    withdrawn.append(slot)
                elif slot.status is RUNNING and slot.ended_alone is None:
                    self._end_alone_locked(slot, CANCELLED, 0)
                    slot.unstarted_only = True
        for slot in withdrawn:
            self._slot_done(slot)
        self.notify()

    def spare(self, slot: Slot) -> None:
        """The runner found that a task ended only if unstarted had started: it runs on."""
        with self._lock:
            if slot.unstarted_only and slot.status is RUNNING:
                self._clear_alone(slot)

    def _release_delayed(self) -> None:
        with self._lock:
            self._release_delayed_locked(time.monotonic())

    def _release_delayed_locked(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, slot = heapq.heappop(self._delayed)
            if slot.status is QUEUED:
                self._queued.append(slot)

    # -- deciding (thread-safe; the first decision wins) ------------------------

    def fail(self, error: BaseException) -> bool:
        """Record the first failure and end the siblings. ``False`` if already decided."""
        return self._end(EndKind.FAILURE, error)

    def expire(self) -> bool:
        """The deadline passed: end everything with :class:`ExecTimeout`."""
        return self._end(EndKind.TIMEOUT, ExecTimeout(self.timeout_message))

    def detach(self) -> None:
        """The runner is done with this batch: ``notify`` goes nowhere from now on,
        and no longer holds the runner's state for as long as the batch lives."""
        self.notify = _nothing

    def cancel(self, error: BaseException | None = None) -> bool:
        """Cancel from outside (context, interruption, close)."""
        return self._end(EndKind.CANCELLED, error or Cancelled("the call was cancelled"))

    def end_task(self, slot: Slot, status: TaskStatus, item: int = 0) -> bool:
        """End one running task on its own: ``TIMEOUT`` (its task timeout passed) or
        ``CANCELLED`` (killed alone). The runner tells it, and kills it after the grace.

        ``item`` is the offset of the item that ran too long, in a chunk. ``False``
        if the task had already settled or been ended.
        """
        with self._lock:
            if slot.status is not RUNNING or slot.ended_alone is not None:
                return False
            self._end_alone_locked(slot, status, item)
        self.notify()
        return True

    def _end_alone_locked(self, slot: Slot, status: TaskStatus, item: int) -> None:
        slot.ended_alone = status
        slot.ended_at = time.monotonic()
        slot.ended_item = item
        self.alone.add(slot.index)

    def _end(self, kind: EndKind, error: BaseException) -> bool:
        with self._lock:
            if self.decided.is_set():
                return False
            self.outcome = error
            self.end_kind = kind
            self.ended_at = time.monotonic()
            skipped = []
            for slot in itertools.chain(self._queued, (d[2] for d in self._delayed)):
                if slot.status is QUEUED:
                    self._settle(slot, self._unstarted_status(slot))
                    skipped.append(slot)
            # Replaced, never emptied in place: the runner peeks without the lock.
            self._queued = deque()
            self._delayed = []
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

    def started(self, slot: Slot, at: float) -> None:
        """The task really started at monotonic time ``at`` (first start kept)."""
        if slot.start_at is None:
            slot.start_at = at

    def task_returned(self, slot: Slot, result: Any) -> None:
        """The task returned ``result`` (for a chunk judged item by item: its run
        ended, every item of it reported)."""
        first: BaseException | None = None
        with self._lock:
            if slot.status in FINAL:
                return
            if slot.item_state is not None:
                self._run_over(slot)
            elif slot.ended_alone is TIMEOUT:
                # It returned during its grace, but too late: a timeout all the same.
                slot.attempts += 1
                first = self._failed(slot, self._timeout_error(slot), TIMEOUT)
            else:
                slot.attempts += 1
                slot.result = result
                if self.end_kind is None:
                    self._ok += 1
                    self._finish(slot, OK)
                else:
                    self._finish(slot, self._end_status())
                self._check_success()
        self._after(slot, first)

    def task_failed(self, slot: Slot, error: BaseException, *, crashed: bool = False) -> None:
        """The task raised (or its result could not travel), or its worker died."""
        first: BaseException | None = None
        with self._lock:
            if slot.status in FINAL:
                return
            if slot.item_state is not None and slot.status is RUNNING:
                # The chunk itself failed (not one item): its items still to run fail.
                for offset in slot.todo or range(slot.size):
                    if slot.item_state[offset] == _PENDING:
                        first = first or self._item_failed(slot, offset, error, crashed)
                self._run_over(slot)
            else:
                slot.attempts += 1
                if slot.ended_alone is TIMEOUT:
                    error, crashed = self._timeout_error(slot), False
                status = (
                    TIMEOUT if isinstance(error, TaskTimeout) else CRASHED if crashed else ERROR
                )
                first = self._failed(slot, error, status)
        self._after(slot, first)

    def task_killed(self, slot: Slot) -> None:
        """The runner killed this task: the batch ended (grace over), or the task was
        ended alone (its task timeout, a killed future)."""
        first: BaseException | None = None
        with self._lock:
            if slot.status in FINAL:
                return
            if slot.ended_alone is not None:
                if slot.item_state is not None:
                    offset = slot.ended_item
                    error = self._ended_alone_error(slot)
                    if isinstance(error, TaskError) and slot.output is not None:
                        error.stdout, error.stderr = slot.output  # what the item wrote
                    first = self._item_failed(slot, offset, error, False)
                    self._run_over(slot)
                else:
                    slot.attempts += 1
                    error = self._ended_alone_error(slot)
                    if slot.ended_alone is TIMEOUT:
                        first = self._failed(slot, error, TIMEOUT)
                    else:
                        slot.error = error
                        self._finish(slot, CANCELLED)
                        self._check_success()
            else:
                slot.attempts += 1
                if slot.error is None:
                    slot.error = self._ended_error()
                self._finish(slot, self._end_status())
        self._after(slot, first)

    def task_unstarted(self, slot: Slot) -> bool:
        """Its worker never started the task: it goes back to the queue (this is no
        retry), or ends ``skipped`` once the batch has ended (a retry: with its last
        attempt's failure) or ``cancelled`` if it was ended alone. ``False`` when it went back too often already: the runner then
        blames it (a worker that cannot start tasks must not be replaced forever).
        """
        with self._lock:
            if slot.status in FINAL:
                return True
            if self.end_kind is None and slot.ended_alone is None:
                if slot.requeued >= REQUEUE_MOST:
                    return False
                slot.requeued += 1
                slot.status = QUEUED
                slot.pid = None
                self._queued.appendleft(slot)
                requeued = True
            else:
                if slot.ended_alone is CANCELLED:
                    slot.error = self._ended_alone_error(slot)
                    self._finish(slot, CANCELLED)
                    self._check_success()
                else:
                    self._finish(slot, self._unstarted_status(slot))
                requeued = False
        if requeued:
            self.notify()
        else:
            self._slot_done(slot)
        return True

    def item_returned(self, slot: Slot, offset: int, value: Any) -> None:
        """Item ``offset`` of a chunk judged item by item returned ``value``."""
        first: BaseException | None = None
        with self._lock:
            state = slot.item_state
            if slot.status in FINAL or state is None or state[offset] != _PENDING:
                return
            assert slot.items is not None
            if slot.ended_alone is TIMEOUT and slot.ended_item == offset:
                first = self._item_failed(slot, offset, self._timeout_error(slot), False)
            else:
                assert slot.item_attempts is not None
                slot.item_attempts[offset] += 1
                slot.items[offset] = value
                state[offset] = _DONE
            if slot.ended_alone is not None and slot.ended_item == offset:
                self._clear_alone(slot)
        self._after(None, first)

    def item_failed(
        self, slot: Slot, offset: int, error: BaseException, *, crashed: bool = False
    ) -> None:
        """Item ``offset`` of a chunk judged item by item raised, or its worker died."""
        first: BaseException | None = None
        with self._lock:
            state = slot.item_state
            if slot.status in FINAL or state is None or state[offset] != _PENDING:
                return
            if slot.ended_alone is not None and slot.ended_item == offset:
                if slot.ended_alone is TIMEOUT:
                    error, crashed = self._timeout_error(slot), False
                self._clear_alone(slot)
            first = self._item_failed(slot, offset, error, crashed)
        self._after(None, first)

    def run_interrupted(self, slot: Slot) -> None:
        """A run of a chunk judged item by item stopped part-way (its worker died, its
        items reported until then): the items still to run go back to the queue."""
        with self._lock:
            if slot.status in FINAL or slot.item_state is None:
                return
            self._run_over(slot)
        self._after(slot, None)

    def abandon(self) -> None:
        """Settle every task still open: the runner can no longer report on them."""
        with self._lock:
            slots = self._live.values() if self._forget else self.slots
            open_slots = [s for s in slots if s.status not in FINAL]
            for slot in open_slots:
                if slot.error is None:
                    slot.error = self._ended_error()
                self._finish(slot, self._end_status() if slot.status is RUNNING else SKIPPED)
            self._queued = deque()
            self._delayed = []
            self._open = False
            self._check_settled()
        for slot in open_slots:
            self._slot_done(slot)

    # -- the rules (callers hold the lock) ------------------------------------------

    def _failed(self, slot: Slot, error: BaseException, status: TaskStatus) -> BaseException | None:
        """A task failed: retry it, keep going, or end the batch (returned: the error
        that should end it, decided outside the lock)."""
        if self.end_kind is not None:
            slot.error = error
            self._finish(slot, self._end_status())
            return None
        if self._retry(slot, error, slot.attempts):
            slot.pending_failure = (error, status)
            return None
        slot.error = error
        self._finish(slot, status)
        if self.keep_going:
            self._check_success()
            return None
        return error

    def _retry(self, slot: Slot, error: BaseException, attempts: int) -> bool:
        if attempts > self.retries or not self._retryable(error):
            return False
        not_before = time.monotonic() + self.retry_delay * 2 ** (attempts - 1)
        if self.deadline is not None and not_before >= self.deadline:
            return False  # never past the call's deadline
        slot.status = QUEUED
        slot.pid = None
        self._clear_alone(slot)
        slot.not_before = not_before
        if not_before <= time.monotonic():
            self._queued.append(slot)
        else:
            heapq.heappush(self._delayed, (not_before, slot.index, slot))
        return True

    def _retryable(self, error: BaseException) -> bool:
        """``retry_on`` matches the crash or timeout itself, else the task's own error."""
        retry_on = self.retry_on
        if isinstance(error, retry_on):
            return True
        cause = error.__cause__
        if cause is None or not isinstance(error, TaskError):
            return False
        return isinstance(cause, retry_on) and not (
            isinstance(cause, RemoteError) and RemoteError not in retry_on
        )

    def _item_failed(
        self, slot: Slot, offset: int, error: BaseException, crashed: bool
    ) -> BaseException | None:
        """An item of a chunk failed: retry it with the chunk, or settle it."""
        assert slot.item_state is not None and slot.item_attempts is not None
        assert slot.items is not None
        slot.item_attempts[offset] += 1
        if isinstance(error, TaskError) and error.index != slot.base + offset:
            error = _reindexed(error, slot.base + offset)
        if self.end_kind is None and self._retryable(error):
            attempts = slot.item_attempts[offset]
            delay = self.retry_delay * 2 ** (attempts - 1)
            not_before = time.monotonic() + delay
            if attempts <= self.retries and (self.deadline is None or not_before < self.deadline):
                slot.not_before = max(slot.not_before, not_before)
                return None  # stays pending: it runs again when the chunk is next handed over
        slot.items[offset] = error
        slot.item_state[offset] = _FAILED
        if self.end_kind is None and not self.keep_going:
            return error
        return None

    def _run_over(self, slot: Slot) -> None:
        """A run of a chunk judged item by item is over: settle it or queue the rest."""
        assert slot.item_state is not None and slot.items is not None
        self._clear_alone(slot)
        todo = [o for o in range(slot.size) if slot.item_state[o] == _PENDING]
        if not todo:
            slot.result = slot.items
            slot.attempts = max(slot.item_attempts or [1])
            if self.end_kind is None:
                self._ok += 1
                ends = _FAILED in slot.item_state and not self.keep_going
                self._finish(slot, ERROR if ends else OK)
                if not ends:
                    # A failed item ends the batch: the caller reports it (fail(),
                    # outside the lock), even when this was the last slot to settle.
                    self._check_success()
            else:
                self._finish(slot, self._end_status())
            return
        if self.end_kind is not None:
            slot.error = self._ended_error()
            self._finish(slot, self._end_status())
            return
        slot.todo = todo
        slot.status = QUEUED
        slot.pid = None
        if slot.not_before > time.monotonic():
            heapq.heappush(self._delayed, (slot.not_before, slot.index, slot))
        else:
            self._queued.appendleft(slot)

    def _timeout_error(self, slot: Slot) -> TaskTimeout:
        return TaskTimeout(slot.base + slot.ended_item, self.task_timeout or 0.0)

    def _ended_alone_error(self, slot: Slot) -> BaseException:
        if slot.ended_alone is TIMEOUT:
            return self._timeout_error(slot)
        return Cancelled("the task was cancelled")

    def _ended_error(self) -> BaseException | None:
        """What a task ended by the batch's end is told: the timeout, or a cancellation."""
        if self.end_kind is EndKind.TIMEOUT or isinstance(self.outcome, Cancelled):
            return self.outcome
        index = getattr(self.outcome, "index", None)
        return Cancelled(f"cancelled because task {index} failed first")

    def _unstarted_status(self, slot: Slot) -> TaskStatus:
        """How a task that will not run (again) ends: ``skipped`` if it never ran; if
        its retry never ran, its last attempt's failure (that attempt counts)."""
        if slot.pending_failure is None:
            return SKIPPED
        slot.error, status = slot.pending_failure
        return status

    def _end_status(self) -> TaskStatus:
        return TIMEOUT if self.end_kind is EndKind.TIMEOUT else CANCELLED

    def _clear_alone(self, slot: Slot) -> None:
        slot.ended_alone = None
        slot.unstarted_only = False
        self.alone.discard(slot.index)

    def _slot(self, index: int) -> Slot:
        return self._live[index] if self._forget else self.slots[index]

    def _finish(self, slot: Slot, status: TaskStatus) -> None:
        self._settle(slot, status)
        self._check_settled()

    def _settle(self, slot: Slot, status: TaskStatus) -> None:
        error = slot.error
        if slot.output is not None and isinstance(error, TaskError) and error.stdout is None:
            # A task's own error carries what it wrote (errors of the batch's end are
            # shared by its tasks, and are no TaskError).
            error.stdout, error.stderr = slot.output
        slot.status = status
        slot.payload = None  # settled: it will not be sent again
        self.alone.discard(slot.index)
        slot.unstarted_only = False
        if self._forget:
            self._live.pop(slot.index, None)
        self._unsettled -= 1

    def _check_success(self) -> None:
        if (
            not self._open
            and self.end_kind is None
            and self._unsettled == 0
            and not self.decided.is_set()
        ):
            self.decided.set()
            self._check_settled()

    def _check_settled(self) -> None:
        if self._unsettled == 0 and not self._open:
            self.settled.set()

    def _after(self, slot: Slot | None, first: BaseException | None) -> None:
        """Outside the lock: end the batch on a first failure, notify what waits."""
        if first is not None:
            self.fail(first)
        if slot is None:
            return
        if slot.status in FINAL:
            self._slot_done(slot)
        elif slot.status is QUEUED:
            self.notify()  # a retry or the rest of a chunk: the runner hands it over

    def _slot_done(self, slot: Slot) -> None:
        if self.on_slot_done is not None:
            self.on_slot_done(slot)

    # -- for the runner: judging chunks item by item ---------------------------------

    def prepare_items(self, slot: Slot) -> list[int] | None:
        """Before a chunk judged item by item is handed over: the offsets to run
        (``None``: all of them, the first time)."""
        if not self.per_item:
            return None
        with self._lock:
            if slot.item_state is None:
                slot.item_state = bytearray(slot.size)
                slot.items = [None] * slot.size
                slot.item_attempts = [0] * slot.size
                return None
            return slot.todo

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

    def wait_logs(self, most: float = LOGS_WAIT) -> None:
        """Once the batch has ended: wait (at most ``most`` seconds) until the records
        its running tasks had written by then have been handed to the caller's logging.

        Call from the caller's thread, never from the runner's.
        """
        event = self.logs_drained
        if event is not None and self.end_kind is not None:
            event.wait(most)

    def results(self) -> list[Any]:
        """The results in task order, or raise the outcome.

        In a keep-going batch a failed task's :class:`TaskError` stands in its place.
        Not for a batch that forgets its settled slots.
        """
        if self._forget:
            raise RuntimeError("a batch that forgets its settled slots has no results")
        self.wait_decided()
        if self.outcome is not None:
            raise self.outcome
        if self.keep_going:
            if self.chunked and not self.per_item:  # a failed one-item chunk
                return [s.result if s.status is OK else [s.error] for s in self.slots]
            return [s.result if s.status is OK else s.error for s in self.slots]
        return [slot.result for slot in self.slots]


class Latch:
    """A flag that is set once, waited for like a :class:`threading.Event`, and that
    calls back whoever asked when it is set.

    ``when_set(callback)`` runs ``callback()`` when the latch is set (in the thread
    that sets it, possibly while the batch holds its lock: a callback must be quick
    and must not call back into the batch), or at once if it is set already. This
    is how an awaiting coroutine hears of a batch's outcome without a thread of its
    own waiting for it. Cheap to make: the event threads wait on is made only when
    one does (thousands of calls may be made at once).
    """

    __slots__ = ("_callbacks", "_event", "_flag", "_lock")

    def __init__(self) -> None:
        self._flag = False
        self._lock = threading.Lock()
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[], None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def when_set(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._flag:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback()

    def set(self) -> None:
        with self._lock:
            if self._flag:
                return
            self._flag = True
            event, callbacks, self._callbacks = self._event, self._callbacks, None
        if event is not None:
            event.set()
        for callback in callbacks or ():
            callback()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        with self._lock:
            if self.is_set():  # set meanwhile
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)


def _reindexed(error: TaskError, index: int) -> TaskError:
    """``error`` naming item ``index`` (a chunk's failure named the chunk's first item)."""
    error.index = index
    error.args = (index, error.message)
    return error


def _nothing() -> None:
    return None


# How long the main thread blocks at a stretch: a KeyboardInterrupt is raised only
# when it runs Python code again, and a SIGINT delivered to another thread (or
# ``_thread.interrupt_main()``) does not wake a blocked lock.
MAIN_THREAD_SLICE = 0.05


def wait_interruptibly(event: threading.Event | Latch, timeout: float | None = None) -> bool:
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
