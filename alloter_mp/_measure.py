"""Measuring a task inside its worker: the peak resident memory of that task alone."""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["PeakMeter"]


class PeakMeter:
    """Per-task peak resident memory.

    On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's
    high-water mark of resident memory (VmHWM) to the current resident size, so the
    mark read after a task is that task's own peak: exact to the page, whatever the
    task did in between (even memory it freed again), because the kernel keeps it.

    Reading the mark from ``/proc/self/status`` costs 7-17 us; ``getrusage``'s
    ``ru_maxrss`` costs under 1 us and is ``max(that mark, M)``, where M is a mark
    the kernel keeps apart and the reset does not clear: that of the image the
    worker replaced at exec (the parent, under "spawn"). M is at most ``ru_maxrss``
    read right after the first reset (K). So after each reset the meter reads
    ``ru_maxrss`` (s0): when s0 > K, s0 is the mark itself, and the peak is
    ``ru_maxrss`` after the task; otherwise it checks that s0 is about the resident
    size (``/proc/self/statm``, 2 us). A ``ru_maxrss`` that grew during the task is
    the task's own mark in any case. Only when M hides the mark and the task did not
    exceed M is VmHWM read.

    Where none of this is possible, the process-lifetime peak from ``getrusage`` is
    used when it grew during the task, else the resident size at the end (a lower
    bound).
    """

    # The resident size may move a little between the reset and the reads after it.
    _SLACK = 64 * 1024

    def __init__(self) -> None:
        # Raw descriptors rather than file objects: nothing to flush, and no
        # ResourceWarning when the worker exits with them open.
        self.exact = False
        self._clear = self._status = self._statm = -1
        self._start_maxrss = 0
        self._s0 = 0
        self._known = 0  # K: M is at most this
        self._hidden = True
        try:
            import resource

            self._getrusage = resource.getrusage
            self._self = resource.RUSAGE_SELF
            self._page = os.sysconf("SC_PAGE_SIZE")
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
            self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
            self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            os.write(self._clear, b"5")
            self._known = self._ru_maxrss()
            self.exact = self._read_hwm() > 0 and self._read_rss() > 0
        except (ImportError, OSError, AttributeError, ValueError, IndexError):
            self.exact = False
        if not self.exact:
            self.close()

    def close(self) -> None:
        for fd in (self._clear, self._status, self._statm):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._clear = self._status = self._statm = -1
        self.exact = False

    def _read_hwm(self) -> int:
        text = os.pread(self._status, 16384, 0)
        at = text.find(b"VmHWM:")
        if at < 0:
            return 0
        return int(text[at + 6 : text.index(b"kB", at)]) * 1024

    def _read_rss(self) -> int:
        return int(os.pread(self._statm, 256, 0).split()[1]) * self._page

    def _ru_maxrss(self) -> int:
        return int(self._getrusage(self._self).ru_maxrss) * 1024

    def start(self) -> None:
        if self.exact:
            try:
                os.write(self._clear, b"5")
                s0 = self._s0 = self._ru_maxrss()
                self._hidden = s0 <= self._known and s0 > self._read_rss() + self._SLACK
                return
            except (OSError, ValueError, IndexError):
                self.close()
        self._start_maxrss = _maxrss()

    def peak(self) -> int:
        if self.exact:
            try:
                now = self._ru_maxrss()
                if now > self._s0 or not self._hidden:
                    return now
                return self._read_hwm()
            except (OSError, ValueError):
                self.close()
        now_max = _maxrss()
        if now_max > self._start_maxrss:
            return now_max
        return _current_rss()


def _maxrss() -> int:
    try:
        import resource

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return 0
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def _current_rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0
