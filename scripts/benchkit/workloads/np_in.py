"""np_in: one big float64 array given to every task of a call; each task reduces its
slice (s).  Issue 15: >= 5x faster than ProcessPoolExecutor, no slower than joblib
(which memory-maps large arrays)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..adapters import Lib
from ..cells import Cell
from .numpy_base import NumpyWorkload

if TYPE_CHECKING:
    from ..engine import Ctx


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
        # whole numbers: every slice's sum is exact, whatever the order of the adds
        arr = np.arange(cfg.np_in_mib * 2**20 // 8, dtype=np.float64)
        jobs = [(arr, k, cfg.np_tasks) for k in range(cfg.np_tasks)]
        expect = [np_tasks.slice_sum(j) for j in jobs]
        secs = ctx.timed(lambda: lib.submit_each(np_tasks.slice_sum, jobs), expect)
        return Cell(value=secs, extra={"mib": cfg.np_in_mib, "tasks": cfg.np_tasks})


WORKLOAD = ArrayIn()
