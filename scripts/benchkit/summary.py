"""The README's short performance table, from a run's JSON dump.

One line per workload that has peers: alloter_mp's median, the standard library's
``ProcessPoolExecutor`` and the best peer of the row, and alloter_mp's advantage over
each (above 1x, alloter_mp did better, whatever the unit's direction). Written between
the markers of a page (``bench.py --summary README.md``), from a run or from a saved
dump (``--from-json``); the full table is the performance page's (``--page``).
"""

from __future__ import annotations

from typing import Any

from .chart import peers_of
from .render import fmt

SUMMARY_START = "<!-- bench summary: start -->"
SUMMARY_END = "<!-- bench summary: end -->"


def _value(v: float, kind: str | None) -> str:
    if kind:
        return fmt(v, kind)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"  # a dump from before "fmt" was kept


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The summary table of the run ``data`` (its JSON dump), as markdown lines."""
    out = [
        "| workload | alloter_mp | ProcessPoolExecutor | best peer | vs PPE | vs best |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for workload in data["workloads"].values():
        found = peers_of(workload)
        if found is None:
            continue
        ours, peers = found
        higher = workload["higher_is_better"]
        kind = workload.get("fmt")
        adv = {label: ratio for label, _, ratio, _ in peers}
        # a peer whose call returned while its task still ran (the timeout row)
        shown = {
            label: _value(v, kind) + (" (its task ran on)" if spun else "")
            for label, v, _, spun in peers
        }
        best = min(adv, key=adv.__getitem__)
        ppe = next((label for label in adv if label.startswith("ProcessPoolExecutor")), None)
        title = workload.get("title_for") or workload["title"]
        unit = f"{workload['unit']}, {'higher' if higher else 'lower'} is better"
        cells = [
            f"{title} ({unit})",
            _value(ours, kind),
            shown[ppe] if ppe else "-",
            f"{best}: {shown[best]}",
            f"{adv[ppe]:.2f}x" if ppe else "-",
            f"{adv[best]:.2f}x",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_summary(data: dict[str, Any], path: str) -> None:
    """Put the summary of ``data`` between the summary markers of the page at ``path``."""
    with open(path) as f:
        text = f.read()
    start, end = text.find(SUMMARY_START), text.find(SUMMARY_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {SUMMARY_START} ... {SUMMARY_END} part to fill")
    cfg = data.get("config", {})
    loads = data.get("load_average_1min") or []
    head = (
        f"{cfg.get('workers', '?')} workers, median of {cfg.get('rounds', '?')} round(s), "
        f"{data.get('cpu_count', '?')} CPUs, Python {data.get('python', '?').split()[0]}"
    )
    if loads:
        head += f", 1-min load average {min(loads):.2f}-{max(loads):.2f} during the run"
    part = [SUMMARY_START, "", head + ":", "", *summary_lines(data), ""]
    with open(path, "w") as f:
        f.write(text[:start] + "\n".join(part) + "\n" + text[end:])
