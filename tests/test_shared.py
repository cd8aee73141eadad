"""Big arrays through shared memory in the pool: arguments and results, end to end.

Contract section 11: buffers of ``share_threshold`` bytes or more (pickle protocol 5
out-of-band: numpy arrays, ``pickle.PickleBuffer``) travel through shared memory,
written once per call, read-only where they arrive, and no segment outlives its
call, whatever the outcome, nor the parent killed with SIGKILL. Segments are looked
for where they live: the descriptors and mappings of the parent and every process
it started (/proc), and /dev/shm.
"""

from __future__ import annotations

import functools
import gc
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import _procs
import _shared_tasks as S
import pytest

from alloter_mp import (
    Alloter,
    AlloterError,
    Cancelled,
    Context,
    ExecTimeout,
    ProcessAlloter,
    TaskError,
    WorkerCrashed,
)

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MiB = 1 << 20
TESTS = str(Path(__file__).resolve().parent)


def family() -> list[int]:
    """This process and every live process it started (workers, fork server)."""
    return [os.getpid(), *(p.pid for p in _procs.live_descendants())]


# A segment's name: alloter_mp-<pid of its maker> (the log journal and the capture
# files are anonymous files too, named otherwise, and live as long as their worker).
SEGMENT = re.compile(rf"{S.MEMFD}-\d+")


def holders(pids: list[int] | None = None) -> list[str]:
    """Descriptors and mappings of our segments in ``pids`` (default: the family)."""
    found = []
    for pid in family() if pids is None else pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if SEGMENT.search(os.readlink(f"/proc/{pid}/fd/{fd}")):
                        found.append(f"{pid} fd {fd}")
                except OSError:
                    pass
            with open(f"/proc/{pid}/maps") as f:
                found.extend(f"{pid} map" for line in f if SEGMENT.search(line))
        except OSError:  # gone meanwhile
            pass
    return found


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm"))


def wait_no_holders(timeout: float = 5.0) -> list[str]:
    end = time.monotonic() + timeout
    while True:
        held = holders()
        if not held or time.monotonic() > end:
            return held
        time.sleep(0.05)


@pytest.fixture
def shm_before() -> set[str]:
    gc.collect()
    assert holders() == [], "segments held before the test"
    return shm_files()


def call(fn: Any, *args: Any) -> Any:
    return functools.partial(fn, *args)


# -- arguments -------------------------------------------------------------------------


def test_big_argument_is_shared_read_only_and_written_once(
    alloter: ProcessAlloter, shm_before: set[str]
) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB
    rows = alloter.exec(*[call(S.slow_describe, 0.05, big) for _ in range(8)])
    assert all(r["readonly"] and r["shared"] for r in rows), rows
    assert all(r["sum"] == float(big.sum()) for r in rows)
    # One segment holds the array once, whatever the number of tasks taking it.
    assert {r["segment"] for r in rows} == {big.nbytes}
    assert len({r["pid"] for r in rows}) == 2
    # Every task ended: the call returned only once nothing held the segment.
    assert holders() == []
    assert shm_files() - shm_before == set()


def test_tasks_sent_one_by_one_share_one_copy(alloter: ProcessAlloter) -> None:
    # Big tasks (a pickle over 1 MiB each) travel one by one, not as one blob.
    big = np.arange(4 * MiB, dtype=np.float64)
    padding = [b"x" * (2 * MiB) for _ in range(4)]
    tasks = [call(S.describe_all, big, np.frombuffer(p, dtype=np.uint8)) for p in padding]
    rows = alloter.exec(*tasks)
    assert all(a["shared"] and b["shared"] for a, b in rows)
    # the big array once, then each padding (2 MiB, page aligned) after it
    assert max(a["segment"] for a, _ in rows) == big.nbytes + 4 * 2 * MiB


def test_small_arguments_stay_in_the_pickle(alloter: ProcessAlloter) -> None:
    small = np.arange(1000, dtype=np.float64)
    (row,) = alloter.exec(call(S.describe, small))
    assert not row["readonly"] and not row["shared"]


def test_share_threshold_none_shares_nothing_and_a_low_one_shares_small_arrays(
    alloter: ProcessAlloter,
) -> None:
    big = np.arange(MiB, dtype=np.float64)
    (row,) = alloter.with_options(share_threshold=None).exec(call(S.describe, big))
    assert not row["readonly"] and not row["shared"]
    result = alloter.with_options(share_threshold=None).exec(call(S.full, MiB, 1.0))[0]
    assert result.flags.writeable
    small = np.arange(2000, dtype=np.float64)  # 16 KB
    low = alloter.with_options(share_threshold=4096)
    (row,) = low.exec(call(S.describe, small))
    assert row["readonly"] and row["shared"]
    assert not low.exec(call(S.full, 2000, 1.0))[0].flags.writeable
    with ProcessAlloter(1, share_threshold=0) as a:
        (row,) = a.exec(call(S.describe, np.arange(10.0)))
        assert row["shared"]


