"""np_out: every task of a call returns a big float64 array (s).  Issue 15: >= 2x
faster than ProcessPoolExecutor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..adapters import Lib
from ..cells import Cell
from .numpy_base import NumpyWorkload

if TYPE_CHECKING:
    from ..engine import Ctx


class ArraysOut(NumpyWorkload):
    key = "np_out"
    title = "{k} results of {mib_out} MiB back"
    unit = "s"
    higher_better = False
    fmt = "s"
    log_name = "numpy: big arrays out"

    def value(self, ctx: Ctx, lib: Lib) -> Cell:
        from .. import np_tasks

        cfg = ctx.cfg
        self.warm_numpy(lib, cfg.workers)
        n = cfg.np_out_mib * 2**20 // 8
        jobs = [(k, n) for k in range(cfg.np_tasks)]

        def call() -> list[tuple[Any, ...]]:
            outs = lib.submit_each(np_tasks.block, jobs)
            return [(o.dtype.str, o.shape, float(o[0]), float(o[-1])) for o in outs]

        expect = [("<f8", (n,), float(k), float(k)) for k in range(cfg.np_tasks)]
        secs = ctx.timed(call, expect)
        return Cell(value=secs, extra={"mib": cfg.np_out_mib, "tasks": cfg.np_tasks})


WORKLOAD = ArraysOut()
