"""Big out-of-band pickle buffers through shared memory, in both directions.

Pickle protocol 5 hands every large buffer an object exposes (a numpy array's data,
a :class:`pickle.PickleBuffer`) to a ``buffer_callback`` instead of copying it into
the pickle, and ``pickle.loads(data, buffers=...)`` rebuilds the objects on the
buffers it is given, without a copy. The mechanism is pickle's: no numpy here.

Writer side, :class:`Outbox`: one per call (the parent's arguments) or per result
(a worker's). ``dumps(obj)`` pickles ``obj`` with buffers of at least ``threshold``
bytes written into shared segments; the same buffer given again to the same outbox
(8 tasks of one call taking one array) is written once. ``release()`` closes the
outbox's descriptors.

Reader side, :class:`Inbox`: takes the segments' descriptors as they arrive and
``loads`` packed objects on read-only mappings of them (numpy arrays come back with
``writeable=False``). A mapping lives as long as the objects built on it, whatever
becomes of the inbox; ``release()`` closes the descriptors.

Segments are anonymous files that have no name anywhere while they are used, so a
process that dies, even by SIGKILL, leaves nothing behind: the kernel frees a
segment when the last descriptor and mapping of it go. On Linux (and FreeBSD) a
segment is a ``memfd_create`` file; one outbox writes all its buffers into one
growing segment, so a call holds one descriptor whatever its size. Elsewhere it is a
POSIX shared memory object unlinked right after it is created (and registered with
multiprocessing's resource tracker for that instant), one per buffer, since those
cannot grow. Descriptors travel over the worker's duplex pipe, a Unix socket, with
:func:`send_fds` and :func:`recv_fds`.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import pickle
import select
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import cloudpickle

__all__ = [
    "DEFAULT_THRESHOLD",
    "Inbox",
    "Outbox",
    "Packed",
    "Received",
    "Refs",
    "pack_alone",
    "recv_fds",
    "send_fds",
]

DEFAULT_THRESHOLD = 1 << 20
PROTOCOL = 5
# Each buffer starts on this boundary, so that a reader can map it alone.
_ALIGN = max(mmap.ALLOCATIONGRANULARITY, mmap.PAGESIZE)
# Linux accepts at most 253 descriptors in one message (SCM_MAX_FD).
_FDS_PER_MESSAGE = 250
# The name a memfd segment shows in /proc/<pid>/fd and maps (it is no file name).
MEMFD_NAME = "alloter_mp"

_HAS_MEMFD = hasattr(os, "memfd_create")
_TRACKFD = {"trackfd": False} if sys.version_info >= (3, 13) else {}


# Where a pickle's out-of-band buffers lie: (segment, offset, nbytes) for each.
Refs = tuple[tuple[int, int, int], ...]


class Packed(NamedTuple):
    """A pickle and where its out-of-band buffers lie.

    ``refs`` holds one ``(segment, offset, nbytes)`` per buffer, in pickle order;
    ``segment`` counts the outbox's segments from 0. With no refs, ``data`` is an
    ordinary pickle that ``pickle.loads`` reads alone.
    """

    data: bytes
    refs: Refs


# -- writer --------------------------------------------------------------------------


class Outbox:
    """Writes the big buffers of the objects it pickles into shared segments.

    ``threshold``: buffers of at least this many bytes are shared (``None``: none,
    everything travels in the pickle). ``anonymous_files``: use ``memfd_create``
    segments (``None``: where the platform has them; ``False`` forces the POSIX
    shared memory fallback). Thread-safe; release it when the call or result it
    serves is over, or let it be collected.
    """

    def __init__(
        self, threshold: int | None = DEFAULT_THRESHOLD, *, anonymous_files: bool | None = None
    ) -> None:
        if threshold is not None and (isinstance(threshold, bool) or threshold < 0):
            raise ValueError(f"threshold must be >= 0 bytes or None, not {threshold!r}")
        self.threshold = threshold
        self._memfd = _HAS_MEMFD if anonymous_files is None else anonymous_files
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._arena_end = 0  # next free byte of the memfd segment
        self._placed: dict[tuple[Any, ...], tuple[int, int, int]] = {}
        self._keep: list[pickle.PickleBuffer] = []  # so that placed keys stay unique
        self._released = False
        # Made with the first segment: most outboxes never make one.
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- pickling ----------------------------------------------------------------

    def dumps(self, obj: Any, *, result: bool = False) -> Packed:
        """Pickle ``obj``, its big buffers written to (or found in) this outbox.

        Pickled as :mod:`alloter_mp._transport` does: plain pickle where it can,
        cloudpickle for functions that must travel by value (``result=True``: a
        result may refer to ``__main__`` by reference).
        """
        packed = self.pack(obj, result=result)
        if type(packed) is bytes:
            return Packed(packed, ())
        return Packed(*packed)

    def pack(self, obj: Any, *, result: bool = False) -> bytes | tuple[bytes, Refs]:
        """Like :meth:`dumps`, cheaper for the many objects that share nothing.

        Returns the plain pickle (bytes, readable by ``pickle.loads`` alone) when no
        buffer was shared, else the tuple ``(data, refs)`` that :meth:`Inbox.loads`
        reads.
        """
        data, found = _pickle_finding(obj, self.threshold, result)
        if not found:
            return data
        refs = self.place(found)
        if refs is None:
            return _pickle(obj, None, result)
        return (data, refs)

    def place(self, found: list[pickle.PickleBuffer]) -> Refs | None:
        """Write (or find) ``found``'s buffers here: their refs, ``None`` if no room."""
        with self._lock:
            if self._released:
                raise RuntimeError("this outbox was released")
            try:
                return tuple(self._place(buffer) for buffer in found)
            except OSError:
                # No room for a segment (memory, descriptors): the pickle can still
                # carry the bytes itself, as it would without sharing.
                return None

    def _place(self, buffer: pickle.PickleBuffer) -> tuple[int, int, int]:
        view = buffer.raw()
        key = _identity(view)
        ref = self._placed.get(key)
        if ref is None:
            ref = self._write_memfd(view) if self._memfd else self._write_named(view)
            self._placed[key] = ref
            self._keep.append(buffer)
        return ref

    def _write_memfd(self, view: memoryview) -> tuple[int, int, int]:
        if not self._fds:
            try:
                self._keep_fd(_new_memfd())
            except OSError:  # memfd refused (seccomp, an old kernel): fall back
                self._memfd = False
                return self._write_named(view)
        offset = -(-self._arena_end // _ALIGN) * _ALIGN
        _pwrite_all(self._fds[0], view, offset)
        self._arena_end = offset + view.nbytes
        return (0, offset, view.nbytes)

    def _write_named(self, view: memoryview) -> tuple[int, int, int]:
        fd = _new_unlinked_shm(view.nbytes)
        try:
            with mmap.mmap(fd, view.nbytes) as target:
                target[:] = view
        except BaseException:
            os.close(fd)
            raise
        self._keep_fd(fd)
        return (len(self._fds) - 1, 0, view.nbytes)

    def _keep_fd(self, fd: int) -> None:
        self._fds.append(fd)
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, _close_all, self._fds)

    # -- what to send ---------------------------------------------------------------

    def fds(self, start: int = 0) -> list[int]:
        """The segments' descriptors from the ``start``-th on, to send to a reader.

        Segments only ever get added: a reader that was sent the first ``n`` needs
        ``fds(n)`` before it reads a :class:`Packed` made since.
        """
        with self._lock:
            return self._fds[start:]

    def fds_copy(self, start: int = 0) -> list[int]:
        """Duplicates of :meth:`fds`, for the sender to close once sent.

        Another thread may release the outbox meanwhile: the duplicates stay valid
        (a released outbox gives none).
        """
        with self._lock:
            copies: list[int] = []
            try:
                for fd in self._fds[start:]:
                    copies.append(os.dup(fd))
            except OSError:
                _close_all(copies)
                raise
            return copies

    @property
    def segment_count(self) -> int:
        """How many segments this outbox has made so far."""
        return len(self._fds)

    @property
    def shared_bytes(self) -> int:
        """Bytes written to shared segments (each shared buffer once)."""
        with self._lock:
            return sum(nbytes for _, _, nbytes in self._placed.values())

    def seal(self) -> None:
        """Forbid any change to the segments (memfd only): for a finished result."""
        import fcntl

        add = getattr(fcntl, "F_ADD_SEALS", None)
        if not self._memfd or add is None:
            return
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        with self._lock:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, add, seals)

    def release(self) -> None:
        """Close this outbox's descriptors. Idempotent.

        Readers keep what they mapped or were sent; the memory goes with the last of
        them. Packed objects made here can no longer be sent to a new reader.
        """
        with self._lock:
            self._released = True
            _close_all(self._fds)
            self._placed.clear()
            self._keep.clear()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _pickle_finding(
    obj: Any, threshold: int | None, result: bool
) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj`` with its buffers of ``threshold`` bytes or more left out (found)."""
    if threshold is None:
        return _pickle(obj, None, result), []
    found: list[pickle.PickleBuffer] = []

    def take(buffer: pickle.PickleBuffer) -> bool:
        try:
            size = buffer.raw().nbytes
        except BufferError:  # not contiguous: pickle says what it says in band
            return True
        if size == 0 or size < threshold:
            return True
        found.append(buffer)
        return False

    return _pickle(obj, take, result, found.clear), found


def pack_alone(
    obj: Any, threshold: int | None, *, result: bool = True
) -> bytes | tuple[bytes, Refs, Outbox]:
    """Pickle one object (a worker's result) with an outbox of its own, made only if
    something is shared: the plain pickle, or ``(data, refs, outbox)``; the caller
    sends the outbox's descriptors with ``data`` and then releases it."""
    data, found = _pickle_finding(obj, threshold, result)
    if not found:
        return data
    outbox = Outbox(threshold)
    refs = outbox.place(found)
    if refs is None:
        outbox.release()
        return _pickle(obj, None, result)
    return (data, refs, outbox)


def _pickle(
    obj: Any,
    callback: Callable[[pickle.PickleBuffer], bool] | None,
    result: bool,
    restart: Callable[[], None] = lambda: None,
) -> bytes:
    if result or not cloudpickle.list_registry_pickle_by_value():
        try:
            data = pickle.dumps(obj, PROTOCOL, buffer_callback=callback)
        except Exception:
            restart()
        else:
            if result or b"__main__" not in data:
                return data
            restart()
    return cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)  # type: ignore[no-any-return]


