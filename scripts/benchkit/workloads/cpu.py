"""cpu: pure-Python CPU tasks of ~100 ms each on a warm pool.

efficiency = (worker CPU / workers) / makespan.  The tasks are sized in CPU time, not
wall time, so that other load on the machine does not shrink them.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from .. import tasks as T
from ..adapters import Lib
from ..cells import Cell
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx, Run


def calibrate_spin(seconds: float) -> int:
    """Iterations of ``spin`` that cost ``seconds`` of CPU in this process."""
    n = 100_000
    for _ in range(6):
        dt = T.spin(n)
        n = max(1000, int(n * seconds / max(dt, 1e-4)))
        if abs(dt - seconds) / seconds < 0.03:
            break
    return int(n * seconds / statistics.median(T.spin(n) for _ in range(3)))


class Cpu(Workload):
    key = "cpu"
    title = "{c} x {ms} ms CPU tasks: efficiency"
    unit = "%"
    higher_better = True
    fmt = "pct"
    needs = ("submit_each",)

    def prepare(self, run: Run) -> None:
        from ..engine import log

        n = calibrate_spin(run.cfg.cpu_seconds)
        run.state["spin_n"] = n
        run.state["spin_cal"] = T.spin(n)
        log(f"cpu task: spin({n}) = {run.state['spin_cal'] * 1e3:.1f} ms CPU in-process")

    def value(self, ctx: Ctx, lib: Lib) -> Cell:
        t0 = time.perf_counter()
        cpus = lib.submit_each(T.spin, [ctx.state["spin_n"]] * ctx.cfg.cpu_tasks)
        makespan = time.perf_counter() - t0
        ideal = sum(cpus) / ctx.cfg.workers
        return Cell(
            value=100.0 * ideal / makespan,
            extra={"makespan_s": makespan, "ideal_s": ideal, "cpu_s": cpus},
        )

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        ok = [c for c in cells if c.value is not None]
        if not ok:
            return []
        ms = statistics.median(c.extra["makespan_s"] for c in ok)
        ideal = statistics.median(c.extra["ideal_s"] for c in ok)
        return [f"makespan {ms:.3f} s, ideal {ideal:.3f} s"]


WORKLOAD = Cpu()
