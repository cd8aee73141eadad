"""The calls every alloter offers, whatever runs the tasks.

:class:`BatchAlloter` turns a call (``exec``, ``exec_with_context``, ``exec_report``,
``map``, ``imap``) into a :class:`~alloter_mp._batch.Batch`, checking and pickling
the tasks first so that bad input fails before anything starts, hands the batch to
its runner through :meth:`BatchAlloter._submit` and waits for the outcome. The local
process pool and Ray are two runners behind this one class, so the outcomes of a
call are the same on both.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any, TypeVar

from . import _mapping, _transport
from ._batch import Batch, wait_interruptibly
from ._context import Context
from ._cpus import available_cpus
from ._errors import Cancelled, ExecTimeout, SerializationError
from ._progress import attach_progress
from ._report import Report, build_report

__all__ = ["BatchAlloter"]

# Tasks pickled together up to this size are sent as one blob per worker.
BLOB_MOST = 1 << 20

T = TypeVar("T")
R = TypeVar("R")
_A = TypeVar("_A", bound="BatchAlloter")


def _check_seconds(name: str, value: float | None, *, allow_zero: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, not {value!r}")
    return float(value)


def _check_limit(limit: int | None) -> int:
    if limit is None:
        return available_cpus()
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    return limit or available_cpus()


def _check_memory(memory_limit: int | None) -> int | None:
    if memory_limit is None:
        return None
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int):
        raise TypeError(f"memory_limit must be an int (bytes) or None, not {memory_limit!r}")
    if memory_limit <= 0:
        raise ValueError(f"memory_limit must be > 0 bytes, not {memory_limit}")
    return memory_limit


class BatchAlloter:
    """The calls of an alloter; a subclass says how a batch's tasks are run.

    Subclasses set the options below in ``__init__`` and implement :meth:`_submit`
    (hand a batch to the runner, which reports every task's fate to the batch) and
    :meth:`close`.
    """

    _limit: int
    _timeout: float | None
    _cancel_grace: float
    _memory_limit: int | None
    _progress: bool
    # Tasks pickled together up to this size travel as one blob (0: one by one).
    _blob_most: int = BLOB_MOST

    def _set_options(
        self,
        limit: int,
        timeout: float | None,
        cancel_grace: float | None,
        memory_limit: int | None,
        progress: bool,
    ) -> None:
        self._limit = limit
        self._timeout = _check_seconds("timeout", timeout)
        grace = _check_seconds("cancel_grace", cancel_grace, allow_zero=True)
        self._cancel_grace = 0.0 if grace is None else grace
        self._memory_limit = _check_memory(memory_limit)
        self._progress = bool(progress)

    def _submit(self, batch: Batch) -> None:
        """Hand ``batch`` to the runner (it must settle every slot, come what may)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what this alloter holds."""
        raise NotImplementedError

    # -- properties ------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The most tasks of this alloter that run at once."""
        return self._limit

    @property
    def timeout(self) -> float | None:
        """Seconds for one whole call, or ``None``."""
        return self._timeout

    # -- running ---------------------------------------------------------------

    def exec(self, *tasks: Callable[[], Any]) -> list[Any]:
        """Run every task; return their results in task order.

        Raises :class:`TaskError` (or :class:`WorkerCrashed`) as soon as the first
        task fails, :class:`ExecTimeout` when the timeout passes; in both cases the
        other tasks are ended.
        """
        return self._call(tasks, None)

    def exec_with_context(self, ctx: Context, *tasks: Callable[[], Any]) -> list[Any]:
        """Like :meth:`exec`, ended by ``ctx``: :class:`Cancelled` when it is
        cancelled, :class:`ExecTimeout` when its deadline passes."""
        if not isinstance(ctx, Context):
            raise TypeError(f"ctx must be an alloter_mp.Context, not {type(ctx).__name__}")
        return self._call(tasks, ctx)

    def exec_report(self, *tasks: Callable[[], Any], ctx: Context | None = None) -> Report:
        """Run like :meth:`exec`, but return a :class:`Report` instead of raising.

        The report is complete: it waits until every task has ended (returned,
        been killed or been skipped) and says what each one cost.
        """
        started = time.perf_counter()
        batch = self._prepare(tasks, ctx, measure=True)
        self._run(batch, ctx, len(tasks), settle=True)
        return build_report(batch, time.perf_counter() - started)

    def map(
        self, fn: Callable[[T], R], iterable: Iterable[T], *, chunksize: int | None = None
    ) -> list[R]:
        """``fn(item)`` for every item, results in order, with the outcomes of :meth:`exec`.

        A failure's ``TaskError.index`` is the item's position. Items travel in chunks
        (``chunksize=None`` picks a size) so that tiny functions run at full speed.
        """
        if not isinstance(iterable, Sized):
            return list(self.imap(fn, iterable, chunksize=chunksize, ordered=True))
        self._check_map_args(fn, chunksize)
        started = time.monotonic()
        # A sequence is sliced as it is (a range stays a range); anything else is listed.
        source: Any = iterable
        items = source if isinstance(source, Sequence) else list(source)
        chunks = _mapping.chunk_list(fn, items, chunksize, self._limit)
        if not chunks:
            return []
        batch = self._prepare(chunks, None, started=started, locate=_mapping.first_unpicklable_item)
        batch.even = True
        for slot, chunk in zip(batch.slots, chunks, strict=True):
            slot.base = chunk.start
            slot.size = len(chunk.items)
        self._run(batch, None, len(iterable))
        return list(itertools.chain.from_iterable(batch.results()))

    def imap(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        chunksize: int | None = None,
        ordered: bool = True,
    ) -> Iterator[R]:
        """Like :meth:`map`, yielding results as they come.

        In input order, or in completion order with ``ordered=False``. The iterable
        is read lazily with a bounded number of items in flight. Closing the iterator
        early ends the outstanding work; the timeout counts from this call.
        """
        self._check_map_args(fn, chunksize)
        return _mapping.imap(self, fn, iterable, chunksize, ordered)

    @staticmethod
    def _check_map_args(fn: object, chunksize: object) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if chunksize is not None:
            if isinstance(chunksize, bool) or not isinstance(chunksize, int):
                raise TypeError("chunksize must be a positive int or None")
            if chunksize <= 0:
                raise ValueError("chunksize must be > 0")

    def __enter__(self: _A) -> _A:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one call ----------------------------------------------------------------

    def _call(self, tasks: tuple[Callable[[], Any], ...], ctx: Context | None) -> list[Any]:
        batch = self._prepare(tasks, ctx)
        self._run(batch, ctx, len(tasks))
        return batch.results()

    def _prepare(
        self,
        tasks: Sequence[Callable[[], Any]],
        ctx: Context | None,
        *,
        measure: bool = False,
        started: float | None = None,
        locate: Callable[[Any, int], int] | None = None,
    ) -> Batch:
        """Check and pickle the tasks (nothing starts if that fails), make the batch."""
        if started is None:
            started = time.monotonic()  # the call's timeout counts pickling too
        payloads, blob = self._payloads(tasks, locate)
        batch = self._new_batch(payloads, ctx, measure=measure, started=started)
        batch.blob = blob
        return batch

    def _run(self, batch: Batch, ctx: Context | None, total: int, *, settle: bool = False) -> None:
        """Submit ``batch`` and wait for its outcome (and, with ``settle``, every task)."""
        token = self._launch(batch, ctx, total)
        try:
            self._wait(batch, settle=settle)
        finally:
            self._finish(batch, ctx, token)

    def _payloads(
        self,
        tasks: Sequence[Callable[[], Any]],
        locate: Callable[[Any, int], int] | None = None,
    ) -> tuple[list[Any], bytes | None]:
        """Per-task payloads, or one blob of all tasks when that is small enough.

        Pickling the list at once writes shared code and globals once, which makes
        many small tasks much cheaper; big tasks are pickled one by one so that a
        worker is only sent what it runs.
        """
        for i, task in enumerate(tasks):
            if not callable(task):
                raise TypeError(f"task {i} is not callable: {task!r}")
        if len(tasks) > 1 and self._blob_most > 0:
            try:
                blob = _transport.dumps_tasks(tasks)
            except Exception:
                blob = None  # find which task fails below
            if blob is not None and len(blob) <= self._blob_most:
                return [None] * len(tasks), blob
        payloads = []
        for i, task in enumerate(tasks):
            try:
                payloads.append(_transport.dumps(task))
            except Exception as exc:
                # For a map, ``locate`` turns the chunk's position into the item's.
                index = i if locate is None else locate(task, i)
                raise SerializationError(index, f"{type(exc).__name__}: {exc}") from exc
        return payloads, None

    def _new_batch(
        self,
        payloads: list[Any],
        ctx: Context | None,
        *,
        measure: bool = False,
        open_input: bool = False,
        started: float | None = None,
    ) -> Batch:
        if ctx is not None:
            if ctx.cancelled:
                raise _cancelled_error(ctx)
            if ctx.expired:
                raise ExecTimeout("the context's deadline had passed before the call")
        now = time.monotonic() if started is None else started
        deadline = None if self._timeout is None else now + self._timeout
        message = f"the call did not finish within its timeout of {self._timeout} s"
        if (
            ctx is not None
            and ctx.deadline is not None
            and (deadline is None or ctx.deadline < deadline)
        ):
            deadline = ctx.deadline
            message = "the context's deadline passed before the call finished"
        return Batch(
            payloads,
            deadline=deadline,
            cancel_grace=self._cancel_grace,
            timeout_message=message,
            measure=measure or self._memory_limit is not None,
            open_input=open_input,
        )

    def _launch(self, batch: Batch, ctx: Context | None, total: int | None) -> Any:
        """Submit ``batch``; returns what :meth:`_finish` needs to clean up."""
        if batch.decided.is_set():
            return (None, None)
        bar = attach_progress(batch, total) if self._progress else None
        token = None
        if ctx is not None:
            token = ctx._on_cancel(lambda: batch.cancel(_cancelled_error(ctx)))
        try:
            self._submit(batch)
        except BaseException:
            if ctx is not None:
                ctx._remove_callback(token)
            if bar is not None:
                bar.close()
            raise
        return (token, bar)

    @staticmethod
    def _wait(batch: Batch, *, settle: bool) -> None:
        try:
            batch.wait_decided()
            if settle:
                wait_interruptibly(batch.settled)
        except BaseException:
            # KeyboardInterrupt (or any other escape): end the call's tasks, then go.
            batch.cancel(Cancelled("the caller was interrupted"))
            raise

    @staticmethod
    def _finish(batch: Batch, ctx: Context | None, token: Any) -> None:
        cancel_token, bar = token
        if ctx is not None:
            ctx._remove_callback(cancel_token)
        if bar is not None:
            bar.close()


def _cancelled_error(ctx: Context) -> Cancelled:
    reason = ctx.reason
    return Cancelled("the context was cancelled" + (f": {reason}" if reason is not None else ""))