def test_share_threshold_is_checked() -> None:
    with pytest.raises(TypeError):
        ProcessAlloter(1, share_threshold=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ProcessAlloter(1, share_threshold=True)
    with pytest.raises(ValueError):
        ProcessAlloter(1, share_threshold=-1)
    with ProcessAlloter(1) as a, pytest.raises(ValueError):
        a.with_options(share_threshold=-5)


def test_pickle_buffer_argument_is_shared(alloter: ProcessAlloter) -> None:
    data = bytearray(os.urandom(2 * MiB))

    def inspect(buffer: Any) -> tuple[bool, int, str]:
        view = memoryview(buffer)
        address = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
        return view.readonly, sum(view[:1000]), S.mapping_of(address)

    readonly, head, mapping = alloter.exec(call(inspect, pickle.PickleBuffer(data)))[0]
    assert readonly and head == sum(data[:1000]) and S.MEMFD in mapping


# -- results ---------------------------------------------------------------------------


def test_big_results_come_back_shared_read_only(
    alloter: ProcessAlloter, shm_before: set[str]
) -> None:
    results = alloter.exec(*[call(S.full, 2 * MiB, float(k)) for k in range(4)])
    for k, r in enumerate(results):
        assert r.shape == (2 * MiB,) and float(r[0]) == k and float(r[-1]) == k
        assert not r.flags.writeable
        assert S.MEMFD in S.mapping_of(r.__array_interface__["data"][0])
        with pytest.raises(ValueError, match="read-only"):
            r[0] = 1.0
    # The arrays keep their mappings (and nothing else): dropping them frees all.
    assert holders() and all(h.startswith(f"{os.getpid()} ") for h in holders())
    del results, r
    gc.collect()
    assert holders() == []
    assert shm_files() - shm_before == set()


def test_results_of_a_map_and_imap_come_back_shared(alloter: ProcessAlloter) -> None:
    jobs = [(MiB, float(k)) for k in range(6)]
    out = alloter.map(_full_job, jobs, chunksize=2)
    assert [float(r[0]) for r in out] == [float(k) for k in range(6)]
    assert all(not r.flags.writeable for r in out)
    out = list(alloter.imap(_full_job, iter(jobs), chunksize=1))
    assert [float(r[-1]) for r in out] == [float(k) for k in range(6)]
    assert all(S.MEMFD in S.mapping_of(r.__array_interface__["data"][0]) for r in out)


def _full_job(job: tuple[int, float]) -> Any:
    return S.full(*job)


def test_items_judged_one_by_one_return_shared_results(alloter: ProcessAlloter) -> None:
    # errors="return": each item's result travels on its own (an ITEM message).
    jobs = [(MiB, 1.0), (MiB, -1.0), (MiB, 3.0)]
    out = alloter.map(_full_or_fail_job, jobs, chunksize=3, errors="return")
    assert float(out[0][5]) == 1.0 and float(out[2][5]) == 3.0
    assert isinstance(out[1], TaskError)
    assert not out[0].flags.writeable
    assert S.MEMFD in S.mapping_of(out[2].__array_interface__["data"][0])


def _full_or_fail_job(job: tuple[int, float]) -> Any:
    return S.full_or_fail(*job)


def test_map_and_imap_items_are_shared(alloter: ProcessAlloter) -> None:
    arrays = [np.full(MiB, float(k)) for k in range(4)]
    assert alloter.map(S.total, arrays, chunksize=1) == [float(k * MiB) for k in range(4)]
    assert list(alloter.imap(S.total, iter(arrays))) == [float(k * MiB) for k in range(4)]
    rows = alloter.map(S.describe, arrays + arrays, chunksize=3)
    assert all(r["shared"] and r["readonly"] for r in rows)
    assert wait_no_holders() == []


def test_map_and_imap_items_are_shared_after_shared_results(alloter: ProcessAlloter) -> None:
    # The order that once failed: a test whose shared results the parent dropped,
    # then one that expects no segment mapped anywhere (found on 3.13, where no
    # garbage collection came between the two).
    test_results_of_a_map_and_imap_come_back_shared(alloter)
    test_map_and_imap_items_are_shared(alloter)


def test_shared_results_go_when_the_caller_drops_them(
    alloter: ProcessAlloter, shm_before: set[str]
) -> None:
    # No reference cycle keeps a finished call's results: their mappings go with the
    # caller's last reference (and the pool's own, which it drops once the call has
    # settled), not at some later garbage collection, which may not come before the
    # memory is needed again. The collector is off meanwhile.
    me = [os.getpid()]

    def gone() -> bool:
        end = time.monotonic() + 2.0
        while holders(me) and time.monotonic() < end:
            time.sleep(0.02)
        return holders(me) == []

    gc.disable()
    try:
        out: Any = alloter.exec(*[call(S.full, MiB, float(k)) for k in range(3)])
        assert len([h for h in holders(me) if h.endswith(" map")]) == 3
        del out
        assert gone(), "exec's results outlived the caller's reference"
        out = alloter.map(_full_job, [(MiB, 1.0)] * 4, chunksize=2)
        del out
        assert gone(), "map's results outlived the caller's reference"
        report = alloter.exec_report(call(S.full, MiB, 2.0))
        del report
        assert gone(), "a report's results outlived the caller's reference"
    finally:
        gc.enable()


# -- nothing outlives the call ---------------------------------------------------------


def test_nothing_outlives_a_failed_call(alloter: ProcessAlloter, shm_before: set[str]) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)
    with pytest.raises(TaskError, match="failed holding"):
        alloter.exec(call(S.fail_with, big, 0.1), call(S.hold, big, 30.0))
    assert wait_no_holders() == []
    assert shm_files() - shm_before == set()
    # The pool goes on, sharing again.
    assert alloter.exec(call(S.describe, big))[0]["shared"]
    assert holders() == []


