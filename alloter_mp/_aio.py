"""The asyncio face: awaitable calls on every alloter.

An awaited call is the plain call's batch, awaited instead of waited for:

* the tasks are checked and pickled in the event loop (the only work done there),
  the batch is handed to the alloter's runner, and the coroutine awaits a future
  that the runner's own thread resolves through ``loop.call_soon_threadsafe`` when
  the batch's outcome is known (:class:`~alloter_mp._batch.Latch`): no thread per
  call, nothing blocking the loop, so thousands of calls may be awaited at once;
* the call's deadline is a timer of the loop, so an ``ExecTimeout`` comes on time
  even while the runner is busy;
* when the awaiting coroutine is cancelled (``task.cancel()``, ``asyncio.timeout``,
  ``wait_for``, a failing ``TaskGroup`` sibling), the batch is cancelled — queued
  tasks never start, running ones are told and killed after the grace — and the
  coroutine waits until every task of the call has ended (``settled``, not
  ``decided``) before the ``CancelledError`` goes on, unchanged.

``imap_async`` feeds an open batch as ``imap`` does, from a plain or an async
iterable, a bounded number of chunks ahead of the consumer.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence, Sized
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import _mapping, _transport
from ._batch import LOGS_WAIT, Batch, Latch, Slot
from ._context import Context
from ._errors import Cancelled, SerializationError
from ._options import check_chunksize, check_errors, check_fn
from ._report import Report, build_report
from ._states import TaskStatus

if TYPE_CHECKING:
    # Imported where a coroutine runs (an event loop runs, so it is loaded): at the
    # top it would load asyncio, and with it ssl and OpenSSL, into every program
    # and every spawned worker that imports alloter_mp (0.1 s, 3 MB).
    import asyncio


class Launch(Protocol):
    """A launched call (``_calls.Launch``): its progress bar, if any."""

    bar: Any


class Caller(Protocol):
    """What the awaitable calls need of the calls' machinery (``_calls.Caller``)."""

    parallelism: int

    def prepare(
        self, tasks: Sequence[Callable[[], Any]], ctx: Context | None, *, measure: bool = False
    ) -> Batch: ...

    def map_batch(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        chunksize: int | None,
        *,
        keep_going: bool = False,
    ) -> Batch | None: ...

    def chunksize_for(self, chunksize: int | None, keep_going: bool) -> int | None: ...

    def new_batch(
        self,
        payloads: list[Any],
        ctx: Context | None,
        *,
        open_input: bool = False,
        keep_going: bool = False,
        chunked: bool = False,
    ) -> Batch: ...

    def launch(self, batch: Batch, ctx: Context | None, total: int | None) -> Launch: ...

    def finish(self, launch: Any) -> None: ...


__all__ = ["AsyncCalls", "AsyncResults"]

T = TypeVar("T")
R = TypeVar("R")


class AsyncCalls:
    """The awaitable calls of an alloter (a base of every alloter's class)."""

    _caller: Caller

    async def exec_async(self, *tasks: Callable[[], Any], ctx: Context | None = None) -> list[Any]:
        """``await`` form of :meth:`exec` (``exec_with_context`` when ``ctx`` is given).

        Same outcomes. Cancelling the awaiting task ends the call's tasks (queued ones
        never start, running ones are told and killed after ``cancel_grace``) and
        returns only once all have ended; then ``CancelledError`` propagates.
        """
        _check_ctx(ctx)
        caller = self._caller
        batch = caller.prepare(tasks, ctx)
        await _run(caller, batch, ctx, len(tasks), settle=False)
        return batch.results()

    async def exec_report_async(
        self, *tasks: Callable[[], Any], ctx: Context | None = None
    ) -> Report:
        """``await`` form of :meth:`exec_report` (cancellation as for :meth:`exec_async`)."""
        _check_ctx(ctx)
        caller = self._caller
        started = time.perf_counter()
        batch = caller.prepare(tasks, ctx, measure=True)
        await _run(caller, batch, ctx, len(tasks), settle=True)
        return build_report(batch, time.perf_counter() - started)

    async def map_async(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T] | AsyncIterable[T],
        *,
        chunksize: int | None = None,
        errors: str = "raise",
    ) -> list[R]:
        """``await`` form of :meth:`map`; ``iterable`` may also be an async iterable."""
        keep_going = check_errors(errors)
        check_fn(fn)
        chunksize = check_chunksize(chunksize)
        if not isinstance(iterable, Sized) or hasattr(iterable, "__aiter__"):
            results = self.imap_async(fn, iterable, chunksize=chunksize, errors=errors)
            try:
                return [item async for item in results]
            finally:
                await results.aclose()
        source: Any = iterable
        items = source if isinstance(source, Sequence) else list(source)
        caller = self._caller
        batch = caller.map_batch(fn, items, chunksize, keep_going=keep_going)
        if batch is None:
            return []
        await _run(caller, batch, None, len(items), settle=False)
        return list(itertools.chain.from_iterable(batch.results()))

    def imap_async(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T] | AsyncIterable[T],
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        errors: str = "raise",
    ) -> AsyncResults:
        """``async for`` form of :meth:`imap`, over a plain or an async iterable.

        The iterable is read lazily, a bounded number of items ahead. Leaving the
        ``async for`` early (or cancelling the task iterating) ends the outstanding
        work; ``aclose()`` also waits until it has ended.
        """
        keep_going = check_errors(errors)
        check_fn(fn)
        chunksize = check_chunksize(chunksize)
        return AsyncResults(self._caller, fn, iterable, chunksize, ordered, keep_going)


