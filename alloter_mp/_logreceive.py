"""The parent's half of the log relay: what a worker relays goes to the parent's logging.

:func:`snapshot` is what the parent sends with a batch so that the worker applies
the parent's levels and warning filters (:mod:`alloter_mp._logrelay`). A
:class:`LogReceiver` per worker turns the frames the worker sends back into records,
handed to ``logging.getLogger(record.name).handle(record)`` so the parent's
handlers, levels and filters decide, and into warnings, issued through
``warnings.warn_explicit`` so the parent's filters decide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from ._anonfile import AnonFile
from ._logrelay import (
    FIELDS,
    HEADER,
    JOURNAL_BYTES,
    LENGTH,
    NOT_JOURNALED,
    RECORD,
    Snapshot,
    find_class,
)

__all__ = ["LogReceiver", "snapshot"]


def snapshot() -> Snapshot:
    """The parent's logging levels and warning filters, as a worker applies them.

    Only loggers with a level or ``disabled`` set are listed: a worker derives every
    other logger's effective level from them, as :mod:`logging` does. Warning
    categories travel by name, so that a snapshot always pickles. Taken once per
    batch, and cheap when nothing changed since the last one (see :class:`_Cache`).
    """
    cached = _cache.get()
    if cached is not None:
        return cached
    manager = logging.Logger.manager
    levels: list[tuple[str, int]] = []
    off: list[str] = []
    for name, logger in list(manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):  # not a PlaceHolder
            if logger.level:
                levels.append((name, logger.level))
            if logger.disabled:
                off.append(name)
    root = logging.root
    if root.disabled:
        off.append(root.name)
    filters = tuple(
        (action, message, (category.__module__, category.__qualname__), module, lineno)
        for action, message, category, module, lineno in warnings.filters
        if isinstance(category, type)
    )
    default = str(getattr(warnings, "defaultaction", "default"))
    snap = (root.level, manager.disable, tuple(levels), tuple(off), filters, default)
    _cache.put(snap)
    return snap


class _Cache:
    """The last snapshot, while nothing it depends on has changed.

    Listing every logger costs about 0.1 us a logger, per batch. Logging clears each
    logger's ``_cache`` of level answers whenever a level changes (``setLevel``,
    ``logging.disable``), so a mark left in the root's tells that no level changed
    since the snapshot. The rest is compared: the warning filters, the default
    action, and the ``disabled`` flags the snapshot holds. A logger disabled since
    is not seen, which costs only its records' trip (the parent drops them).
    """

    _MARK = "alloter_mp.snapshot"

    def __init__(self) -> None:
        self.snap: Snapshot | None = None
        self.filters: tuple[Any, ...] = ()
        self.filters_list: Any = None

    def get(self) -> Snapshot | None:
        snap = self.snap
        level_cache = getattr(logging.root, "_cache", None)
        if snap is None or not isinstance(level_cache, dict) or self._MARK not in level_cache:
            return None
        filters = warnings.filters
        if (
            filters is not self.filters_list
            or len(filters) != len(self.filters)
            or tuple(filters) != self.filters
            or getattr(warnings, "defaultaction", "default") != snap[5]
            or not all(_disabled(name) for name in snap[3])
            or logging.root.disabled != (logging.root.name in snap[3])
        ):
            return None
        return snap

    def put(self, snap: Snapshot) -> None:
        level_cache = getattr(logging.root, "_cache", None)
        if isinstance(level_cache, dict):
            level_cache[self._MARK] = True
            self.snap = snap
            self.filters_list = warnings.filters
            self.filters = tuple(warnings.filters)


def _disabled(name: str) -> bool:
    logger = logging.Logger.manager.loggerDict.get(name)
    if logger is None:
        logger = logging.root if name == logging.root.name else None
    return isinstance(logger, logging.Logger) and logger.disabled


_cache = _Cache()


def _start_of_logging() -> float:
    # A relayed record's relativeCreated counts from the parent's import of logging,
    # as the parent's own records do. Nanoseconds from 3.13 on, seconds before.
    start = getattr(logging, "_startTime", None)
    if isinstance(start, int):
        return start / 1e9
    return start if isinstance(start, float) else 0.0


_START = _start_of_logging()


class LogReceiver:
    """The parent's half of the relay for one worker.

    :meth:`create` makes the journal to pass to the worker; :meth:`on_logs` handles a
    ``LOGS`` message; :meth:`recover` delivers what a dead worker had journaled but
    not sent. Use it from one thread (the supervisor). ``position(index, offset)``
    turns a frame's task index and chunk offset into ``record.task_index``; without
    it, their sum.
    """

    def __init__(self, journal: AnonFile | None = None) -> None:
        self.journal = journal
        self._last_gen = -1
        self._loggers: dict[str, logging.Logger] = {}
        self._registries: dict[str, dict[Any, Any]] = {}

    @classmethod
    def create(cls) -> LogReceiver:
        """A receiver with a new journal (pass :attr:`journal` to the worker)."""
        return cls(AnonFile.create("alloter_mp-logs", JOURNAL_BYTES))

    def close(self) -> None:
        """Release the journal."""
        if self.journal is not None:
            self.journal.close()

    def on_logs(
        self, msg: tuple[Any, ...], position: Callable[[int, int], int] | None = None
    ) -> None:
        """Handle a ``(LOGS, generation, frames)`` message from the worker."""
        _, gen, frames = msg
        if gen != NOT_JOURNALED:
            self._last_gen = gen
        self.deliver(frames, position)

    @property
    def last_gen(self) -> int:
        """The generation of the last journaled frames received (-1: none yet)."""
        return self._last_gen

    def unsent(self) -> int | None:
        """The generation of the last frames the live worker wrote that have not been
        received here, ``None`` when all were: those it journaled and has not sent
        yet, else those it sent last (perhaps still in the pipe). They arrive in a
        ``LOGS`` message of that generation (or, if the worker dies, by :meth:`recover`)."""
        journal = self.journal
        if journal is None or journal.fd < 0:
            return None
        gen, end = HEADER.unpack(os.pread(journal.fd, HEADER.size, 0))
        last = gen if end > HEADER.size else gen - 1
        return last if last > self._last_gen else None

    def recover(self, position: Callable[[int, int], int] | None = None) -> None:
        """Once the worker died and its pipe was read to the end: deliver the frames it
        had journaled but not sent."""
        journal = self.journal
        if journal is None or journal.fd < 0:
            return
        gen, end = HEADER.unpack(os.pread(journal.fd, HEADER.size, 0))
        if gen == self._last_gen or end <= HEADER.size:
            return
        self._last_gen = gen
        self.deliver(os.pread(journal.fd, end - HEADER.size, HEADER.size), position)

    def deliver(self, frames: bytes, position: Callable[[int, int], int] | None = None) -> None:
        """Hand each frame of ``frames`` to the parent's logging or warnings."""
        view = memoryview(frames)
        size = len(view)
        at = 0
        while at + LENGTH.size <= size:
            (length,) = LENGTH.unpack_from(view, at)
            start = at + LENGTH.size
            at = start + length
            if at > size:
                break  # torn: its worker died writing it
            try:
                item = pickle.loads(view[start:at])
                if item[0] == RECORD:
                    self._record(item, position)
                else:
                    self._warning(item)
            except Exception:  # a filter of the program's raised, say
                if logging.raiseExceptions:
                    _report_failure()

    def _record(self, item: tuple[Any, ...], position: Callable[[int, int], int] | None) -> None:
        _, index, offset, fields, message, exc_text, stack_info, extras = item
        name = fields[0]
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = logging.getLogger(name)
        if not logger.isEnabledFor(fields[1]):
            return
        fast = logging.getLogRecordFactory() is logging.LogRecord
        if fast:  # skips LogRecord.__init__, whose every field is replaced anyway
            record = logging.LogRecord.__new__(logging.LogRecord)
            attrs = record.__dict__
            attrs.update(zip(FIELDS, fields, strict=True))
        else:
            attrs = dict(zip(FIELDS, fields, strict=True))
        attrs["msg"] = message
        attrs["args"] = ()
        attrs["exc_info"] = None
        attrs["exc_text"] = exc_text
        attrs["stack_info"] = stack_info
        attrs["relativeCreated"] = (attrs["created"] - _START) * 1000.0
        if extras is not None:
            plain, packed = extras
            attrs.update(plain)
            for key, (data, text) in packed.items():
                try:
                    attrs[key] = pickle.loads(data)
                except Exception:  # its class exists only in the worker
                    attrs[key] = text
        attrs["task_index"] = index + offset if position is None else position(index, offset)
        if not fast:  # the program's own record factory makes it, then takes these
            record = logging.makeLogRecord(attrs)
        logger.handle(record)

    def _warning(self, item: tuple[Any, ...]) -> None:
        _, _index, _offset, text, cat_module, cat_name, filename, lineno, module = item
        category = find_class(cat_module, cat_name)
        message: Warning
        try:
            if not (isinstance(category, type) and issubclass(category, Warning)):
                raise TypeError(category)
            message = category(text)
        except Exception:  # not a class here, or one that wants other arguments
            message = UserWarning(f"{cat_name}: {text}")
        registry = self._registry(module or filename)
        try:
            warnings.warn_explicit(message, type(message), filename, lineno, module, registry)
        except Warning:
            # An "error" filter the worker did not apply (its category's module was
            # not loaded there when the batch began): nothing can be raised in the
            # task now, so the warning is shown rather than lost.
            warnings.showwarning(message, type(message), filename, lineno)

    def _registry(self, module: str) -> dict[Any, Any]:
        # Where a warning issued here from that module is remembered, so that the
        # "default" and "module" actions show it once, whoever issued it.
        namespace = getattr(sys.modules.get(module), "__dict__", None)
        if isinstance(namespace, dict):
            registry = namespace.setdefault("__warningregistry__", {})
            if isinstance(registry, dict):
                return registry
        return self._registries.setdefault(module, {})


def _report_failure() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write("alloter_mp: a task's log record or warning could not be handled:\n")
        traceback.print_exc(file=sys.stderr)
