"""failfast: one task raising at once among sleepers: from the failing task's end
until the caller sees the error (ms).  How each library is observed: adapters/base."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .. import tasks as T
from ..adapters import Lib
from ..cells import Cell
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx

FAIL_RE = re.compile(re.escape(T.FAIL_TAG) + r"([0-9.]+(?:e[+-]?\d+)?)")


def fail_time_of(e: BaseException) -> float:
    """The failing task's ``time.time()`` carried in the exception's message, looked
    for along the cause/context chain and any remote traceback text."""
    seen: list[BaseException] = []
    x: BaseException | None = e
    texts: list[str] = []
    while x is not None and x not in seen and len(seen) < 8:
        seen.append(x)
        texts += [str(x), repr(x), str(getattr(x, "remote_traceback", "") or "")]
        x = x.__cause__ or x.__context__
    for t in texts:
        m = FAIL_RE.search(t)
        if m:
            return float(m.group(1))
    raise RuntimeError(f"failing task's time not found in {type(e).__name__}: {e}")


class FailFast(Workload):
    key = "failfast"
    title = "fail-fast: task's end -> caller sees error"
    unit = "ms"
    higher_better = False
    fmt = "ms"
    kind = "alone"
    needs = ("failfast",)
    log_name = "fail-fast"

    def value(self, ctx: Ctx, lib: Lib) -> float:
        cfg = ctx.cfg
        seen, exc = lib.failfast(cfg.workers, cfg.ff_sleepers, cfg.ff_sleep)
        return (seen - fail_time_of(exc)) * 1e3

    def meta(self, lib: Lib) -> dict[str, Any]:
        return {"how": lib.ff_how}

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        return [meta["how"]] if "how" in meta else []


WORKLOAD = FailFast()