def _check_ctx(ctx: object) -> None:
    if ctx is not None and not isinstance(ctx, Context):
        raise TypeError(f"ctx must be an alloter_mp.Context, not {type(ctx).__name__}")


# -- awaiting a batch ----------------------------------------------------------------------


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Callable[[], None]:
    """A callback for any thread that resolves ``future`` in ``loop``."""

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits
            loop.call_soon_threadsafe(_set_if_pending, future)

    return wake


async def _until(latch: Latch) -> None:
    """Until ``latch`` is set (its setter's thread tells the loop)."""
    import asyncio  # here: the package imports without it (see the top)

    if latch.is_set():
        return
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    latch.when_set(_waker(loop, future))
    await future


async def _until_settled(batch: Batch) -> None:
    """Until every task of ``batch`` has ended, whatever cancels the waiting task
    meanwhile (bounded by the grace and the kill escalation)."""
    import asyncio  # here: the package imports without it (see the top)

    waiting = asyncio.ensure_future(_until(batch.settled))
    while not waiting.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(waiting)


def _expire_on_time(batch: Batch) -> asyncio.TimerHandle | None:
    """A timer of the loop that expires ``batch`` at its deadline."""
    import asyncio  # here: the package imports without it (see the top)

    if batch.deadline is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.call_later(max(0.0, batch.deadline - time.monotonic()), batch.expire)


async def _logs_handed_over(batch: Batch) -> None:
    """As ``batch.wait_logs()``, without blocking the loop: once an ended batch's
    running tasks' records have reached the caller's logging (a short wait, bounded)."""
    import asyncio  # here: the package imports without it (see the top)

    drained = batch.logs_drained
    if drained is None or batch.end_kind is None:
        return
    end = time.monotonic() + LOGS_WAIT
    while not drained.is_set() and time.monotonic() < end:
        await asyncio.sleep(0.005)


async def _await_batch(batch: Batch, *, settle: bool) -> None:
    """Await the outcome of a launched batch (``settle``: every task's end).

    A cancellation of the awaiting task cancels the batch and waits for it to
    settle before it propagates, unchanged.
    """
    timer = _expire_on_time(batch)
    try:
        await _until(batch.settled if settle else batch.decided)
        await _logs_handed_over(batch)
    except BaseException:
        batch.cancel(Cancelled("the awaiting task was cancelled"))
        await _until_settled(batch)
        raise
    finally:
        if timer is not None:
            timer.cancel()


async def _run(
    caller: Caller, batch: Batch, ctx: Context | None, total: int, *, settle: bool
) -> None:
    launch = caller.launch(batch, ctx, total)
    try:
        await _await_batch(batch, settle=settle)
    finally:
        caller.finish(launch)


# -- imap_async ---------------------------------------------------------------------------------


