"""logs and relay: the cost of alloter_mp's log relay (issue 14).

``logs``: one task emitting 10,000 INFO records, handled by a handler of the caller
(a StreamHandler to /dev/null with a formatter, as a program logging to a file
has), against the same logging done in the caller itself (ms).  Interleaved pairs
within one cell, the median of each side.  The notes add the same with a handler
that only counts (the relay's share at its largest) and how far a task runs ahead
of a handler of the caller that is stuck (it may run until the pipe's buffer is
full, then waits).

``relay``: N no-op tasks, one submit each, with the relay on (the default) and off,
in interleaved pairs on the same warm workers (tasks/s).  On a shared machine the
load drifts within a round by more than the 5 % the target allows, so the target is
judged on the median of the pairs' own ratios (each pair seconds apart), kept in
the cell as ``pair_ratio``.

Only alloter_mp relays logs, so no other library has a row.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .. import tasks as T
from ..adapters import Lib
from ..cells import Cell
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Ctx

RECORDS = 10_000  # the target's number, also with --quick
REF = "ref: the same logging in the caller"
QUIET = "alloter_mp (relay_logs=False)"


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


class _Stuck(logging.Handler):
    """Blocks on the first record until released."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()  # (Handler.release is the handler's lock's)

    def emit(self, record: logging.LogRecord) -> None:
        self.gate.wait(30)


@contextmanager
def _handler(handler: logging.Handler) -> Iterator[logging.Handler]:
    """``handler`` alone on the "bench" logger at INFO (propagation off), then undone."""
    log = logging.getLogger("bench")
    saved = (log.level, log.propagate, log.handlers[:])
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield handler
    finally:
        log.handlers[:] = saved[2]
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _pairs(lib: Lib, handler: logging.Handler, k: int) -> tuple[float, float]:
    """Medians of ``k`` interleaved (in the caller, relayed) timings of RECORDS records."""
    here: list[float] = []
    there: list[float] = []
    with _handler(handler):
        lib.one(T.log_records, 10)  # the workers have the caller's levels
        for _ in range(k):
            t0 = time.perf_counter()
            T.log_records(RECORDS)
            here.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            if lib.one(T.log_records, RECORDS) != RECORDS:
                raise RuntimeError("wrong result")
            there.append(time.perf_counter() - t0)
    return statistics.median(here), statistics.median(there)


def _ahead_of_a_stuck_handler(lib: Lib, tmp: str) -> int:
    """How many records a task emits while the caller's handler is stuck (then waits)."""
    path = os.path.join(tmp, f"ahead-{time.monotonic_ns()}")
    stuck = _Stuck()
    with _handler(stuck):
        task = functools.partial(T.log_marking, 20_000)
        thread = threading.Thread(target=lib.one, args=(task, path))
        thread.start()
        try:
            time.sleep(1.0)  # long enough to fill any buffer many times over
            with open(path) as f:
                ahead = int(f.read().strip() or 0)
        finally:
            stuck.gate.set()
            thread.join(60)
    return ahead


class Logs(Workload):
    key = "logs"
    title = f"a task's {RECORDS:,} INFO records to a handler of the caller"
    unit = "ms"
    higher_better = False
    fmt = "ms"
    peers = frozenset({"ours"})
    needs = ("one",)

    def measure(self, ctx: Ctx, lib: Lib) -> None:
        k = 3 if ctx.cfg.quick else 5
        extra: dict[str, Any] = {}

        def relayed() -> Cell:
            with open(os.devnull, "w") as sink:
                handler = logging.StreamHandler(sink)
                handler.setFormatter(
                    logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
                )
                here, there = _pairs(lib, handler, k)
            count_here, count_there = _pairs(lib, _Count(), k)
            extra.update(
                here_ms=here * 1e3,
                counting_here_ms=count_here * 1e3,
                counting_ms=count_there * 1e3,
                ahead_records=_ahead_of_a_stuck_handler(lib, ctx.run.tmp),
            )
            return Cell(value=there * 1e3, extra=dict(extra))

        cell = ctx.cell(relayed, self.budget)
        ctx.add(self.key, lib.name, cell)
        if "here_ms" in extra:
            ctx.add(self.key, REF, Cell(value=extra["here_ms"]), floor=True)

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        if label != "alloter_mp":
            return ["same handler, same logger, run by the caller itself"] if label == REF else []
        ok = [c.extra for c in cells if c.value is not None and "counting_ms" in c.extra]
        if not ok:
            return []
        counting = statistics.median(e["counting_ms"] for e in ok)
        counting_here = statistics.median(e["counting_here_ms"] for e in ok)
        ahead = statistics.median(e["ahead_records"] for e in ok)
        return [
            "StreamHandler to /dev/null with a formatter",
            f"a handler that only counts: {counting:.1f} ms vs {counting_here:.1f} ms in the "
            f"caller ({counting / counting_here:.2f}x)",
            f"a stuck handler of the caller: the task ran {ahead:,.0f} records ahead, then "
            "waited (the pipe's buffer)",
        ]


class Relay(Workload):
    key = "relay"
    title = "{n} no-op tasks, one submit each: log relay on (default) vs off"
    unit = "tasks/s"
    higher_better = True
    fmt = "rate"
    peers = frozenset({"ours"})
    needs = ("submit_each_quiet",)

    def measure(self, ctx: Ctx, lib: Lib) -> None:
        n = ctx.cfg.n_tasks
        items = list(range(n))
        k = 11 if ctx.cfg.quick else 21
        times: dict[str, list[float]] = {"on": [], "off": []}

        def pairs() -> Cell:
            calls: dict[str, Callable[[], list[Any]]] = {
                "on": lambda: lib.submit_each(T.noop, items),
                "off": lambda: lib.submit_each_quiet(T.noop, items),
            }
            for call in calls.values():
                call()  # a first call of this size (memory grows) is no sample
            for i in range(k):
                # Alternating which goes first, so neither always follows the other.
                for side in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    t0 = time.perf_counter()
                    if calls[side]() != items:
                        raise RuntimeError("wrong results")
                    times[side].append(time.perf_counter() - t0)
            ratios = [off / on for on, off in zip(times["on"], times["off"], strict=True)]
            return Cell(
                value=n / statistics.median(times["on"]),
                extra={"pair_ratio": statistics.median(ratios)},
            )

        cell = ctx.cell(pairs, self.budget)
        ctx.add(self.key, lib.name, cell)
        if times["off"] and cell.value is not None:
            ctx.add(self.key, QUIET, Cell(value=n / statistics.median(times["off"])))

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        if label == "alloter_mp":
            ratios = [c.extra["pair_ratio"] for c in cells if "pair_ratio" in c.extra]
            note = "ProcessAlloter on its warm workers, nothing logged"
            if ratios:
                note += f"; on/off within each pair: {statistics.median(ratios):.3f}x (median)"
            return [note]
        return ["the same workers, with_options(relay_logs=False)"] if label == QUIET else []


WORKLOAD = Logs()
RELAY = Relay()