def _identity(view: memoryview) -> tuple[Any, ...]:
    """What makes two buffers the same one: their memory, while it is kept alive.

    A writable buffer is known by its address and size (two views of one array's
    memory are one buffer); a read-only one by the object that exports it.
    """
    if not view.readonly:
        import ctypes  # here: a worker that shares no result never needs it

        anchor = ctypes.c_char.from_buffer(view)
        try:
            return ("at", ctypes.addressof(anchor), view.nbytes)
        finally:
            del anchor
    return ("of", id(view.obj), view.nbytes)


def _new_memfd() -> int:
    flags = os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
    fd = os.memfd_create(f"{MEMFD_NAME}-{os.getpid()}", flags)
    with contextlib.suppress(Exception):
        import fcntl

        # Nobody may shrink it under a reader's mapping (the reader would get SIGBUS).
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    # ``view`` is a PickleBuffer's raw(): flat bytes. A write may be partial (Linux
    # writes at most 2 GiB at once).
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


def _posixshmem() -> Any:
    return importlib.import_module("_posixshmem")


def _new_unlinked_shm(size: int) -> int:
    """A POSIX shared memory object of ``size`` bytes whose name is already gone.

    The resource tracker (a process of its own) knows the name for the few
    instructions it exists, so even a SIGKILL then leaves nothing behind.
    """
    import secrets
    from multiprocessing import resource_tracker

    shm = _posixshmem()
    for _ in range(100):
        # Short: macOS allows 31 characters.
        name = f"/amp{os.getpid():x}{secrets.token_hex(4)}"
        resource_tracker.register(name, "shared_memory")
        try:
            fd: int = shm.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            resource_tracker.unregister(name, "shared_memory")
            continue
        try:
            _unlink_named(name)
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise FileExistsError("no free name for a shared memory segment")


