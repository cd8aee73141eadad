"""art: ``await exec_async(one task)`` against the plain ``exec`` round trip (us).

Both are timed in one event loop, call after call, so that both rows see the same
machine load.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from .. import tasks as T
from ..adapters import Lib
from ..cells import Cell
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx

PLAIN = "alloter_mp (plain exec)"


class AsyncRoundTrip(Workload):
    key = "art"
    title = "await exec_async(one task) vs exec, warm"
    unit = "us"
    higher_better = False
    fmt = "us"
    needs = ("async_rt",)
    peers = frozenset({"ours"})

    def measure(self, ctx: Ctx, lib: Lib) -> None:
        plain: list[float] = []

        def awaited() -> float:
            a, p = lib.async_rt(T.noop, 0, ctx.cfg.rt_calls)
            plain.extend(p)
            return statistics.median(a) * 1e6

        cell = ctx.cell(awaited, self.budget)
        ctx.add(self.key, "alloter_mp", cell)
        if plain:
            ctx.add(self.key, PLAIN, Cell(value=statistics.median(plain) * 1e6))


WORKLOAD = AsyncRoundTrip()
