#!/usr/bin/env python
"""Benchmark alloter_mp against its peers, side by side, in one run.

    python scripts/bench.py                 # 5 rounds, 2 workers
    python scripts/bench.py --quick         # smoke run, well under a minute
    python scripts/bench.py --rounds 9 --workers 2 --json bench.json
    python scripts/bench.py --libs ours,mp_pool --workloads submit,map

Libraries: alloter_mp, concurrent.futures.ProcessPoolExecutor, multiprocessing.Pool,
loky, pebble, mpire and joblib (each with its default start method unless a row says
otherwise).  A library that is missing or fails prints ``error: ...`` in its cell;
the run goes on.

Workloads (every round runs every library; the library order rotates per round):

  submit    N no-op tasks, one submit per task, on a warm pool (tasks/s)
  map       N no-op items through each library's map at its best chunk size (items/s)
  rt        warm round trip of one task (us)
  cold      new pool, 2 tasks, close (s)
  cpu       8 x ~100 ms pure-Python CPU tasks: efficiency = (worker CPU / workers) / makespan
  failfast  one task raising at once among 20 sleeping 200 ms: failing task's end until
            the caller sees the error (ms)
  timeout   a task looping forever under a 0.5 s timeout: caller back minus 0.5 s (ms),
            and whether the looping process still lives 1 s later
  mem       idle USS of parent + workers after warm-up, measured in a fresh interpreter (MB)

submit and map time each call, repeated within a round for up to 0.25 s (at most 25
calls) and take the median, so a call of a few milliseconds is not one noisy sample.
The 1-min load average is printed: on a shared machine every number moves with it.

Floors: a raw ``os.fork`` + ``multiprocessing.Pipe`` echo (round trip, cold start and
one-message-per-task throughput) shows what the operating system itself costs.

The script cleans up every process it starts: after each cell it kills whatever new
descendant is still alive (and reports it as a leak), a watchdog (SIGALRM) bounds
every cell, and at exit every descendant is killed and reaped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing as mp
import os
import pickle
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
# Interpreters started later (spawn, forkserver, loky, the memory probe) must find
# both the library under test and the task module.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT, HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

import _bench_tasks as T  # noqa: E402  (needs the sys.path set-up above)

# --------------------------------------------------------------------------- config


@dataclass
class Config:
    workers: int = 2
    rounds: int = 5
    n_tasks: int = 10_000
    chunks: list[int] = field(default_factory=lambda: [1, 16, 64, 256, 1250])
    rt_calls: int = 200
    cpu_tasks: int = 8
    cpu_seconds: float = 0.100
    ff_sleepers: int = 20
    ff_sleep: float = 0.200
    timeout: float = 0.5
    alive_after: float = 1.0
    cell_budget: float = 120.0
    rep_budget: float = 0.25  # submit/map: repeat a call within a round up to this long
    rep_most: int = 25
    quick: bool = False


def make_config(args: argparse.Namespace) -> Config:
    c = Config(workers=args.workers, rounds=args.rounds, quick=args.quick)
    if args.quick:
        c.rounds = 1 if args.rounds == 5 else args.rounds
        c.n_tasks = 2000
        c.rt_calls = 50
        c.rep_budget = 0.1
        c.cpu_seconds = 0.05
        c.cell_budget = 30.0
    if args.tasks:
        c.n_tasks = args.tasks
    even = max(1, -(-c.n_tasks // (4 * c.workers)))  # multiprocessing.Pool.map's default
    c.chunks = [64, even] if args.quick else [1, 16, 64, 256, even]
    c.chunks = sorted(set(c.chunks))
    return c


# ------------------------------------------------------------------- process hygiene

HELPER_MARKS = ("resource_tracker", "semaphore_tracker", "forkserver")


def _descendants() -> dict[tuple[int, float], psutil.Process]:
    out: dict[tuple[int, float], psutil.Process] = {}
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return out
    for p in kids:
        with suppress(psutil.Error):
            out[(p.pid, p.create_time())] = p
    return out


def _is_helper(p: psutil.Process) -> bool:
    """A long-lived helper of multiprocessing/loky started directly by us (resource
    tracker, forkserver).  Workers forked by a forkserver share its command line but
    are its children, not ours, so they are not helpers."""
    try:
        if p.ppid() != os.getpid():
            return False
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return any(m in cmd for m in HELPER_MARKS)


def _live(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_procs(procs: list[psutil.Process]) -> None:
    for p in procs:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=3)


def reap_new(before: dict[tuple[int, float], psutil.Process], grace: float) -> int:
    """Wait up to ``grace`` s for descendants born since ``before`` to exit, then kill
    the rest; return how many had to be killed."""
    deadline = time.monotonic() + grace
    while True:
        new = [
            p
            for k, p in _descendants().items()
            if k not in before and not _is_helper(p) and _live(p)
        ]
        if not new or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    kill_procs(new)
    return len(new)


def kill_everything() -> None:
    """At the end: every descendant but the resource trackers / forkservers (they exit
    by themselves when we do, and killing them early makes multiprocessing and loky
    relaunch them from their exit handlers), then reap our zombies."""
    kill_procs([p for p in _descendants().values() if not _is_helper(p)])
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break


class CellTimeout(BaseException):
    """Raised by the watchdog in the main thread; a BaseException so that no library's
    ``except Exception`` swallows it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CellTimeout()


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass
class Cell:
    value: float | None = None
    error: str | None = None
    note: str = ""
    leaked: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _err(e: BaseException) -> str:
    if isinstance(e, CellTimeout):
        return "error: hung past the watchdog"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {msg}"[:160]


# -------------------------------------------------------------------------- helpers

FAIL_RE = re.compile(re.escape(T.FAIL_TAG) + r"([0-9.]+(?:e[+-]?\d+)?)")


def fail_time_of(e: BaseException) -> float:
    """The failing task's ``time.time()`` carried in the exception's message, looked
    for along the cause/context chain and any remote traceback text."""
    seen: list[BaseException] = []
    x: BaseException | None = e
    texts: list[str] = []
    while x is not None and x not in seen and len(seen) < 8:
        seen.append(x)
        texts += [str(x), repr(x), str(getattr(x, "remote_traceback", "") or "")]
        x = x.__cause__ or x.__context__
    for t in texts:
        m = FAIL_RE.search(t)
        if m:
            return float(m.group(1))
    raise RuntimeError(f"failing task's time not found in {type(e).__name__}: {e}")


def read_pid(pidfile: str, wait: float = 2.0) -> int | None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


