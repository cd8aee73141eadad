"""A tqdm progress bar on stderr that counts a call's finished and failed tasks.

The bar advances by one as each task ends, whatever its status, and its postfix
says how many of those failed (raised, crashed or timed out) and, once there are
any, how many were cancelled or skipped because the call ended early.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ._batch import Batch, Slot
from ._states import TaskStatus

__all__ = ["Progress", "attach_progress"]

# Statuses counted as failures; "cancelled" and "skipped" are shown apart.
_FAILED = frozenset({TaskStatus.ERROR, TaskStatus.CRASHED, TaskStatus.TIMEOUT})


class Progress:
    """A call's progress bar: advanced by the runner's thread as tasks end."""

    def __init__(self, batch: Batch, total: int | None, desc: str) -> None:
        from tqdm import tqdm

        self._lock = threading.Lock()
        self._failed = 0
        self._ended = 0
        self._bar: Any = tqdm(total=total, desc=desc, file=sys.stderr, unit="task", leave=True)
        self._bar.set_postfix(failed=0, refresh=False)

    def slot_done(self, slot: Slot) -> None:
        with self._lock:
            if self._bar is None:
                return
            if slot.status in _FAILED:
                self._failed += 1
            elif slot.status is not TaskStatus.OK:
                self._ended += 1
            if slot.status is not TaskStatus.OK:
                postfix = {"failed": self._failed}
                if self._ended:
                    postfix["cancelled"] = self._ended
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(slot.size)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def attach_progress(batch: Batch, total: int | None, desc: str = "alloter_mp") -> Progress:
    """Show a bar for ``batch``; the caller closes it when the call returns."""
    bar = Progress(batch, total, desc)
    batch.on_slot_done = bar.slot_done
    return bar
