"""What every library adapter offers, and the helpers they share.

Each adapter offers the same operations on one library:

  start(w) / stop() / abort()       a warm pool for the "warm" workloads
  submit_each(fn, args) -> list     one submit per task ``fn(x)``, wait for all results
  submit_each_quiet(fn, args)       the same with the library's log relay off (alloter_mp)
  map(fn, items, chunk) -> list     the library's map at a chunk size
  one(fn, arg)                      one task, wait for its result
  cold(w)                           new pool, 2 no-op tasks, close (joined)
  failfast(w, sleepers, s)          -> (time.time() the caller saw the error, exc)
  timeout(w, pidfile, t)            -> (seconds until the caller had control, finish())
  ex_submit_each(fn, args) -> list  one submit per task on the library's
                                    concurrent.futures-style executor, wait for all
  ex_one(fn, arg)                   one call on that executor, wait for its result
  async_rt(fn, arg, n)              -> ([s per awaited call], [s per plain call]),
                                    interleaved in one event loop
  async_cancel(pidfile)             -> (s from cancel() to the await's return, pid
                                    gone then?) for a spinning task, grace 0

An adapter that cannot do an operation leaves it out; ``can(op)`` tells, and a
workload names the operations it ``needs``.  A new capability is a new method here
(raising ``NotImplementedError``) plus its implementation in the adapters that have it.

Fail-fast: each peer is observed its most favourable reasonable way: a done-callback
on every future (concurrent.futures, loky, pebble) or ``error_callback``
(multiprocessing.Pool, mpire) stamps the time in the library's own result thread the
moment the failure is set; joblib can only raise from the call itself, so it uses
``return_as="generator_unordered"`` and stamps when the first exception comes out.
alloter_mp is timed when ``exec`` raises in the caller's thread (the least
favourable of these points).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import tasks as T
from ..config import Config


class Lib:
    key = ""
    name = ""
    submit_call = ""
    map_call = ""
    ff_how = ""
    to_how = ""

    def can(self, op: str) -> bool:
        """Whether this adapter implements the operation ``op``."""
        return getattr(type(self), op, None) is not getattr(Lib, op, None)

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

    def submit_each_quiet(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
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

    def ex_submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        raise NotImplementedError

    def ex_one(self, fn: Callable[..., Any], arg: Any) -> Any:
        raise NotImplementedError

    def async_rt(self, fn: Callable[..., Any], arg: Any, n: int) -> tuple[list[float], list[float]]:
        raise NotImplementedError

    def async_cancel(self, pidfile: str) -> tuple[float, bool]:
        raise NotImplementedError


def warm_items(w: int) -> list[int]:
    return list(range(4 * w))


def ff_tasks(n: int, s: float) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
    """The fail-fast batch: one task failing at once, then ``n`` sleepers."""
    return [(T.fail_now, ())] + [(T.sleep_for, (s,))] * n


class FirstError:
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
