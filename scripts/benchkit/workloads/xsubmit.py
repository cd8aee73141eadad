"""xsubmit: N no-op calls, one executor ``submit`` each, then wait for all (calls/s).

The concurrent.futures face of each library on its warm pool: alloter_mp's
``ProcessPoolExecutor`` (here ``alloter.executor()`` on the warm alloter: the same
machinery), the standard library's, loky's, and pebble's ``schedule``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import tasks as T
from ..adapters import Lib
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class ExecutorSubmit(Workload):
    key = "xsubmit"
    title = "executor: {n} no-op submits, then wait for all"
    unit = "calls/s"
    higher_better = True
    fmt = "rate"
    needs = ("ex_submit_each",)
    peers = frozenset({"ours", "ppe", "loky", "pebble"})

    def value(self, ctx: Ctx, lib: Lib) -> float:
        n = ctx.cfg.n_tasks
        items = list(range(n))
        return n / ctx.timed(lambda: lib.ex_submit_each(T.noop, items), items)

    def meta(self, lib: Lib) -> dict[str, Any]:
        return {"call": "alloter.executor().submit" if lib.key == "ours" else lib.submit_call}


WORKLOAD = ExecutorSubmit()