def spinning_state(pid: int | None) -> tuple[bool, bool]:
    """(alive, still burning CPU) for the looping task's process."""
    if pid is None:
        return False, False
    try:
        p = psutil.Process(pid)
        if not _live(p):
            return False, False
        c0 = sum(p.cpu_times()[:2])
        time.sleep(0.3)
        c1 = sum(p.cpu_times()[:2])
        # an idle worker uses ~0 CPU; a spinning one gets its share of a busy machine
        return _live(p), (c1 - c0) > 0.05
    except psutil.Error:
        return False, False


def calibrate_spin(seconds: float) -> int:
    """Iterations of ``spin`` that cost ``seconds`` of CPU in this process.  CPU time,
    not wall time, so that other load on the machine does not shrink the tasks."""
    n = 100_000
    for _ in range(6):
        dt = T.spin(n)
        n = max(1000, int(n * seconds / max(dt, 1e-4)))
        if abs(dt - seconds) / seconds < 0.03:
            break
    return int(n * seconds / statistics.median(T.spin(n) for _ in range(3)))


def warm_items(w: int) -> list[int]:
    return list(range(4 * w))


# ------------------------------------------------------------------------- adapters
#
# Each adapter offers the same operations on one library:
#   start(w) / stop() / abort()       a warm pool for submit, map, rt, cpu
#   submit_each(fn, args) -> list     one submit per task, wait for all results
#   map(fn, items, chunk) -> list     the library's map at a chunk size
#   one(fn, arg)                      one task, wait for its result
#   cold(w)                           new pool, 2 no-op tasks, close (joined)
#   failfast(w, sleepers, s)          -> (time.time() the caller saw the error, exc)
#   timeout(w, pidfile, t)            -> (seconds until the caller had control, finish())
#
# Fail-fast: each peer is observed its most favourable reasonable way: a done-callback
# on every future (concurrent.futures, loky, pebble) or ``error_callback``
# (multiprocessing.Pool, mpire) stamps the time in the library's own result thread the
# moment the failure is set; joblib can only raise from the call itself, so we use
# ``return_as="generator_unordered"`` and stamp when the first exception comes out.
# alloter_mp is timed when ``exec`` raises in the caller's thread (the least
# favourable of these points).


class Lib:
    key = ""
    name = ""
    submit_call = ""
    map_call = ""
    ff_how = ""
    to_how = ""

    def map_chunks(self, cfg: Config) -> list[Any]:
        return list(cfg.chunks)

    def start(self, w: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        self.stop()

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], items: list[Any], chunk: Any) -> list[Any]:
        raise NotImplementedError

    def one(self, fn: Callable[..., Any], arg: Any) -> Any:
        raise NotImplementedError

    def cold(self, w: int) -> None:
        raise NotImplementedError

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        raise NotImplementedError

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        raise NotImplementedError


def _ff_tasks(n: int, s: float) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
    return [(T.fail_now, ())] + [(T.sleep_for, (s,))] * n


