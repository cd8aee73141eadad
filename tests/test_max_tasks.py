"""max_tasks_per_worker holds within one call, however tasks are sent ahead.

Each task returns the pid of the worker that ran it; counting pids tells how many
tasks each worker ran. Tiny tasks are the case that matters: they are the ones the
pool sends ahead to a busy worker, several to a message. A map chunk counts as one
task, as in the standard library.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from alloter_mp import Alloter, ProcessAlloter


def pid_of(_: object = None) -> int:
    return os.getpid()


def _check_at_most(pids: list[int], most: int) -> None:
    counts = Counter(pids)
    assert max(counts.values()) <= most, f"a worker ran more than {most} tasks: {counts}"


def test_one_task_per_worker_three_tasks_three_workers() -> None:
    with ProcessAlloter(1, max_tasks_per_worker=1) as a:
        pids = a.exec(os.getpid, os.getpid, os.getpid)
    assert len(set(pids)) == 3, pids


@pytest.mark.parametrize("limit", [1, 2])
def test_two_per_worker_four_tasks(limit: int) -> None:
    with ProcessAlloter(limit, max_tasks_per_worker=2) as a:
        pids = a.exec(*[os.getpid] * 4)
    _check_at_most(pids, 2)
    assert len(set(pids)) >= 2


def test_map_chunks_of_one_each_on_its_own_worker() -> None:
    with ProcessAlloter(2, max_tasks_per_worker=1) as a:
        pids = a.map(pid_of, range(10), chunksize=1)
    assert len(set(pids)) == 10, Counter(pids)


def test_map_chunk_counts_as_one_task() -> None:
    with ProcessAlloter(1, max_tasks_per_worker=1) as a:
        pids = a.map(pid_of, range(10), chunksize=5)
    assert pids[:5] == [pids[0]] * 5 and pids[5:] == [pids[5]] * 5
    assert pids[0] != pids[5]


def test_many_tiny_tasks_respect_the_maximum() -> None:
    with ProcessAlloter(2, max_tasks_per_worker=3) as a:
        pids = a.exec(*[os.getpid] * 30)
    _check_at_most(pids, 3)
    assert len(set(pids)) >= 10


def test_the_maximum_holds_across_calls() -> None:
    with ProcessAlloter(1, max_tasks_per_worker=2) as a:
        pids = [pid for _ in range(3) for pid in a.exec(os.getpid, os.getpid, os.getpid)]
    _check_at_most(pids, 2)


def test_imap_respects_the_maximum() -> None:
    with ProcessAlloter(2, max_tasks_per_worker=2) as a:
        pids = list(a.imap(pid_of, range(12), chunksize=1))
    _check_at_most(pids, 2)


def test_unlimited_alloter_respects_the_maximum() -> None:
    with Alloter(max_tasks_per_worker=1) as a:
        pids = a.exec(*[os.getpid] * 6)
    assert len(set(pids)) == 6
