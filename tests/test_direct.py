"""The caller's own dispatch: a call hands its tasks to idle workers itself.

A warm pool skips the supervisor for a new call's first tasks, and a call of one
task reads its worker's reply itself (the worker is lent to it for a moment). The
promises stay the supervisor's: one owner per task, deaths settled, timers kept,
and a Ctrl-C landing anywhere in that path loses nothing.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Any

import _procs
import _tasks
import pytest

from alloter_mp import (
    Cancelled,
    Context,
    ExecTimeout,
    ProcessAlloter,
    TaskError,
    WorkerCrashed,
    _pool,
)


def noop(x: int = 0) -> int:
    return x


def settled_pool(a: ProcessAlloter, timeout: float = 5.0) -> None:
    """Wait until the pool holds no task and knows of no call (its state is whole)."""
    pool = a.pool
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with pool._lock:
            busy = [w for w in pool._workers if w.pipeline or w.run is not None or w.lent]
            runs = list(pool._runs)
        if not busy and not runs:
            return
        time.sleep(0.01)
    raise AssertionError(f"pool not settled: busy={busy} runs={runs}")


def test_one_task_on_a_warm_pool_never_wakes_the_supervisor(
    alloter: ProcessAlloter, monkeypatch: pytest.MonkeyPatch
) -> None:
    alloter.exec(noop, noop)
    settled_pool(alloter)
    wakes = []
    real = _pool.WorkerPool._wake
    monkeypatch.setattr(_pool.WorkerPool, "_wake", lambda self: (wakes.append(1), real(self)))
    reads = []
    real_events = _pool.WorkerPool._handle_events
    monkeypatch.setattr(
        _pool.WorkerPool,
        "_handle_events",
        lambda self, events, lent: (reads.extend(events), real_events(self, events, lent)),
    )
    for i in range(50):
        assert alloter.exec(functools.partial(noop, i)) == [i]
    assert wakes == [] and reads == []
    settled_pool(alloter)


def test_a_long_task_is_given_back_to_the_supervisor(alloter: ProcessAlloter) -> None:
    alloter.exec(noop)
    started = time.monotonic()
    assert alloter.exec(functools.partial(_tasks.sleep_then, 0.3, "late")) == ["late"]
    assert time.monotonic() - started < 2.0
    settled_pool(alloter)


def test_crash_of_a_lent_worker_is_worker_crashed(alloter: ProcessAlloter) -> None:
    alloter.exec(noop, noop)
    with pytest.raises(WorkerCrashed):
        alloter.exec(functools.partial(os._exit, 3))
    # and once the task outlived the lending
    with pytest.raises(WorkerCrashed):
        alloter.exec(_crash_later)
    assert alloter.exec(noop, noop) == [0, 0]
    settled_pool(alloter)


def _crash_later() -> None:
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def test_failure_and_timeout_of_a_lent_task() -> None:
    with ProcessAlloter(1, cancel_grace=0.05) as warm:
        warm.exec(noop)  # the worker starts without the timeout
        with pytest.raises(TaskError):
            warm.exec(functools.partial(_tasks.raise_value_error, "lent"))
        a = warm.with_options(timeout=0.05)
        started = time.monotonic()
        with pytest.raises(ExecTimeout):
            a.exec(functools.partial(_tasks.sleep_then, 5.0))
        assert 0.05 <= time.monotonic() - started < 0.5
        assert warm.exec(noop) == [0]  # its worker was killed: a new one starts
        settled_pool(warm)


def test_a_lent_task_cancelled_from_another_thread() -> None:
    with ProcessAlloter(1, cancel_grace=0.05) as a:
        a.exec(noop)
        ctx = Context()
        threading.Timer(0.005, ctx.cancel).start()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            a.exec_with_context(ctx, functools.partial(_tasks.sleep_then, 5.0))
        assert time.monotonic() - started < 0.5
        assert a.exec(noop) == [0]
        settled_pool(a)


@pytest.fixture
def sigint_armed():
    """SIGINT raises KeyboardInterrupt while ``armed[0]``; a late one is dropped."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    armed = [True]

    def handler(signum: int, frame: Any) -> None:
        # In alloter_mp's code, the test's or a wait in threading: one landing in a
        # weakref callback or the garbage collector's would be "unraisable".
        name = frame.f_code.co_filename if frame is not None else ""
        if armed[0] and ("alloter_mp" in name or name in (__file__, threading.__file__)):
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield armed
    finally:
        armed[0] = False
        time.sleep(0.05)  # a signal still on its way lands here, harmlessly
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "where",
    [
        "_batch.Batch.take",  # taken, not yet sent
        "_pool.WorkerPool._send",  # pipeline entry made, message not yet written
        "_pool.WorkerPool._lend",  # off the supervisor's selector
        "_pool.WorkerPool._read",  # between a message's length and its bytes
        "_pool.WorkerPool._give_back",  # back on the selector
    ],
)
def test_ctrl_c_inside_the_callers_dispatch_is_held_until_the_state_is_whole(
    sigint_armed: list[bool], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A SIGINT delivered in the middle of each step the caller takes for the pool
    raises KeyboardInterrupt only once the pool's state is whole again: the task was
    sent and answered or cancelled, no worker had to be killed to recover."""
    import alloter_mp._batch as _batch

    module, cls, name = where.split(".")
    owner = getattr({"_batch": _batch, "_pool": _pool}[module], cls)
    real = getattr(owner, name)
    hits = []

    def interrupted(*args: object, **kwargs: object) -> object:
        if hits_left[0] > 0:
            hits_left[0] -= 1
            hits.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode
            time.sleep(0)
        return real(*args, **kwargs)

    with ProcessAlloter(2, cancel_grace=5.0) as a:
        a.exec(noop, noop)
        pids = sorted(s.pid for s in a.stats())
        monkeypatch.setattr(owner, name, interrupted)
        lent_only = name in ("_lend", "_give_back")  # only a call of one task is lent
        for task_count in (1,) if lent_only else (1, 2):
            hits_left = [1]
            with pytest.raises(KeyboardInterrupt):
                a.exec(*[functools.partial(noop, i) for i in range(task_count)])
            assert hits == [1] * task_count or hits == [1] * len(hits)
            hits.clear()
        monkeypatch.setattr(owner, name, real)
        # Whole again without killing anyone (the grace is 5 s).
        settled_pool(a, timeout=2.0)
        assert sorted(s.pid for s in a.stats()) == pids
        assert a.exec(*[functools.partial(noop, i) for i in range(4)]) == list(range(4))


def test_ctrl_c_at_random_points_of_many_calls_loses_nothing(sigint_armed: list[bool]) -> None:
    """SIGINT at random points of thousands of calls: each one either returns its
    result or raises KeyboardInterrupt, and the pool is whole afterwards."""
    with ProcessAlloter(2, cancel_grace=5.0) as a:
        a.exec(noop, noop)
        pids = sorted(s.pid for s in a.stats())
        stop = threading.Event()
        sent = [0]

        def interrupt() -> None:
            while not stop.wait(0.0002 + (sent[0] % 7) * 0.0003):
                os.kill(os.getpid(), signal.SIGINT)
                sent[0] += 1

        interrupted = returned = 0
        ticker = threading.Thread(target=interrupt)
        ticker.start()
        try:
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                try:
                    if returned % 3:
                        assert a.exec(functools.partial(noop, returned)) == [returned]
                    else:
                        assert a.exec(noop, noop, noop) == [0, 0, 0]
                    returned += 1
                except KeyboardInterrupt:
                    interrupted += 1
        finally:
            stop.set()
            ticker.join()
            sigint_armed[0] = False
        assert interrupted > 20 and returned > 20, (interrupted, returned)
        settled_pool(a, timeout=2.0)
        assert sorted(s.pid for s in a.stats()) == pids  # nobody had to be killed
        assert a.exec(*[functools.partial(noop, i) for i in range(5)]) == list(range(5))
    assert not _procs.wait_no_descendants()
