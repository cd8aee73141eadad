"""np_in: one big float64 array given to every task of a call; each task reduces its
slice (s).  Issue 15: >= 5x faster than ProcessPoolExecutor, no slower than joblib
(which memory-maps large arrays).

Each timed call gets an array it has not seen (built untimed, with other numbers), as
a program that computes its data and fans it out does.  The same array given to call
after call is noted apart: joblib then writes it once for the life of its pool (its
cache is keyed by the array object, so a change made in place goes unseen by the
next call's tasks), where alloter_mp writes it once per call and lets it go when the
call ends."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from ..adapters import Lib
from ..cells import Cell
from .numpy_base import NumpyWorkload

if TYPE_CHECKING:
    from ..engine import Ctx

FRESH_CALLS = 5  # timed calls per round, each with an array of its own
SAME_CALLS = 3  # then calls given one array again


class ArrayIn(NumpyWorkload):
    key = "np_in"
    title = "one {mib_in} MiB float64 array to {k} tasks, each sums a slice"
    unit = "s"
    higher_better = False
    fmt = "s"
    log_name = "numpy: big array in"

    def value(self, ctx: Ctx, lib: Lib) -> Cell:
        import numpy as np

        from .. import np_tasks

        cfg = ctx.cfg
        self.warm_numpy(lib, cfg.workers)
        items = cfg.np_in_mib * 2**20 // 8

        def call(arr: Any) -> float:
            # whole numbers: every slice's sum is exact, whatever the order of the adds
            jobs = [(arr, k, cfg.np_tasks) for k in range(cfg.np_tasks)]
            expect = [np_tasks.slice_sum(j) for j in jobs]
            t0 = time.perf_counter()
            got = lib.submit_each(np_tasks.slice_sum, jobs)
            took = time.perf_counter() - t0
            if got != expect:
                raise RuntimeError("wrong results")
            return took

        fresh = []
        arr = None
        for i in range(FRESH_CALLS):
            del arr  # one big array alive at a time
            arr = np.arange(i, items + i, dtype=np.float64)
            fresh.append(call(arr))
        same = [call(arr) for _ in range(SAME_CALLS)]
        extra = {"mib": cfg.np_in_mib, "tasks": cfg.np_tasks, "same_s": statistics.median(same)}
        return Cell(value=statistics.median(fresh), extra=extra)

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        same = [c.extra["same_s"] for c in cells if c.value is not None and "same_s" in c.extra]
        if not same:
            return []
        return [f"the same array again, call after call: {statistics.median(same):.3f} s"]


WORKLOAD = ArrayIn()
