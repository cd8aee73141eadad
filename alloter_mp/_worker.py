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
  time and, when asked, the peak resident memory of each task;
* receives the shared segments of its batch's big arguments with the tasks, maps
  them read-only, and lets go of them when the parent says the batch is over (or
  when tasks of another batch come); a result's big buffers go back the same way,
  in segments of their own (:mod:`alloter_mp._shm`).

The worker knows nothing of batches beyond the ids it echoes back.
"""

from __future__ import annotations

import _thread
import contextlib
import faulthandler
import gc
import os
import pickle
import signal
import time
import weakref
from collections import deque
from typing import Any

from . import _mapping, _shm, _sight, _task, _threads, _transport, _words
from ._measure import PeakMeter

__all__ = [
    "INIT_FAILED",
    "ITEM",
    "RELEASE",
    "RELEASED",
    "RESULTS",
    "SHARED",
    "SKIPPED",
    "STOP",
    "TASKS",
    "worker_main",
]

# Message kinds, parent -> worker:
#   (TASKS, params, blob, [(seq, index, payload, offsets), ...])
# ``params`` are the batch's: (batch_id, deadline, measure, fail_fast, task_timeout,
# per_item, share_threshold). ``fail_fast``: the first failure ends the batch, so the
# worker may skip the rest of it at once; ``per_item``: a map chunk reports each item
# as it ends (``offsets``: which of its items to run, None for all). The blob, when
# not None, is the whole batch's task list pickled at once; items then carry no
# payload and the worker takes task ``index`` from it. A payload (or blob) is bytes,
# or ``(data, refs)`` when its big buffers lie in the batch's shared segments.
TASKS = 1
STOP = 2  # (STOP,)
RELEASE = 10  # (RELEASE, batch_id): let go of the batch's task list and segments
# Worker -> parent.
RESULTS = 3  # (RESULTS, batch_id, [(seq, code, body, wall, cpu, peak, start), ...])
INIT_FAILED = 4  # (INIT_FAILED, ExceptionInfo)
ITEM = 5  # (ITEM, batch_id, seq, offset, code, body, start): one item of a chunk
# Kinds 6 (LOGS), 7 (CONFIG) and 8 (OUTPUT) are the relay's and capture's: see _sight.
RELEASED = 11  # (RELEASED, batch_id): done, nothing of it is mapped any more
# Either way: (SHARED, nfds, message). ``nfds`` descriptors (shared segments, sent
# with _shm.send_fds) follow the message, on the channel's descriptor socket (see
# _channel). From a worker, each result body with big buffers is
# ``(data, refs, nseg)``: its ``nseg`` segments come next in the descriptors, in
# the order of the bodies.
SHARED = 9

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
    conn: Any,  # the worker's end of its alloter_mp._channel.Channel
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
    # What the worker inherited (the parent's objects under fork, the fork server's
    # otherwise) is left out of its garbage collections: a collection writes to every
    # object it visits, which would copy each page of them into this process.
    gc.freeze()
    _threads.apply_env(thread_env)  # before the initializer or a task loads a BLAS
    _become_group_leader()
    # The parent owns Ctrl-C: it cancels the batch, and kills us if need be.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Descriptor 2, whatever sys.stderr is: a captured task's crash report is its output.
    faulthandler.enable(file=2)
    with contextlib.suppress(Exception):
        lifeline_w.close()  # under fork we inherited the parent's end: drop it
    # _thread, not threading: Thread.start() waits until the new thread runs, which
    # on a busy machine delays the worker's start by milliseconds. The watcher needs
    # no more than to run soon; the worker ends with os._exit, never joining it.
    _thread.start_new_thread(_watch_lifeline, (lifeline,))
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
_Params = tuple[int, float | None, bool, bool, float | None, bool, int | None]
# A task waiting in the worker: (params, seq, index, payload, offsets)
_Queued = tuple[_Params, int, int, Any, list[int] | None]


def _serve(conn: Any, sight: _sight.WorkerSight) -> None:
    state = _task.state
    words = state.words
    assert words is not None
    meter = PeakMeter()
    held = _Held()
    results = _Results()
    state.dump_result = results.pack
    queue: deque[_Queued] = deque()
    out: list[tuple[Any, ...]] = []
    out_batch = 0
    out_since = 0.0
    recv = conn.recv_bytes
    send = sight.send  # log frames go first
    poll = conn.waiter()
    dumps = pickle.dumps
    protocol = _transport.PROTOCOL
    cancel_batch, skip_from, skip_to = _words.CANCEL_BATCH, _words.SKIP_FROM, _words.SKIP_TO

    def flush() -> None:
        nonlocal out
        if out:
            if results.made:
                fds, outboxes = results.share(out, 2)
                _send_shared(send, conn, (RESULTS, out_batch, out), fds, outboxes)
            else:
                send(dumps((RESULTS, out_batch, out), protocol))
            out = []

    def send_item(seq: int, offset: int, code: int, body: Any, start: float) -> None:
        # An item's outcome goes at once: if the worker dies in the next item, the
        # ones before it are not lost. Results held back are older: they go first.
        flush()
        sight.after(state.batch_id, seq, offset)
        if type(body) is tuple:
            rows = [(body,)]
            fds, outboxes = results.share(rows, 0)
            message = (ITEM, state.batch_id, seq, offset, code, rows[0][0], start)
            _send_shared(send, conn, message, fds, outboxes)
        else:
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
                fds = _shm.recv_fds(conn.fd_conn, msg[1]) if msg[0] == SHARED else None
            except (EOFError, OSError):
                return
            if fds is not None:
                msg = msg[2]
                held.use(msg[1][0], None)
                held.add(fds)
            kind = msg[0]
            if kind == STOP:
                flush()
                sight.stop()
                return
            if kind == _sight.CONFIG:
                sight.configure(msg)
                continue
            if kind == RELEASE:
                flush()
                held.release(msg[1])
                send(dumps((RELEASED, msg[1]), protocol))
                continue
            _, params, blob, items = msg
            sight.batch(params[0])
            held.use(params[0], blob)
            for seq, index, payload, offsets in items:
                queue.append((params, seq, index, payload, offsets))
        if out and len(queue) == 1:
            # The last task this worker has, and nothing more in the pipe: what is held
            # back goes now, so that the parent can send more while this one runs.
            flush()
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
        results.threshold = params[6]
        sight.before(index)
        item = _run_one(words, params, seq, index, payload, offsets, held, meter)
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


class _Held:
    """What the worker holds of the batch it serves: its task list and shared segments.

    The task list (the blob) is unpickled on first use. Tasks of another batch, or
    the parent's RELEASE, let go of both: the objects built on the segments go with
    the task list, and with them the mappings.
    """

    def __init__(self) -> None:
        self.batch_id = 0
        self.blob: Any = None
        self.tasks: Any = None  # the blob unpickled: a task list, or a map's function
        self.inbox: _shm.Inbox | None = None

    def use(self, batch_id: int, blob: Any) -> None:
        if batch_id != self.batch_id:
            self.release(self.batch_id)
            self.batch_id = batch_id
        if blob is not None:
            self.blob, self.tasks = blob, None

    def add(self, fds: list[int]) -> None:
        if self.inbox is None:
            self.inbox = _shm.Inbox()
        self.inbox.add(fds)

    def load(self, payload: Any) -> Any:
        """A task from its payload (bytes, or ``(data, refs)`` read on the segments).

        A batch with both a blob and payloads is a map: the blob is its function, a
        payload a chunk's items (see ``_mapping.split_map``).
        """
        loaded = self._loads(payload)
        if self.blob is None:
            return loaded
        if self.tasks is None:
            self.tasks = self._loads(self.blob)
        return _mapping.Chunk(self.tasks, loaded)

    def _loads(self, payload: Any) -> Any:
        if type(payload) is bytes:
            return pickle.loads(payload)
        if self.inbox is None:
            self.inbox = _shm.Inbox()  # none came: loading says which is missing
        return self.inbox.loads(payload)

    def task(self, batch_id: int, index: int) -> Any:
        if batch_id != self.batch_id or self.blob is None:
            raise RuntimeError(f"no task list for batch {batch_id}")  # a bug, said loudly
        if self.tasks is None:
            self.tasks = self._loads(self.blob)
        return self.tasks[index]

    def release(self, batch_id: int) -> None:
        if batch_id != self.batch_id:
            return
        inbox = self.inbox
        self.blob = self.tasks = self.inbox = None
        if inbox is None:
            return
        mapped = [weakref.ref(view.obj) for view in inbox.views()]
        inbox.release()
        del inbox
        if any(ref() is not None for ref in mapped):
            gc.collect()  # a reference cycle (a closure's globals) may hold a mapping


class _Results:
    """Results whose big buffers go back through shared memory.

    ``pack`` pickles a result (``threshold``: the batch's ``share_threshold``); one
    that shares buffers becomes ``(data, refs, outbox)``, and ``send`` sends the
    message it sits in with the outboxes' descriptors after it.
    """

    def __init__(self) -> None:
        self.threshold: int | None = None
        self.made = 0  # outboxes made since the last send: 0 means nothing to look for
        self._found: list[pickle.PickleBuffer] = []

    def _take(self, buffer: pickle.PickleBuffer) -> bool:
        try:
            size = buffer.raw().nbytes
        except BufferError:  # not contiguous: in the pickle
            return True
        if size == 0 or size < (self.threshold or 0):
            return True
        self._found.append(buffer)
        return False

    def pack(self, obj: Any) -> Any:
        threshold = self.threshold
        if threshold is None:
            return _transport.dumps_result(obj)
        found = self._found
        try:
            # Plain pickle, as _transport.dumps_result, with the big buffers left out.
            data = pickle.dumps(obj, _transport.PROTOCOL, buffer_callback=self._take)
        except Exception:
            found.clear()
            body = _shm.pack_alone(obj, threshold)  # cloudpickle's turn
        else:
            if not found:
                return data
            outbox = _shm.Outbox(threshold)
            refs = outbox.place(found)
            found.clear()
            if refs is None:
                outbox.release()
                return _transport.dumps_result(obj)
            body = (data, refs, outbox)
        if type(body) is tuple:
            self.made += 1
        return body

    def share(self, rows: list[Any], at: int) -> tuple[list[int], list[_shm.Outbox]]:
        """Ready ``rows`` (each with a body at position ``at``) to be sent: the bodies
        become ``(data, refs, nseg)``; their descriptors, and the outboxes to release
        once they are sent."""
        fds: list[int] = []
        outboxes = []
        for i, row in enumerate(rows):
            body = row[at]
            if type(body) is tuple:
                data, refs, outbox = body
                outbox.seal()  # nobody may change what the parent maps
                segments = outbox.fds()
                rows[i] = (*row[:at], (data, refs, len(segments)), *row[at + 1 :])
                fds.extend(segments)
                outboxes.append(outbox)
        self.made = 0
        return fds, outboxes


def _send_shared(
    send: Any, conn: Any, message: Any, fds: list[int], outboxes: list[_shm.Outbox]
) -> None:
    """Send ``message`` with ``send`` (the relay's: log frames first), then ``fds`` on
    the channel's descriptor socket, then let go of the outboxes."""
    try:
        send(pickle.dumps((SHARED, len(fds), message), _transport.PROTOCOL))
        _shm.send_fds(conn.fd_conn, fds)
    finally:
        for outbox in outboxes:
            outbox.release()


def _run_one(
    words: memoryview,
    params: _Params,
    seq: int,
    index: int,
    payload: bytes | None,
    offsets: list[int] | None,
    held: _Held,
    meter: PeakMeter,
) -> tuple[Any, ...]:
    batch_id, deadline, measure, _, task_timeout, per_item, _ = params
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
        outcome = _task.execute(held.task, (batch_id, index), measure, meter)
    else:
        outcome = _task.execute(held.load, (payload,), measure, meter)
    words[_words.RUNNING] = 0
    return (seq, *outcome, start)
