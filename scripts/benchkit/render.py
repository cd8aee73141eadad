"""The report: a markdown table (median over rounds, ratio against alloter_mp, notes),
the targets, and the JSON dump of the raw numbers."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import sys
from dataclasses import asdict
from typing import Any

from .cells import Cell, summarize
from .engine import Run
from .targets import render_targets
from .workloads import Workload


def fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return f"{v:,.0f}"
    if kind == "us":
        return f"{v:,.0f}"
    if kind == "ms":
        return f"{v:,.1f}"
    if kind == "s":
        return f"{v:.3f}"
    if kind == "pct":
        return f"{v:.1f}"
    if kind == "mb":
        return f"{v:.1f}"
    return f"{v:g}"


def verdict(ratio: float | None, higher_better: bool) -> str:
    if ratio is None:
        return ""
    if 0.95 <= ratio <= 1.05:
        return "~ same"
    better = ratio > 1 if higher_better else ratio < 1
    return "ours better" if better else "ours worse"


def _ordered_rows(wl: Workload, rows: dict[str, list[Cell]]) -> list[tuple[str, list[Cell]]]:
    def rank(label: str) -> tuple[int, str]:
        if label == wl.ours_row:
            return (0, "")
        if label.startswith("alloter_mp"):
            return (1, label)
        if label.startswith(("floor", "ref")):
            return (3, label)
        return (2, "")

    return sorted(rows.items(), key=lambda kv: rank(kv[0]))


def _note(wl: Workload, label: str, cells: list[Cell], run: Run) -> str:
    rows = run.results[wl.key]
    parts = wl.note(label, cells, run.meta[wl.key].get(label, {}), rows)
    ok = [c for c in cells if c.value is not None]
    errs = [c.error for c in cells if c.error]
    if errs and ok:
        parts.append(f"{len(errs)}/{len(cells)} rounds failed: {errs[0]}")
    leaked = sum(c.leaked for c in cells)
    if leaked:
        parts.append(f"LEAKED {leaked} process(es), killed by the bench")
    note = "; ".join(parts)
    for after in wl.note_after(label, cells, rows):
        note = f"{note}; {after}"
    return note


def _table(run: Run, *, for_page: bool = False) -> list[str]:
    """The markdown table; ``for_page``: narrower, for the documentation's page (the
    direction goes into the workload's cell, the min-max column is left out)."""
    if for_page:
        out = ["| workload | library | median | ours/row | verdict | notes |"]
        out.append("|---|---|---:|---:|---|---|")
    else:
        out = ["| workload | library | median | min-max | better | ours/row | verdict | notes |"]
        out.append("|---|---|---:|---:|---|---:|---|---|")
    for w in run.registry:
        rows = run.results[w.key]
        if not rows:
            continue
        title = w.title_for(run.cfg)
        ours = summarize(rows[w.ours_row])["median"] if w.ours_row in rows else None
        first = True
        for label, cells in _ordered_rows(w, rows):
            s = summarize(cells)
            if s["median"] is None:
                med = (s["errors"] or ["error: no result"])[0]
                rng = ""
            else:
                med = fmt(s["median"], w.fmt)
                rng = f"{fmt(s['min'], w.fmt)}-{fmt(s['max'], w.fmt)}" if s["n"] > 1 else ""
            ratio = None
            if label != w.ours_row and ours is not None and s["median"]:
                ratio = ours / s["median"]
            if run.meta[w.key].get(label, {}).get("floor"):
                kind = "(reference)" if label.startswith("ref") else "(floor)"
            elif label.startswith("alloter_mp") and label != w.ours_row:
                kind = "(our variant)"
            else:
                kind = verdict(ratio, w.higher_better)
            direction = "higher" if w.higher_better else "lower"
            if for_page:
                head = f"{title} ({w.unit}, {direction} is better)" if first else ""
            else:
                head = f"{title} [{w.unit}]" if first else ""
            first = False
            ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
            note = _note(w, label, cells, run)
            if for_page:
                cols = [head, label, med, ratio_text, kind, note]
            else:
                cols = [head, label, med, rng, direction if head else "", ratio_text, kind, note]
            out.append("| " + " | ".join(cols) + " |")
    return out


def render(run: Run) -> str:
    return "\n".join([*_heading(run), "", *_table(run), "", *render_targets(run)])


def _heading(run: Run) -> list[str]:
    cfg = run.cfg
    out: list[str] = []
    out.append(
        f"alloter_mp bench: {cfg.workers} workers, {cfg.rounds} round(s), "
        f"N={cfg.n_tasks}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    )
    if run.loads:
        out.append(
            "1-min load average at each round's start and at the end: "
            + ", ".join(f"{x:.2f}" for x in run.loads)
            + f" (other processes compete for the {os.cpu_count()} CPUs above ~0)"
        )
    for w in run.selected:
        if run.results[w.key]:
            out += [line for line in w.header(run) if line not in out]
    out.append(
        "median over rounds [min-max]; ratio = alloter_mp / row "
        "(in the row's unit; see 'better' for the direction)"
    )
    return out


# The part of the documentation's performance page that a run writes (--page).
PAGE_START = "<!-- bench table: start -->"
PAGE_END = "<!-- bench table: end -->"


def write_page(run: Run, path: str) -> None:
    """Put this run's heading and table between the markers of the page at ``path``."""
    with open(path) as f:
        text = f.read()
    start, end = text.find(PAGE_START), text.find(PAGE_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {PAGE_START} ... {PAGE_END} part to fill")
    heading = [f"* {line}" for line in _heading(run) if not line.startswith("median over")]
    table = ['<div class="bench-table" markdown>', "", *_table(run, for_page=True), "", "</div>"]
    part = [PAGE_START, "", *heading, "", *table, ""]
    with open(path, "w") as f:
        f.write(text[:start] + "\n".join(part) + "\n" + text[end:])


def to_json(run: Run) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    vers: dict[str, str | None] = {}
    for pkg in (
        "alloter-mp",
        "loky",
        "pebble",
        "mpire",
        "joblib",
        "psutil",
        "cloudpickle",
        "numpy",
        "threadpoolctl",
    ):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = None
    wls = {}
    extra: dict[str, Any] = {}
    for w in run.registry:
        rows = {}
        for label, cells in run.results[w.key].items():
            s = summarize(cells)
            rows[label] = {
                **s,
                "values": [c.value for c in cells],
                "extra": [{k: v for k, v in c.extra.items() if k != "traceback"} for c in cells],
                "meta": run.meta[w.key].get(label, {}),
            }
        wls[w.key] = {
            "title": w.title,
            "title_for": w.title_for(run.cfg),
            "unit": w.unit,
            "fmt": w.fmt,
            "higher_is_better": w.higher_better,
            "ours_row": w.ours_row,
            "rows": rows,
        }
        extra.update(w.json_extra(run))
    return {
        "config": asdict(run.cfg),
        "spin_iterations": run.state.get("spin_n", 0),
        "spin_in_process_s": run.state.get("spin_cal", 0.0),
        "state": run.state,
        "load_average_1min": run.loads,
        "python": sys.version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "start_method_default": mp.get_start_method(allow_none=False),
        "versions": vers,
        "workloads": wls,
        **extra,
    }