def test_nothing_outlives_a_timeout(shm_before: set[str]) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)
    with ProcessAlloter(2, timeout=1.0, cancel_grace=0.1) as a:
        a.exec(call(S.describe, np.arange(3.0)))
        with pytest.raises(ExecTimeout):
            a.exec(call(S.hold, big, 30.0), call(S.hold, big, 30.0), call(S.hold, big, 30.0))
        assert wait_no_holders() == []
    assert shm_files() - shm_before == set()


def test_nothing_outlives_a_cancelled_call(alloter: ProcessAlloter, shm_before: set[str]) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)
    ctx = Context()
    threading.Timer(0.5, ctx.cancel).start()
    with pytest.raises(Cancelled):
        alloter.exec_with_context(ctx, call(S.hold, big, 30.0), call(S.hold, big, 30.0))
    assert wait_no_holders() == []
    assert shm_files() - shm_before == set()


def test_nothing_outlives_a_crash(alloter: ProcessAlloter, shm_before: set[str]) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)
    with pytest.raises(WorkerCrashed):
        alloter.exec(call(S.crash_with, big, 0.2), call(S.hold, big, 30.0))
    assert wait_no_holders() == []
    report = alloter.exec_report(call(S.crash_with, big, 0.1), call(S.hold, big, 0.3))
    assert [t.status for t in report.tasks] == ["crashed", "cancelled"]
    assert holders() == []  # every task had ended when the report came back
    assert shm_files() - shm_before == set()


def test_nothing_outlives_a_pool_closed_mid_call(shm_before: set[str]) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)
    a = ProcessAlloter(2, cancel_grace=0.1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            a.exec(call(S.hold, big, 30.0), call(S.hold, big, 30.0))
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    time.sleep(1.0)
    a.close()
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert not _procs.wait_no_descendants()
    assert holders() == []
    assert shm_files() - shm_before == set()


def test_nothing_outlives_a_failing_supervisor(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], shm_before: set[str]
) -> None:
    from alloter_mp import _pool

    def broken(self: Any, w: Any, msg: Any) -> None:
        raise RuntimeError("supervisor bug")

    monkeypatch.setattr(_pool.WorkerPool, "_on_message", broken)
    big = np.arange(4 * MiB, dtype=np.float64)
    with ProcessAlloter(2) as a, pytest.raises(AlloterError, match="supervisor"):
        a.exec(call(S.hold, big, 0.1), call(S.hold, big, 30.0))
    assert "supervisor bug" in capfd.readouterr().err
    assert not _procs.wait_no_descendants()
    assert holders() == []
    assert shm_files() - shm_before == set()


def test_nothing_outlives_calls_of_an_alloter_without_limit(shm_before: set[str]) -> None:
    big = np.arange(2 * MiB, dtype=np.float64)
    with Alloter() as a:
        rows = a.exec(*[call(S.describe, big) for _ in range(5)])
        assert all(r["shared"] for r in rows)
        assert holders() == []
    assert shm_files() - shm_before == set()


# -- the parent killed mid-call ----------------------------------------------------------

_KILLED_PARENT = """
import os, sys, functools, time
sys.path.insert(0, {tests!r})
import numpy as np
import _shared_tasks as S
from alloter_mp import ProcessAlloter

if __name__ == "__main__":
    a = ProcessAlloter(2)
    big = np.arange(8 * 2**20, dtype=np.float64)
    # A result comes back shared (the parent maps it), then the call that hangs.
    kept = a.exec(functools.partial(S.full, 2**20, 1.0), functools.partial(S.full, 2**20, 2.0))
    print(os.getpid(), *(s.pid for s in a.stats()), flush=True)
    a.exec(*[functools.partial(S.slow_describe, 120.0, big) for _ in range(4)])
"""


def test_parent_killed_mid_call_leaves_nothing(tmp_path: Path, shm_before: set[str]) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(_KILLED_PARENT).format(tests=TESTS))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3
        # Every process of the call holds the array's segment (or the result's).
        end = time.monotonic() + 20
        while len({h.split()[0] for h in holders(pids)}) < 3 and time.monotonic() < end:
            time.sleep(0.05)
        assert {h.split()[0] for h in holders(pids)} == {str(p) for p in pids}
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    end = time.monotonic() + 20
    while any(_procs.pid_gone(p, 0) is False for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert all(_procs.pid_gone(p, 0.1) for p in pids)
    assert holders(pids) == []
    assert shm_files() - shm_before == set()
