"""The chart of a run: alloter_mp's ratio against each peer, per workload.

Drawn from the JSON dump (``render.to_json``), so that a saved run can be drawn
again without running it: ``bench.py --from-json FILE --chart OUT``. One row per
workload that has peers, one marker per peer, on a log scale where right of 1 means
alloter_mp did better (whatever the unit's direction); floors, references and our own
variants are left out. Needs matplotlib (the ``plot`` or ``test`` extra).
"""

from __future__ import annotations

import textwrap
from typing import Any

from .config import Config
from .workloads.base import fields

# A peer's colour and marker by its label's start (the first that matches).
STYLES = {
    "ProcessPoolExecutor (fork)": ("#9ecae1", "o"),
    "ProcessPoolExecutor (forkserver)": ("#08306b", "h"),
    "ProcessPoolExecutor": ("#1f77b4", "o"),
    "multiprocessing.Pool": ("#ff7f0e", "s"),
    "loky": ("#2ca02c", "^"),
    "pebble": ("#d62728", "v"),
    "mpire": ("#9467bd", "D"),
    "joblib": ("#8c564b", "P"),
}
OTHER = ("#7f7f7f", "X")


def advantages(data: dict[str, Any]) -> list[tuple[str, list[tuple[str, float, bool]]]]:
    """Per workload with peers: its title and (peer, alloter_mp's advantage, kept
    running) for each peer.

    The advantage is ours/peer for a higher-is-better unit and peer/ours for a
    lower-is-better one: above 1, alloter_mp did better. "Kept running" says the
    peer's task still spun after its timeout (the timeout row) in some round.
    """
    try:
        titles = fields(Config(**data.get("config", {})))
    except TypeError:  # a dump from another version of Config: titles as stored
        titles = {}
    out = []
    for workload in data["workloads"].values():
        found = peers_of(workload)
        if found is None:
            continue
        pairs = [(label, ratio, spun) for label, _, ratio, spun in found[1]]
        title = workload.get("title_for") or _format(workload["title"], titles)
        direction = "higher" if workload["higher_is_better"] else "lower"
        title = "\n".join(textwrap.wrap(title, 40))
        out.append((f"{title}\n[{workload['unit']}, {direction} is better]", pairs))
    return out


def peers_of(workload: dict[str, Any]) -> tuple[float, list[tuple[str, float, float, bool]]] | None:
    """alloter_mp's median in one workload of a dump and, for each peer: its median,
    alloter_mp's advantage over it (above 1: ours better, whatever the unit's
    direction) and whether its task kept running past a timeout. ``None`` when
    either side is missing; floors, references and our own variants are no peers."""
    rows = workload["rows"]
    ours = rows.get(workload.get("ours_row", "alloter_mp"), {}).get("median")
    if not ours:
        return None
    found = []
    for label, row in rows.items():
        peer = row.get("median")
        if (
            label.startswith("alloter_mp")
            or row.get("meta", {}).get("floor")
            or not peer
            or peer <= 0
        ):
            continue
        ratio = ours / peer if workload["higher_is_better"] else peer / ours
        spun = any(e.get("spinning") for e in row.get("extra", []) if isinstance(e, dict))
        found.append((label, peer, ratio, spun))
    return (ours, found) if found else None


def _format(title: str, values: dict[str, Any]) -> str:
    try:
        return title.format(**values)
    except (KeyError, IndexError, ValueError):
        return title


def style_of(label: str) -> tuple[str, str]:
    for name, style in STYLES.items():
        if label.startswith(name):
            return style
    return OTHER


def draw_chart(data: dict[str, Any], path: str) -> None:
    """Draw the ratios of the run ``data`` (its JSON dump) to ``path`` (PNG, SVG...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = advantages(data)
    if not rows:
        raise ValueError("no workload has both an alloter_mp row and a peer's row")
    values = [r for _, pairs in rows for _, r, _ in pairs]
    low = min(0.5, min(values) / 1.5)
    high = max(2.0, max(values) * 1.5)
    fig, ax = plt.subplots(figsize=(9, 0.62 * len(rows) + 2.8))
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.axvspan(low, 1, color="#f4e4e4", zorder=0)
    ax.axvspan(1, high, color="#e4f1e4", zorder=0)
    ax.axvline(1, color="#444444", linewidth=1, zorder=1)
    seen: dict[str, Any] = {}
    spun_any = False
    for y, (_, pairs) in enumerate(rows):
        ax.axhline(y, color="#dddddd", linewidth=0.6, zorder=1)
        for label, ratio, spun in pairs:
            colour, marker = style_of(label)
            spun_any = spun_any or spun
            point = ax.scatter(
                ratio,
                y,
                s=64,
                facecolor="none" if spun else colour,
                marker=marker,
                edgecolor=colour if spun else "black",
                linewidth=1.6 if spun else 0.5,
                zorder=3,
            )
            if not spun:
                seen.setdefault(label, point)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([title for title, _ in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("alloter_mp's advantage over the peer (x, log scale)", fontsize=9.5)
    for x, align, text in (
        (0.01, "left", "<- peer better"),
        (0.99, "right", "alloter_mp better ->"),
    ):
        ax.text(
            x,
            0.005,
            text,
            transform=ax.transAxes,
            ha=align,
            va="bottom",
            fontsize=8.5,
            color="#555555",
        )
    ticks = [t for t in (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300) if low <= t <= high]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    handles, labels = list(seen.values()), list(seen)
    if spun_any:
        hollow = ax.scatter([], [], s=64, facecolor="none", edgecolor="#555555", linewidth=1.6)
        handles.append(hollow)
        labels.append(
            "hollow: returned sooner, but its task\nwas still running 1 s after the timeout"
        )
    ax.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.02),
        ncol=2,
        fontsize=8.5,
        frameon=False,
    )
    cfg = data.get("config", {})
    rounds = cfg.get("rounds", "?")
    quick = " (--quick: small sizes, 1 round)" if cfg.get("quick") else ""
    fig.suptitle(
        f"alloter_mp against its peers: median of {rounds} round(s), "
        f"{cfg.get('workers', '?')} workers, {data.get('cpu_count', '?')} CPUs{quick}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