def _unlink_named(name: str) -> None:
    from multiprocessing import resource_tracker

    try:
        _posixshmem().shm_unlink(name)
    finally:
        resource_tracker.unregister(name, "shared_memory")


def _read_at(fd: int, nbytes: int, offset: int) -> bytearray:
    data = bytearray(nbytes)
    view = memoryview(data)
    done = 0
    while done < nbytes:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            raise OSError(f"segment ends {nbytes - done} bytes early")
        done += count
    return data


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


# -- reader --------------------------------------------------------------------------


class Inbox:
    """Reads :class:`Packed` objects on read-only mappings of the segments it was given.

    ``add(fds)`` in the order the outbox made them (it takes the descriptors over).
    Mappings made for one buffer are reused while the inbox lives: the tasks of one
    call that share an array share one mapping.
    """

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self._fds: list[int] = []
        self._views: dict[tuple[int, int, int], memoryview] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._fds)
        self.add(fds)

    def add(self, fds: Iterable[int]) -> None:
        """Take over the next segments' descriptors."""
        self._fds.extend(fds)

    @property
    def segment_count(self) -> int:
        """How many segments this inbox was given."""
        return len(self._fds)

    def views(self) -> list[memoryview]:
        """The mappings made so far (one per buffer read)."""
        return list(self._views.values())

    def loads(self, packed: Packed | tuple[bytes, Sequence[tuple[int, int, int]]]) -> Any:
        """Unpickle ``packed``; its big buffers are read-only views of shared memory."""
        data, refs = packed
        if not refs:
            return pickle.loads(data)
        return pickle.loads(data, buffers=[self._view(tuple(ref)) for ref in refs])  # type: ignore[arg-type]

    def _view(self, ref: tuple[int, int, int]) -> memoryview:
        view = self._views.get(ref)
        if view is None:
            segment, offset, nbytes = ref
            if not 0 <= segment < len(self._fds):
                raise RuntimeError(f"segment {segment} was never received")
            fd = self._fds[segment]
            try:
                mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ, offset=offset, **_TRACKFD)
            except OSError:
                # Out of descriptors (before Python 3.13 each mapping keeps one) or of
                # address space: a copy still gives the object, read-only as promised.
                view = memoryview(_read_at(fd, nbytes, offset)).toreadonly()
            else:
                # The view keeps the mapping alive; the mapping is unmapped when the
                # last object built on it goes (never closed here: they may use it).
                view = memoryview(mapping)
            self._views[ref] = view
        return view

    def release(self) -> None:
        """Close the descriptors and forget the mappings (objects keep theirs)."""
        self._views.clear()
        _close_all(self._fds)

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Received:
    """A pickle that came with segments of its own (a worker's result).

    :meth:`load` it once: the descriptors are closed then (or when it is dropped
    unread); the objects built keep their mappings.
    """

    __slots__ = ("data", "fds", "refs")

    def __init__(self, data: bytes, refs: Refs, fds: list[int]) -> None:
        self.data = data
        self.refs = refs
        self.fds = fds

    def load(self) -> Any:
        fds, self.fds = self.fds, []
        with Inbox(fds) as inbox:
            return inbox.loads((self.data, self.refs))

    def __del__(self) -> None:
        _close_all(self.fds)


