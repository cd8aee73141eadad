"""The pipes between the pool and one worker: a message channel each way.

A :class:`Channel` is one end: it reads messages from one pipe and writes them to
another, framed as ``multiprocessing.Connection`` frames them (a 4-byte big-endian
length, or -1 and an 8-byte length, then the bytes). Descriptors of shared segments
(see :mod:`alloter_mp._shm`) cannot travel on a pipe: they go on a Unix socket pair
beside it, ``fd_conn``, in the order of the messages that announce them.

Why not one duplex ``multiprocessing.Pipe``: that is a socket pair, and a round
trip over a socket pair costs markedly more than over two pipes (about 21 against
13 us on the 2-core machines the targets are measured on); and reading a frame with
plain ``os.read`` calls skips ``Connection``'s Python layers, which matter for tiny
tasks.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["Channel", "channel_pair"]

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
# Header and message go in one write up to this size (as Connection does).
_JOIN_MOST = 16384


class Channel:
    """One end of a worker's message channel (see the module docstring).

    ``reader``, ``writer`` and ``fd_conn`` are ``multiprocessing`` connections, so
    that a channel travels to a child process with any start method.
    """

    __slots__ = ("_rfd", "_wfd", "fd_conn", "reader", "writer")

    def __init__(self, reader: Any, writer: Any, fd_conn: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.fd_conn = fd_conn
        self._rfd: int = reader.fileno()
        self._wfd: int = writer.fileno()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Channel, (self.reader, self.writer, self.fd_conn))

    def fileno(self) -> int:
        """The descriptor to wait on for messages."""
        return self._rfd

    def send_bytes(self, data: bytes) -> None:
        """Write one message (``OSError`` once the other end is gone)."""
        size = len(data)
        if size > 0x7FFFFFFF:
            _write_all(self._wfd, _SHORT.pack(-1) + _LONG.pack(size))
            _write_all(self._wfd, data)
        elif size > _JOIN_MOST:
            _write_all(self._wfd, _SHORT.pack(size))
            _write_all(self._wfd, data)
        else:
            _write_all(self._wfd, _SHORT.pack(size) + data)

    def recv_bytes(self) -> bytes | bytearray:
        """Read one message; ``EOFError`` once the other end is closed."""
        (size,) = _SHORT.unpack(_read_exactly(self._rfd, 4))
        if size == -1:
            (size,) = _LONG.unpack(_read_exactly(self._rfd, 8))
        return _read_exactly(self._rfd, size)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message (or the end of the channel) waits to be read."""
        return self.waiter()(timeout)

    def waiter(self) -> Callable[[float | None], bool]:
        """A quicker :meth:`poll` for one thread at a time (it keeps its poll object)."""
        poller = select.poll()
        poller.register(self._rfd, select.POLLIN)
        wait = poller.poll

        def ready(timeout: float | None = 0.0) -> bool:
            return bool(wait(None if timeout is None else timeout * 1000))

        return ready

    def close(self) -> None:
        """Close the three connections of this end. Idempotent."""
        for conn in (self.reader, self.writer, self.fd_conn):
            conn.close()


def channel_pair(ctx: Any) -> tuple[Channel, Channel]:
    """Both ends of a new channel, made with multiprocessing context ``ctx``."""
    down_r, down_w = ctx.Pipe(duplex=False)
    up_r, up_w = ctx.Pipe(duplex=False)
    fds_a, fds_b = ctx.Pipe(duplex=True)
    return Channel(up_r, down_w, fds_a), Channel(down_r, up_w, fds_b)


def _read_exactly(fd: int, size: int) -> bytes | bytearray:
    data = os.read(fd, size)
    if len(data) == size:
        return data
    if not data:
        raise EOFError("the channel was closed")
    # A long message comes in pieces (a pipe holds 64 KiB): read them into place.
    buffer = bytearray(size)
    view = memoryview(buffer)
    view[: len(data)] = data
    done = len(data)
    while done < size:
        count = os.readv(fd, [view[done:]])
        if not count:
            raise EOFError("the channel was closed in the middle of a message")
        done += count
    return buffer


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
