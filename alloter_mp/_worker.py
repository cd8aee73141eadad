"""The worker process of the pool: its main loop.

A worker:

* starts a session of its own, so killing its process group reaches every process
  a task started, and a Ctrl-C meant for the parent does not reach it;
* watches a lifeline pipe from the parent in a small thread: when the parent dies
  the pipe reaches EOF and the worker kills its own group, so nothing is orphaned;
* turns on ``faulthandler``, so a segfault leaves its stack on descriptor 2;
* relays its tasks' log records and warnings to the parent, and captures their
  output when asked (:mod:`alloter_mp._sight`);
* reads task messages, keeps the tasks in a local queue and runs them in order
  (through :func:`alloter_mp._task.execute`, as every engine does); a task of a
  batch the parent has ended is skipped without starting;
* says in its shared words (:mod:`alloter_mp._words`) which task runs and since
  when, so the parent knows which task a crash belongs to and which never started;
* sends results back in small groups (an error at once), with the wall time, CPU
  time and, when asked, the peak resident memory of each task.

The worker knows nothing of batches beyond the ids it echoes back.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import signal
import threading
import time
from collections import deque
from typing import Any

from . import _sight, _task, _threads, _transport, _words
from ._measure import PeakMeter

__all__ = ["INIT_FAILED", "ITEM", "RESULTS", "SKIPPED", "STOP", "TASKS", "worker_main"]

# Message kinds, parent -> worker:
#   (TASKS, params, blob, [(seq, index, payload, offsets), ...])
# ``params`` are the batch's: (batch_id, deadline, measure, fail_fast, task_timeout,
# per_item). ``fail_fast``: the first failure ends the batch, so the worker may skip
# the rest of it at once; ``per_item``: a map chunk reports each item as it ends
# (``offsets``: which of its items to run, None for all). The blob, when not None,
# is the whole batch's task list pickled at once; items then carry no payload and
# the worker takes task ``index`` from it.
TASKS = 1
STOP = 2  # (STOP,)
# Worker -> parent.
RESULTS = 3  # (RESULTS, batch_id, [(seq, code, body, wall, cpu, peak, start), ...])
INIT_FAILED = 4  # (INIT_FAILED, ExceptionInfo)
ITEM = 5  # (ITEM, batch_id, seq, offset, code, body, start): one item of a chunk
# Kinds 6 (LOGS), 7 (CONFIG) and 8 (OUTPUT) are the relay's and capture's: see _sight.

# Result codes: _task.OK, _task.ERR, and:
SKIPPED = 2  # never started: its batch had ended

# Results are held back at most this long (or this many) so that tiny tasks do not
# pay a message each; an error is sent at once.
_FLUSH_AFTER = 0.002
_FLUSH_COUNT = 256


# -- the process ---------------------------------------------------------------


def _watch_lifeline(lifeline: Any) -> None:
    """Kill this worker's whole group when the parent's end of the lifeline closes.

    This is the only parent-death mechanism on purpose: ``PR_SET_PDEATHSIG`` would
    have the kernel SIGKILL the worker the moment its parent dies, before this
    thread could end the processes the running task started.
    """
    with contextlib.suppress(OSError, EOFError):
        lifeline.poll(None)
    # The parent is gone (or closed the pipe): nobody will read our results.
    # Children that left our group (a session of their own) are reached through psutil.
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(Exception):
                child.kill()
    with contextlib.suppress(OSError):
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(70)


def _become_group_leader() -> None:
    with contextlib.suppress(OSError):
        os.setsid()


def worker_main(
    conn: Any,
    words: Any,
    lifeline: Any,
    lifeline_w: Any,
    init_payload: bytes | None,
    thread_env: dict[str, str] | None = None,
    sight_args: Any = None,
) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``).

    ``sight_args``: the log journal and capture files its parent made for it
    (:meth:`alloter_mp._sight.HandleSight.worker_args`).
    """
    _threads.apply_env(thread_env)  # before the initializer or a task loads a BLAS
    _become_group_leader()
    # The parent owns Ctrl-C: it cancels the batch, and kills us if need be.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Descriptor 2, whatever sys.stderr is: a captured task's crash report is its output.
    faulthandler.enable(file=2)
    with contextlib.suppress(Exception):
        lifeline_w.close()  # under fork we inherited the parent's end: drop it
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()
    _task.state.words = _words.view(words)
    sight = _sight.WorkerSight(conn.send_bytes, sight_args, _task.state.words)

    if init_payload is not None:
        try:
            initializer, initargs = _transport.loads(init_payload)
            initializer(*initargs)
        except BaseException as exc:
            info = _transport.capture_exception(exc, skip_frames=1)
            with contextlib.suppress(OSError):
                sight.send(pickle.dumps((INIT_FAILED, info), _transport.PROTOCOL))
            os._exit(3)
    _serve(conn, sight)


# The batch's parameters of a TASKS message (see above).
_Params = tuple[int, float | None, bool, bool, float | None, bool]
# A task waiting in the worker: (params, seq, index, payload, offsets)
_Queued = tuple[_Params, int, int, bytes | None, list[int] | None]


