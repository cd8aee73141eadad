"""``capture_output=True``: a task's file descriptors 1 and 2, caught apart.

The parent makes two anonymous files per worker (:class:`CaptureFiles`, passed to
the worker at its start). Around a captured task the worker points its descriptors 1
and 2 at them with ``dup2``, so everything the task writes lands there: ``print``,
``os.write``, C code, and the processes the task starts (they inherit 1 and 2).
Python's own buffers are flushed before and after, and C's stdio buffers after;
a ``sys.stdout`` or ``sys.stderr`` that does not write to 1 or 2 (inherited under
``fork`` from a parent that replaced it) is swapped for one that does meanwhile.
Then the worker puts its descriptors back and reads the last :data:`TAIL_BYTES` of
each file (:class:`Capture`). The files are emptied, not reopened, for the next
task, and they are opened in append mode, so that a straggling child of an earlier
task cannot scribble over the start of the next task's output.

When the task crashes (segfault, ``os._exit``, SIGKILL) the worker reads nothing,
but the parent holds its own descriptors to the same files and reads the tail
itself (:meth:`CaptureFiles.read`): the output of a task that died is not lost,
and a segfault's ``faulthandler`` report, written to descriptor 2, is part of it.

A task that writes without end would grow its file in memory: while a task runs,
a small thread frees the part of a file before its last :data:`TAIL_BYTES` once it
passes :data:`TRIM_AT` (``fallocate`` punching a hole, on Linux; elsewhere the file
just grows until the task ends).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import mmap
import os
import sys
import threading
import time
from typing import Any

from ._anonfile import AnonFile

__all__ = ["TAIL_BYTES", "Capture", "CaptureFiles"]

# The most of each stream that is kept.
TAIL_BYTES = 1 << 20
# Past this size a file's head is freed while its task runs.
TRIM_AT = 8 * TAIL_BYTES
TRIM_EVERY = 0.1

_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class CaptureFiles:
    """The two files a worker's stdout and stderr go to during a captured task."""

    __slots__ = ("err", "out")

    def __init__(self, out: AnonFile, err: AnonFile) -> None:
        self.out = out
        self.err = err

    @classmethod
    def create(cls) -> CaptureFiles:
        """Two new files, to pass to a worker in its ``Process`` arguments."""
        files = []
        for name in ("alloter_mp-stdout", "alloter_mp-stderr"):
            file = AnonFile.create(name)
            flags = fcntl.fcntl(file.fd, fcntl.F_GETFL)
            fcntl.fcntl(file.fd, fcntl.F_SETFL, flags | os.O_APPEND)
            files.append(file)
        return cls(*files)

    def read(self) -> tuple[str, str]:
        """The last :data:`TAIL_BYTES` of each file as text: ``(stdout, stderr)``.

        For the parent, once the worker died during a captured task.
        """
        return read_tail(self.out.fd), read_tail(self.err.fd)

    def close(self) -> None:
        """Close this process's descriptors."""
        self.out.close()
        self.err.close()


def read_tail(fd: int, most: int = TAIL_BYTES) -> str:
    """The last ``most`` bytes of file ``fd`` decoded as UTF-8 (undecodable bytes replaced)."""
    size = os.fstat(fd).st_size
    start = max(0, size - most)
    data = os.pread(fd, size - start, start) if size > start else b""
    if start:
        # The cut may fall inside a character: drop its continuation bytes.
        skip = 0
        while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
            skip += 1
        data = data[skip:]
    return data.decode("utf-8", errors="replace")


def _flush_python() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


def _writes_to(stream: Any, fd: int) -> bool:
    try:
        return bool(stream.fileno() == fd)
    except Exception:  # None, or a stream with no descriptor (io.StringIO, ...)
        return False


def _fd_stream(fd: int) -> io.TextIOWrapper:
    raw = open(fd, "wb", buffering=0, closefd=False)  # noqa: SIM115 - kept for the worker's life
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace", write_through=True)


class _Libc:
    """The two C functions capture needs, when there is a C library to ask."""

    def __init__(self) -> None:
        self.fflush: Any = None
        self.fallocate: Any = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        except (ImportError, OSError):
            return
        self.fflush = getattr(libc, "fflush", None)
        if self.fflush is not None:
            self.fflush.argtypes = [ctypes.c_void_p]
        fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
        if fallocate is not None and sys.platform.startswith("linux"):
            fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            self.fallocate = fallocate


class Capture:
    """The worker's side: :meth:`begin` before a task, :meth:`end` after it.

    Made once per worker, on the first captured task; it keeps copies of the
    worker's own descriptors 1 and 2 to put back after each task.
    """

    def __init__(self, files: CaptureFiles) -> None:
        self.files = files
        self._saved = (os.dup(1), os.dup(2))  # not inheritable: children get 1 and 2
        self._libc = _Libc()
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._trimmer: threading.Thread | None = None
        # Python streams on 1 and 2, for a worker whose sys.stdout or sys.stderr is
        # elsewhere (inherited under fork from a parent that replaced them).
        self._streams = (_fd_stream(1), _fd_stream(2))
        self._replaced: list[tuple[str, Any]] = []
        self.active = False

    def begin(self) -> None:
        """Empty both files and point descriptors 1 and 2 at them."""
        _flush_python()
        self._fflush()
        with self._lock:
            for file in (self.files.out, self.files.err):
                os.ftruncate(file.fd, 0)
        os.dup2(self.files.out.fd, 1)
        os.dup2(self.files.err.fd, 2)
        for name, fd, stream in (("stdout", 1, self._streams[0]), ("stderr", 2, self._streams[1])):
            current = getattr(sys, name)
            if not _writes_to(current, fd):
                self._replaced.append((name, current))
                setattr(sys, name, stream)
        self.active = True
        if self._libc.fallocate is not None:
            if self._trimmer is None:
                self._trimmer = threading.Thread(target=self._trim, daemon=True)
                self._trimmer.name = "alloter_mp-capture"
                self._trimmer.start()
            self._running.set()

    def end(self) -> tuple[str, str]:
        """Put descriptors 1 and 2 back; the task's ``(stdout, stderr)``, last 1 MiB each."""
        if not self.active:
            return "", ""
        self._running.clear()
        _flush_python()
        self._fflush()
        for name, stream in self._replaced:
            setattr(sys, name, stream)
        self._replaced.clear()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        self.active = False
        return self.files.read()

    def _fflush(self) -> None:
        # Output C code left in stdio's buffers belongs to the task that wrote it.
        if self._libc.fflush is not None:
            self._libc.fflush(None)

    def _trim(self) -> None:
        page = mmap.PAGESIZE
        while True:
            self._running.wait()
            time.sleep(TRIM_EVERY)
            with self._lock:
                if not self._running.is_set():
                    continue
                for file in (self.files.out, self.files.err):
                    with contextlib.suppress(OSError):
                        size = os.fstat(file.fd).st_size
                        if size > TRIM_AT:
                            cut = (size - TAIL_BYTES) // page * page
                            if self._libc.fallocate(file.fd, _PUNCH_HOLE, 0, cut) != 0:
                                self._libc.fallocate = None  # not supported here
                                return

    def close(self) -> None:
        """Put the descriptors back if a task is still captured, and drop the copies."""
        if self.active:
            self.end()
        for fd in self._saved:
            with contextlib.suppress(OSError):
                os.close(fd)
