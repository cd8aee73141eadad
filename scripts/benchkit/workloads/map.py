"""map: N no-op items through each library's map at its best chunk size (items/s).

Every chunk size is measured; per library the chunk size with the best median wins
the row, and alloter_mp with ``chunksize=None`` (its own pick) gets a row of its own.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from .. import tasks as T
from ..adapters import Lib
from ..cells import Cell, summarize
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx, Run

AUTO_ROW = "alloter_mp (chunksize=None)"


class Map(Workload):
    key = "map"
    title = "{n} no-op items through map, best chunk"
    unit = "items/s"
    higher_better = True
    fmt = "rate"
    needs = ("map",)
    ours_row = AUTO_ROW

    def measure(self, ctx: Ctx, lib: Lib) -> None:
        n = ctx.cfg.n_tasks
        items = list(range(n))
        by_chunk = ctx.run.raw.setdefault(self.key, {}).setdefault(lib.name, {})
        for chunk in lib.map_chunks(ctx.cfg):

            def mapped(chunk: Any = chunk) -> float:
                return n / ctx.timed(lambda: lib.map(T.noop, items, chunk), items)

            by_chunk.setdefault(str(chunk), []).append(ctx.cell(mapped))

    def finish(self, run: Run) -> None:
        """Per library: the chunk size with the best median wins the map row; ours with
        ``chunksize=None`` gets a row of its own."""
        for name, by_chunk in run.raw.get(self.key, {}).items():
            best: tuple[float, str] | None = None
            for chunk, cells in by_chunk.items():
                vals = [c.value for c in cells if c.value is not None]
                if chunk == "None" or not vals:
                    continue
                med = statistics.median(vals)
                if best is None or med > best[0]:
                    best = (med, chunk)
            all_med = {
                ch: (statistics.median(v) if v else None)
                for ch, cells in by_chunk.items()
                for v in [[c.value for c in cells if c.value is not None]]
            }
            if "None" in by_chunk:
                run.results[self.key][f"{name} (chunksize=None)"] = by_chunk["None"]
                run.meta[self.key][f"{name} (chunksize=None)"] = {"chunks": all_med, "auto": True}
            if best is None:
                errs = [c for cells in by_chunk.values() for c in cells if c.error]
                run.results[self.key][name] = errs[:1] or [Cell(error="error: no result")]
            else:
                run.results[self.key][name] = by_chunk[best[1]]
                run.meta[self.key][name] = {"best_chunk": best[1], "chunks": all_med}

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        parts = []
        if "best_chunk" in meta:
            parts.append(f"best chunk={meta['best_chunk']}")
        if meta.get("auto"):
            parts.append("library's own pick")
        return parts

    def note_after(self, label: str, cells: list[Cell], rows: dict[str, list[Cell]]) -> list[str]:
        med = summarize(cells)["median"]
        ours_best = rows.get("alloter_mp")
        if label == self.ours_row or not med or not ours_best or label.startswith("alloter_mp"):
            return []
        ob = summarize(ours_best)["median"]
        return [f"ours best chunk/row {ob / med:.2f}x"] if ob else []

    def json_extra(self, run: Run) -> dict[str, Any]:
        return {
            "map_by_chunk": {
                name: {ch: [c.value for c in cells] for ch, cells in by.items()}
                for name, by in run.raw.get(self.key, {}).items()
            }
        }


WORKLOAD = Map()
