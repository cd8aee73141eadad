"""A report's timeline (contract section 10): ``Report.to_chrome_trace`` and
``Report.plot``."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pytest

from alloter_mp import ProcessAlloter, Report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail_later(seconds: float) -> None:
    time.sleep(seconds)
    raise ValueError("planned failure")


@pytest.fixture(scope="module")
def mixed() -> Report:
    """ok tasks, a failure that ends the call, cancelled and skipped siblings."""
    with ProcessAlloter(2, cancel_grace=0.2) as alloter:
        return alloter.exec_report(
            lambda: nap(0.1),
            lambda: fail_later(1.0),
            lambda: nap(0.1),
            lambda: nap(5),  # running when the failure comes: cancelled
            lambda: nap(0.1),  # still queued then: skipped
        )


def test_the_batch_is_mixed(mixed: Report) -> None:
    statuses = [t.status for t in mixed.tasks]
    assert statuses == ["ok", "error", "ok", "cancelled", "skipped"]


def test_chrome_trace_has_one_event_per_started_task(mixed: Report, tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    mixed.to_chrome_trace(path)
    events = json.loads(path.read_text())
    complete = [e for e in events if e["ph"] == "X"]
    started = [t for t in mixed.tasks if t.start_s is not None]
    assert len(complete) == len(started) == 4
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    pids = {t.pid for t in started}
    assert sorted(tracks.values()) == sorted(f"worker {pid}" for pid in pids)
    for event, task in zip(complete, started, strict=True):
        assert event["name"] == f"task {task.index} {task.status}"
        assert event["cat"] == task.status
        assert tracks[event["tid"]] == f"worker {task.pid}"
        assert task.start_s is not None
        assert event["ts"] == pytest.approx(task.start_s * 1e6, abs=1)
        assert event["dur"] == pytest.approx(task.wall_s * 1e6, abs=1)
        assert event["args"]["attempts"] == task.attempts
    failed = next(e for e in complete if e["cat"] == "error")
    assert "planned failure" in failed["args"]["error"]


def test_chrome_trace_to_a_stream(mixed: Report) -> None:
    stream = io.StringIO()
    mixed.to_chrome_trace(stream)
    assert not stream.closed
    events = json.loads(stream.getvalue())
    assert sum(e["ph"] == "X" for e in events) == 4


def test_an_empty_report_makes_an_empty_trace(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    Report([]).to_chrome_trace(path)
    assert [e["ph"] for e in json.loads(path.read_text())] == ["M"]


def test_plot_writes_a_png(mixed: Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "timeline.png"
    mixed.plot(path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000  # not an empty canvas


def test_plot_follows_the_file_name(mixed: Report, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "timeline.svg"
    mixed.plot(path, title="a mixed batch")
    text = path.read_text()
    assert "<svg" in text


def test_plot_without_matplotlib_names_the_extra(
    mixed: Report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(ImportError, match=r"alloter-mp\[plot\]"):
        mixed.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
