"""Contract section 5: map and imap."""

from __future__ import annotations

import functools
import itertools
import time

import _tasks
import pytest
from _procs import pid_gone

from alloter_mp import ExecTimeout, ProcessAlloter, TaskError, WorkerPool


def slow_double(x):
    time.sleep(0.02)
    return x * 2


@pytest.mark.parametrize("chunksize", [None, 1, 7, 1000])
def test_map_results_in_order(alloter, chunksize):
    assert alloter.map(lambda x: x * x, range(200), chunksize=chunksize) == [
        x * x for x in range(200)
    ]


def test_map_of_nothing(alloter):
    assert alloter.map(lambda x: x, []) == []
    assert list(alloter.imap(lambda x: x, iter([]))) == []


@pytest.mark.parametrize("chunksize", [None, 1, 10])
def test_map_failure_names_the_item_index(alloter, chunksize):
    with pytest.raises(TaskError) as info:
        alloter.map(functools.partial(_tasks.fail_on, 37), range(100), chunksize=chunksize)
    assert info.value.index == 37
    assert isinstance(info.value.__cause__, ValueError)
    assert "bad item 37" in info.value.remote_traceback


def test_map_crash_names_the_item_index(alloter):
    def crash_on_5(x):
        if x == 5:
            _tasks.exit_now(4)
        return x

    with pytest.raises(TaskError) as info:
        alloter.map(crash_on_5, range(20), chunksize=10)
    assert info.value.index == 5
    assert info.value.exitcode == 4


def test_imap_ordered_and_unordered(alloter):
    def wait_then(x):
        time.sleep(0.3 if x == 0 else 0.01)
        return x

    assert list(alloter.imap(wait_then, range(10), chunksize=1)) == list(range(10))
    out = list(alloter.imap(wait_then, range(10), chunksize=1, ordered=False))
    assert sorted(out) == list(range(10))
    assert out[0] != 0  # the slow first item did not hold the others back


def test_imap_reads_an_endless_generator_lazily(alloter):
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield i

    it = alloter.imap(lambda x: x + 1, endless())
    first = list(itertools.islice(it, 50))
    assert first == list(range(1, 51))
    time.sleep(0.2)
    assert len(pulled) < 50 + 20000  # bounded read-ahead, not the whole stream
    it.close()


def test_closing_imap_early_ends_outstanding_work(tmp_path):
    pidfile = tmp_path / "pid"

    def item(x):
        if x == 1:
            _tasks.write_pid_and_sleep(str(pidfile), 100)
        return x

    with ProcessAlloter(2, cancel_grace=0.1) as a:
        it = a.imap(item, range(4), chunksize=1, ordered=False)
        assert next(it) in (0, 2, 3)
        deadline = time.monotonic() + 5
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        it.close()
        assert pid_gone(int(pidfile.read_text()), timeout=3)
        assert a.map(lambda x: x, range(3)) == [0, 1, 2]


def test_map_timeout_counts_from_the_call(alloter):
    a = ProcessAlloter(2, timeout=0.5, cancel_grace=0.05)
    try:
        start = time.monotonic()
        with pytest.raises(ExecTimeout):
            a.map(slow_double, range(1000), chunksize=1)
        assert time.monotonic() - start < 0.5 + 0.3
        it = a.imap(lambda x: x, range(100))
        time.sleep(0.6)  # the consumer's own time counts
        with pytest.raises(ExecTimeout):
            list(it)
    finally:
        a.close()


def spanned(path, fail_at, long_item, x):
    """An item that logs its start and end (monotonic) to ``path``.

    Item ``long_item`` sleeps 100 s ignoring ``cancelled()``; item ``fail_at`` raises
    (its end is the moment it fails); the others sleep 20 ms.
    """
    with open(path, "a") as f:
        f.write(f"s {x} {time.monotonic()}\n")
    time.sleep(100 if x == long_item else 0.02)
    with open(path, "a") as f:
        f.write(f"e {x} {time.monotonic()}\n")
    if x == fail_at:
        raise ValueError(f"bad item {x}")
    return x


def _spans(path, until):
    """``{item: (start, end)}``; an item still running (or killed) ends at ``until``."""
    starts, ends = {}, {}
    for line in path.read_text().splitlines():
        kind, x, t = line.split()
        (starts if kind == "s" else ends)[int(x)] = float(t)
    return {x: (t, ends.get(x, until)) for x, t in starts.items()}


@pytest.mark.parametrize("pool_size", [None, 4], ids=["own-pool", "shared-pool-of-4"])
def test_map_respects_limit_and_fail_fast_timing(tmp_path, pool_size):
    # limit 2, also on a pool of 4 workers shared with nobody: the limit, not the
    # pool, must hold the map to two items at once. The pool's four workers are all
    # started (and idle) first: the limit must hold back idle workers too, not only
    # the starting of new ones.
    limit, fail_at, long_item, grace = 2, 20, 1, 1.0
    path = tmp_path / "spans"
    fn = functools.partial(spanned, str(path), fail_at, long_item)
    pool = WorkerPool(pool_size) if pool_size else None
    base = ProcessAlloter(limit, cancel_grace=grace)
    a = base.with_pool(pool) if pool else base
    try:
        if pool is not None:
            warm = ProcessAlloter(pool_size)
            try:
                pids = warm.with_pool(pool).exec(
                    *[functools.partial(_tasks.sleep_then_pid, 0.3)] * 4
                )
            finally:
                warm.close()
            assert len(set(pids)) == pool_size, f"the pool did not start its {pool_size} workers"
        with pytest.raises(TaskError) as info:
            a.map(fn, range(10_000), chunksize=1)
        t_raise = time.monotonic()
        spans = _spans(path, until=t_raise)
        time.sleep(0.2)  # an item that starts late would show now
        late_spans = _spans(path, until=t_raise)
    finally:
        a.close()
        base.close()
        if pool is not None:
            pool.close()
    assert info.value.index == fail_at
    assert isinstance(info.value.__cause__, ValueError)
    t_fail = spans[fail_at][1]
    # Fast return: the long item (killed only after its 1 s grace) is not awaited.
    assert t_raise - t_fail < 0.3, f"map raised {t_raise - t_fail:.3f}s after the failure"
    # The limit: never more than two items at once (and two did run at once).
    most = _tasks.most_at_once(spans.values())
    assert most == limit, f"{most} items ran at once under limit {limit}"
    # Queued items never start: only those before the failure, and at most one per
    # worker that was handed its next item just as the failure came in.
    assert set(range(fail_at + 1)) <= set(late_spans), sorted(late_spans)
    assert len(late_spans) <= fail_at + 1 + limit, f"{len(late_spans)} items started"


def test_bad_map_arguments(alloter):
    with pytest.raises(TypeError):
        alloter.map(42, range(3))
    with pytest.raises(ValueError):
        alloter.map(abs, range(3), chunksize=0)
    with pytest.raises(TypeError):
        alloter.map(abs, range(3), chunksize=1.5)


@pytest.mark.timeout(120)
def test_imap_memory_stays_flat_over_a_long_stream(alloter):
    import psutil

    me = psutil.Process()
    it = alloter.imap(lambda x: x, itertools.count())
    for _ in itertools.islice(it, 200_000):
        pass
    before = me.memory_info().rss
    total = 0
    for x in itertools.islice(it, 1_000_000):
        total += x
    grown = me.memory_info().rss - before
    it.close()
    assert total > 0
    assert grown < 30 * 2**20, f"parent grew by {grown / 2**20:.1f} MiB"
