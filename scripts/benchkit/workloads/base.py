"""What a workload is, for the engine and the renderer.

A workload is one module with a ``Workload`` subclass, listed in
``workloads/__init__.py`` (the table's order).  It says:

* how it runs (``kind``):
  - ``"warm"``:  on the library's warm pool, shared with the other warm workloads
                 of that library and round (``start`` was called, ``stop`` follows);
  - ``"alone"``: the workload makes and ends its own pool (cold start, fail-fast);
  - ``"fresh"``: in a fresh interpreter that starts the library's warm pool
                 (memory, numpy), with ``env_unset`` removed from its environment;
* which libraries it compares: ``libs()`` (default: every library at its default
  start method), narrowed to ``peers`` (library keys) and to the adapters that have
  the operations it ``needs`` (``Lib.can``);
* what one cell measures: ``value(ctx, lib)`` returns a number or a ``Cell`` (with
  ``extra`` for the notes); ``measure`` may be overridden to add several rows;
* the table's header for it (``title``, ``unit``, ``higher_better``, ``fmt``), its
  notes, and which row is "ours" (the ratios' numerator).

So a new workload is one file here plus one line in ``__init__``; a new capability of
the libraries is a method on the adapters that have it, named in ``needs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..adapters import Lib, all_libs
from ..cells import Cell
from ..config import Config

if TYPE_CHECKING:
    from ..engine import Ctx, Run


class Workload:
    key = ""
    # formatted with ``fields(cfg)``: n, c, ms, t, k, w, pool, mib_in, mib_out, bn
    title = ""
    unit = ""
    higher_better = True
    fmt = ""  # rate, us, ms, s, pct, mb (see render.fmt)
    kind = "warm"
    needs: tuple[str, ...] = ()
    peers: frozenset[str] | None = None
    ours_row = "alloter_mp"
    budget: float | None = None  # watchdog of one cell (None: cfg.cell_budget)
    fresh_timeout = 60.0  # "fresh": how long the interpreter may take
    env_unset: tuple[str, ...] = ()  # "fresh": variables its interpreter runs without
    quick_once = False  # with --quick, only in the first round
    log_name = ""

    def libs(self) -> list[Lib]:
        return all_libs()

    def supports(self, lib: Lib) -> bool:
        if self.peers is not None and lib.key not in self.peers:
            return False
        return all(lib.can(op) for op in self.needs)

    def workers(self, cfg: Config) -> int:
        """Workers of the pool a "fresh" workload starts."""
        return cfg.workers

    def title_for(self, cfg: Config) -> str:
        return self.title.format(**fields(cfg))

    def prepare(self, run: Run) -> None:
        """Once per run, before the rounds (calibration); results go to ``run.state``."""

    def floors(self, cfg: Config) -> list[tuple[str, Callable[[], float]]]:
        """Rows measured once per round without any library: (label, measurement)."""
        return []

    def measure(self, ctx: Ctx, lib: Lib) -> None:
        cell = ctx.cell(lambda: self.value(ctx, lib), self.budget)
        ctx.add(self.key, lib.name, cell, **self.meta(lib))

    def value(self, ctx: Ctx, lib: Lib) -> float | Cell:
        raise NotImplementedError

    def meta(self, lib: Lib) -> dict[str, Any]:
        """What the notes (and the JSON) record about a library's row."""
        return {}

    def finish(self, run: Run) -> None:
        """After the rounds: turn what was gathered into rows."""

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        """The row's own notes, before the generic ones (failed rounds, leaks)."""
        return []

    def note_after(self, label: str, cells: list[Cell], rows: dict[str, list[Cell]]) -> list[str]:
        """Notes after the generic ones."""
        return []

    def header(self, run: Run) -> list[str]:
        """Lines the report prints above the table when this workload ran."""
        return []

    def json_extra(self, run: Run) -> dict[str, Any]:
        """Top-level entries of the JSON dump."""
        return {}


def fields(cfg: Config) -> dict[str, Any]:
    return {
        "n": f"{cfg.n_tasks:,}",
        "c": cfg.cpu_tasks,
        "ms": int(cfg.cpu_seconds * 1000),
        "t": cfg.timeout,
        "k": cfg.np_tasks,
        "w": cfg.workers,
        "pool": cfg.mem_pool,
        "mib_in": cfg.np_in_mib,
        "mib_out": cfg.np_out_mib,
        "bn": cfg.blas_n,
    }
