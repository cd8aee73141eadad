"""mpire's WorkerPool (with keep_alive, so that calls reuse the workers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import tasks as T
from .base import FirstError, Lib, ff_tasks, warm_items


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
            fe = FirstError()
            for fn, args in ff_tasks(n, s):
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
