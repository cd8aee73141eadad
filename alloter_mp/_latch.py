"""Latch: a one-way ``threading.Event`` that is cheap to make.

Every call makes two (its batch is decided, its tasks settled), and a
``threading.Event`` (a ``Condition`` over a lock) costs more to make than a whole
round trip's worth of other bookkeeping. A latch is one lock, taken when it is made
and released once, when it is set; each waiter takes it and hands it on at once, so
all of them wake. It cannot be cleared, which no batch needs.
"""

from __future__ import annotations

import _thread
import contextlib

__all__ = ["Latch"]


class Latch:
    """``set()`` once; ``is_set()`` and ``wait(timeout)`` as ``threading.Event``'s."""

    __slots__ = ("_flag", "_gate")

    def __init__(self) -> None:
        self._flag = False
        self._gate = _thread.allocate_lock()
        self._gate.acquire()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        # Two threads setting it at once: the other one may have opened it already.
        with contextlib.suppress(RuntimeError):
            self._gate.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        if timeout is None:
            got = self._gate.acquire()
        elif timeout <= 0:
            return self._flag
        else:
            got = self._gate.acquire(timeout=timeout)
        if got:
            self._gate.release()  # the next waiter's turn
        return self._flag

    def __repr__(self) -> str:
        return f"<Latch {'set' if self._flag else 'unset'}>"
