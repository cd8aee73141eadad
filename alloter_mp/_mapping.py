"""map and imap: items sent in chunks through an open batch, read lazily.

Each chunk of items is one task of the batch (a :class:`Chunk`), so the batch rules
apply unchanged: the first failing item fails the call with its own index, the
timeout and cancellation end the outstanding chunks. The iterable is read only as
far as a bounded number of chunks ahead of what the consumer has taken.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from . import _task, _transport, _words
from ._batch import MAIN_THREAD_SLICE, Batch, Slot
from ._errors import Cancelled, SerializationError
from ._states import TaskStatus


class CallSteps(Protocol):
    """What the imap feeder needs of the calls' machinery (``_calls.Caller``)."""

    parallelism: int

    def chunksize_for(self, chunksize: int | None, keep_going: bool) -> int | None: ...

    def new_batch(
        self,
        payloads: list[Any],
        ctx: Any,
        *,
        open_input: bool = False,
        keep_going: bool = False,
        chunked: bool = False,
    ) -> Batch: ...

    def launch(self, batch: Batch, ctx: Any, total: int | None) -> Any: ...

    def finish(self, launch: Any) -> None: ...


__all__ = ["Chunk", "imap"]

# A chunk of unknown-length input aims at about this much work.
TARGET_CHUNK_SECONDS = 0.02
MOST_PER_CHUNK = 4096
# A chunk looks at the cancel flag once per this many items.
_BLOCK = 16


class Chunk:
    """Runs ``fn`` over a few items in a worker; a failure names its item.

    ``start`` (the first item's position) stays in the parent: it is not pickled.
    """

    __slots__ = ("fn", "items", "start")

    def __init__(self, fn: Callable[[Any], Any], items: Sequence[Any], start: int = 0) -> None:
        self.fn = fn
        self.items = items
        self.start = start

    def __call__(self) -> list[Any] | None:
        fn = self.fn
        items = self.items
        shared = _task.chunk_words()
        if shared is None:  # not in a pool worker (on Ray, or called directly)
            return self._run_slowly()
        words, batch_id = shared
        if _task.state.per_item:
            self._run_items(words, batch_id)
            return None
        cancel, item = _words.CANCEL_BATCH, _words.ITEM
        out: list[Any] = []
        append = out.append
        offset = 0
        try:
            # Each item's offset goes to shared memory, so that a crash names the
            # item; cancellation is looked at once per block, which keeps the loop
            # close to a plain map for tiny items.
            for start in range(0, len(items), _BLOCK):
                if words[cancel] == batch_id:
                    raise Cancelled("the call was cancelled")
                for offset in range(start, min(start + _BLOCK, len(items))):
                    words[item] = offset
                    append(fn(items[offset]))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                setattr(exc, _transport.OFFSET_ATTR, offset)
            raise
        return out

    def _run_items(self, words: memoryview, batch_id: int) -> None:
        """Run the items one by one, each reported as it ends (see ``per_item``).

        Each item is a task of its own here: it has its own start, deadline and key
        (so it alone can be told to stop), and its failure is its own outcome.
        """
        state = _task.state
        sink = state.item_sink
        assert sink is not None
        fn, items, seq = self.fn, self.items, state.seq
        offsets = state.offsets if state.offsets is not None else range(len(items))
        for offset in offsets:
            if words[_words.CANCEL_BATCH] == batch_id:
                raise Cancelled("the call was cancelled")
            start = time.monotonic()
            words[_words.START_NS] = int(start * 1e9)
            words[_words.ITEM] = offset
            state.key = _words.task_key(seq, offset)
            state.deadline = _task.sooner(state.call_deadline, state.task_timeout, start)
            try:
                value = fn(items[offset])
            except BaseException as exc:
                sink(
                    seq, offset, _task.ERR, _transport.capture_exception(exc, skip_frames=1), start
                )
                continue
            try:
                body = _transport.dumps_result(value)
            except BaseException as exc:
                sink(seq, offset, _task.ERR, _task.unpicklable_result(value, exc), start)
            else:
                sink(seq, offset, _task.OK, body, start)

    def _run_slowly(self) -> list[Any]:
        # The same rules through the public in-task API: cancellation looked at once
        # per block, a failing item's offset marked on its exception.
        fn = self.fn
        items = self.items
        state = _task.state
        out: list[Any] = []
        offset = 0
        try:
            for offset, item in enumerate(items):
                if offset % _BLOCK == 0 and _task.cancelled():
                    raise Cancelled("the call was cancelled")
                state.item = offset  # the item its log records name
                out.append(fn(item))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                setattr(exc, _transport.OFFSET_ATTR, offset)
            raise
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (Chunk, (self.fn, self.items))


def chunk_list(
    fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None, workers: int
) -> list[Chunk]:
    """Cut a sequence of items into chunks for ``map`` (a range stays a range)."""
    size = chunksize or _auto_chunksize(len(items), workers) or 1
    return [Chunk(fn, items[i : i + size], i) for i in range(0, len(items), size)]


def first_unpicklable_item(chunk: Chunk, position: int) -> int:
    """The position in the whole input of the item that makes ``chunk`` unpicklable."""
    return chunk.start + _first_unpicklable(list(chunk.items))


