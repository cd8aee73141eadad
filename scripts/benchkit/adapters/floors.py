"""Floors: a raw ``os.fork`` + ``multiprocessing.Pipe`` echo shows what the operating
system itself costs (round trip, cold start, one message per task)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import statistics
import time
from typing import Any

from .. import tasks as T


def _fork_echo(call: bool) -> tuple[int, Any]:
    """Fork a child that echoes what it receives over a ``multiprocessing.Pipe``; with
    ``call`` it unpickles ``(fn, args)``, calls it and sends the pickled result."""
    parent, child = mp.Pipe()
    pid = os.fork()
    if pid == 0:  # child: touch nothing but the pipe
        code = 0
        try:
            parent.close()
            while True:
                m = child.recv_bytes()
                if not m:
                    break
                if call:
                    fn, args = pickle.loads(m)
                    m = pickle.dumps(fn(*args))
                child.send_bytes(m)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    child.close()
    return pid, parent


def _end_echo(pid: int, conn: Any) -> None:
    try:
        conn.send_bytes(b"")
    finally:
        conn.close()
        os.waitpid(pid, 0)


def floor_rt(n: int) -> float:
    """Median round trip (s) of a small message to a forked echo child."""
    pid, conn = _fork_echo(call=False)
    try:
        msg = pickle.dumps((T.noop, (0,)))
        times = []
        for _ in range(n + 10):
            t0 = time.perf_counter()
            conn.send_bytes(msg)
            conn.recv_bytes()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[10:])
    finally:
        _end_echo(pid, conn)


def floor_cold(w: int) -> float:
    """Fork ``w`` children, one pickled no-op each over a Pipe, wait for them."""
    t0 = time.perf_counter()
    kids = [_fork_echo(call=True) for _ in range(w)]
    for i, (_, conn) in enumerate(kids):
        conn.send_bytes(pickle.dumps((T.noop, (i,))))
    for _, conn in kids:
        conn.recv_bytes()
    for pid, conn in kids:
        _end_echo(pid, conn)
    return time.perf_counter() - t0


def floor_submit(w: int, n: int, window: int = 32) -> float:
    """Tasks/s with one pickled message per task to ``w`` forked children (no batching,
    ``window`` messages in flight per child)."""
    kids = [_fork_echo(call=True) for _ in range(w)]
    try:
        t0 = time.perf_counter()
        i = 0
        out = []
        while i < n:
            sent = []
            for _, conn in kids:
                k = 0
                while k < window and i < n:
                    conn.send_bytes(pickle.dumps((T.noop, (i,))))
                    i += 1
                    k += 1
                sent.append(k)
            for (_, conn), k in zip(kids, sent, strict=False):
                for _ in range(k):
                    out.append(pickle.loads(conn.recv_bytes()))
        dt = time.perf_counter() - t0
        assert len(out) == n
        return n / dt
    finally:
        for pid, conn in kids:
            _end_echo(pid, conn)
