"""pebble's ProcessPool."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import tasks as T
from .base import FirstError, Lib, ff_tasks, warm_items


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

    def ex_submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        return self.submit_each(fn, args)

    def ex_one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self.one(fn, arg)

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
            fe = FirstError()
            fs = []
            for fn, args in ff_tasks(n, s):
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
