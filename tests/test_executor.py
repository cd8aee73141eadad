"""alloter_mp.ProcessPoolExecutor: the standard library's executor, with real processes.

The first part checks the behaviour code written for
``concurrent.futures.ProcessPoolExecutor`` relies on (the ideas of CPython's own
executor tests, in our words); the rest what section 8 adds: crashes that fail one
future, cancellation that stops the work, no references kept, a clean exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import itertools
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import _face_tasks as T
import pytest
from _procs import live_descendants, pid_gone, wait_no_descendants

from alloter_mp import (
    MemoryLimitExceeded,
    ProcessAlloter,
    ProcessPoolExecutor,
    RemoteError,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
)


@pytest.fixture
def executor() -> Iterator[ProcessPoolExecutor]:
    ex = ProcessPoolExecutor(2, cancel_grace=0.2)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    assert not wait_no_descendants(), "workers left behind after shutdown()"


def _pids(pidfile: Path, timeout: float = 10.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pidfile.exists() and pidfile.read_text().strip():
            return [int(p) for p in pidfile.read_text().split() if p.isdigit()]
        time.sleep(0.01)
    raise AssertionError(f"{pidfile} was never written")


def _supervisor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("alloter_mp-supervisor")]


# -- what code written for the standard library relies on -------------------------------


def test_is_a_concurrent_futures_executor(executor: ProcessPoolExecutor) -> None:
    future = executor.submit(pow, 2, 8)
    assert isinstance(executor, cf.Executor)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=30) == 256


def test_submit_passes_keywords_even_named_fn_or_self(executor: ProcessPoolExecutor) -> None:
    assert executor.submit(T.mul, 2, y=8).result() == 16
    assert executor.submit(T.capture, 1, self=2, fn=3).result() == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=T.capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        executor.submit(arg=1)  # type: ignore[call-arg]


def test_map_over_several_iterables_and_chunks(executor: ProcessPoolExecutor) -> None:
    expected = list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10))) == expected
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == expected
    assert list(executor.map(pow, [], [])) == []


def test_map_error_is_raised_in_order_and_ends_the_iterator(
    executor: ProcessPoolExecutor,
) -> None:
    for chunksize in (1, 3):
        results = executor.map(divmod, [5, 5, 5, 5], [2, 3, 0, 5], chunksize=chunksize)
        if chunksize == 1:
            assert next(results) == (2, 1)
            assert next(results) == (1, 2)
        with pytest.raises(ZeroDivisionError):
            next(results)
        with pytest.raises(StopIteration):
            next(results)


def test_map_timeout_raises_from_next_and_ends_the_rest(
    executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    results = executor.map(T.write_pid_then_sleep, [pidfile], [60], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert 0.9 <= time.monotonic() - started < 5.0
    (worker,) = _pids(pidfile)
    assert pid_gone(worker, 5.0), "the timed-out call still runs"
    with pytest.raises(StopIteration):
        next(results)


def test_map_closed_early_ends_outstanding_calls(
    executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    marker = tmp_path / "seen"
    pidfile = tmp_path / "pid"
    results = executor.map(
        lambda i: (
            T.noop(i)
            if i == 0
            else T.cooperative(marker, 60)
            if i == 1
            else T.tree_then_spin(pidfile)
        ),
        range(3),
    )
    assert next(results) == 0
    worker, child = _pids(pidfile)
    _pids(Path(f"{marker}.started"))  # both calls run (not just sent to a worker)
    results.close()  # type: ignore[attr-defined]
    assert pid_gone(worker, 5.0) and pid_gone(child, 5.0)
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.read_text() == "cancelled"


def test_map_buffersize_validation() -> None:
    with ProcessPoolExecutor(1) as ex:
        for bad in ("foo", 2.0):
            with pytest.raises(TypeError, match="buffersize must be an integer or None"):
                ex.map(str, range(4), buffersize=bad)  # type: ignore[arg-type]
        for bad in (0, -1):
            with pytest.raises(ValueError, match="buffersize must be None or > 0"):
                ex.map(str, range(4), buffersize=bad)
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            ex.map(str, range(4), chunksize=0)


def test_map_buffersize_reads_lazily(executor: ProcessPoolExecutor) -> None:
    for size in (1, 2, 4, 8):
        assert list(executor.map(str, range(4), buffersize=size)) == ["0", "1", "2", "3"]
    assert list(executor.map(T.mul, range(4), range(4), buffersize=2)) == [0, 1, 4, 9]
    endless = executor.map(str, itertools.count(), buffersize=2)
    assert [next(endless) for _ in range(3)] == ["0", "1", "2"]
    endless.close()  # type: ignore[attr-defined]
    items = iter(range(4))
    executor.map(str, items, buffersize=2)
    assert next(items) == 2, "only buffersize items may be read ahead"
    assert next(executor.map(str, [], buffersize=2), None) is None
    assert next(executor.map(str, buffersize=2), None) is None


def test_bad_use_raises_the_standard_errors() -> None:
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ProcessPoolExecutor(max_workers=number)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ProcessPoolExecutor(1, initializer=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        ProcessPoolExecutor(1, max_tasks_per_child="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        ProcessPoolExecutor(1, max_tasks_per_child=0)
    import multiprocessing

    with pytest.raises(ValueError, match="max_tasks_per_child is incompatible with the 'fork'"):
        ProcessPoolExecutor(1, multiprocessing.get_context("fork"), max_tasks_per_child=2)
    with pytest.raises(ValueError, match="cancel_grace"):
        ProcessPoolExecutor(1, cancel_grace=-1)
    ex = ProcessPoolExecutor(1)
    ex.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(pow, 2, 2)
    ex.shutdown()  # idempotent


def test_shutdown_waits_and_leaves_no_process_or_thread(tmp_path: Path) -> None:
    threads_before = set(_supervisor_threads())
    ex = ProcessPoolExecutor(2)
    futures = [ex.submit(T.sleep_then_touch, 0.3, tmp_path / f"m{i}") for i in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() and f.result() == "done" for f in futures)
    assert all((tmp_path / f"m{i}").exists() for i in range(4))
    assert not live_descendants(), "a worker outlived shutdown(wait=True)"
    assert set(_supervisor_threads()) <= threads_before, "the executor's thread outlived it"


def test_context_manager_shuts_down() -> None:
    with ProcessPoolExecutor(2) as ex:
        assert ex.submit(T.noop, 1).result() == 1
    with pytest.raises(RuntimeError):
        ex.submit(T.noop, 1)
    assert not live_descendants()


def test_default_max_workers_is_the_usable_cpus() -> None:
    from alloter_mp import available_cpus

    with ProcessPoolExecutor() as ex:
        assert ex._max_workers == available_cpus()


def test_mp_context_chooses_the_start_method() -> None:
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        assert ex.submit(T.mul, 3, 4).result() == 12
        assert ex._stream.pool.start_method == "spawn"


def test_initializer_runs_in_each_worker() -> None:
    with ProcessPoolExecutor(1, initializer=T.init_record, initargs=("x",)) as ex:
        assert ex.submit(T.init_seen).result() == ["x"]


def test_max_tasks_per_child_replaces_workers() -> None:
    with ProcessPoolExecutor(1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(T.pid).result() for _ in range(6)]
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_no_stale_reference_to_the_callable_or_arguments(executor: ProcessPoolExecutor) -> None:
    collected = threading.Event()
    obj = T.Payload(3)
    alive = weakref.ref(obj, lambda _: collected.set())  # (kept: its callback fires)
    future = executor.submit(obj.method)
    arg = T.Payload(4)
    arg_ref = weakref.ref(arg)
    other = executor.submit(T.noop, arg)
    del obj, arg
    assert future.result() == 3
    assert isinstance(other.result(), T.Payload)
    gc.collect()
    assert collected.wait(5), "the executor kept the submitted callable alive"
    assert alive() is None
    assert arg_ref() is None, "the executor kept an argument alive"


def test_no_reference_to_a_result_once_the_future_is_dropped(
    executor: ProcessPoolExecutor,
) -> None:
    future = executor.submit(T.make_payload, 5)
    result_ref = weakref.ref(future.result())
    del future
    gc.collect()
    assert result_ref() is None, "the executor kept a result alive"
    for obj in executor.map(T.make_payload, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None, "map's iterator kept a result alive"


def test_worker_keeps_no_reference_to_arguments_or_results(
    executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    directory = str(tmp_path)
    arg = T.Tracked(directory, "arg")
    worker = executor.submit(T.pid).result()
    future = executor.submit(T.take_tracked_return_tracked, arg, directory)
    assert isinstance(future.result(), T.Tracked)
    # The worker let go of its copies before it even answered.
    deadline = time.monotonic() + 5
    names = {f"arg.{worker}", f"result.{worker}"}
    while not names <= {p.name for p in tmp_path.iterdir()} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert names <= {p.name for p in tmp_path.iterdir()}, "the worker kept an argument or result"


def test_swallows_no_falsey_exception(executor: ProcessPoolExecutor) -> None:
    with pytest.raises(T.FalseyError, match="boolbool"):
        executor.submit(T.raise_falsey, "boolbool").result()


# -- errors -----------------------------------------------------------------------------


def test_a_raising_call_raises_its_original_exception(executor: ProcessPoolExecutor) -> None:
    future = executor.submit(T.raise_value_error, "bad input")
    with pytest.raises(ValueError, match="bad input") as info:
        future.result()
    cause = info.value.__cause__
    assert isinstance(cause, cf.process._RemoteTraceback)
    assert "raise_value_error" in str(cause) and "ValueError: bad input" in str(cause)
    assert isinstance(future.exception(), ValueError)


def test_system_exit_and_unrebuildable_exceptions(executor: ProcessPoolExecutor) -> None:
    with pytest.raises(SystemExit) as info:
        executor.submit(T.raise_system_exit, 5).result()
    assert info.value.code == 5
    with pytest.raises(RemoteError, match="Unrebuildable"):
        executor.submit(T.raise_unrebuildable).result()


def test_no_fail_fast_between_futures(executor: ProcessPoolExecutor) -> None:
    slow = executor.submit(T.sleep_then, 0.5, "slow")
    bad = executor.submit(T.raise_value_error)
    with pytest.raises(ValueError):
        bad.result()
    assert slow.result() == "slow"


def test_unpicklable_call_fails_its_future_not_submit(executor: ProcessPoolExecutor) -> None:
    lock = threading.Lock()
    future = executor.submit(T.noop, lock)
    with pytest.raises(SerializationError) as info:
        future.result()
    assert isinstance(info.value, pickle.PicklingError)
    assert "pickle" in str(info.value)
    unpicklable_fn = executor.submit(lock.acquire)
    assert isinstance(unpicklable_fn.exception(), pickle.PicklingError)
    not_callable = executor.submit(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not callable"):
        not_callable.result()
    assert executor.submit(T.noop, 1).result() == 1


def test_unpicklable_result_fails_its_future(executor: ProcessPoolExecutor) -> None:
    future = executor.submit(threading.Lock)
    error = future.exception()
    assert error is not None and "pickle" in str(error)


def test_a_crash_fails_one_future_and_the_pool_heals(executor: ProcessPoolExecutor) -> None:
    slow = [executor.submit(T.sleep_then, 0.5, i) for i in range(3)]
    crash = executor.submit(T.exit_now, 7)
    with pytest.raises(BrokenProcessPool) as info:
        crash.result()
    assert isinstance(info.value, WorkerCrashed)
    assert info.value.exitcode == 7
    assert [f.result() for f in slow] == [0, 1, 2]
    killed = executor.submit(T.kill_self)
    assert isinstance(killed.exception(), WorkerCrashed)
    assert killed.exception().exitcode == -9  # type: ignore[union-attr]
    assert executor.submit(T.mul, 6, 7).result() == 42
    assert len(executor._processes) <= 2


def test_a_failing_initializer_breaks_the_executor() -> None:
    ex = ProcessPoolExecutor(2, initializer=T.init_fail)
    try:
        try:
            future = ex.submit(T.noop, 1)
        except BrokenProcessPool:
            pass
        else:
            with pytest.raises(BrokenProcessPool) as info:
                future.result(timeout=30)
            assert "error in initializer" in str(info.value.__cause__)
        deadline = time.monotonic() + 10
        while not ex._broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ex._broken
        with pytest.raises(BrokenProcessPool):
            ex.submit(T.noop, 1)
    finally:
        ex.shutdown(wait=True)
    assert not wait_no_descendants()


def test_task_timeout_and_memory_limit() -> None:
    with ProcessPoolExecutor(2, task_timeout=0.3, cancel_grace=0.1) as ex:
        with pytest.raises(TaskTimeout):
            ex.submit(T.spin_forever).result(timeout=10)
        assert ex.submit(T.noop, 1).result() == 1
    with ProcessPoolExecutor(1, memory_limit=100 * 1024 * 1024) as ex:
        future = ex.submit(T.allocate, 200)
        with pytest.raises(MemoryLimitExceeded) as info:
            future.result(timeout=30)
        assert isinstance(info.value, BrokenProcessPool)
        assert ex.submit(T.allocate, 1, 0.0).result() == 1024 * 1024


# -- cancelling ---------------------------------------------------------------------------


def test_cancel_a_queued_call_it_never_runs(tmp_path: Path) -> None:
    with ProcessPoolExecutor(1) as ex:
        blocker = ex.submit(T.sleep_then, 0.5)
        queued = ex.submit(T.touch_then, tmp_path / "ran")
        assert queued.cancel() is True
        assert queued.cancelled() and queued.done()
        with pytest.raises(cf.CancelledError):
            queued.result()
        blocker.result()
    assert not (tmp_path / "ran").exists()


def test_cancel_of_a_running_call_follows_the_standard_rule(executor: ProcessPoolExecutor) -> None:
    future = executor.submit(T.sleep_then, 0.5, "finished")
    deadline = time.monotonic() + 10
    while not future.running() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert future.running()
    assert future.cancel() is False
    assert future.result() == "finished"
    assert future.cancel() is False  # done


def test_kill_on_cancel_ends_the_call_and_its_tree(tmp_path: Path) -> None:
    marker = tmp_path / "seen"
    with ProcessPoolExecutor(2, kill_on_cancel=True, cancel_grace=0.3) as ex:
        cooperative = ex.submit(T.cooperative, marker, 60)
        deaf = ex.submit(T.tree_then_spin, tmp_path / "pid")
        worker, child = _pids(tmp_path / "pid")
        _pids(Path(f"{marker}.started"))
        assert cooperative.cancel() is True and deaf.cancel() is True
        assert cooperative.cancelled() and deaf.cancelled()
        assert pid_gone(worker, 5.0) and pid_gone(child, 5.0)
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.read_text() == "cancelled", "the running call was not told"
        assert ex.submit(T.noop, 2).result() == 2


def test_future_kill_works_without_the_option(
    executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    future = executor.submit(T.tree_then_spin, tmp_path / "pid")
    worker, child = _pids(tmp_path / "pid")
    assert future.kill() is True
    assert future.cancelled()
    assert pid_gone(worker, 5.0) and pid_gone(child, 5.0)
    done = executor.submit(T.noop, 1)
    done.result()
    assert done.kill() is False and not done.cancelled()


def test_shutdown_cancel_futures_cancels_calls_sent_ahead(tmp_path: Path) -> None:
    with ProcessPoolExecutor(1) as ex:
        # Tiny calls first: the pool learns they are quick and sends them ahead.
        list(ex.map(T.noop, range(200)))
        long = ex.submit(T.write_pid_then_sleep, tmp_path / "pid", 0.8)
        _pids(tmp_path / "pid")
        tail = [ex.submit(T.touch_then, tmp_path / f"t{i}", i) for i in range(20)]
        deadline = time.monotonic() + 5
        while not any(f.running() for f in tail) and time.monotonic() < deadline:
            time.sleep(0.005)
        ahead = [f for f in tail if f.running()]
        assert ahead, "no call was sent ahead to the busy worker"
        ex.shutdown(wait=True, cancel_futures=True)
        assert long.result() == 0.8, "a running call must finish"
        assert all(f.cancelled() for f in tail)
        assert not any((tmp_path / f"t{i}").exists() for i in range(20))


def test_terminate_and_kill_workers_end_everything(tmp_path: Path) -> None:
    for how in ("terminate_workers", "kill_workers"):
        pidfile = tmp_path / f"{how}.pid"
        ex = ProcessPoolExecutor(1)
        running = ex.submit(T.tree_then_sleep, pidfile, 60)
        queued = ex.submit(T.touch_then, tmp_path / f"{how}.ran")
        worker, child = _pids(pidfile)
        assert worker in ex._processes
        started = time.monotonic()
        getattr(ex, how)()
        with pytest.raises(BrokenProcessPool):
            running.result(timeout=10)
        assert time.monotonic() - started < 2.0
        assert queued.cancelled()
        assert pid_gone(worker, 5.0) and pid_gone(child, 5.0)
        with pytest.raises(RuntimeError):
            ex.submit(T.noop)
        ex.shutdown(wait=True)
        assert not (tmp_path / f"{how}.ran").exists()
    assert not wait_no_descendants()


# -- the standard machinery around futures -------------------------------------------


def test_wait_and_as_completed(executor: ProcessPoolExecutor) -> None:
    fast = executor.submit(T.sleep_then, 0.05, "fast")
    slow = executor.submit(T.sleep_then, 1.0, "slow")
    bad = executor.submit(T.raise_value_error)
    done, not_done = cf.wait([fast, slow, bad], return_when=cf.FIRST_EXCEPTION, timeout=10)
    assert bad in done and slow in not_done
    cancelled = executor.submit(T.sleep_then, 5)
    cancelled.kill()
    done, _ = cf.wait([cancelled], timeout=5)
    assert cancelled in done
    order = [f.result() for f in cf.as_completed([slow, fast], timeout=10)]
    assert order == ["fast", "slow"]
    done, not_done = cf.wait([fast, slow], return_when=cf.ALL_COMPLETED)
    assert not not_done


def test_as_completed_sees_cancellation(executor: ProcessPoolExecutor) -> None:
    blockers = [executor.submit(T.sleep_then, 0.5) for _ in range(2)]
    queued = executor.submit(T.sleep_then, 5)
    seen = []

    def cancel_soon() -> None:
        time.sleep(0.1)
        queued.cancel()

    threading.Thread(target=cancel_soon).start()
    for future in cf.as_completed([queued, *blockers], timeout=10):
        seen.append(future)
    assert seen[0] is queued and queued.cancelled()


def test_many_threads_submit_at_once(executor: ProcessPoolExecutor) -> None:
    results: dict[int, list[int]] = {}

    def submitter(k: int) -> None:
        futures = [executor.submit(T.mul, k, i) for i in range(200)]
        results[k] = [f.result() for f in futures]

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: [k * i for i in range(200)] for k in range(8)}


def test_done_callbacks_can_submit_more(executor: ProcessPoolExecutor) -> None:
    chain: list[int] = []
    finished = threading.Event()

    def step(future: cf.Future[int]) -> None:
        value = future.result()
        chain.append(value)
        if value < 5:
            executor.submit(T.noop, value + 1).add_done_callback(step)
        else:
            finished.set()

    executor.submit(T.noop, 0).add_done_callback(step)
    assert finished.wait(30)
    assert chain == [0, 1, 2, 3, 4, 5]


def test_shutdown_from_a_done_callback_does_not_deadlock() -> None:
    ex = ProcessPoolExecutor(1)
    called = threading.Event()

    def stop(_: cf.Future[int]) -> None:
        ex.shutdown(wait=True)
        called.set()

    ex.submit(T.noop, 1).add_done_callback(stop)
    assert called.wait(30)
    ex.shutdown(wait=True)
    assert not wait_no_descendants()


def test_run_in_executor_cancellation_stops_the_work(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def main(ex: ProcessPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(ex, T.mul, 6, 7) == 42
        assert await asyncio.wrap_future(ex.submit(T.mul, 2, 3)) == 6
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(ex, T.tree_then_spin, pidfile), 1.0)

    with ProcessPoolExecutor(1, kill_on_cancel=True, cancel_grace=0.1) as ex:
        asyncio.run(main(ex))
        worker, child = _pids(pidfile)
        assert pid_gone(worker, 5.0) and pid_gone(child, 5.0)


def test_many_tiny_calls() -> None:
    with ProcessPoolExecutor(2) as ex:
        futures = [ex.submit(T.mul, i, 2) for i in range(10_000)]
        _, not_done = cf.wait(futures, timeout=120)
        assert not not_done
        assert [f.result() for f in futures] == [2 * i for i in range(10_000)]


# -- over an alloter ------------------------------------------------------------------------


def test_alloter_executor_shares_workers_and_limit(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with ProcessAlloter(2, cancel_grace=0.2) as alloter:
        workers = {w.pid for w in alloter.stats()} | set(alloter.exec(T.pid, T.pid))
        ex = alloter.executor()
        assert isinstance(ex, ProcessPoolExecutor)
        futures = [ex.submit(T.record, log, 0.3) for _ in range(4)]
        alloter.exec(*[lambda: T.record(log, 0.3) for _ in range(2)])
        cf.wait(futures)
        assert T.most_at_once(log) <= 2, "the executor and the alloter broke the limit together"
        assert {ex.submit(T.pid).result() for _ in range(4)} <= workers | {
            w.pid for w in alloter.stats()
        }
        ex.shutdown(wait=True)
        assert len(alloter.stats()) == 2, "the executor's shutdown closed the alloter's workers"
        assert alloter.exec(T.pid)
        ex2 = alloter.executor(kill_on_cancel=True)
        running = ex2.submit(T.tree_then_spin, tmp_path / "pid")
        worker, child = _pids(tmp_path / "pid")
        assert running.cancel() is True
        assert pid_gone(worker, 5.0) and pid_gone(child, 5.0)
        ex2.shutdown()
        assert alloter.exec(T.pid)
    assert not wait_no_descendants()


def test_executor_dropped_without_shutdown_finishes_its_calls(tmp_path: Path) -> None:
    ex = ProcessPoolExecutor(1)
    future = ex.submit(T.sleep_then_touch, 0.3, tmp_path / "m")
    del ex
    gc.collect()
    assert future.result(timeout=30) == "done"
    assert not wait_no_descendants(10.0), "an executor dropped without shutdown left workers"


# -- interpreter exit -----------------------------------------------------------------------


def _run_script(
    source: str, tmp_path: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ)
    tests = str(Path(__file__).parent)
    root = str(Path(__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([tests, root, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def test_exit_with_an_executor_left_open_neither_hangs_nor_orphans(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    done = _run_script(
        f"""
        import time, pathlib
        import _face_tasks as T
        from alloter_mp import ProcessPoolExecutor
        if __name__ == "__main__":
            ex = ProcessPoolExecutor(2)
            ex.submit(T.tree_then_spin, {str(pidfile)!r})
            ex.submit(T.sleep_then_touch, 0.5, {str(tmp_path / "short")!r})
            while not pathlib.Path({str(pidfile)!r}).exists():
                time.sleep(0.01)
            print("leaving")
        """,
        tmp_path,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "leaving" in done.stdout
    assert elapsed < 15
    worker, child = _pids(pidfile)
    assert pid_gone(worker, 5.0) and pid_gone(child, 5.0), "a process outlived the program"
    assert (tmp_path / "short").exists(), "a short pending call was dropped at exit"
    assert "Traceback" not in done.stderr


def test_the_executor_example_runs() -> None:
    root = Path(__file__).parent.parent
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    ours = subprocess.run(
        [sys.executable, str(root / "examples" / "executor_dropin.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert ours.returncode == 0, ours.stderr
    assert "score(13) failed: BrokenWorker" in ours.stdout
    assert "map still works" in ours.stdout
    assert ours.stdout.count(" = ") == 7  # every other input scored
