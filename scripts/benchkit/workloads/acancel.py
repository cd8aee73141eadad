"""acancel: cancel the task awaiting ``exec_async`` of a spinning task (cancel_grace=0):
from ``task.cancel()`` until the await has returned (ms), and whether the spinning
process was gone by then."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from ..adapters import Lib
from ..cells import Cell
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class AsyncCancel(Workload):
    key = "acancel"
    title = "cancel an awaiting task (grace 0): await back"
    unit = "ms"
    higher_better = False
    fmt = "ms"
    kind = "alone"
    needs = ("async_cancel",)
    peers = frozenset({"ours"})

    def value(self, ctx: Ctx, lib: Lib) -> Cell:
        pidfile = os.path.join(ctx.run.tmp, f"acancel-{time.monotonic_ns()}.pid")
        elapsed, gone = lib.async_cancel(pidfile)
        return Cell(value=elapsed * 1e3, extra={"gone": gone})

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        ok = [c for c in cells if c.value is not None]
        alive = sum(1 for c in ok if not c.extra.get("gone"))
        if not ok:
            return []
        return [
            "process gone when the await returned"
            if not alive
            else f"process ALIVE at return in {alive}/{len(ok)} rounds"
        ]


WORKLOAD = AsyncCancel()
