"""Soak: thousands of mixed calls from 8 threads sharing one alloter.

Each call checks its own outcome (results carry a per-call token, so a result that
reached the wrong call is caught). The run prints calls per second, the parent's
peak RSS and the open descriptors at start and end, and fails on growth: more
descriptors, more processes than workers, batches kept alive, RSS creeping up.

Size: ``ALLOTER_SOAK_CALLS`` (default 4000), capped by ``ALLOTER_SOAK_SECONDS``
(default 90). Rerun with ``pytest -m soak tests/test_soak.py -s``.
"""

from __future__ import annotations

import functools
import gc
import os
import random
import threading
import time
from pathlib import Path

import _faults as F
import psutil
import pytest

from alloter_mp import Context, ExecTimeout, ProcessAlloter, TaskError, WorkerCrashed
from alloter_mp._batch import Batch

CALLS = int(os.environ.get("ALLOTER_SOAK_CALLS", "4000"))
SECONDS = float(os.environ.get("ALLOTER_SOAK_SECONDS", "90"))
THREADS = 8
LIMIT = 3


def _square_plus(token: int, x: int) -> tuple[int, int]:
    return token, x * x


def _one_call(a: ProcessAlloter, rng: random.Random, token: int, d: str) -> str:
    """One random call; asserts its outcome; returns its kind."""
    roll = rng.random()
    if roll < 0.5:
        n = rng.randint(1, 8)
        got = a.exec(*[functools.partial(_square_plus, token, i) for i in range(n)])
        assert got == [(token, i * i) for i in range(n)], "wrong or foreign results"
        return "exec"
    if roll < 0.65:
        n = rng.randint(2, 6)
        bad = rng.randrange(n)
        tasks = [functools.partial(_square_plus, token, i) for i in range(n)]
        tasks[bad] = F.make_task(F.Fault(F.RAISE), bad, d)
        try:
            a.exec(*tasks)
        except TaskError as exc:
            assert exc.index == bad and isinstance(exc.__cause__, ValueError), repr(exc)
        else:
            raise AssertionError("a raising task did not fail the call")
        return "raise"
    if roll < 0.75:
        items = list(range(rng.randint(1, 60)))
        assert a.map(functools.partial(_square_plus, token), items) == [
            (token, x * x) for x in items
        ]
        return "map"
    if roll < 0.85:
        n = rng.randint(2, 5)
        tasks = [functools.partial(_square_plus, token, i) for i in range(n)]
        tasks[-1] = F.make_task(F.Fault(F.RAISE), n - 1, d)
        report = a.exec_report(*tasks)
        assert report.tasks[-1].status == "error"
        for t in report.tasks[:-1]:
            assert t.status in ("ok", "cancelled", "skipped"), t.status
            if t.status == "ok":
                assert t.result == (token, t.index * t.index)
        return "report"
    if roll < 0.92:
        it = a.imap(functools.partial(_square_plus, token), iter(range(10_000)))
        for k, got in enumerate(it):
            assert got == (token, k * k)
            if k == 20:
                break
        it.close()  # type: ignore[attr-defined]
        return "imap-closed"
    if roll < 0.96:
        try:
            a.exec(functools.partial(_square_plus, token, 1), F.make_task(F.Fault(F.EXIT, 3), 1, d))
        except WorkerCrashed as exc:
            assert exc.index == 1 and exc.exitcode == 3, repr(exc)
        else:
            raise AssertionError("a crashing task did not fail the call")
        return "crash"
    try:
        a.exec_with_context(Context(timeout=0.05), F.make_task(F.Fault(F.SLEEP_LONG), 0, d))
    except ExecTimeout:
        pass
    else:
        raise AssertionError("a sleeping task did not time out")
    return "timeout"


def _settle(a: ProcessAlloter) -> None:
    """Wait until the only processes are ``LIMIT`` live workers (all started)."""
    a.exec(*[lambda: time.sleep(0.1) for _ in range(LIMIT)])
    end = time.monotonic() + 5
    while time.monotonic() < end:
        workers = {s.pid for s in a.stats()}
        if {p.pid for p in F.live_descendants()} == workers and len(workers) == LIMIT:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {F.live_descendants()} vs workers {a.stats()}")


def _batches_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Batch))


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_mixed_calls_from_eight_threads(tmp_path: Path) -> None:
    me = psutil.Process()
    d = str(tmp_path)
    with ProcessAlloter(LIMIT, cancel_grace=0.05) as a:
        for i in range(200):  # warm up: workers, fork server, lazy imports, caches
            _one_call(a, random.Random(i), i, d)
        _settle(a)
        fds_start = F.open_fds()
        rss_start = me.memory_info().rss
        threads_start = threading.active_count()

        counts: dict[str, int] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()
        done = 0
        peak = [rss_start]
        stop = threading.Event()
        t_end = time.monotonic() + SECONDS

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], me.memory_info().rss)

        def worker(n: int, upto: int) -> None:
            nonlocal done
            rng = random.Random(1000 + n + upto)
            token = n * 1_000_000 + upto
            while not stop.is_set():
                with lock:
                    if done >= upto or time.monotonic() > t_end:
                        return
                    done += 1
                token += 1
                try:
                    kind = _one_call(a, rng, token, d)
                except BaseException as exc:
                    errors.append(exc)
                    stop.set()
                    return
                with lock:
                    counts[kind] = counts.get(kind, 0) + 1

        def phase(upto: int) -> None:
            pool = [threading.Thread(target=worker, args=(n, upto)) for n in range(THREADS)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        # The first half grows what eight threads need once (glibc gives each thread
        # its own malloc arena); the second half shows whether calls leak.
        phase(CALLS // 2)
        rss_mid = me.memory_info().rss
        phase(CALLS)
        took = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if errors:
            raise errors[0]

        _settle(a)
        fds_end = F.open_fds()
        rss_end = me.memory_info().rss
        batches = _batches_alive()
        total = sum(counts.values())
        print(
            f"\n[soak] {total} calls from {THREADS} threads in {took:.1f}s = {total / took:.0f} calls/s; "
            f"mix {dict(sorted(counts.items()))}\n"
            f"[soak] parent RSS start {rss_start / 2**20:.1f} MiB, half-way {rss_mid / 2**20:.1f} MiB, "
            f"peak {peak[0] / 2**20:.1f} MiB, "
            f"end {rss_end / 2**20:.1f} MiB; fds start {fds_start}, end {fds_end}; "
            f"threads start {threads_start}, end {threading.active_count()}; "
            f"batches alive {batches}"
        )
        assert total >= min(CALLS, 500), f"only {total} calls ran"
        assert fds_end <= fds_start, f"descriptors grew: {fds_start} -> {fds_end}"
        assert threading.active_count() <= threads_start, "threads left behind"
        assert batches <= 2, f"{batches} Batch objects still alive after the run"
        assert rss_end - rss_mid < 16 * 2**20, (
            f"parent RSS grew by {(rss_end - rss_mid) / 2**20:.1f} MiB over the second half"
        )
    alive = F.wait_dead([(p.pid, None) for p in F.live_descendants()], 5.0)
    assert not alive, f"processes left after close(): {alive}"
