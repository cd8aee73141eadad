"""multiprocessing.Pool."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

from .. import tasks as T
from .base import FirstError, Lib, ff_tasks, warm_items


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
            fe = FirstError()
            for fn, args in ff_tasks(n, s):
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