class _FirstError:
    """Stamps ``time.time()`` at the first failure reported by a callback."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at: float | None = None
        self.exc: BaseException | None = None
        self.lock = threading.Lock()

    def error(self, exc: BaseException) -> None:
        t = time.time()
        with self.lock:
            if self.at is None:
                self.at, self.exc = t, exc
                self.event.set()

    def future_done(self, f: cf.Future[Any]) -> None:
        if f.cancelled():
            return
        exc = f.exception()
        if exc is not None:
            self.error(exc)

    def result(self, wait: float = 30.0) -> tuple[float, BaseException]:
        if not self.event.wait(wait):
            raise RuntimeError("the failure was never reported")
        assert self.at is not None and self.exc is not None
        return self.at, self.exc


class Ours(Lib):
    def __init__(self, start_method: str | None = None) -> None:
        self.sm = start_method
        self.key = "ours" if start_method is None else f"ours_{start_method}"
        self.name = "alloter_mp" if start_method is None else f"alloter_mp ({start_method})"
        self.submit_call = "exec(*tasks)"
        self.map_call = "map"
        self.ff_how = "exec raises in the caller"
        self.to_how = "ProcessAlloter(timeout=) -> ExecTimeout"

    def map_chunks(self, cfg: Config) -> list[Any]:
        return [None, *cfg.chunks]

    def _mk(self, w: int, **kw: Any) -> Any:
        from alloter_mp import ProcessAlloter

        return ProcessAlloter(w, start_method=self.sm, **kw)

    def start(self, w: int) -> None:
        self.a = self._mk(w)
        self.a.exec(*[functools.partial(T.noop, i) for i in warm_items(w)])
        self.a.map(T.noop, warm_items(w))

    def stop(self) -> None:
        self.a.close()

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        return list(self.a.exec(*[functools.partial(fn, x) for x in args]))

    def map(self, fn: Callable[..., Any], items: list[Any], chunk: Any) -> list[Any]:
        return list(self.a.map(fn, items, chunksize=chunk))

    def one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.a.exec(functools.partial(fn, arg))[0]

    def cold(self, w: int) -> None:
        with self._mk(w) as a:
            a.exec(functools.partial(T.noop, 0), functools.partial(T.noop, 1))

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        from alloter_mp import TaskError

        a = self._mk(w)
        try:
            a.exec(*[functools.partial(T.noop, i) for i in warm_items(w)])
            tasks = [functools.partial(fn, *args) for fn, args in _ff_tasks(n, s)]
            try:
                a.exec(*tasks)
            except TaskError as e:
                return time.time(), e
            raise RuntimeError("exec returned without raising")
        finally:
            a.close()

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        from alloter_mp import ExecTimeout

        a = self._mk(w, timeout=t)
        try:
            for _ in range(3):  # the first call also starts the workers
                try:
                    a.exec(*[functools.partial(T.noop, i) for i in warm_items(w)])
                    break
                except ExecTimeout:
                    continue
            t0 = time.perf_counter()
            try:
                a.exec(functools.partial(T.spin_forever, pidfile))
            except ExecTimeout:
                return time.perf_counter() - t0, a.close
            raise RuntimeError("exec returned without ExecTimeout")
        except BaseException:
            a.close()
            raise


class PPE(Lib):
    """concurrent.futures.ProcessPoolExecutor."""

    def __init__(self, method: str | None = None) -> None:
        self.method = method
        default = mp.get_start_method(allow_none=False)
        self.key = "ppe" if method is None else f"ppe_{method}"
        self.name = (
            f"ProcessPoolExecutor (default: {default})"
            if method is None
            else f"ProcessPoolExecutor ({method})"
        )
        self.submit_call = "submit"
        self.map_call = "map"
        self.ff_how = "future done-callback"
        self.to_how = "future.result(timeout=)"

    def _mk(self, w: int) -> cf.ProcessPoolExecutor:
        ctx = mp.get_context(self.method) if self.method else None
        return cf.ProcessPoolExecutor(w, mp_context=ctx)

    @staticmethod
    def _warm(ex: Any, w: int) -> None:
        fs = [ex.submit(T.noop, i) for i in warm_items(w)]
        for f in fs:
            f.result()

    def start(self, w: int) -> None:
        self.ex = self._mk(w)
        self._warm(self.ex, w)

    def stop(self) -> None:
        self.ex.shutdown(wait=True)

    def abort(self) -> None:
        self.ex.shutdown(wait=False, cancel_futures=True)

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        fs = [self.ex.submit(fn, x) for x in args]
        return [f.result() for f in fs]

    def map(self, fn: Callable[..., Any], items: list[Any], chunk: Any) -> list[Any]:
        return list(self.ex.map(fn, items, chunksize=chunk))

    def one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.ex.submit(fn, arg).result()

    def cold(self, w: int) -> None:
        with self._mk(w) as ex:
            fs = [ex.submit(T.noop, 0), ex.submit(T.noop, 1)]
            [f.result() for f in fs]

    def _shutdown_hard(self, ex: Any) -> None:
        ex.shutdown(wait=True, cancel_futures=True)

    def _cancel(self, fs: list[Any]) -> None:
        for f in fs:
            f.cancel()

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        ex = self._mk(w)
        try:
            self._warm(ex, w)
            fe = _FirstError()
            fs = []
            for fn, args in _ff_tasks(n, s):
                f = ex.submit(fn, *args)
                f.add_done_callback(fe.future_done)
                fs.append(f)
            seen = fe.result()
            self._cancel(fs)
            return seen
        finally:
            self._shutdown_hard(ex)

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        ex = self._mk(w)
        try:
            self._warm(ex, w)
            t0 = time.perf_counter()
            f = ex.submit(T.spin_forever, pidfile)
            try:
                f.result(timeout=t)
            except cf.TimeoutError:
                return time.perf_counter() - t0, lambda: self._shutdown_hard(ex)
            raise RuntimeError("no timeout")
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise


class Loky(PPE):
    def __init__(self) -> None:
        self.key = "loky"
        self.name = "loky"
        self.submit_call = "submit"
        self.map_call = "map"
        self.ff_how = "future done-callback"
        self.to_how = "future.result(timeout=); no kill"

    def _mk(self, w: int) -> Any:
        import loky

        return loky.ProcessPoolExecutor(max_workers=w)

    def abort(self) -> None:
        self.ex.shutdown(wait=False, kill_workers=True)

    def cold(self, w: int) -> None:
        ex = self._mk(w)
        fs = [ex.submit(T.noop, 0), ex.submit(T.noop, 1)]
        [f.result() for f in fs]
        ex.shutdown(wait=True)

    def _shutdown_hard(self, ex: Any) -> None:
        ex.shutdown(wait=True, kill_workers=True)

    def _cancel(self, fs: list[Any]) -> None:
        # loky 3.7's manager thread raises InvalidStateError on futures cancelled
        # before shutdown(kill_workers=True); the kill ends them all anyway
        pass


class MpPool(Lib):
    key = "mp_pool"
    name = "multiprocessing.Pool"
    submit_call = "apply_async"
    map_call = "map"
    ff_how = "error_callback"
    to_how = "AsyncResult.get(timeout=)"

    def start(self, w: int) -> None:
        self.p = mp.Pool(w)
        self.p.map(T.noop, warm_items(w), chunksize=1)

    def stop(self) -> None:
        self.p.close()
        self.p.join()

    def abort(self) -> None:
        self.p.terminate()
        self.p.join()

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        rs = [self.p.apply_async(fn, (x,)) for x in args]
        return [r.get() for r in rs]

    def map(self, fn: Callable[..., Any], items: list[Any], chunk: Any) -> list[Any]:
        return self.p.map(fn, items, chunksize=chunk)

    def one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.p.apply(fn, (arg,))

    def cold(self, w: int) -> None:
        p = mp.Pool(w)
        rs = [p.apply_async(T.noop, (0,)), p.apply_async(T.noop, (1,))]
        [r.get() for r in rs]
        p.close()
        p.join()

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        p = mp.Pool(w)
        try:
            p.map(T.noop, warm_items(w), chunksize=1)
            fe = _FirstError()
            for fn, args in _ff_tasks(n, s):
                p.apply_async(fn, args, error_callback=fe.error)
            return fe.result()
        finally:
            p.terminate()
            p.join()

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        p = mp.Pool(w)

        def finish() -> None:
            p.terminate()
            p.join()

        try:
            p.map(T.noop, warm_items(w), chunksize=1)
            t0 = time.perf_counter()
            r = p.apply_async(T.spin_forever, (pidfile,))
            try:
                r.get(timeout=t)
            except mp.TimeoutError:
                return time.perf_counter() - t0, finish
            raise RuntimeError("no timeout")
        except BaseException:
            finish()
            raise


class Pebble(Lib):
    key = "pebble"
    name = "pebble"
    submit_call = "schedule"
    map_call = "map"
    ff_how = "future done-callback"
    to_how = "schedule(timeout=)"

    def _mk(self, w: int) -> Any:
        import pebble

        return pebble.ProcessPool(max_workers=w)

    @staticmethod
    def _warm(p: Any, w: int) -> None:
        fs = [p.schedule(T.noop, (i,)) for i in warm_items(w)]
        [f.result() for f in fs]

    def start(self, w: int) -> None:
        self.p = self._mk(w)
        self._warm(self.p, w)

    def stop(self) -> None:
        self.p.close()
        self.p.join()

    def abort(self) -> None:
        self.p.stop()
        self.p.join()

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        fs = [self.p.schedule(fn, (x,)) for x in args]
        return [f.result() for f in fs]

    def map(self, fn: Callable[..., Any], items: list[Any], chunk: Any) -> list[Any]:
        return list(self.p.map(fn, items, chunksize=chunk).result())

    def one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.p.schedule(fn, (arg,)).result()

    def cold(self, w: int) -> None:
        p = self._mk(w)
        fs = [p.schedule(T.noop, (0,)), p.schedule(T.noop, (1,))]
        [f.result() for f in fs]
        p.close()
        p.join()

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        p = self._mk(w)
        try:
            self._warm(p, w)
            fe = _FirstError()
            fs = []
            for fn, args in _ff_tasks(n, s):
                f = p.schedule(fn, args)
                f.add_done_callback(fe.future_done)
                fs.append(f)
            seen = fe.result()
            for f in fs:
                f.cancel()
            return seen
        finally:
            p.stop()
            p.join()

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        p = self._mk(w)

        def finish() -> None:
            p.stop()
            p.join()

        try:
            self._warm(p, w)
            t0 = time.perf_counter()
            f = p.schedule(T.spin_forever, (pidfile,), timeout=t)
            try:
                f.result()
            except TimeoutError:
                return time.perf_counter() - t0, finish
            raise RuntimeError("no timeout")
        except BaseException:
            finish()
            raise


class Mpire(Lib):
    key = "mpire"
    name = "mpire"
    submit_call = "apply_async"
    map_call = "map"
    ff_how = "error_callback"
    to_how = "apply_async(task_timeout=)"

    def _mk(self, w: int) -> Any:
        import mpire

        # keep_alive: reuse the workers between calls (else every map starts new ones)
        return mpire.WorkerPool(n_jobs=w, keep_alive=True)

    @staticmethod
    def _warm(p: Any, w: int) -> None:
        rs = [p.apply_async(T.noop, (i,)) for i in warm_items(w)]
        [r.get() for r in rs]

    def start(self, w: int) -> None:
        self.p = self._mk(w)
        self._warm(self.p, w)
        # mpire 2.10 with keep_alive: the first map after apply_async on a fresh pool
        # raises "noop() takes ... 2 were given"; later maps work.  Warm that path too.
        try:
            self.p.map(T.noop, warm_items(w), chunk_size=1)
        except TypeError:
            self.p.map(T.noop, warm_items(w), chunk_size=1)

    def stop(self) -> None:
        self.p.stop_and_join()

    def abort(self) -> None:
        self.p.terminate()

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        rs = [self.p.apply_async(fn, (x,)) for x in args]
        return [r.get() for r in rs]

    def map(self, fn: Callable[..., Any], items: list[Any], chunk: Any) -> list[Any]:
        return list(self.p.map(fn, items, chunk_size=chunk))

    def one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.p.apply(fn, (arg,))

    def cold(self, w: int) -> None:
        p = self._mk(w)
        rs = [p.apply_async(T.noop, (0,)), p.apply_async(T.noop, (1,))]
        [r.get() for r in rs]
        p.stop_and_join()

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        p = self._mk(w)
        try:
            self._warm(p, w)
            fe = _FirstError()
            for fn, args in _ff_tasks(n, s):
                p.apply_async(fn, args, error_callback=fe.error)
            return fe.result()
        finally:
            p.terminate()

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        p = self._mk(w)
        try:
            self._warm(p, w)
            t0 = time.perf_counter()
            r = p.apply_async(T.spin_forever, (pidfile,), task_timeout=t)
            try:
                r.get()
            except TimeoutError:
                return time.perf_counter() - t0, p.terminate
            raise RuntimeError("no timeout")
        except BaseException:
            p.terminate()
            raise


def _joblib_shutdown(kill: bool) -> None:
    from joblib.externals.loky import reusable_executor as rex

    ex = getattr(rex, "_executor", None)
    if ex is not None:
        ex.shutdown(wait=True, kill_workers=kill)


class Joblib(Lib):
    key = "joblib"
    name = "joblib"
    submit_call = "Parallel(batch_size=1)"
    map_call = "Parallel(batch_size=)"
    ff_how = "first exception out of generator_unordered"
    to_how = "Parallel(timeout=)"

    def map_chunks(self, cfg: Config) -> list[Any]:
        return ["auto", *cfg.chunks]

    def start(self, w: int) -> None:
        import joblib

        self.w = w
        self.par = joblib.Parallel(n_jobs=w, batch_size=1)
        self.par.__enter__()
        self.par(joblib.delayed(T.noop)(i) for i in warm_items(w))

    def stop(self) -> None:
        try:
            self.par.__exit__(None, None, None)
        finally:
            _joblib_shutdown(kill=False)

    def abort(self) -> None:
        try:
            self.par.__exit__(None, None, None)
        finally:
            _joblib_shutdown(kill=True)

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        import joblib

        return list(self.par(joblib.delayed(fn)(x) for x in args))

    def map(self, fn: Callable[..., Any], items: list[Any], chunk: Any) -> list[Any]:
        import joblib

        return list(
            joblib.Parallel(n_jobs=self.w, batch_size=chunk)(joblib.delayed(fn)(x) for x in items)
        )

    def one(self, fn: Callable[..., Any], arg: Any) -> Any:
        import joblib

        return self.par([joblib.delayed(fn)(arg)])[0]

    def cold(self, w: int) -> None:
        import joblib

        _joblib_shutdown(kill=True)  # not timed in practice: nothing should be running
        joblib.Parallel(n_jobs=w)(joblib.delayed(T.noop)(i) for i in range(2))
        _joblib_shutdown(kill=False)

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        import joblib

        try:
            joblib.Parallel(n_jobs=w)(joblib.delayed(T.noop)(i) for i in warm_items(w))
            gen = joblib.Parallel(n_jobs=w, batch_size=1, return_as="generator_unordered")(
                joblib.delayed(fn)(*args) for fn, args in _ff_tasks(n, s)
            )
            try:
                for _ in gen:
                    pass
            except ValueError as e:
                return time.time(), e
            raise RuntimeError("no error raised")
        finally:
            _joblib_shutdown(kill=True)

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        import joblib

        try:
            joblib.Parallel(n_jobs=w)(joblib.delayed(T.noop)(i) for i in warm_items(w))
            t0 = time.perf_counter()
            try:
                joblib.Parallel(n_jobs=w, timeout=t)([joblib.delayed(T.spin_forever)(pidfile)])
            except (TimeoutError, mp.TimeoutError):
                return time.perf_counter() - t0, lambda: _joblib_shutdown(kill=True)
            raise RuntimeError("no timeout")
        except BaseException:
            _joblib_shutdown(kill=True)
            raise


def all_libs() -> list[Lib]:
    return [Ours(), PPE(), MpPool(), Loky(), Pebble(), Mpire(), Joblib()]


def cold_libs() -> list[Lib]:
    return [
        Ours(),
        Ours("fork"),
        PPE(),
        PPE("fork"),
        PPE("forkserver"),
        MpPool(),
        Loky(),
        Pebble(),
        Mpire(),
        Joblib(),
    ]


# ---------------------------------------------------------------------------- floors


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


# ------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    key: str
    title: str
    unit: str
    higher_better: bool
    fmt: str  # rate, us, ms, s, pct, mb


WORKLOADS = [
    Workload("submit", "{n} no-op tasks, one submit each", "tasks/s", True, "rate"),
    Workload("map", "{n} no-op items through map, best chunk", "items/s", True, "rate"),
    Workload("rt", "warm round trip of one task", "us", False, "us"),
    Workload("cold", "cold start: new pool, 2 tasks, close", "s", False, "s"),
    Workload("cpu", "{c} x {ms} ms CPU tasks: efficiency", "%", True, "pct"),
    Workload("failfast", "fail-fast: task's end -> caller sees error", "ms", False, "ms"),
    Workload("timeout", "timeout overshoot past {t} s", "ms", False, "ms"),
    Workload("mem", "idle memory, parent + workers (USS)", "MB", False, "mb"),
]
WL = {w.key: w for w in WORKLOADS}


class Bench:
    def __init__(self, cfg: Config, libs: set[str] | None, workloads: set[str]) -> None:
        self.cfg = cfg
        self.only = libs
        self.workloads = workloads
        # results[workload][row label] = list of Cells (one per round)
        self.results: dict[str, dict[str, list[Cell]]] = {w.key: {} for w in WORKLOADS}
        self.meta: dict[str, dict[str, Any]] = {w.key: {} for w in WORKLOADS}
        self.map_raw: dict[str, dict[str, list[Cell]]] = {}
        self.spin_n = 0
        self.spin_cal = 0.0
        self.loads: list[float] = []  # 1-min load average at each round's start, and at the end
        self.tmp = tempfile.mkdtemp(prefix="alloter-bench-")

    def _want(self, lib: Lib) -> bool:
        return self.only is None or lib.key in self.only or lib.key.split("_")[0] in self.only

    def add(self, wl: str, label: str, cell: Cell, **meta: Any) -> None:
        self.results[wl].setdefault(label, []).append(cell)
        self.meta[wl].setdefault(label, {}).update(meta)

    def cell(self, fn: Callable[[], Any], budget: float | None = None, reap: bool = True) -> Cell:
        """Run one measurement with a watchdog; errors become the cell's text.  With
        ``reap``, processes the cell started and left behind are killed and counted."""
        c = Cell()
        before = _descendants() if reap else {}
        try:
            with watchdog(budget or self.cfg.cell_budget):
                out = fn()
            if isinstance(out, Cell):
                c = out
            else:
                c.value = out
        except (Exception, CellTimeout) as e:
            c.error = _err(e)
            c.extra["traceback"] = traceback.format_exc()
        if reap:
            c.leaked = reap_new(before, grace=2.0 if c.error is None else 0.3)
        return c

    def timed(self, fn: Callable[[], Any], expect: Any) -> float:
        """Seconds one call of ``fn`` takes: the median of as many calls as fit in
        ``cfg.rep_budget`` seconds (at least one, at most ``cfg.rep_most``), so that a
        call of a few milliseconds is not a single noisy sample."""
        times: list[float] = []
        while True:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            if out != expect:
                raise RuntimeError("wrong results")
            if sum(times) >= self.cfg.rep_budget or len(times) >= self.cfg.rep_most:
                return statistics.median(times)

    # ---- the warm-pool workloads: submit, map, rt, cpu on one pool per library/round
    def warm_session(self, lib: Lib) -> None:
        cfg, w = self.cfg, self.cfg.workers
        wanted = [k for k in ("submit", "map", "rt", "cpu") if k in self.workloads]
        if not wanted:
            return
        before = _descendants()
        hung: list[str] = []

        def inner(fn: Callable[[], Any]) -> Cell:
            # the pool lives across these cells: no reaping until the session ends,
            # and after a hang the pool is not trusted for the rest of the session
            if hung:
                return Cell(error=f"skipped: {hung[0]}")
            c = self.cell(fn, reap=False)
            if c.error is not None and "hung" in c.error:
                hung.append(f"{c.error} in an earlier workload")
            return c

        started = inner(lambda: lib.start(w))
        if started.error is not None:
            for k in wanted:
                self.add(k, lib.name, Cell(error=started.error))
            self.cell(lib.abort, budget=15.0, reap=False)
            reap_new(before, grace=0.2)
            return
        try:
            items = list(range(cfg.n_tasks))
            if "submit" in wanted:

                def submit() -> float:
                    return cfg.n_tasks / self.timed(lambda: lib.submit_each(T.noop, items), items)

                self.add("submit", lib.name, inner(submit), call=lib.submit_call)

            if "map" in wanted:
                for chunk in lib.map_chunks(cfg):

                    def mapped(chunk: Any = chunk) -> float:
                        return cfg.n_tasks / self.timed(
                            lambda: lib.map(T.noop, items, chunk), items
                        )

                    self.map_raw.setdefault(lib.name, {}).setdefault(str(chunk), []).append(
                        inner(mapped)
                    )

            if "rt" in wanted:

                def rt() -> float:
                    me = os.getpid()
                    if lib.one(T.noop, 7) != 7:
                        raise RuntimeError("wrong result")
                    if lib.one(T.whoami, 0) == me:
                        raise RuntimeError("ran in the parent, not in a worker")
                    for _ in range(10):
                        lib.one(T.noop, 0)
                    times = []
                    for _ in range(cfg.rt_calls):
                        t0 = time.perf_counter()
                        lib.one(T.noop, 0)
                        times.append(time.perf_counter() - t0)
                    return statistics.median(times) * 1e6

                self.add("rt", lib.name, inner(rt))

            if "cpu" in wanted:

                def cpu() -> Cell:
                    t0 = time.perf_counter()
                    cpus = lib.submit_each(T.spin, [self.spin_n] * cfg.cpu_tasks)
                    makespan = time.perf_counter() - t0
                    ideal = sum(cpus) / w
                    return Cell(
                        value=100.0 * ideal / makespan,
                        extra={"makespan_s": makespan, "ideal_s": ideal, "cpu_s": cpus},
                    )

                self.add("cpu", lib.name, inner(cpu))
        finally:
            stopped = Cell(error="hung earlier") if hung else self.cell(lib.stop, 30.0, False)
            if stopped.error is not None:
                self.cell(lib.abort, budget=15.0, reap=False)
            leaked = reap_new(before, grace=2.0)
            if stopped.error is not None or leaked:
                for k in wanted:
                    if k in self.results and lib.name in self.results[k]:
                        last = self.results[k][lib.name][-1]
                        last.leaked += leaked
                        if stopped.error:
                            last.extra["close_error"] = stopped.error

    def cold(self, lib: Lib) -> None:
        def run() -> float:
            t0 = time.perf_counter()
            lib.cold(self.cfg.workers)
            return time.perf_counter() - t0

        self.add("cold", lib.name, self.cell(run))

    def failfast(self, lib: Lib) -> None:
        cfg = self.cfg

        def run() -> float:
            seen, exc = lib.failfast(cfg.workers, cfg.ff_sleepers, cfg.ff_sleep)
            return (seen - fail_time_of(exc)) * 1e3

        self.add("failfast", lib.name, self.cell(run), how=lib.ff_how)

    def timeout(self, lib: Lib) -> None:
        cfg = self.cfg

        def run() -> Cell:
            pidfile = os.path.join(self.tmp, f"spin-{lib.key}-{time.monotonic_ns()}.pid")
            elapsed, finish = lib.timeout(cfg.workers, pidfile, cfg.timeout)
            back = time.perf_counter()
            pid = read_pid(pidfile)
            time.sleep(max(0.0, back + cfg.alive_after - time.perf_counter()))
            alive, spinning = spinning_state(pid)
            if pid is not None and alive:
                with suppress(psutil.Error):
                    kill_procs([psutil.Process(pid)])
            with watchdog(20.0):
                finish()
            return Cell(
                value=(elapsed - cfg.timeout) * 1e3,
                extra={"alive": alive, "spinning": spinning, "pid": pid},
            )

        self.add("timeout", lib.name, self.cell(run), how=lib.to_how)

    def memory(self, lib: Lib) -> None:
        def run() -> Cell:
            cmd = [sys.executable, os.path.abspath(__file__), "--_mem", lib.key]
            cmd += ["--workers", str(self.cfg.workers)]
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise RuntimeError("memory probe hung") from None
            finally:
                with suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = err.decode().strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"probe exit {proc.returncode}: {tail[0]}")
            d = json.loads(lines[-1])
            return Cell(value=d["uss_mb"], extra=d)

        self.add("mem", lib.name, self.cell(run, budget=90.0))

    def floors(self) -> None:
        cfg = self.cfg
        label = "floor: fork + Pipe"
        if "rt" in self.workloads:
            self.add("rt", label, self.cell(lambda: floor_rt(cfg.rt_calls) * 1e6), floor=True)
        if "cold" in self.workloads:
            self.add("cold", label, self.cell(lambda: floor_cold(cfg.workers)), floor=True)
        if "submit" in self.workloads:
            self.add(
                "submit",
                "ref: fork + Pipe, 1 msg/task",
                self.cell(lambda: floor_submit(cfg.workers, cfg.n_tasks)),
                floor=True,
            )

    def run(self) -> None:
        cfg = self.cfg
        if "cpu" in self.workloads:
            self.spin_n = calibrate_spin(cfg.cpu_seconds)
            self.spin_cal = T.spin(self.spin_n)
            log(f"cpu task: spin({self.spin_n}) = {self.spin_cal * 1e3:.1f} ms CPU in-process")
        libs = [lib for lib in all_libs() if self._want(lib)]
        cold = [lib for lib in cold_libs() if self._want(lib)]
        for r in range(cfg.rounds):
            k = r % max(1, len(libs))
            order = libs[k:] + libs[:k]
            cold_order = cold[k:] + cold[:k]
            t_round = time.perf_counter()
            self.loads.append(os.getloadavg()[0])
            log(f"round {r + 1}/{cfg.rounds}: floors")
            self.floors()
            for lib in order:
                log(f"round {r + 1}/{cfg.rounds}: {lib.name}: warm workloads")
                self.warm_session(lib)
            if "cold" in self.workloads:
                for lib in cold_order:
                    log(f"round {r + 1}/{cfg.rounds}: {lib.name}: cold start")
                    self.cold(lib)
            for lib in order:
                if "failfast" in self.workloads:
                    log(f"round {r + 1}/{cfg.rounds}: {lib.name}: fail-fast")
                    self.failfast(lib)
                if "timeout" in self.workloads:
                    log(f"round {r + 1}/{cfg.rounds}: {lib.name}: timeout")
                    self.timeout(lib)
                if "mem" in self.workloads and (r == 0 or not cfg.quick):
                    log(f"round {r + 1}/{cfg.rounds}: {lib.name}: memory")
                    self.memory(lib)
            log(f"round {r + 1} took {time.perf_counter() - t_round:.1f} s")
        self.loads.append(os.getloadavg()[0])
        self._fold_map()

    def _fold_map(self) -> None:
        """Per library: the chunk size with the best median wins the map row; ours with
        ``chunksize=None`` gets a row of its own."""
        for name, by_chunk in self.map_raw.items():
            best: tuple[float, str] | None = None
            for chunk, cells in by_chunk.items():
                vals = [c.value for c in cells if c.value is not None]
                if chunk == "None" or not vals:
                    continue
                med = statistics.median(vals)
                if best is None or med > best[0]:
                    best = (med, chunk)
            all_med = {
                ch: (statistics.median(v) if v else None)
                for ch, cells in by_chunk.items()
                for v in [[c.value for c in cells if c.value is not None]]
            }
            if "None" in by_chunk:
                self.results["map"][f"{name} (chunksize=None)"] = by_chunk["None"]
                self.meta["map"][f"{name} (chunksize=None)"] = {"chunks": all_med, "auto": True}
            if best is None:
                errs = [c for cells in by_chunk.values() for c in cells if c.error]
                self.results["map"][name] = errs[:1] or [Cell(error="error: no result")]
            else:
                self.results["map"][name] = by_chunk[best[1]]
                self.meta["map"][name] = {"best_chunk": best[1], "chunks": all_med}


# ------------------------------------------------------------------------- reporting


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "us":
        return f"{v:,.0f}"
    if kind == "ms":
        return f"{v:,.1f}"
    if kind == "s":
        return f"{v:.3f}"
    if kind == "pct":
        return f"{v:.1f}"
    if kind == "mb":
        return f"{v:.1f}"
    return f"{v:g}"


def summarize(cells: list[Cell]) -> dict[str, Any]:
    vals = [c.value for c in cells if c.value is not None]
    errs = [c.error for c in cells if c.error]
    return {
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "n": len(vals),
        "errors": errs,
        "leaked": sum(c.leaked for c in cells),
    }


OURS_ROW = {"map": "alloter_mp (chunksize=None)"}


def ours_label(wl: str) -> str:
    return OURS_ROW.get(wl, "alloter_mp")


def note_for(wl: str, label: str, cells: list[Cell], meta: dict[str, Any]) -> str:
    parts: list[str] = []
    m = meta.get(label, {})
    if wl == "submit" and "call" in m:
        parts.append(m["call"])
    if wl == "map":
        if "best_chunk" in m:
            parts.append(f"best chunk={m['best_chunk']}")
        if m.get("auto"):
            parts.append("library's own pick")
    if wl in ("failfast", "timeout") and "how" in m:
        parts.append(m["how"])
    ok = [c for c in cells if c.value is not None]
    if wl == "cpu" and ok:
        ms = statistics.median(c.extra["makespan_s"] for c in ok)
        ideal = statistics.median(c.extra["ideal_s"] for c in ok)
        parts.append(f"makespan {ms:.3f} s, ideal {ideal:.3f} s")
    if wl == "timeout" and ok:
        alive = sum(1 for c in ok if c.extra.get("alive"))
        spin = sum(1 for c in ok if c.extra.get("spinning"))
        n = len(ok)
        if alive == 0:
            parts.append("process gone 1 s later")
        elif spin == alive:
            parts.append(f"looping process STILL SPINNING 1 s later ({spin}/{n} rounds)")
        else:
            parts.append(
                f"process alive 1 s later ({alive}/{n} rounds), still spinning in {spin}"
                " (otherwise the task was stopped and the worker kept)"
            )
    if wl == "mem" and ok:
        rss = statistics.median(c.extra["rss_mb"] for c in ok)
        parts.append(f"RSS sum {rss:.0f} MB, {ok[0].extra['procs']} procs")
    errs = [c.error for c in cells if c.error]
    if errs and ok:
        parts.append(f"{len(errs)}/{len(cells)} rounds failed: {errs[0]}")
    leaked = sum(c.leaked for c in cells)
    if leaked:
        parts.append(f"LEAKED {leaked} process(es), killed by the bench")
    return "; ".join(parts)


def verdict(ratio: float | None, higher_better: bool) -> str:
    if ratio is None:
        return ""
    if 0.95 <= ratio <= 1.05:
        return "~ same"
    better = ratio > 1 if higher_better else ratio < 1
    return "ours better" if better else "ours worse"


def render(b: Bench) -> str:
    cfg = b.cfg
    out: list[str] = []
    out.append(
        f"alloter_mp bench: {cfg.workers} workers, {cfg.rounds} round(s), "
        f"N={cfg.n_tasks}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )
    if b.loads:
        out.append(
            "1-min load average at each round's start and at the end: "
            + ", ".join(f"{x:.2f}" for x in b.loads)
            + f" (other processes compete for the {os.cpu_count()} CPUs above ~0)"
        )
    out.append(
        "median over rounds [min-max]; ratio = alloter_mp / row "
        "(in the row's unit; see 'better' for the direction)"
    )
    out.append("")
    out.append("| workload | library | median | min-max | better | ours/row | verdict | notes |")
    out.append("|---|---|---:|---:|---|---:|---|---|")
    for w in WORKLOADS:
        rows = b.results[w.key]
        if not rows:
            continue
        title = w.title.format(
            n=f"{cfg.n_tasks:,}",
            c=cfg.cpu_tasks,
            ms=int(cfg.cpu_seconds * 1000),
            t=cfg.timeout,
        )
        ours = summarize(rows[ours_label(w.key)])["median"] if ours_label(w.key) in rows else None
        first = True
        for label, cells in _ordered_rows(w.key, rows):
            s = summarize(cells)
            if s["median"] is None:
                med = (s["errors"] or ["error: no result"])[0]
                rng = ""
            else:
                med = fmt(s["median"], w.fmt)
                rng = f"{fmt(s['min'], w.fmt)}-{fmt(s['max'], w.fmt)}" if s["n"] > 1 else ""
            ratio = None
            if label != ours_label(w.key) and ours is not None and s["median"]:
                ratio = ours / s["median"]
            is_floor = b.meta[w.key].get(label, {}).get("floor")
            is_variant = label.startswith("alloter_mp") and label != ours_label(w.key)
            note = note_for(w.key, label, cells, b.meta[w.key])
            if w.key == "map" and label != ours_label(w.key) and s["median"]:
                ours_best = b.results["map"].get("alloter_mp")
                if ours_best and not label.startswith("alloter_mp"):
                    ob = summarize(ours_best)["median"]
                    if ob:
                        note = f"{note}; ours best chunk/row {ob / s['median']:.2f}x"
            head = f"{title} [{w.unit}]" if first else ""
            first = False
            out.append(
                "| "
                + " | ".join(
                    [
                        head,
                        label,
                        med,
                        rng,
                        ("higher" if w.higher_better else "lower") if head else "",
                        f"{ratio:.2f}x" if ratio is not None else "",
                        ("(reference)" if label.startswith("ref") else "(floor)")
                        if is_floor
                        else "(our variant)"
                        if is_variant
                        else verdict(ratio, w.higher_better),
                        note,
                    ]
                )
                + " |"
            )
    out.append("")
    out += render_targets(b)
    return "\n".join(out)


def _ordered_rows(wl: str, rows: dict[str, list[Cell]]) -> list[tuple[str, list[Cell]]]:
    def rank(label: str) -> tuple[int, str]:
        if label == ours_label(wl):
            return (0, "")
        if label.startswith("alloter_mp"):
            return (1, label)
        if label.startswith(("floor", "ref")):
            return (3, label)
        return (2, "")

    return sorted(rows.items(), key=lambda kv: rank(kv[0]))


def _med(b: Bench, wl: str, label: str) -> float | None:
    cells = b.results.get(wl, {}).get(label)
    return summarize(cells)["median"] if cells else None


def render_targets(b: Bench) -> list[str]:
    """Issue 4's targets, checked against this run."""
    out = ["Targets (issue 4):"]
    n = f"{b.cfg.n_tasks:,}"

    def line(ok: bool | None, text: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "MISS")
        out.append(f"  [{mark}] {text}")

    def peers(wl: str) -> dict[str, float]:
        d = {}
        for label in b.results.get(wl, {}):
            if label.startswith(("alloter_mp", "floor", "ref")):
                continue
            v = _med(b, wl, label)
            if v is not None:
                d[label] = v
        return d

    ours = _med(b, "submit", "alloter_mp")
    ref = _med(b, "submit", "multiprocessing.Pool")
    r = ours / ref if ours and ref else None
    line(
        r >= 2.0 if r else None,
        f"exec {n} tiny tasks >= 2.0x multiprocessing.Pool.apply_async: "
        + (f"{r:.2f}x ({fmt(ours, 'rate')} vs {fmt(ref, 'rate')} tasks/s)" if r else "no data"),
    )
    auto = _med(b, "map", "alloter_mp (chunksize=None)")
    best = _med(b, "map", "alloter_mp")
    ref = _med(b, "map", "multiprocessing.Pool")
    r = auto / ref if auto and ref else None
    r2 = best / ref if best and ref else None
    line(
        r >= 1.0 if r else None,
        f"map {n} tiny items >= 1.0x multiprocessing.Pool.map at its best chunk: "
        + (f"{r:.2f}x with chunksize=None" if r else "no data")
        + (f", {r2:.2f}x at ours' best chunk" if r2 else ""),
    )
    r = auto / best if auto and best else None
    line(
        r >= 0.8 if r else None,
        f"map chunksize=None within 20% of ours' best hand-picked chunk ({n} tiny items): "
        + (f"{r:.2f}x" if r else "no data"),
    )
    ours = _med(b, "rt", "alloter_mp")
    p = peers("rt")
    if ours and p:
        name, v = min(p.items(), key=lambda kv: kv[1])
        line(
            ours / v <= 0.6,
            f"warm round trip <= 0.6x the fastest peer's ({name}, {v:.0f} us): "
            f"{ours / v:.2f}x ({ours:.0f} us)",
        )
    else:
        line(None, "warm round trip <= 0.6x the fastest peer's: no data")
    ours = _med(b, "cold", "alloter_mp")
    ref = _med(b, "cold", "ProcessPoolExecutor (fork)")
    r = ours / ref if ours and ref else None
    line(
        r <= 1.0 if r else None,
        "cold start <= 1.0x ProcessPoolExecutor with fork: "
        + (f"{r:.2f}x ({ours * 1e3:.1f} ms vs {ref * 1e3:.1f} ms)" if r else "no data"),
    )
    ours = _med(b, "failfast", "alloter_mp")
    line(
        ours <= 10.0 if ours is not None else None,
        "fail-fast: caller sees the error within 10 ms of the failing task's end: "
        + (f"{ours:.1f} ms" if ours is not None else "no data"),
    )
    cells = b.results.get("timeout", {}).get("alloter_mp", [])
    ours = _med(b, "timeout", "alloter_mp")
    gone = all(not c.extra.get("alive") for c in cells if c.value is not None)
    line(
        (ours <= 50.0 and gone) if ours is not None else None,
        "timeout: control back within 50 ms of the deadline, looping process gone: "
        + (
            f"{ours:.1f} ms past the deadline, process {'gone' if gone else 'STILL ALIVE'}"
            if ours is not None
            else "no data"
        ),
    )
    ours = _med(b, "cpu", "alloter_mp")
    p = peers("cpu")
    if ours is not None and p:
        name, v = max(p.items(), key=lambda kv: kv[1])
        line(
            ours >= v - 1e-9,
            f"CPU batch efficiency >= the best peer's ({name}, {v:.1f} %): {ours:.1f} %",
        )
    else:
        line(None, "CPU batch efficiency >= the best peer's: no data")
    return out


