"""Reading a worker's messages many at a time.

A worker writes each message on its pipe with :mod:`multiprocessing.connection`'s
framing (a 4-byte big-endian length, or ``-1`` and an 8-byte length for a message
of 2 GiB or more, then the bytes). Reading them one ``recv_bytes()`` at a time costs
two system calls per message, and each system call lets another thread of the
parent take the interpreter lock, after which the supervisor may wait a whole
switch interval to get it back. A worker that reports many small results (an
executor's stream of tiny calls) then makes the supervisor crawl.

:class:`MessageReader` reads whatever the pipe holds in one call and cuts it into
whole messages; only a message larger than what arrived is completed with blocking
reads (its writer is in the middle of writing it).
"""

from __future__ import annotations

import os
import struct

__all__ = ["MessageReader"]

# Bytes asked for per read.
CHUNK = 1 << 16

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


class MessageReader:
    """Whole messages from the read end of a :mod:`multiprocessing` pipe (fd ``fd``)."""

    __slots__ = ("_buf", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()

    def read(self) -> list[bytes | bytearray]:
        """One read of what the pipe holds (it must be readable, or this blocks),
        cut into whole messages. Raises ``EOFError`` once the writer is gone and
        every whole message was returned."""
        data = os.read(self.fd, CHUNK)
        if not data:
            if self._buf:
                raise EOFError("the pipe closed in the middle of a message")
            raise EOFError
        buf = self._buf
        buf += data
        messages: list[bytes | bytearray] = []
        start = 0
        end = len(buf)
        while end - start >= 4:
            (size,) = _HEADER.unpack_from(buf, start)
            head = 4
            if size == -1:
                if end - start < 12:
                    break
                (size,) = _LONG_HEADER.unpack_from(buf, start + 4)
                head = 12
            if end - start - head < size:
                if start == 0 and size > CHUNK:
                    # A big message: complete it now rather than a chunk per turn.
                    messages.append(self._complete(head, size))
                    return messages
                break
            messages.append(bytes(buf[start + head : start + head + size]))
            start += head + size
        del buf[:start]
        return messages

    def _complete(self, head: int, size: int) -> bytearray:
        """The rest of a message of ``size`` bytes whose start is in the buffer."""
        have = len(self._buf) - head
        out = bytearray(size)
        view = memoryview(out)
        view[:have] = self._buf[head:]
        self._buf.clear()
        while have < size:
            n = os.readv(self.fd, [view[have:]])
            if n == 0:
                raise EOFError("the pipe closed in the middle of a message")
            have += n
        return out
