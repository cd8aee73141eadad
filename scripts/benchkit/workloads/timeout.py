"""timeout: a task looping forever under a 0.5 s timeout: caller back minus 0.5 s (ms),
and whether the looping process still lives (and spins) 1 s later."""

from __future__ import annotations

import os
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import psutil

from ..adapters import Lib
from ..cells import Cell
from ..procs import kill_procs, read_pid, spinning_state, watchdog
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class Timeout(Workload):
    key = "timeout"
    title = "timeout overshoot past {t} s"
    unit = "ms"
    higher_better = False
    fmt = "ms"
    kind = "alone"
    needs = ("timeout",)

    def value(self, ctx: Ctx, lib: Lib) -> Cell:
        cfg = ctx.cfg
        pidfile = os.path.join(ctx.run.tmp, f"spin-{lib.key}-{time.monotonic_ns()}.pid")
        elapsed, finish = lib.timeout(cfg.workers, pidfile, cfg.timeout)
        back = time.perf_counter()
        pid = read_pid(pidfile)
        time.sleep(max(0.0, back + cfg.alive_after - time.perf_counter()))
        alive, spinning = spinning_state(pid)
        if pid is not None and alive:
            with suppress(psutil.Error):
                kill_procs([psutil.Process(pid)])
        with watchdog(20.0):
            finish()
        return Cell(
            value=(elapsed - cfg.timeout) * 1e3,
            extra={"alive": alive, "spinning": spinning, "pid": pid},
        )

    def meta(self, lib: Lib) -> dict[str, Any]:
        return {"how": lib.to_how}

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        parts = [meta["how"]] if "how" in meta else []
        ok = [c for c in cells if c.value is not None]
        if not ok:
            return parts
        alive = sum(1 for c in ok if c.extra.get("alive"))
        spin = sum(1 for c in ok if c.extra.get("spinning"))
        n = len(ok)
        if alive == 0:
            parts.append("process gone 1 s later")
        elif spin == alive:
            parts.append(f"looping process STILL SPINNING 1 s later ({spin}/{n} rounds)")
        else:
            parts.append(
                f"process alive 1 s later ({alive}/{n} rounds), still spinning in {spin}"
                " (otherwise the task was stopped and the worker kept)"
            )
        return parts


WORKLOAD = Timeout()