def _auto_chunksize(length: int | None, workers: int) -> int | None:
    if length is None:
        return None  # adapt to measured item times
    return max(1, min(MOST_PER_CHUNK, math.ceil(length / (8 * workers))))


def imap(
    caller: CallSteps,
    fn: Callable[[Any], Any],
    iterable: Iterable[Any],
    chunksize: int | None,
    ordered: bool,
    keep_going: bool = False,
) -> Iterator[Any]:
    """The body of ``imap`` (arguments already checked)."""
    length = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    chunksize = caller.chunksize_for(chunksize, keep_going)
    size = chunksize or _auto_chunksize(length, caller.parallelism)
    batch = caller.new_batch([], None, open_input=True, keep_going=keep_going, chunked=True)
    return _Feeder(caller, fn, iter(iterable), size, ordered, batch, length).run()


class _Feeder:
    """Feeds an open batch chunk by chunk, ahead of the consumer, and yields results."""

    def __init__(
        self,
        caller: CallSteps,
        fn: Callable[[Any], Any],
        items: Iterator[Any],
        size: int | None,
        ordered: bool,
        batch: Batch,
        total: int | None,
    ) -> None:
        self.caller = caller
        self.fn = fn
        self.items = items
        self.fixed = size
        self.size = size or 1
        self.ordered = ordered
        self.batch = batch
        self.done: queue.SimpleQueue[Slot | None] = queue.SimpleQueue()
        self.ahead = 2 * caller.parallelism + 2
        self.next_item = 0
        self.exhausted = False
        self.total = total  # items, when the input has a length (for the progress bar)

    def run(self) -> Iterator[Any]:
        batch = self.batch
        launch: Any = None
        try:
            launch = self.caller.launch(batch, None, self.total)
            batch.on_slot_done = self._slot_done_with(launch.bar)
            batch.on_decided = lambda: self.done.put(None)
            yield from self._loop()
        finally:
            batch.cancel(Cancelled("the iterator was closed before the end"))
            if launch is not None:
                self.caller.finish(launch)

    def _slot_done_with(self, bar: Any) -> Callable[[Slot], None]:
        put = self.done.put
        if bar is None:
            return put

        def both(slot: Slot) -> None:
            bar.slot_done(slot)
            put(slot)

        return both

    def _loop(self) -> Iterator[Any]:
        batch = self.batch
        pending: dict[int, Slot] = {}
        next_yield = 0
        taken = 0
        while True:
            outstanding = len(batch.slots) - (next_yield if self.ordered else taken)
            while not self.exhausted and outstanding < self.ahead and not batch.ending:
                if not self._feed():
                    break
                outstanding += 1
            if self.exhausted and (next_yield if self.ordered else taken) >= len(batch.slots):
                batch.results()  # raises the outcome if any
                return
            slot = self._next_done()
            if batch.outcome is not None:
                batch.wait_logs()
                raise batch.outcome
            if slot is None:
                continue
            self._adapt(slot)
            if not self.ordered:
                taken += 1
                yield from _take(slot)
                continue
            pending[slot.index] = slot
            while next_yield in pending:
                done = pending.pop(next_yield)
                next_yield += 1
                yield from _take(done)

    def _feed(self) -> bool:
        items = list(itertools.islice(self.items, self.size))
        if not items:
            self.exhausted = True
            self.batch.close_input()
            return False
        try:
            payload = _transport.dumps(Chunk(self.fn, items))
        except Exception as exc:
            raise SerializationError(self.next_item + _first_unpicklable(items), str(exc)) from exc
        self.batch.append(payload, base=self.next_item, size=len(items))
        self.next_item += len(items)
        return True

    def _next_done(self) -> Slot | None:
        deadline = self.batch.deadline
        # The main thread waits in slices so that a KeyboardInterrupt gets through.
        most = MAIN_THREAD_SLICE if threading.current_thread() is threading.main_thread() else None
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                self.batch.expire()
                return None
            if most is not None:
                timeout = most if timeout is None else min(timeout, most)
            try:
                return self.done.get(timeout=timeout)
            except queue.Empty:
                continue

    def _adapt(self, slot: Slot) -> None:
        if self.fixed is not None or slot.result is None:
            return
        count = len(slot.result)
        if count and slot.wall_s > 0:
            per_item = slot.wall_s / count
            target = int(TARGET_CHUNK_SECONDS / max(per_item, 1e-7))
            self.size = max(1, min(MOST_PER_CHUNK, target, self.size * 4))
        elif count:
            self.size = min(MOST_PER_CHUNK, self.size * 4)


def _take(slot: Slot) -> list[Any]:
    """A settled chunk's values (released from the slot), in item order."""
    result, slot.result = slot.result, None
    if result is None and slot.status is not TaskStatus.OK:
        # A keep-going batch's failed one-item chunk (items sent alone, as on Ray).
        return [slot.error]
    return result  # type: ignore[no-any-return]


def _first_unpicklable(items: list[Any]) -> int:
    for i, item in enumerate(items):
        try:
            _transport.dumps(item)
        except Exception:
            return i
    return 0
