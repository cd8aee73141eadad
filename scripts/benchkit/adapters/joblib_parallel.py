"""joblib's Parallel (its default backend, loky's reusable executor)."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

from .. import tasks as T
from ..config import Config
from .base import Lib, ff_tasks, warm_items


def _shutdown(kill: bool) -> None:
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
            _shutdown(kill=False)

    def abort(self) -> None:
        try:
            self.par.__exit__(None, None, None)
        finally:
            _shutdown(kill=True)

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

        _shutdown(kill=True)  # not timed in practice: nothing should be running
        joblib.Parallel(n_jobs=w)(joblib.delayed(T.noop)(i) for i in range(2))
        _shutdown(kill=False)

    def failfast(self, w: int, n: int, s: float) -> tuple[float, BaseException]:
        import joblib

        try:
            joblib.Parallel(n_jobs=w)(joblib.delayed(T.noop)(i) for i in warm_items(w))
            gen = joblib.Parallel(n_jobs=w, batch_size=1, return_as="generator_unordered")(
                joblib.delayed(fn)(*args) for fn, args in ff_tasks(n, s)
            )
            try:
                for _ in gen:
                    pass
            except ValueError as e:
                return time.time(), e
            raise RuntimeError("no error raised")
        finally:
            _shutdown(kill=True)

    def timeout(self, w: int, pidfile: str, t: float) -> tuple[float, Callable[[], None]]:
        import joblib

        try:
            joblib.Parallel(n_jobs=w)(joblib.delayed(T.noop)(i) for i in warm_items(w))
            t0 = time.perf_counter()
            try:
                joblib.Parallel(n_jobs=w, timeout=t)([joblib.delayed(T.spin_forever)(pidfile)])
            except (TimeoutError, mp.TimeoutError):
                return time.perf_counter() - t0, lambda: _shutdown(kill=True)
            raise RuntimeError("no timeout")
        except BaseException:
            _shutdown(kill=True)
            raise
