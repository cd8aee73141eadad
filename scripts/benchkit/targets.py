"""The issues' speed targets, each checked against this run: PASS, MISS, or n/a when
the run has no data for it (a workload or library left out, or failed)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from .adapters import PPE
from .adapters.ours import default_start_method
from .cells import summarize

if TYPE_CHECKING:
    from .engine import Run

Line = Callable[[bool | None, str], None]


def _med(run: Run, wl: str, label: str) -> float | None:
    cells = run.results.get(wl, {}).get(label)
    return summarize(cells)["median"] if cells else None


def _peers(run: Run, wl: str) -> dict[str, float]:
    d = {}
    for label in run.results.get(wl, {}):
        if label.startswith(("alloter_mp", "floor", "ref")):
            continue
        v = _med(run, wl, label)
        if v is not None:
            d[label] = v
    return d


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _section(title: str) -> tuple[list[str], Line]:
    out = [title]

    def line(ok: bool | None, text: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "MISS")
        out.append(f"  [{mark}] {text}")

    return out, line


# ---- targets that several issues state


def _exec_vs_pool(run: Run, line: Line, times: float) -> None:
    n = f"{run.cfg.n_tasks:,}"
    ours = _med(run, "submit", "alloter_mp")
    ref = _med(run, "submit", "multiprocessing.Pool")
    r = ours / ref if ours and ref else None
    line(
        r >= times if r else None,
        f"exec {n} tiny tasks >= {times:.1f}x multiprocessing.Pool.apply_async: "
        + (f"{r:.2f}x ({_rate(ours)} vs {_rate(ref)} tasks/s)" if r else "no data"),
    )


def _map_vs_pool(run: Run, line: Line) -> None:
    n = f"{run.cfg.n_tasks:,}"
    auto = _med(run, "map", "alloter_mp (chunksize=None)")
    best = _med(run, "map", "alloter_mp")
    ref = _med(run, "map", "multiprocessing.Pool")
    r = auto / ref if auto and ref else None
    r2 = best / ref if best and ref else None
    line(
        r >= 1.0 if r else None,
        f"map {n} tiny items >= 1.0x multiprocessing.Pool.map at its best chunk: "
        + (f"{r:.2f}x with chunksize=None" if r else "no data")
        + (f", {r2:.2f}x at ours' best chunk" if r2 else ""),
    )


def _round_trip(run: Run, line: Line) -> None:
    ours = _med(run, "rt", "alloter_mp")
    p = _peers(run, "rt")
    if ours and p:
        name, v = min(p.items(), key=lambda kv: kv[1])
        line(
            ours / v <= 0.6,
            f"warm round trip <= 0.6x the fastest peer's ({name}, {v:.0f} us): "
            f"{ours / v:.2f}x ({ours:.0f} us)",
        )
    else:
        line(None, "warm round trip <= 0.6x the fastest peer's: no data")


def _same_method(
    run: Run, line: Line, wl: str, most: float, what: str, show: Callable[[float], str]
) -> None:
    """alloter_mp against ProcessPoolExecutor under each start method both rows have."""
    default = default_start_method()
    pairs = [("alloter_mp", default), ("alloter_mp (fork)", "fork")]
    seen: list[tuple[str, float, float, float]] = []
    for ours_label, method in pairs:
        if method is None:
            continue
        ours = _med(run, wl, ours_label)
        ref = _med(run, wl, f"ProcessPoolExecutor ({method})")
        if ours and ref and method not in (m for m, _, _, _ in seen):
            seen.append((method, ours / ref, ours, ref))
    text = f"{what} <= {most:.1f}x ProcessPoolExecutor's with the same start method: "
    if not seen:
        line(None, text + "no data")
        return
    line(
        all(r <= most for _, r, _, _ in seen),
        text + ", ".join(f"{m} {r:.2f}x ({show(o)} vs {show(p)})" for m, r, o, p in seen),
    )


# ---- issue 4


def issue4(run: Run) -> list[str]:
    out, line = _section("Targets (issue 4):")
    n = f"{run.cfg.n_tasks:,}"
    _exec_vs_pool(run, line, 2.0)
    _map_vs_pool(run, line)
    auto = _med(run, "map", "alloter_mp (chunksize=None)")
    best = _med(run, "map", "alloter_mp")
    r = auto / best if auto and best else None
    line(
        r >= 0.8 if r else None,
        f"map chunksize=None within 20% of ours' best hand-picked chunk ({n} tiny items): "
        + (f"{r:.2f}x" if r else "no data"),
    )
    _round_trip(run, line)
    ours = _med(run, "cold", "alloter_mp")
    ref = _med(run, "cold", "ProcessPoolExecutor (fork)")
    r = ours / ref if ours and ref else None
    line(
        r <= 1.0 if r else None,
        "cold start <= 1.0x ProcessPoolExecutor with fork: "
        + (f"{r:.2f}x ({ours * 1e3:.1f} ms vs {ref * 1e3:.1f} ms)" if ours and ref else "no data"),
    )
    ours = _med(run, "failfast", "alloter_mp")
    line(
        ours <= 10.0 if ours is not None else None,
        "fail-fast: caller sees the error within 10 ms of the failing task's end: "
        + (f"{ours:.1f} ms" if ours is not None else "no data"),
    )
    cells = run.results.get("timeout", {}).get("alloter_mp", [])
    ours = _med(run, "timeout", "alloter_mp")
    gone = all(not c.extra.get("alive") for c in cells if c.value is not None)
    line(
        (ours <= 50.0 and gone) if ours is not None else None,
        "timeout: control back within 50 ms of the deadline, looping process gone: "
        + (
            f"{ours:.1f} ms past the deadline, process {'gone' if gone else 'STILL ALIVE'}"
            if ours is not None
            else "no data"
        ),
    )
    ours = _med(run, "cpu", "alloter_mp")
    p = _peers(run, "cpu")
    if ours is not None and p:
        name, v = max(p.items(), key=lambda kv: kv[1])
        line(
            ours >= v - 1e-9,
            f"CPU batch efficiency >= the best peer's ({name}, {v:.1f} %): {ours:.1f} %",
        )
    else:
        line(None, "CPU batch efficiency >= the best peer's: no data")
    return out


# ---- issue 15


def _faster(run: Run, line: Line, wl: str, peer: str, times: float, what: str) -> None:
    """alloter_mp at least ``times`` x faster than ``peer`` (rows in seconds)."""
    ours = _med(run, wl, "alloter_mp")
    ref = _med(run, wl, peer)
    r = ref / ours if ours and ref else None
    goal = "no slower than" if times == 1.0 else f">= {times:g}x faster than"
    line(
        r >= times if r else None,
        f"{what} {goal} {peer}: "
        + (f"{r:.2f}x faster ({ours:.3f} s vs {ref:.3f} s)" if r else "no data"),
    )


def issue15(run: Run) -> list[str]:
    out, line = _section("Targets (issue 15):")
    cfg = run.cfg
    ppe = PPE().name
    _map_vs_pool(run, line)
    _round_trip(run, line)
    _same_method(run, line, "cold", 1.0, "cold start", lambda s: f"{s * 1e3:.1f} ms")
    _same_method(
        run,
        line,
        "mem8",
        1.5,
        f"idle memory of a warm pool of {cfg.mem_pool} workers",
        lambda mb: f"{mb:.1f} MB",
    )
    big = f"one {cfg.np_in_mib} MiB array to {cfg.np_tasks} tasks"
    _faster(run, line, "np_in", ppe, 5.0, big)
    _faster(run, line, "np_in", "joblib", 1.0, big)
    _faster(run, line, "np_out", ppe, 2.0, f"{cfg.np_tasks} results of {cfg.np_out_mib} MiB back")
    ours = _med(run, "blas", "alloter_mp")
    ref = _med(run, "blas", "joblib")
    text = (
        f"{cfg.np_tasks} matrix products {cfg.blas_n}x{cfg.blas_n}, limit {cfg.workers}: "
        "CPU efficiency >= joblib's: "
    )
    line(
        ours >= ref if ours is not None and ref is not None else None,
        text
        + (f"{ours:.1f} % vs {ref:.1f} %" if ours is not None and ref is not None else "no data"),
    )
    _exec_vs_pool(run, line, 3.0)
    return out


# ---- issue 14


def issue14(run: Run) -> list[str]:
    out, line = _section("Targets (issue 14):")
    ours = _med(run, "logs", "alloter_mp")
    ref = _med(run, "logs", "ref: the same logging in the caller")
    r = ours / ref if ours and ref else None
    line(
        r <= 3.0 if r else None,
        "a task's 10,000 INFO records to a handler of the caller <= 3x the same logging "
        "in one process: "
        + (f"{r:.2f}x ({ours:.1f} ms vs {ref:.1f} ms)" if r and ours and ref else "no data"),
    )
    cells = run.results.get("logs", {}).get("alloter_mp", [])
    ahead = [c.extra["ahead_records"] for c in cells if "ahead_records" in c.extra]
    line(
        min(ahead) > 0 if ahead else None,
        "a stuck handler of the caller does not stop a task before the pipe's buffer is "
        "full: "
        + (f"the task ran {min(ahead):,} records ahead, then waited" if ahead else "no data"),
    )
    n = f"{run.cfg.n_tasks:,}"
    on = _med(run, "relay", "alloter_mp")
    off = _med(run, "relay", "alloter_mp (relay_logs=False)")
    cells = run.results.get("relay", {}).get("alloter_mp", [])
    ratios = [c.extra["pair_ratio"] for c in cells if "pair_ratio" in c.extra]
    r = statistics.median(ratios) if ratios else None
    line(
        r >= 0.95 if r else None,
        f"exec of {n} tiny tasks with the log relay on (nothing logged) within 5 % of it "
        "off: "
        + (
            f"{r:.3f}x within interleaved pairs (medians {_rate(on)} vs {_rate(off)} tasks/s)"
            if r
            else "no data"
        ),
    )
    return out


# ---- issue 12


def issue12(run: Run) -> list[str]:
    out, line = _section("Targets (issue 12):")
    n = f"{run.cfg.n_tasks:,}"
    ppe = PPE().name
    ours = _med(run, "xsubmit", "alloter_mp")
    ref = _med(run, "xsubmit", ppe)
    r = ours / ref if ours and ref else None
    line(
        r >= 2.0 if r else None,
        f"executor: {n} no-op submits then wait >= 2.0x {ppe}: "
        + (f"{r:.2f}x ({_rate(ours)} vs {_rate(ref)} calls/s)" if r else "no data"),
    )
    ours = _med(run, "xrt", "alloter_mp")
    ref = _med(run, "xrt", ppe)
    r = ours / ref if ours and ref else None
    line(
        r <= 1.0 if r else None,
        f"executor: warm round trip <= 1.0x {ppe}'s: "
        + (f"{r:.2f}x ({ours:.0f} us vs {ref:.0f} us)" if ours and ref else "no data"),
    )
    ours = _med(run, "art", "alloter_mp")
    ref = _med(run, "art", "alloter_mp (plain exec)")
    r = ours / ref if ours and ref else None
    line(
        r <= 1.2 if r else None,
        "await exec_async(one task) <= 1.2x the plain exec round trip: "
        + (f"{r:.2f}x ({ours:.0f} us vs {ref:.0f} us)" if ours and ref else "no data"),
    )
    cells = run.results.get("acancel", {}).get("alloter_mp", [])
    ours = _med(run, "acancel", "alloter_mp")
    gone = all(c.extra.get("gone") for c in cells if c.value is not None)
    line(
        (ours <= 100.0 and gone) if ours is not None else None,
        "cancelling an awaiting task (spinning task, cancel_grace=0): await back and "
        "process gone within 100 ms: "
        + (
            f"{ours:.1f} ms, process {'gone' if gone else 'STILL ALIVE'}"
            if ours is not None
            else "no data"
        ),
    )
    return out


def render_targets(run: Run) -> list[str]:
    return [*issue4(run), "", *issue15(run), "", *issue14(run), "", *issue12(run)]