def to_json(b: Bench) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    vers = {}
    for pkg in ("alloter-mp", "loky", "pebble", "mpire", "joblib", "psutil", "cloudpickle"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = None
    wls = {}
    for w in WORKLOADS:
        rows = {}
        for label, cells in b.results[w.key].items():
            s = summarize(cells)
            rows[label] = {
                **s,
                "values": [c.value for c in cells],
                "extra": [{k: v for k, v in c.extra.items() if k != "traceback"} for c in cells],
                "meta": b.meta[w.key].get(label, {}),
            }
        wls[w.key] = {
            "title": w.title,
            "unit": w.unit,
            "higher_is_better": w.higher_better,
            "rows": rows,
        }
    map_raw = {
        name: {ch: [c.value for c in cells] for ch, cells in by.items()}
        for name, by in b.map_raw.items()
    }
    return {
        "config": asdict(b.cfg),
        "spin_iterations": b.spin_n,
        "spin_in_process_s": b.spin_cal,
        "load_average_1min": b.loads,
        "python": sys.version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "start_method_default": mp.get_start_method(allow_none=False),
        "versions": vers,
        "workloads": wls,
        "map_by_chunk": map_raw,
    }


# ---------------------------------------------------------------------- memory probe


def memory_probe(key: str, w: int) -> int:
    """Runs in a fresh interpreter: warm one library's pool, then sum USS/RSS of this
    process and every descendant."""
    lib = {x.key: x for x in all_libs()}[key]
    lib.start(w)
    try:
        lib.submit_each(T.noop, list(range(200)))
        lib.map(T.noop, list(range(200)), 16 if key != "ours" else None)
        time.sleep(0.5)
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        uss = rss = 0
        n = 0
        for p in procs:
            try:
                mi = p.memory_full_info()
            except psutil.Error:
                continue
            uss += mi.uss
            rss += mi.rss
            n += 1
        print(json.dumps({"uss_mb": uss / 2**20, "rss_mb": rss / 2**20, "procs": n}), flush=True)
    finally:
        lib.stop()
    return 0


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds per measurement (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, small N")
    ap.add_argument("--tasks", type=int, default=0, help="N for submit/map (default 10000)")
    ap.add_argument("--json", metavar="FILE", help="dump raw numbers as JSON")
    ap.add_argument(
        "--libs",
        help="comma-separated subset: ours,ppe,mp_pool,loky,pebble,mpire,joblib",
    )
    ap.add_argument(
        "--workloads",
        help="comma-separated subset: " + ",".join(w.key for w in WORKLOADS),
    )
    ap.add_argument("--_mem", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._mem:
        return memory_probe(args._mem, args.workers)
    if args.workers < 1 or args.rounds < 1:
        ap.error("--workers and --rounds must be >= 1")

    cfg = make_config(args)
    libs = set(args.libs.split(",")) if args.libs else None
    wls = set(args.workloads.split(",")) if args.workloads else {w.key for w in WORKLOADS}
    unknown = wls - set(WL)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    try:
        import alloter_mp  # noqa: F401
    except Exception as e:
        log(f"alloter_mp does not import ({_err(e)}); its rows will show the error")

    b = Bench(cfg, libs, wls)
    t0 = time.perf_counter()
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted; printing what was measured")
        b._fold_map()
    finally:
        kill_everything()
    print(render(b))
    log(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(b), f, indent=2, default=str)
        log(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
