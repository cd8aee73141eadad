"""Timelines of what ran: a Chrome trace (Perfetto, ``chrome://tracing``) and a plot.

A timeline is a list of :class:`Span`: one bar per task (or per attempt of a shell
job) on a track (a worker process; a job slot of ``alloter-mp run``), named by the
task's index and status and coloured by status. :class:`TraceWriter` writes spans in
Chrome's JSON array trace format as they come, so an endless ``alloter-mp run``
writes its trace with flat memory; :func:`plot` draws spans with matplotlib (the
optional ``plot`` extra). ``Report.to_chrome_trace`` and ``Report.plot`` and the
command line's ``--trace`` all go through here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["COLOURS", "Span", "TraceWriter", "plot", "write_trace"]

# One colour per status (the library's words and the command line's), for the plot;
# the trace carries the nearest of chrome://tracing's named colours ("cname").
COLOURS = {
    "ok": "#43a047",
    "error": "#e53935",
    "failed": "#e53935",
    "crashed": "#8e24aa",
    "timeout": "#fb8c00",
    "cancelled": "#9e9e9e",
    "killed": "#9e9e9e",
}
_CNAMES = {
    "ok": "good",
    "error": "terrible",
    "failed": "terrible",
    "crashed": "bad",
    "timeout": "yellow",
    "cancelled": "grey",
    "killed": "grey",
}
_MEANING = {
    "ok": "ok",
    "error": "error (raised)",
    "failed": "failed",
    "crashed": "crashed (worker died)",
    "timeout": "timeout",
    "cancelled": "cancelled (ended early)",
    "killed": "killed (ended early)",
}


@dataclass(frozen=True)
class Span:
    """One bar of a timeline: ``start_s`` seconds after the start, ``wall_s`` long."""

    name: str
    status: str
    track: str
    start_s: float
    wall_s: float
    label: str = ""  # what the plot writes on the bar (short)
    args: dict[str, Any] = field(default_factory=dict)


class TraceWriter:
    """Writes spans to ``stream`` as a Chrome trace, one event per span as it comes.

    Each track is a thread of one process (named ``process``), named after the track
    and sorted in the order the tracks first appear. :meth:`close` ends the JSON
    array; a trace cut short before that still loads (the format allows it).
    """

    def __init__(self, stream: IO[str], process: str = "alloter_mp") -> None:
        self._stream = stream
        self._pid = os.getpid()
        self._tracks: dict[str, int] = {}
        self._first = True
        stream.write("[")
        self._event(
            {"name": "process_name", "ph": "M", "pid": self._pid, "args": {"name": process}}
        )

    def add(self, span: Span) -> None:
        """Write one span (and its track's names, the first time the track is seen)."""
        tid = self._tracks.get(span.track)
        if tid is None:
            tid = self._tracks[span.track] = len(self._tracks) + 1
            for name, value in (("thread_name", span.track), ("thread_sort_index", tid)):
                key = "name" if name == "thread_name" else "sort_index"
                self._event(
                    {"name": name, "ph": "M", "pid": self._pid, "tid": tid, "args": {key: value}}
                )
        event: dict[str, Any] = {
            "name": span.name,
            "cat": span.status,
            "ph": "X",
            "ts": round(span.start_s * 1e6, 1),
            "dur": round(max(span.wall_s, 0.0) * 1e6, 1),
            "pid": self._pid,
            "tid": tid,
            "args": {"status": span.status, **span.args},
        }
        cname = _CNAMES.get(span.status)
        if cname is not None:
            event["cname"] = cname
        self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        self._stream.write(("\n" if self._first else ",\n") + json.dumps(event))
        self._first = False
        self._stream.flush()

    def close(self) -> None:
        """End the trace (the stream itself is the caller's)."""
        self._stream.write("\n]\n")
        self._stream.flush()


@contextlib.contextmanager
def _opened(file: str | os.PathLike[str] | IO[Any], mode: str) -> Iterator[IO[Any]]:
    """``file`` itself if it is a stream (left open), else the file at that path."""
    if not isinstance(file, (str, os.PathLike)):
        yield file
        return
    encoding = None if "b" in mode else "utf-8"
    with open(os.fspath(file), mode, encoding=encoding) as stream:
        yield stream


def write_trace(
    spans: Iterable[Span], file: str | os.PathLike[str] | IO[str], process: str = "alloter_mp"
) -> None:
    """Write ``spans`` to ``file`` (a path or a text stream) as a Chrome trace."""
    with _opened(file, "w") as stream:
        writer = TraceWriter(stream, process)
        for span in spans:
            writer.add(span)
        writer.close()


def plot(
    spans: Sequence[Span],
    file: str | os.PathLike[str] | IO[bytes],
    *,
    title: str,
    xlabel: str = "seconds since the call started",
    marks: Sequence[tuple[float, str]] = (),
    note: str = "",
) -> None:
    """Draw ``spans`` as a timeline image: a row per track, a bar per span.

    The format follows the file name (``.png``, ``.svg``, ``.pdf``...). ``marks`` are
    ``(seconds, text)`` drawn as labelled vertical lines; ``note`` is a line of text
    under the axes (e.g. which tasks never started).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError(
            "plotting a report needs matplotlib, which is not installed: "
            "pip install 'alloter-mp[plot]'"
        ) from exc

    # Tracks from the top in the order the spans name them (a report: by task index).
    tracks = list(dict.fromkeys(span.track for span in spans))
    rows = {track: n for n, track in enumerate(tracks)}
    end = max((s.start_s + s.wall_s for s in spans), default=1.0)
    end = max([end, *(at for at, _ in marks)]) or 1.0

    fig = Figure(figsize=(10, 1.9 + 0.55 * max(1, len(tracks))), dpi=110)
    ax = fig.add_subplot()
    seen: dict[str, int] = {}
    for span in spans:
        colour = COLOURS.get(span.status, "#607d8b")
        seen[span.status] = seen.get(span.status, 0) + 1
        # A task ended at once still gets a visible sliver.
        width = max(span.wall_s, end * 0.004)
        y = rows[span.track]
        ax.barh(y, width, left=span.start_s, height=0.62, color=colour, edgecolor="white")
        # The long label where it fits, the short one where only that fits.
        label = span.label if width >= end * 0.08 else span.label.split()[-1]
        if span.label and width >= end * 0.035:
            ax.text(
                span.start_s + width / 2,
                y,
                label,
                ha="center",
                va="center",
                fontsize=8.5,
                color="white",
                fontweight="bold",
                clip_on=True,
            )
    for at, text in marks:
        ax.axvline(at, color="#424242", linestyle="--", linewidth=1)
        right = at > 0.6 * end  # the text goes on the side with room
        ax.annotate(
            text,
            xy=(at, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-4 if right else 4, -4),
            textcoords="offset points",
            ha="right" if right else "left",
            va="top",
            fontsize=8.5,
            color="#212121",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
        )
    ax.set_yticks(range(len(tracks)), tracks)
    ax.set_ylim(max(1, len(tracks)) - 0.5, -0.5 - (0.6 if marks else 0.0))
    ax.set_xlim(0, end * 1.02)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", color="#e0e0e0", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, loc="left", fontsize=11)
    order = [s for s in COLOURS if s in seen] + sorted(s for s in seen if s not in COLOURS)
    handles = [
        Patch(color=COLOURS.get(s, "#607d8b"), label=f"{_MEANING.get(s, s)}: {seen[s]}")
        for s in order
    ]
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
            fontsize=9,
            title="status",
            title_fontsize=9,
            alignment="left",
        )
    if note:
        fig.text(0.01, 0.01, note, fontsize=8.5, color="#424242", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    with _opened(file, "wb") as stream:
        fig.savefig(stream, format=_format_of(file))


def _format_of(file: str | os.PathLike[str] | IO[bytes]) -> str:
    name = getattr(file, "name", file)
    ext = (
        os.path.splitext(os.fspath(name))[1].lstrip(".").lower()
        if isinstance(name, (str, os.PathLike))
        else ""
    )
    return ext or "png"