class AsyncResults(AsyncIterator[Any]):
    """The results of ``imap_async``: an async iterator over an open batch it feeds.

    Reads its input (plain or async) lazily, a bounded number of chunks ahead of the
    consumer; results come in input order (or as they end, unordered). Leaving
    early ends the outstanding work: ``aclose()`` (and a cancellation while waiting
    for a result) waits until it has ended; an iterator merely dropped ends it at
    once, without waiting.
    """

    def __init__(
        self,
        caller: Caller,
        fn: Callable[[Any], Any],
        iterable: Iterable[Any] | AsyncIterable[Any],
        chunksize: int | None,
        ordered: bool,
        keep_going: bool,
    ) -> None:
        self._caller = caller
        self._fn = fn
        self._aiter: AsyncIterator[Any] | None = None
        self._iter: Any = None
        length = None
        if hasattr(iterable, "__aiter__"):
            self._aiter = iterable.__aiter__()
        else:
            self._iter = iter(iterable)
            length = len(iterable) if isinstance(iterable, Sized) else None
        chunksize = caller.chunksize_for(chunksize, keep_going)
        self._fixed = chunksize
        self._size = chunksize or _mapping._auto_chunksize(length, caller.parallelism) or 1
        self._total = length
        self._ordered = ordered
        self._keep_going = keep_going
        self._ahead = 2 * caller.parallelism + 2
        # Made now, so that the timeout counts from the call.
        self._batch = caller.new_batch(
            [], None, open_input=True, keep_going=keep_going, chunked=True
        )
        self._launch: Launch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._arrived: deque[Slot] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._pending: dict[int, Slot] = {}
        self._out: deque[Any] = deque()
        self._next_yield = 0
        self._taken = 0
        self._next_item = 0
        self._exhausted = False
        self._closed = False

    def __aiter__(self) -> AsyncResults:
        return self

    async def __anext__(self) -> Any:
        import asyncio  # here: the package imports without it (see the top)

        if self._out:
            return self._out.popleft()
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._launch is None:
                self._start()
            while not self._out:
                await self._step()
        except StopAsyncIteration:
            self._finish()
            raise
        except asyncio.CancelledError:
            await self._end(wait=True)
            raise
        except BaseException:
            await self._end(wait=False)
            raise
        return self._out.popleft()

    async def aclose(self) -> None:
        """End the outstanding work and wait until it has ended."""
        await self._end(wait=True)

    def __del__(self) -> None:
        if self._launch is not None and not self._closed:
            with contextlib.suppress(Exception):
                self._batch.cancel(Cancelled("the iterator was dropped before the end"))
                self._finish()

    # -- the steps -----------------------------------------------------------------------

    def _start(self) -> None:
        import asyncio  # here: the package imports without it (see the top)

        loop = self._loop = asyncio.get_running_loop()
        batch = self._batch
        launch = self._launch = self._caller.launch(batch, None, self._total)
        bar = launch.bar
        # The batch lives in the runner until it settles: its callbacks must not
        # keep this iterator alive, or one dropped early would never end its work.
        me = weakref.ref(self)

        def slot_done(slot: Slot) -> None:
            if bar is not None:
                bar.slot_done(slot)
            _call_soon(loop, lambda: _on(me, "_arrive", slot))

        batch.on_slot_done = slot_done
        batch.on_decided = lambda: _call_soon(loop, lambda: _on(me, "_wake"))
        self._timer = _expire_on_time(batch)

    def _arrive(self, slot: Slot) -> None:
        self._arrived.append(slot)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _step(self) -> None:
        """Feed input ahead, then take one finished chunk (or raise the outcome)."""
        batch = self._batch
        outstanding = self._count() - (self._next_yield if self._ordered else self._taken)
        while not self._exhausted and outstanding < self._ahead and not batch.ending:
            if not await self._feed():
                break
            outstanding += 1
        if (
            self._exhausted
            and (self._next_yield if self._ordered else self._taken) >= self._count()
        ):
            batch.results()  # raises the outcome, if any
            raise StopAsyncIteration
        while not self._arrived:
            if batch.outcome is not None:
                raise batch.outcome
            loop = self._loop
            assert loop is not None
            self._waiter = loop.create_future()
            await self._waiter
        slot = self._arrived.popleft()
        if batch.outcome is not None:
            raise batch.outcome
        self._adapt(slot)
        if not self._ordered:
            self._taken += 1
            self._out.extend(self._take(slot))
            return
        self._pending[slot.index] = slot
        while self._next_yield in self._pending:
            done = self._pending.pop(self._next_yield)
            self._next_yield += 1
            self._out.extend(self._take(done))

    def _count(self) -> int:
        return len(self._batch.slots)

    def _take(self, slot: Slot) -> list[Any]:
        result, slot.result = slot.result, None
        if slot.status is not TaskStatus.OK and result is None:
            return [slot.error]  # a keep-going batch's failed one-item chunk
        return result  # type: ignore[no-any-return]

    async def _feed(self) -> bool:
        items = await self._read(self._size)
        if not items:
            self._exhausted = True
            self._batch.close_input()
            return False
        try:
            payload = _transport.dumps(_mapping.Chunk(self._fn, items))
        except Exception as exc:
            position = self._next_item + _mapping._first_unpicklable(items)
            raise SerializationError(position, str(exc)) from exc
        self._batch.append(payload, base=self._next_item, size=len(items))
        self._next_item += len(items)
        return True

    async def _read(self, count: int) -> list[Any]:
        if self._aiter is None:
            return list(itertools.islice(self._iter, count))
        items = []
        for _ in range(count):
            try:
                items.append(await self._aiter.__anext__())
            except StopAsyncIteration:
                break
        return items

    def _adapt(self, slot: Slot) -> None:
        if self._fixed is not None or not isinstance(slot.result, list):
            return
        count = len(slot.result)
        if count and slot.wall_s > 0:
            per_item = slot.wall_s / count
            target = int(_mapping.TARGET_CHUNK_SECONDS / max(per_item, 1e-7))
            self._size = max(1, min(_mapping.MOST_PER_CHUNK, target, self._size * 4))
        elif count:
            self._size = min(_mapping.MOST_PER_CHUNK, self._size * 4)

    async def _end(self, *, wait: bool) -> None:
        """Leave early: end the outstanding work (and with ``wait``, wait for it)."""
        if self._closed:
            return
        self._closed = True
        self._out.clear()
        if self._launch is None:
            return
        batch = self._batch
        batch.cancel(Cancelled("the iterator was closed before the end"))
        if wait:
            await _until_settled(batch)
        self._finish()

    def _finish(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        launch, self._launch = self._launch, None
        if launch is not None:
            self._caller.finish(launch)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits
        loop.call_soon_threadsafe(callback)


def _on(ref: weakref.ref[AsyncResults], method: str, *args: Any) -> None:
    target = ref()
    if target is not None:
        getattr(target, method)(*args)
