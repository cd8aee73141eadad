"""The core behaviours under every start method the platform offers, from one source.

Each test takes the ``method`` fixture, parametrized over
``multiprocessing.get_all_start_methods()`` (fork, forkserver and spawn on Linux):
results in order (lambdas, closures, partials, bound methods from this module),
fail-fast ``TaskError`` with its index, crashes as ``WorkerCrashed``, the timeout
killing a task that ignores SIGTERM together with its children, and lambdas and
closures defined in a ``__main__`` script run in a subprocess.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import _faults as F
import pytest

from alloter_mp import ExecTimeout, ProcessAlloter, TaskError, WorkerCrashed, WorkerPool


def _param(method: str) -> object:
    if method == "fork":
        # Python 3.12+ warns when a process with threads forks (the supervisor forks).
        mark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
        return pytest.param(method, marks=mark)
    return method


METHODS = [_param(m) for m in multiprocessing.get_all_start_methods()]


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def alloter(method: str) -> Iterator[ProcessAlloter]:
    a = ProcessAlloter(2, start_method=method, cancel_grace=0.1)
    assert a.pool.start_method == method
    try:
        yield a
    finally:
        a.close()
    alive = F.wait_dead([(p.pid, None) for p in F.live_descendants()], 5.0)
    assert not alive, f"processes left after close(): {alive}"


class Scaler:
    def __init__(self, k: int) -> None:
        self.k = k

    def times(self, x: int) -> int:
        return self.k * x


def test_results_in_task_order(alloter: ProcessAlloter, tmp_path: Path) -> None:
    base = 7

    def closure() -> int:
        return base * 6

    tasks = [
        lambda: "lambda",
        closure,
        functools.partial(pow, 2, 10),
        functools.partial(Scaler(3).times, 5),
        F.make_task(F.Fault(F.SLEEP, 0.2), 4, tmp_path),  # finishes after those behind it
        *[lambda i=i: i * i for i in range(10)],
    ]
    got = alloter.exec(*tasks)
    assert got == ["lambda", 42, 1024, 15, ("r", 4, 0.2), *[i * i for i in range(10)]]


def test_first_failure_raises_fast_with_its_index(alloter: ProcessAlloter, tmp_path: Path) -> None:
    alloter.exec(lambda: time.sleep(0.2), lambda: time.sleep(0.2))  # both workers up
    tasks = [
        F.make_task(F.Fault(F.SLEEP_LONG), 0, tmp_path),
        F.make_task(F.Fault(F.RAISE, 0.2), 1, tmp_path),
        F.make_task(F.Fault(F.VALUE, 1), 2, tmp_path),
    ]
    t0 = time.monotonic()
    with pytest.raises(TaskError) as info:
        alloter.exec(*tasks)
    assert time.monotonic() - t0 < 2.0, "exec waited for the sleeping sibling"
    assert info.value.index == 1
    assert isinstance(info.value.__cause__, ValueError)
    assert "fault in task 1" in info.value.remote_traceback
    sleeper = F.started(tmp_path)[0]
    assert not F.wait_dead([(sleeper, None)], 3.0), "the sleeping sibling was not ended"
    assert alloter.exec(lambda: 1) == [1]


@pytest.mark.parametrize(
    "fault",
    [F.Fault(F.SEGFAULT), F.Fault(F.EXIT, 3), F.Fault(F.SIGKILL_SELF)],
    ids=["segfault", "os._exit", "sigkill"],
)
def test_crash_is_worker_crashed(alloter: ProcessAlloter, tmp_path: Path, fault: F.Fault) -> None:
    tasks = [F.make_task(F.Fault(F.VALUE, 0), 0, tmp_path), F.make_task(fault, 1, tmp_path)]
    with pytest.raises(WorkerCrashed) as info:
        alloter.exec(*tasks)
    assert info.value.index == 1
    assert info.value.exitcode == F.expected_exitcode(fault)
    assert alloter.exec(lambda: "healed", lambda: 2) == ["healed", 2]


def test_timeout_kills_the_task_and_its_children(method: str, tmp_path: Path) -> None:
    with (
        WorkerPool(3, start_method=method) as pool,
        ProcessAlloter(3, timeout=0.5, cancel_grace=0.1) as timed,
    ):
        # Start the three workers first (no timeout): under spawn a worker takes a while.
        warm = ProcessAlloter(3).with_pool(pool)
        warm.exec(*[functools.partial(F.sleep, str(tmp_path), 10 + i, 0.2) for i in range(3)])
        for i in range(3):
            (tmp_path / f"{10 + i}.start").unlink()
        a = timed.with_pool(pool)
        tasks = [
            F.make_task(F.Fault(F.IGNORE_TERM), 0, tmp_path),
            F.make_task(F.Fault(F.CHILD_HANG, "session"), 1, tmp_path),
            F.make_task(F.Fault(F.CHILD_HANG, "orphan"), 2, tmp_path),
        ]
        t0 = time.monotonic()
        with pytest.raises(ExecTimeout):
            a.exec(*tasks)
        took = time.monotonic() - t0
        assert 0.5 <= took < 0.8, f"ExecTimeout after {took:.3f}s for a 0.5 s timeout"
        workers = [(pid, None) for pid in F.started(tmp_path).values()]
        kids = [(pid, created) for _, pid, created in F.children(tmp_path)]
        assert len(workers) == 3 and len(kids) == 2
        try:
            assert not F.wait_dead(workers, 3.0), "a worker outlived the timeout"
            assert not F.wait_dead(kids, 3.0), "a task's child outlived the timeout"
        finally:
            F.kill_all(workers + kids)
        assert warm.exec(lambda: 1, lambda: 2) == [1, 2]  # new workers (spawn is slow)


MAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from alloter_mp import ProcessAlloter, TaskError

    OFFSET = 100

    class Boom(Exception):
        pass

    def make_adder(n):
        def add(x):
            return x + n + OFFSET
        return add

    def fail():
        raise Boom("from __main__")

    if __name__ == "__main__":
        add3 = make_adder(3)
        with ProcessAlloter(2, start_method=sys.argv[1]) as a:
            got = a.exec(lambda: OFFSET, lambda: add3(1), lambda: [k for k in range(3)])
            try:
                a.exec(lambda: 1, fail)
            except TaskError as exc:
                err = [exc.index, type(exc.__cause__).__name__, str(exc.__cause__)]
        print(json.dumps({"got": got, "err": err}))
    """
)


def test_lambdas_and_closures_from_a_main_script(method: str, tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), method],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["got"] == [100, 104, [0, 1, 2]]
    assert data["err"] == [1, "Boom", "from __main__"]
