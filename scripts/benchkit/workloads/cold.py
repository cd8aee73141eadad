"""cold: new pool, 2 no-op tasks, close (s), with the start methods side by side."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..adapters import Lib, start_method_libs
from ..adapters.floors import floor_cold
from ..config import Config
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class Cold(Workload):
    key = "cold"
    title = "cold start: new pool, 2 tasks, close"
    unit = "s"
    higher_better = False
    fmt = "s"
    kind = "alone"
    needs = ("cold",)
    log_name = "cold start"

    def libs(self) -> list[Lib]:
        return start_method_libs()

    def floors(self, cfg: Config) -> list[tuple[str, Callable[[], float]]]:
        return [("floor: fork + Pipe", lambda: floor_cold(cfg.workers))]

    def value(self, ctx: Ctx, lib: Lib) -> float:
        t0 = time.perf_counter()
        lib.cold(ctx.cfg.workers)
        return time.perf_counter() - t0


WORKLOAD = Cold()
