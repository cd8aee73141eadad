"""mem: idle USS of the parent and every process it started, after warm-up, measured
in a fresh interpreter (MB)."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import psutil

from .. import tasks as T
from ..adapters import Lib
from ..cells import Cell
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class Memory(Workload):
    key = "mem"
    title = "idle memory, parent + workers (USS)"
    unit = "MB"
    higher_better = False
    fmt = "mb"
    kind = "fresh"
    needs = ("submit_each", "map")
    quick_once = True
    log_name = "memory"

    def value(self, ctx: Ctx, lib: Lib) -> Cell:
        lib.submit_each(T.noop, list(range(200)))
        lib.map(T.noop, list(range(200)), None if lib.key.startswith("ours") else 16)
        time.sleep(0.5)
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        uss = rss = 0
        n = 0
        for p in procs:
            try:
                mi = p.memory_full_info()
            except psutil.Error:
                continue
            uss += mi.uss
            rss += mi.rss
            n += 1
        d = {"uss_mb": uss / 2**20, "rss_mb": rss / 2**20, "procs": n}
        return Cell(value=d["uss_mb"], extra=d)

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        ok = [c for c in cells if c.value is not None]
        if not ok:
            return []
        rss = statistics.median(c.extra["rss_mb"] for c in ok)
        return [f"RSS sum {rss:.0f} MB, {ok[0].extra['procs']} procs"]


WORKLOAD = Memory()
