"""Anonymous files that a parent creates and hands to a worker process at its start.

An anonymous file (``memfd_create`` on Linux, an unlinked temporary file elsewhere)
has no name anywhere, so nothing is left behind whatever kills whom; and since the
parent keeps its own descriptor, it can still read what a worker wrote after the
worker died (a segfault, ``os._exit``, SIGKILL). Both the log journal
(:mod:`alloter_mp._logrelay`) and the captured output (:mod:`alloter_mp._capture`)
are such files.

An :class:`AnonFile` crosses to the worker in the arguments of
``multiprocessing.Process``: under ``spawn`` and ``forkserver`` its descriptor is
duplicated into the child the way multiprocessing passes its own (``DupFd``); under
``fork`` the child simply inherits it.
"""

from __future__ import annotations

import os
import tempfile
from multiprocessing import reduction
from typing import Any

__all__ = ["AnonFile"]


def _new_fd(name: str) -> int:
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            return int(memfd_create(name, os.MFD_CLOEXEC))
        except OSError:  # seccomp or an old kernel: fall back to a temporary file
            pass
    with tempfile.TemporaryFile(prefix=name) as f:  # unlinked at once where POSIX allows
        return os.dup(f.fileno())


class AnonFile:
    """An unnamed file owned by the process holding it; see the module docstring."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls, name: str, size: int = 0) -> AnonFile:
        """A new empty anonymous file (``name`` only shows in ``/proc/PID/fd``)."""
        fd = _new_fd(name)
        if size:
            os.ftruncate(fd, size)
        return cls(fd)

    def close(self) -> None:
        """Close this process's descriptor (the other side keeps its own)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def size(self) -> int:
        """The file's current size in bytes."""
        return os.fstat(self.fd).st_size

    def __reduce__(self) -> tuple[Any, ...]:
        # Valid only while a process is being started (multiprocessing then passes the
        # descriptor to the child); anywhere else DupFd would start a resource-sharing
        # server thread, which nothing here wants.
        return (_rebuild, (reduction.DupFd(self.fd),))


def _rebuild(dup: Any) -> AnonFile:
    return AnonFile(dup.detach())
