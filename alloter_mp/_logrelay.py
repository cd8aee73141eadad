"""The worker's half of the log relay: records and warnings of tasks, sent to the parent.

The parent sends a :func:`~alloter_mp._logreceive.snapshot` of its logging levels
and warning filters with each batch, and a :class:`WorkerRelay` applies it: the
worker's loggers get the parent's levels (so a record the parent would drop is never
even made), its warning filters become the parent's, and one handler on its root
logger turns each record into a small frame. The handlers the worker had are set
aside meanwhile: they are copies of the parent's (under ``fork``) or set up at
import, and the parent's own handlers will see these records.

Frames wait in a journal, an anonymous file mapped into the worker that the parent
also holds, and travel in batches on the worker's result pipe as ``(LOGS,
generation, frames)`` messages: when ``FLUSH_BYTES`` are waiting, before every other
message the worker sends (so a task's records precede its result), and at most
``FLUSH_INTERVAL`` after a record was written (a small thread sees to that, so a
long task's records show up while it runs). The pipe is the only channel; the
journal is what makes a crash harmless: if the worker dies (segfault, ``os._exit``,
SIGKILL), the parent reads the frames it had not yet sent from the file.

A frame is a plain pickle of a small tuple, never cloudpickle: a record's arguments
are merged into its message here, its traceback becomes text, and an extra attribute
that does not pickle travels as its ``repr``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import operator
import os
import pickle
import struct
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from ._anonfile import AnonFile
from ._words import ITEM

__all__ = ["LOGS", "Snapshot", "WorkerRelay"]

# Message kind, worker -> parent: (LOGS, generation, frames). It sits beside the
# kinds of alloter_mp._worker and must not clash with them.
LOGS = 6

# Frame kinds.
RECORD = 0  # (RECORD, index, offset, fields, message, exc_text, stack_info, extras)
WARNING = 1  # (WARNING, index, offset, text, category module, qualname, file, line, module)

PROTOCOL = pickle.HIGHEST_PROTOCOL
JOURNAL_BYTES = 1 << 20
# Frames are sent once this much is waiting...
FLUSH_BYTES = 64 * 1024
# ... or about this long after the first of them was written.
FLUSH_INTERVAL = 0.02

HEADER = struct.Struct("<qq")  # generation, end of the frames written
WORD = struct.Struct("<q")
LENGTH = struct.Struct("<I")  # before each frame
NOT_JOURNALED = -1  # the generation of a frame too big for the journal, sent alone

# The attributes of a plain record (taskName exists from 3.12).
BASE_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)
# Those that travel as they are, in this order.
FIELDS = tuple(
    name
    for name in (
        "name",
        "levelno",
        "levelname",
        "pathname",
        "filename",
        "module",
        "lineno",
        "funcName",
        "created",
        "msecs",
        "thread",
        "threadName",
        "processName",
        "process",
        "taskName",
    )
    if name in BASE_ATTRS
)
_get_fields = operator.itemgetter(*FIELDS)
# Set on a record by formatters, never an ``extra``.
_NOT_EXTRA = BASE_ATTRS | {"message", "asctime"}
_SCALARS = (str, int, float, bool, type(None))
_formatter = logging.Formatter()
_ORIGINAL_SHOWWARNING = warnings.showwarning

# (root level, logging.disable level, ((logger, level), ...), (disabled logger, ...),
#  ((action, message, (category module, qualname), module, lineno), ...), defaultaction)
Snapshot = tuple[int, int, tuple[tuple[str, int], ...], tuple[str, ...], tuple[Any, ...], str]


class _Journal:
    """Frames not yet sent, in a file the parent can read if this process dies.

    Layout: a header (generation, end of the frames) and length-prefixed frames. A
    frame is written before the end moves past it, so a process killed mid-write
    leaves only whole frames behind. The generation changes after each send, so the
    parent can tell frames it already has from frames it has not.
    """

    def __init__(self, file: AnonFile) -> None:
        self.buf = mmap.mmap(file.fd, 0)
        self.size = len(self.buf)
        self.gen = 0
        self.end = HEADER.size
        HEADER.pack_into(self.buf, 0, self.gen, self.end)

    def append(self, frame: bytes) -> int:
        """Bytes waiting with ``frame`` added; -1 (and nothing added) if it does not fit."""
        start = self.end
        body = start + LENGTH.size
        end = body + len(frame)
        if end > self.size:
            return -1
        buf = self.buf
        LENGTH.pack_into(buf, start, len(frame))
        buf[body:end] = frame
        self.end = end
        WORD.pack_into(buf, 8, end)
        return end - HEADER.size

    def pending(self) -> bytes:
        return self.buf[HEADER.size : self.end]

    def sent(self) -> None:
        # End first, then generation: a death between the two leaves nothing to resend.
        self.end = HEADER.size
        WORD.pack_into(self.buf, 8, self.end)
        self.gen += 1
        WORD.pack_into(self.buf, 0, self.gen)


class _MemoryJournal:
    """Frames in memory, for a worker with no parent to read them after a crash (Ray)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.gen = 0
        self.end = HEADER.size  # as if it had a header, so both journals compare alike

    def append(self, frame: bytes) -> int:
        self.buf += LENGTH.pack(len(frame))
        self.buf += frame
        self.end = HEADER.size + len(self.buf)
        return len(self.buf)

    def pending(self) -> bytes:
        return bytes(self.buf)

    def sent(self) -> None:
        self.buf.clear()
        self.end = HEADER.size
        self.gen += 1


