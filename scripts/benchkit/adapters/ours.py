"""alloter_mp's ProcessAlloter."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

from .. import tasks as T
from ..config import Config
from .base import Lib, ff_tasks, warm_items


def default_start_method() -> str | None:
    """The start method a ``ProcessAlloter`` uses when given none (None if it does not
    import).  Making an alloter starts no worker."""
    try:
        from alloter_mp import ProcessAlloter

        a = ProcessAlloter(1)
    except Exception:
        return None
    try:
        return str(a.pool.start_method)
    finally:
        a.close()


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
        if getattr(self, "ex", None) is not None:
            self.ex.shutdown(wait=True)
            self.ex = None
        self.a.close()

    def _executor(self) -> Any:
        # The warm alloter's executor: the same face as alloter_mp.ProcessPoolExecutor,
        # on the session's warm workers.
        if getattr(self, "ex", None) is None:
            self.ex = self.a.executor()
            [f.result() for f in [self.ex.submit(T.noop, i) for i in range(20)]]
        return self.ex

    def ex_submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        ex = self._executor()
        fs = [ex.submit(fn, x) for x in args]
        return [f.result() for f in fs]

    def ex_one(self, fn: Callable[..., Any], arg: Any) -> Any:
        return self._executor().submit(fn, arg).result()

    def async_rt(self, fn: Callable[..., Any], arg: Any, n: int) -> tuple[list[float], list[float]]:
        import asyncio

        a = self.a

        async def both() -> tuple[list[float], list[float]]:
            awaited: list[float] = []
            plain: list[float] = []
            for _ in range(10):
                await a.exec_async(functools.partial(fn, arg))
            for _ in range(n):
                t0 = time.perf_counter()
                await a.exec_async(functools.partial(fn, arg))
                awaited.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                a.exec(functools.partial(fn, arg))
                plain.append(time.perf_counter() - t0)
            return awaited, plain

        return asyncio.run(both())

    def async_cancel(self, pidfile: str) -> tuple[float, bool]:
        import asyncio

        import psutil

        async def run() -> tuple[float, bool]:
            with self._mk(1, cancel_grace=0.0) as a:
                await a.exec_async(functools.partial(T.noop, 0))
                task = asyncio.ensure_future(
                    a.exec_async(functools.partial(T.spin_forever, pidfile))
                )
                pid = None
                while pid is None:
                    await asyncio.sleep(0.002)
                    try:
                        with open(pidfile) as f:
                            pid = int(f.read().strip())
                    except (OSError, ValueError):
                        pass
                await asyncio.sleep(0.05)  # it spins
                t0 = time.perf_counter()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                elapsed = time.perf_counter() - t0
                try:
                    gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    gone = True
                return elapsed, gone

        return asyncio.run(run())

    def submit_each(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        return list(self.a.exec(*[functools.partial(fn, x) for x in args]))

    def submit_each_quiet(self, fn: Callable[..., Any], args: list[Any]) -> list[Any]:
        # The same workers: the first task of each call tells them the relay is off.
        quiet = self.a.with_options(relay_logs=False)
        return list(quiet.exec(*[functools.partial(fn, x) for x in args]))

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
            tasks = [functools.partial(fn, *args) for fn, args in ff_tasks(n, s)]
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