# -- descriptors over the worker's pipe -------------------------------------------------


def _readable(fd: int, timeout: float) -> bool:
    # poll, not a socket timeout: that would make the connection itself non-blocking.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _socket_of(conn: Any) -> socket.socket:
    # A duplicate, so that closing it leaves the connection's own descriptor alone.
    return socket.socket(fileno=os.dup(conn.fileno()))


def send_fds(conn: Any, fds: Sequence[int]) -> None:
    """Send descriptors over a duplex ``multiprocessing`` connection (a Unix socket).

    Call it right after the ``send_bytes`` whose message says how many follow; the
    reader calls :func:`recv_fds` right after the matching ``recv_bytes``. The
    sender may close its copies once this returns.
    """
    if not fds:
        return
    with _socket_of(conn) as sock:
        for start in range(0, len(fds), _FDS_PER_MESSAGE):
            part = list(fds[start : start + _FDS_PER_MESSAGE])
            socket.send_fds(sock, [bytes([len(part)])], part)


def recv_fds(conn: Any, count: int, *, timeout: float | None = None) -> list[int]:
    """Receive ``count`` descriptors sent by :func:`send_fds` (close-on-exec).

    ``timeout``: seconds to wait for each part (``TimeoutError``, an ``OSError``,
    past it; ``None``: as long as it takes).
    """
    received: list[int] = []
    if count <= 0:
        return received
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    try:
        with _socket_of(conn) as sock:
            for start in range(0, count, _FDS_PER_MESSAGE):
                want = min(_FDS_PER_MESSAGE, count - start)
                if timeout is not None and not _readable(sock.fileno(), timeout):
                    raise TimeoutError(f"no descriptors came within {timeout} s")
                message, fds, msg_flags, _ = socket.recv_fds(sock, 1, want, flags)
                received.extend(fds)
                if not message:
                    raise EOFError("the connection closed before its descriptors came")
                if msg_flags & getattr(socket, "MSG_CTRUNC", 0) or len(fds) != message[0]:
                    raise OSError(f"expected {message[0]} descriptors, received {len(fds)}")
    except BaseException:
        _close_all(received)
        raise
    return received
