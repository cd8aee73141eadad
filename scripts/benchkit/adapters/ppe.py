"""concurrent.futures.ProcessPoolExecutor."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

from .. import tasks as T
from .base import FirstError, Lib, ff_tasks, warm_items


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

    def _mk(self, w: int) -> Any:
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

    def ex_submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        return self.submit_each(fn, args)

    def ex_one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.one(fn, arg)

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
            fe = FirstError()
            fs = []
            for fn, args in ff_tasks(n, s):
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