class _RelayHandler(logging.Handler):
    """The handler on a worker's root logger: every record it sees goes to the relay."""

    def __init__(self, relay: WorkerRelay) -> None:
        super().__init__()
        self.relay = relay

    def handle(self, record: logging.LogRecord) -> bool:
        # Not Handler.handle: no handler lock, the relay takes its own to append.
        return self.relay.put_record(record)

    def emit(self, record: logging.LogRecord) -> None:
        self.relay.put_record(record)

    def flush(self) -> None:
        # logging.shutdown() at the worker's exit flushes every handler.
        self.relay.flush_quietly()


class _Saved:
    """The worker's own logging and warnings setup, put back when relaying stops."""

    def __init__(self) -> None:
        self.handlers: list[tuple[logging.Logger, list[logging.Handler]]] = []
        self.no_propagate: list[logging.Logger] = []
        self.levels: dict[str, int] = {}  # loggers given a level of the parent's
        self.root_level = logging.root.level
        self.disable = logging.Logger.manager.disable
        self.showwarning = warnings.showwarning
        self.filters = list(warnings.filters)
        self.defaultaction = str(getattr(warnings, "defaultaction", "default"))


class WorkerRelay:
    """The worker's half of the relay: one per worker process.

    ``send_bytes`` writes one message to the parent (the worker's
    ``conn.send_bytes``); ``None`` keeps the frames in memory until :meth:`take`
    (for an engine that returns them with the result, such as Ray). ``journal`` is
    the file the parent made for this worker (``LogReceiver.journal``), required
    with ``send_bytes``. ``words`` are the worker's shared int64 words: ``words[ITEM]``,
    the offset of the item a chunk runs, travels with each frame beside
    :attr:`index`.

    The worker calls :meth:`configure` with each batch's snapshot (``None``: do not
    relay), sets :attr:`index` before each task, and sends every message of its own
    through :meth:`send`, so that frames always precede the result of the task that
    wrote them.
    """

    def __init__(
        self,
        send_bytes: Callable[[bytes], Any] | None,
        journal: AnonFile | None = None,
        words: Any = None,
    ) -> None:
        self.lock = threading.RLock()
        self.index = 0
        self._words = words
        self._send_bytes = send_bytes
        self._journal: _Journal | _MemoryJournal
        if send_bytes is None:
            self._journal = _MemoryJournal()
            self._flush_at = sys.maxsize
        else:
            if journal is None:
                raise ValueError("a relay that sends needs its journal")
            self._journal = _Journal(journal)
            self._flush_at = FLUSH_BYTES
        self._handler = _RelayHandler(self)
        self._snapshot: Snapshot | None = None
        # Modules of the parent's warning categories not imported here (yet).
        self._unloaded: frozenset[str] = frozenset()
        self._saved: _Saved | None = None
        self._root_level = logging.WARNING
        self._disable = 0
        self._levels: dict[str, int] = {}
        self._off: frozenset[str] = frozenset()
        self._thresholds: dict[str, int] = {}
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork_in_child(ref))

    @property
    def active(self) -> bool:
        """Whether records and warnings are being relayed."""
        return self._saved is not None

    # -- per batch ---------------------------------------------------------------

    def configure(self, snap: Snapshot | None) -> None:
        """Relay under the parent's ``snap`` of levels and filters; ``None``: stop relaying."""
        if snap is None:
            if self._saved is not None:
                self._uninstall()
            return
        if self._saved is None:
            self._install()
        elif self._handler not in logging.root.handlers:  # basicConfig(force=True) in a task
            logging.root.addHandler(self._handler)
        if snap != self._snapshot or any(m in sys.modules for m in self._unloaded):
            self._apply(snap)
        self._apply_levels()  # a task may have changed them

    def _install(self) -> None:
        saved = self._saved = _Saved()
        root = logging.root
        for logger in [root, *logging.Logger.manager.loggerDict.values()]:
            if not isinstance(logger, logging.Logger):  # a PlaceHolder
                continue
            if logger.handlers:
                saved.handlers.append((logger, logger.handlers[:]))
                for handler in logger.handlers[:]:
                    logger.removeHandler(handler)
            if not logger.propagate:  # its records must reach the root's handler
                saved.no_propagate.append(logger)
                logger.propagate = True
        root.addHandler(self._handler)
        warnings.showwarning = self._showwarning

    def _uninstall(self) -> None:
        self.flush_quietly()
        saved = self._saved
        assert saved is not None
        self._saved = None
        self._snapshot = None
        self._unloaded = frozenset()
        root = logging.root
        root.removeHandler(self._handler)
        for logger, handlers in saved.handlers:
            for handler in handlers:
                if handler not in logger.handlers:
                    logger.addHandler(handler)
        for logger in saved.no_propagate:
            logger.propagate = False
        for name, level in saved.levels.items():
            logging.getLogger(name).setLevel(level)
        root.setLevel(saved.root_level)
        logging.disable(saved.disable)
        if warnings.showwarning == self._showwarning:
            warnings.showwarning = saved.showwarning
        _set_filters(saved.filters, saved.defaultaction)

    def _apply(self, snap: Snapshot) -> None:
        saved = self._saved
        assert saved is not None
        root_level, disable, levels, off, filters, defaultaction = snap
        self._snapshot = snap
        self._root_level = root_level
        self._disable = disable
        self._levels = dict(levels)
        self._off = frozenset(off)
        self._thresholds = {}
        for name in list(saved.levels):
            if name not in self._levels:  # the parent no longer sets it: the worker's own
                logging.getLogger(name).setLevel(saved.levels.pop(name))
        for name in self._levels:
            if name not in saved.levels:
                saved.levels[name] = logging.getLogger(name).level
        entries = []
        unloaded = set()
        for action, message, (cat_module, cat_name), module, lineno in filters:
            # Never imported for a filter (the parent's filters may name pytest's or a
            # big library's categories): while its module is not loaded here, no
            # warning of that category (or of a subclass) can be raised here either.
            # A task that imports it gets the filter from its next batch on; until
            # then the parent's own filters still decide whether it is shown.
            category = find_class(cat_module, cat_name, load=False)
            if category is None and cat_module not in sys.modules:
                unloaded.add(cat_module)
            # A category that cannot be found here cannot be raised here either.
            if isinstance(category, type) and issubclass(category, Warning):
                entries.append((action, message, category, module, lineno))
        self._unloaded = frozenset(unloaded)
        _set_filters(entries, defaultaction)

    def _apply_levels(self) -> None:
        root = logging.root
        if root.level != self._root_level:
            root.setLevel(self._root_level)
        if logging.Logger.manager.disable != self._disable:
            logging.disable(self._disable)
        for name, level in self._levels.items():
            logger = logging.getLogger(name)
            if logger.level != level:
                logger.setLevel(level)

    def _threshold(self, name: str) -> int:
        """The parent's effective level for logger ``name``, as ``isEnabledFor`` sees it."""
        if name in self._off:
            level = sys.maxsize
        else:
            level = self._root_level
            part = name
            while part:
                found = self._levels.get(part)
                if found is not None:
                    level = found
                    break
                part = part.rpartition(".")[0]
            level = max(level, self._disable + 1)
        self._thresholds[name] = level
        return level

    # -- per record --------------------------------------------------------------

    def put_record(self, record: logging.LogRecord) -> bool:
        """Journal ``record`` if the parent's level for its logger lets it through."""
        threshold = self._thresholds.get(record.name)
        if threshold is None:
            threshold = self._threshold(record.name)
        if record.levelno < threshold:
            return False
        words = self._words
        try:
            frame = encode_record(record, self.index, words[ITEM] if words is not None else 0)
        except Exception:  # a message that does not format: as any handler would
            self._handler.handleError(record)
            return False
        self._put(frame)
        return True

    def _showwarning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        if file is not None or self._saved is None:  # to a given file, or not relaying
            _ORIGINAL_SHOWWARNING(message, category, filename, lineno, file, line)
            return
        words = self._words
        frame = pickle.dumps(
            (
                WARNING,
                self.index,
                words[ITEM] if words is not None else 0,
                str(message),
                category.__module__,
                category.__qualname__,
                filename,
                lineno,
                _module_at(filename, lineno),
            ),
            PROTOCOL,
        )
        self._put(frame)

    def _put(self, frame: bytes) -> None:
        try:
            with self.lock:
                waiting = self._journal.append(frame)
                if waiting >= self._flush_at:
                    self._flush_locked()
                elif waiting == LENGTH.size + len(frame):
                    self._wake_flusher()  # the first frame waiting
                elif waiting < 0:  # no room left
                    self._flush_locked()
                    if self._journal.append(frame) < 0:  # bigger than the journal
                        self._send(NOT_JOURNALED, LENGTH.pack(len(frame)) + frame)
                    else:
                        self._wake_flusher()
        except (OSError, ValueError):
            pass  # the parent is gone; the lifeline thread ends this worker

    # -- sending -----------------------------------------------------------------

    def _send(self, gen: int, frames: bytes) -> None:
        assert self._send_bytes is not None
        self._send_bytes(pickle.dumps((LOGS, gen, frames), PROTOCOL))

    def _flush_locked(self) -> None:
        journal = self._journal
        if journal.end != HEADER.size and self._send_bytes is not None:
            self._send(journal.gen, journal.pending())
            journal.sent()

    def flush(self) -> None:
        """Send the frames waiting now (``OSError`` if the pipe is broken)."""
        with self.lock:
            self._flush_locked()

    def flush_quietly(self) -> None:
        """:meth:`flush`, ignoring a broken pipe."""
        with contextlib.suppress(OSError, ValueError):
            self.flush()

    def send(self, data: bytes) -> None:
        """Send one message of the worker's own, after the frames waiting before it."""
        send_bytes = self._send_bytes
        assert send_bytes is not None
        with self.lock:
            if self._journal.end != HEADER.size:
                self._flush_locked()
            send_bytes(data)

    def take(self) -> bytes:
        """The frames waiting (a relay without ``send_bytes``), for ``LogReceiver.deliver``."""
        with self.lock:
            frames = bytes(self._journal.pending())
            self._journal.sent()
        return frames

    def _wake_flusher(self) -> None:
        if self._send_bytes is None:
            return
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=_flush_later, args=(weakref.ref(self), self._wake), daemon=True
            )
            self._flusher.name = "alloter_mp-logs"
            self._flusher.start()
        self._wake.set()

    def _forked(self) -> None:
        # A process the task forked must not write into this worker's pipe or
        # journal: its records go where an unconfigured process's go.
        self._send_bytes = None
        self._journal = _MemoryJournal()
        self._flush_at = sys.maxsize
        with contextlib.suppress(Exception):
            logging.root.removeHandler(self._handler)
        if warnings.showwarning == self._showwarning:
            warnings.showwarning = _ORIGINAL_SHOWWARNING
        self._saved = None


