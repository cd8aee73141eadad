"""rt: warm round trip of one task (us)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import tasks as T
from ..adapters import Lib
from ..adapters.floors import floor_rt
from ..config import Config
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class RoundTrip(Workload):
    key = "rt"
    title = "warm round trip of one task"
    unit = "us"
    higher_better = False
    fmt = "us"
    needs = ("one",)

    def floors(self, cfg: Config) -> list[tuple[str, Callable[[], float]]]:
        return [("floor: fork + Pipe", lambda: floor_rt(cfg.rt_calls) * 1e6)]

    def value(self, ctx: Ctx, lib: Lib) -> float:
        me = os.getpid()
        if lib.one(T.noop, 7) != 7:
            raise RuntimeError("wrong result")
        if lib.one(T.whoami, 0) == me:
            raise RuntimeError("ran in the parent, not in a worker")
        for _ in range(10):
            lib.one(T.noop, 0)
        times = []
        for _ in range(ctx.cfg.rt_calls):
            t0 = time.perf_counter()
            lib.one(T.noop, 0)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6


WORKLOAD = RoundTrip()
