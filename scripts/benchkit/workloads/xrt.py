"""xrt: warm round trip of one call through each library's executor (us)."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

from .. import tasks as T
from ..adapters import Lib
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class ExecutorRoundTrip(Workload):
    key = "xrt"
    title = "executor: warm round trip of one call"
    unit = "us"
    higher_better = False
    fmt = "us"
    needs = ("ex_one",)
    peers = frozenset({"ours", "ppe", "loky", "pebble"})

    def value(self, ctx: Ctx, lib: Lib) -> float:
        if lib.ex_one(T.noop, 7) != 7:
            raise RuntimeError("wrong result")
        for _ in range(10):
            lib.ex_one(T.noop, 0)
        times = []
        for _ in range(ctx.cfg.rt_calls):
            t0 = time.perf_counter()
            lib.ex_one(T.noop, 0)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6


WORKLOAD = ExecutorRoundTrip()