def _after_fork_in_child(ref: weakref.ref[WorkerRelay]) -> None:
    relay = ref()
    if relay is not None:
        relay._forked()


def _flush_later(ref: weakref.ref[WorkerRelay], wake: threading.Event) -> None:
    while True:
        wake.wait()
        time.sleep(FLUSH_INTERVAL)
        wake.clear()
        relay = ref()
        if relay is None:
            return
        relay.flush_quietly()
        del relay


def _set_filters(entries: Iterable[Any], defaultaction: str) -> None:
    warnings.resetwarnings()  # marks the filters changed: warning registries start over
    warnings.filters[:] = entries  # type: ignore[index]
    setattr(warnings, "defaultaction", defaultaction)  # noqa: B010 - not in typeshed


def find_class(module: str, qualname: str, *, load: bool = True) -> Any:
    """The object ``module.qualname``, importing its module if need be (and ``load``);
    ``None`` if absent."""
    found: Any = sys.modules.get(module)
    if found is None:
        if not load:
            return None
        try:
            found = __import__(module, fromlist=["_"])
        except Exception:
            return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


def _module_at(filename: str, lineno: int) -> str | None:
    """The module name of the frame that issued a warning (what filters match)."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            break
        if frame.f_lineno == lineno and frame.f_code.co_filename == filename:
            name = frame.f_globals.get("__name__")
            return name if isinstance(name, str) else None
        frame = frame.f_back
    return None


def encode_record(record: logging.LogRecord, index: int, offset: int) -> bytes:
    """One record as a frame (see the module docstring)."""
    attrs = record.__dict__
    exc_text = record.exc_text
    if record.exc_info and not exc_text:
        exc_text = _formatter.formatException(record.exc_info)
    extras = _extras(attrs) if len(attrs) > len(BASE_ATTRS) else None
    return pickle.dumps(
        (
            RECORD,
            index,
            offset,
            _get_fields(attrs),
            record.getMessage(),
            exc_text,
            record.stack_info,
            extras,
        ),
        PROTOCOL,
    )


def _extras(attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[bytes, str]]] | None:
    """Attributes beyond a plain record's (``extra=``): scalars as they are, anything
    else pickled apart with its ``repr``, so one that does not unpickle in the parent
    costs only itself."""
    plain: dict[str, Any] = {}
    packed: dict[str, tuple[bytes, str]] = {}
    for key, value in attrs.items():
        if key in _NOT_EXTRA:
            continue
        if isinstance(value, _SCALARS):
            plain[key] = value
            continue
        text = _safe_repr(value)
        try:
            packed[key] = (pickle.dumps(value, PROTOCOL), text)
        except Exception:
            plain[key] = text
    return (plain, packed) if plain or packed else None


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"
