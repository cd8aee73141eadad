"""submit: N no-op tasks, one submit per task, on a warm pool (tasks/s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import tasks as T
from ..adapters import Lib
from ..adapters.floors import floor_submit
from ..cells import Cell
from ..config import Config
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx


class Submit(Workload):
    key = "submit"
    title = "{n} no-op tasks, one submit each"
    unit = "tasks/s"
    higher_better = True
    fmt = "rate"
    needs = ("submit_each",)

    def floors(self, cfg: Config) -> list[tuple[str, Callable[[], float]]]:
        return [("ref: fork + Pipe, 1 msg/task", lambda: floor_submit(cfg.workers, cfg.n_tasks))]

    def value(self, ctx: Ctx, lib: Lib) -> float:
        n = ctx.cfg.n_tasks
        items = list(range(n))
        return n / ctx.timed(lambda: lib.submit_each(T.noop, items), items)

    def meta(self, lib: Lib) -> dict[str, Any]:
        return {"call": lib.submit_call}

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        return [meta["call"]] if "call" in meta else []


WORKLOAD = Submit()
