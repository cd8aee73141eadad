"""The test process's logging, as the relay tests look at it: a handler that keeps
what it is handed, and the root logger set up for a test and put back after it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

# The loggers the tests give levels, filters or propagate=False: reset afterwards.
TOUCHED = ("app", "app.db", "noisy", "other")


class Collect(logging.Handler):
    """Keeps every record it is handed, with when it was handed."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.arrived: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.append(time.time())

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@contextlib.contextmanager
def root_logs() -> Iterator[Collect]:
    """A handler on the root logger at INFO; the logging setup is put back afterwards."""
    root = logging.getLogger()
    saved = (root.level, root.handlers[:], logging.root.manager.disable)
    handler = Collect()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.disable(saved[2])
        for name in TOUCHED:
            logger = logging.getLogger(name)
            logger.setLevel(logging.NOTSET)
            logger.filters.clear()
            logger.disabled = False
            logger.propagate = True