def _serve(conn: Any, sight: _sight.WorkerSight) -> None:
    state = _task.state
    words = state.words
    assert words is not None
    meter = PeakMeter()
    blobs = _Blobs()
    queue: deque[_Queued] = deque()
    out: list[tuple[Any, ...]] = []
    out_batch = 0
    out_since = 0.0
    recv = conn.recv_bytes
    send = sight.send  # log frames go first
    poll = conn.poll
    dumps = pickle.dumps
    protocol = _transport.PROTOCOL
    cancel_batch, skip_from, skip_to = _words.CANCEL_BATCH, _words.SKIP_FROM, _words.SKIP_TO

    def flush() -> None:
        nonlocal out
        if out:
            send(dumps((RESULTS, out_batch, out), protocol))
            out = []

    def send_item(seq: int, offset: int, code: int, body: Any, start: float) -> None:
        # An item's outcome goes at once: if the worker dies in the next item, the
        # ones before it are not lost. Results held back are older: they go first.
        flush()
        sight.after(state.batch_id, seq, offset)
        send(dumps((ITEM, state.batch_id, seq, offset, code, body, start), protocol))
        sight.resume()

    state.item_sink = send_item
    while True:
        # Block only when there is nothing to do and nothing left to report.
        if not queue:
            flush()
        # Read what the parent sent only when running low: tasks sent ahead wait in
        # the pipe meanwhile, and a poll per task would cost more than a tiny task.
        while not queue or (len(queue) < 2 and poll()):
            try:
                msg = pickle.loads(recv())
            except (EOFError, OSError):
                return
            if msg[0] == STOP:
                flush()
                sight.stop()
                return
            if msg[0] == _sight.CONFIG:
                sight.configure(msg)
                continue
            _, params, blob, items = msg
            sight.batch(params[0])
            if blob is not None:
                blobs.set(params[0], blob)
            for seq, index, payload, offsets in items:
                queue.append((params, seq, index, payload, offsets))
        params, seq, index, payload, offsets = queue.popleft()
        batch_id = params[0]
        if out and (batch_id != out_batch):
            flush()
        if not out:
            out_batch = batch_id
            out_since = time.monotonic()
        if (
            words[cancel_batch] == batch_id
            or state.local_cancel == batch_id
            or words[skip_from] <= seq <= words[skip_to]
        ):
            out.append((seq, SKIPPED, None, 0.0, 0.0, 0, 0.0))
            continue
        sight.before(index)
        item = _run_one(words, params, seq, index, payload, offsets, blobs, meter)
        sight.after(batch_id, seq)
        out.append(item)
        if not params[3]:
            # Not fail-fast: each task's outcome stands on its own, so none is held
            # back where a crash of the next task would lose it.
            flush()
        elif item[1] == _task.ERR:
            state.local_cancel = batch_id  # the failure ends its batch: skip the rest
            flush()  # a failure is news: tell the parent now
        elif len(out) >= _FLUSH_COUNT or time.monotonic() - out_since >= _FLUSH_AFTER:
            flush()


class _Blobs:
    """The task list of the batch this worker serves, unpickled on first use."""

    def __init__(self) -> None:
        self.batch_id = 0
        self.blob: bytes | None = None
        self.tasks: list[Any] | None = None

    def set(self, batch_id: int, blob: bytes) -> None:
        self.batch_id, self.blob, self.tasks = batch_id, blob, None

    def task(self, batch_id: int, index: int) -> Any:
        if batch_id != self.batch_id or self.blob is None:
            raise RuntimeError(f"no task list for batch {batch_id}")  # a bug, said loudly
        if self.tasks is None:
            self.tasks = pickle.loads(self.blob)
        return self.tasks[index]


def _run_one(
    words: memoryview,
    params: _Params,
    seq: int,
    index: int,
    payload: bytes | None,
    offsets: list[int] | None,
    blobs: _Blobs,
    meter: PeakMeter,
) -> tuple[Any, ...]:
    batch_id, deadline, measure, _, task_timeout, per_item = params
    state = _task.state
    state.batch_id = batch_id
    state.key = _words.task_key(seq)
    state.seq = seq
    state.call_deadline = deadline
    state.task_timeout = task_timeout
    state.per_item = per_item
    state.offsets = offsets
    start = time.monotonic()
    state.deadline = _task.sooner(deadline, task_timeout, start)
    # The start, said before the task runs: a crash names this task (not one whose
    # result is still held back here), and a task never started is known as such.
    words[_words.START_NS] = int(start * 1e9)
    words[_words.ITEM] = offsets[0] if offsets else 0
    words[_words.RUNNING] = seq
    words[_words.STARTED] = seq
    if payload is None:
        outcome = _task.execute(blobs.task, (batch_id, index), measure, meter)
    else:
        outcome = _task.execute(pickle.loads, (payload,), measure, meter)
    words[_words.RUNNING] = 0
    return (seq, *outcome, start)
