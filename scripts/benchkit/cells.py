"""One measurement (a ``Cell``: one library, one workload, one round) and the
summary of a row's cells."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from .procs import CellTimeout


@dataclass
class Cell:
    value: float | None = None
    error: str | None = None
    note: str = ""
    leaked: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def error_text(e: BaseException) -> str:
    """What a cell shows for a measurement that raised."""
    if isinstance(e, CellTimeout):
        return "error: hung past the watchdog"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {msg}"[:160]


def summarize(cells: list[Cell]) -> dict[str, Any]:
    vals = [c.value for c in cells if c.value is not None]
    errs = [c.error for c in cells if c.error]
    return {
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "n": len(vals),
        "errors": errs,
        "leaked": sum(c.leaked for c in cells),
    }
