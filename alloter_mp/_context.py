"""Context: cancellation and deadlines passed down to a call, like Go's ``context``."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["Context", "on_cancel", "remove_callback"]


class Context:
    """A cancellation signal with an optional deadline, shared between threads.

    ``Context(timeout=5.0)`` ends 5 s from now; ``ctx.child(timeout=1.0)`` ends when
    ``ctx`` is cancelled, when its parent's deadline passes, or after 1 s, whichever
    comes first. ``cancel()`` may be called from any thread; it cancels every child.
    Cancellation wins over the deadline: once cancelled, a context reports itself
    cancelled even after its deadline passes.
    """

    def __init__(self, *, timeout: float | None = None, parent: Context | None = None) -> None:
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
            if timeout <= 0:
                raise ValueError(f"timeout must be > 0, not {timeout!r}")
        if parent is not None and not isinstance(parent, Context):
            raise TypeError(f"parent must be a Context or None, not {type(parent).__name__}")
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._reason: Any = None
        self._cancelled = False
        self._callbacks: dict[int, Callable[[], object]] = {}
        self._next_token = 0
        self._children: weakref.WeakSet[Context] = weakref.WeakSet()
        own = None if timeout is None else time.monotonic() + float(timeout)
        self._parent = parent
        parent_deadline = parent.deadline if parent is not None else None
        candidates = [d for d in (own, parent_deadline) if d is not None]
        self._deadline = min(candidates) if candidates else None
        if parent is not None:
            parent._adopt(self)

    # -- reading -------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """The ``time.monotonic()`` instant this context expires, or ``None``."""
        return self._deadline

    @property
    def cancelled(self) -> bool:
        """``True`` once ``cancel()`` was called on this context or an ancestor."""
        return self._cancelled

    @property
    def expired(self) -> bool:
        """``True`` once the deadline has passed (cancelled or not)."""
        return self._deadline is not None and time.monotonic() >= self._deadline

    @property
    def done(self) -> bool:
        """``True`` when cancelled or expired: a call under this context would not start."""
        return self._cancelled or self.expired

    @property
    def reason(self) -> Any:
        """What was passed to ``cancel()``, if anything."""
        return self._reason

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or ``None`` without one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the context is done (cancelled or expired) or ``timeout`` passes.

        Returns ``True`` when the context is done, ``False`` when ``timeout`` ran out first.
        """
        limit = None if timeout is None else time.monotonic() + max(0.0, timeout)
        ends = [d for d in (limit, self._deadline) if d is not None]
        end = min(ends) if ends else None
        remaining = None if end is None else max(0.0, end - time.monotonic())
        if self._event.wait(remaining):
            return True
        return self.done

    # -- changing ------------------------------------------------------------

    def cancel(self, reason: Any = None) -> None:
        """Cancel this context and all its children. Idempotent; thread-safe."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            self._reason = reason
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
            children = list(self._children)
            self._event.set()
        for callback in callbacks:
            callback()
        for child in children:
            child.cancel(reason)

    def child(self, timeout: float | None = None) -> Context:
        """A new context cancelled with this one, whose deadline is the sooner of both."""
        return Context(timeout=timeout, parent=self)

    # -- for children and the alloters (see on_cancel) -------------------------

    def _adopt(self, child: Context) -> None:
        with self._lock:
            if not self._cancelled:
                self._children.add(child)
                return
        child.cancel(self._reason)

    def _on_cancel(self, callback: Callable[[], object]) -> int | None:
        """Call ``callback`` (once) when cancelled; returns a token, or runs it now."""
        with self._lock:
            if not self._cancelled:
                self._next_token += 1
                self._callbacks[self._next_token] = callback
                return self._next_token
        callback()
        return None

    def _remove_callback(self, token: int | None) -> None:
        if token is not None:
            with self._lock:
                self._callbacks.pop(token, None)

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else ("expired" if self.expired else "active")
        left = self.time_left()
        extra = "" if left is None else f", {left:.3f}s left"
        return f"<Context {state}{extra}>"


def on_cancel(ctx: Context, callback: Callable[[], object]) -> int | None:
    """Call ``callback`` once when ``ctx`` is cancelled (at once if it already is).

    Returns a token for :func:`remove_callback` (``None`` if it already ran).
    """
    return ctx._on_cancel(callback)


def remove_callback(ctx: Context, token: int | None) -> None:
    """Forget a callback registered with :func:`on_cancel`."""
    ctx._remove_callback(token)
