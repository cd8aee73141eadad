"""The rounds of a run: which library runs which workload, and how each cell is run.

Every round runs every selected workload on every library that supports it (the
library order rotates per round):

1. the floors of the selected workloads;
2. per library, one warm pool for all the "warm" workloads (``Workload.kind``);
3. per "alone" workload, per library: the workload makes and ends its own pools;
4. per "fresh" workload, per library: a fresh interpreter (``bench.py --_fresh``)
   starts the library's warm pool, measures, prints the cell as JSON and exits.

Every cell runs under a watchdog; what a cell leaves running is killed and counted.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .adapters import Lib, all_libs
from .cells import Cell, error_text
from .config import Config
from .procs import CellTimeout, descendants, reap_new, watchdog

if TYPE_CHECKING:
    from .workloads.base import Workload

BENCH_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rotate(xs: list[Lib], r: int) -> list[Lib]:
    k = r % max(1, len(xs))
    return xs[k:] + xs[:k]


class Ctx:
    """What a workload measures with: the run, and the way this session runs a cell
    (inside a warm session a hang skips the rest of the session, and nothing is reaped
    until the pool is closed)."""

    def __init__(self, run: Run, cell: Callable[..., Cell]) -> None:
        self.run = run
        self._cell = cell

    @property
    def cfg(self) -> Config:
        return self.run.cfg

    @property
    def state(self) -> dict[str, Any]:
        return self.run.state

    def cell(self, fn: Callable[[], Any], budget: float | None = None) -> Cell:
        return self._cell(fn, budget)

    def add(self, wl: str, label: str, cell: Cell, **meta: Any) -> None:
        self.run.add(wl, label, cell, **meta)

    def timed(self, fn: Callable[[], Any], expect: Any) -> float:
        return self.run.timed(fn, expect)


class Run:
    def __init__(
        self,
        cfg: Config,
        libs: set[str] | None,
        selected: list[Workload],
        registry: list[Workload],
    ) -> None:
        self.cfg = cfg
        self.only = libs
        self.selected = selected
        self.registry = registry
        # results[workload][row label] = list of Cells (one per round)
        self.results: dict[str, dict[str, list[Cell]]] = {w.key: {} for w in registry}
        self.meta: dict[str, dict[str, Any]] = {w.key: {} for w in registry}
        # what workloads prepare once per run (JSON-able: fresh interpreters get it)
        self.state: dict[str, Any] = {}
        # workloads' own scratch, per workload key (e.g. map's cells per chunk size)
        self.raw: dict[str, Any] = {}
        self.loads: list[float] = []  # 1-min load average at each round's start, and at the end
        self.tmp = tempfile.mkdtemp(prefix="alloter-bench-")

    def want(self, lib: Lib) -> bool:
        return self.only is None or lib.key in self.only or lib.key.split("_")[0] in self.only

    def add(self, wl: str, label: str, cell: Cell, **meta: Any) -> None:
        self.results[wl].setdefault(label, []).append(cell)
        self.meta[wl].setdefault(label, {}).update(meta)

    def cell(self, fn: Callable[[], Any], budget: float | None = None, reap: bool = True) -> Cell:
        """Run one measurement with a watchdog; errors become the cell's text.  With
        ``reap``, processes the cell started and left behind are killed and counted."""
        c = Cell()
        before = descendants() if reap else {}
        try:
            with watchdog(budget or self.cfg.cell_budget):
                out = fn()
            if isinstance(out, Cell):
                c = out
            else:
                c.value = out
        except (Exception, CellTimeout) as e:
            c.error = error_text(e)
            c.extra["traceback"] = traceback.format_exc()
        if reap:
            c.leaked = reap_new(before, grace=2.0 if c.error is None else 0.3)
        return c

    def timed(self, fn: Callable[[], Any], expect: Any) -> float:
        """Seconds one call of ``fn`` takes: the median of as many calls as fit in
        ``cfg.rep_budget`` seconds (at least one, at most ``cfg.rep_most``), so that a
        call of a few milliseconds is not a single noisy sample."""
        times: list[float] = []
        while True:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            if out != expect:
                raise RuntimeError("wrong results")
            if sum(times) >= self.cfg.rep_budget or len(times) >= self.cfg.rep_most:
                return statistics.median(times)

    # ---- the warm workloads share one pool per library and round
    def warm_session(self, lib: Lib, wls: list[Workload]) -> None:
        before = descendants()
        hung: list[str] = []

        def inner(fn: Callable[[], Any], budget: float | None = None) -> Cell:
            # the pool lives across these cells: no reaping until the session ends,
            # and after a hang the pool is not trusted for the rest of the session
            if hung:
                return Cell(error=f"skipped: {hung[0]}")
            c = self.cell(fn, budget, reap=False)
            if c.error is not None and "hung" in c.error:
                hung.append(f"{c.error} in an earlier workload")
            return c

        started = inner(lambda: lib.start(self.cfg.workers))
        if started.error is not None:
            for wl in wls:
                self.add(wl.key, lib.name, Cell(error=started.error))
            self.cell(lib.abort, budget=15.0, reap=False)
            reap_new(before, grace=0.2)
            return
        try:
            ctx = Ctx(self, inner)
            for wl in wls:
                wl.measure(ctx, lib)
        finally:
            stopped = Cell(error="hung earlier") if hung else self.cell(lib.stop, 30.0, False)
            if stopped.error is not None:
                self.cell(lib.abort, budget=15.0, reap=False)
            leaked = reap_new(before, grace=2.0)
            if stopped.error is not None or leaked:
                for wl in wls:
                    if lib.name in self.results[wl.key]:
                        last = self.results[wl.key][lib.name][-1]
                        last.leaked += leaked
                        if stopped.error:
                            last.extra["close_error"] = stopped.error

    # ---- the other workloads, one library at a time
    def measure(self, wl: Workload, lib: Lib) -> None:
        if wl.kind == "fresh":
            cell = self.cell(lambda: self.fresh(wl, lib), budget=wl.budget or 90.0)
            self.add(wl.key, lib.name, cell, **wl.meta(lib))
        else:
            wl.measure(Ctx(self, lambda fn, budget=None: self.cell(fn, budget)), lib)

    def fresh(self, wl: Workload, lib: Lib) -> Cell:
        """Measure ``wl`` on ``lib`` in a fresh interpreter (see ``fresh_child``)."""
        blob = {"workload": wl.key, "lib": lib.key, "cfg": asdict(self.cfg), "state": self.state}
        env = {k: v for k, v in os.environ.items() if k not in wl.env_unset}
        proc = subprocess.Popen(
            [sys.executable, BENCH_PY, "--_fresh", json.dumps(blob)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        try:
            out, err = proc.communicate(timeout=wl.fresh_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"{wl.key} probe hung") from None
        finally:
            with suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = err.decode().strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"probe exit {proc.returncode}: {tail[0]}")
        d = json.loads(lines[-1])
        return Cell(value=d["value"], extra=d["extra"])

    def run(self) -> None:
        cfg = self.cfg
        for wl in self.selected:
            wl.prepare(self)
        libs = [lib for lib in all_libs() if self.want(lib)]
        warm = [wl for wl in self.selected if wl.kind == "warm"]
        others = [
            (wl, [lib for lib in wl.libs() if self.want(lib) and wl.supports(lib)])
            for wl in self.selected
            if wl.kind != "warm"
        ]
        for r in range(cfg.rounds):
            t_round = time.perf_counter()
            self.loads.append(os.getloadavg()[0])
            log(f"round {r + 1}/{cfg.rounds}: floors")
            for wl in self.selected:
                for label, fn in wl.floors(cfg):
                    self.add(wl.key, label, self.cell(fn), floor=True)
            for lib in _rotate(libs, r):
                wanted = [wl for wl in warm if wl.supports(lib)]
                if wanted:
                    log(f"round {r + 1}/{cfg.rounds}: {lib.name}: warm workloads")
                    self.warm_session(lib, wanted)
            for wl, wl_libs in others:
                if wl.quick_once and cfg.quick and r > 0:
                    continue
                for lib in _rotate(wl_libs, r):
                    log(f"round {r + 1}/{cfg.rounds}: {lib.name}: {wl.log_name or wl.key}")
                    self.measure(wl, lib)
            log(f"round {r + 1} took {time.perf_counter() - t_round:.1f} s")
        self.loads.append(os.getloadavg()[0])
        self.finish()

    def finish(self) -> None:
        """Let the workloads turn what they gathered into rows (also after ^C)."""
        for wl in self.selected:
            wl.finish(self)


def fresh_child(blob_text: str, registry: list[Workload]) -> int:
    """In the fresh interpreter: start the library's warm pool, measure the workload,
    print its cell as one JSON line, close the pool."""
    blob = json.loads(blob_text)
    wl = {w.key: w for w in registry}[blob["workload"]]
    lib = {x.key: x for x in wl.libs()}[blob["lib"]]
    cfg = Config(**blob["cfg"])
    run = Run(cfg, None, [wl], registry)
    run.state = blob["state"]
    lib.start(wl.workers(cfg))
    try:
        out = wl.value(Ctx(run, lambda fn, budget=None: run.cell(fn, budget)), lib)
        cell = out if isinstance(out, Cell) else Cell(value=out)
        print(json.dumps({"value": cell.value, "extra": cell.extra}, default=str), flush=True)
    finally:
        lib.stop()
    return 0
