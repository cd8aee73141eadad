"""The calls every alloter offers, whatever runs the tasks.

A call (``exec``, ``exec_with_context``, ``exec_report``, ``map``, ``imap``) goes
through the same four steps, done by a :class:`Caller`:

1. check and pickle the tasks, so that bad input fails before anything starts;
2. make a :class:`~alloter_mp._batch.Batch` with the call's deadline and options;
3. hand it to the alloter's runner (the local pool, Ray), which reports every
   task's fate to the batch;
4. wait for the batch's outcome (and, for a report, for every task to settle).

:class:`BatchAlloter` is the public face of those calls; a subclass only says which
runner runs its batches. So the outcomes of a call are the same on every runner.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from . import _context, _mapping, _shm, _transport
from ._aio import AsyncCalls
from ._batch import Batch, wait_interruptibly
from ._context import Context
from ._errors import Cancelled, ExecTimeout, SerializationError
from ._options import CallOptions, check_chunksize, check_errors, check_fn
from ._progress import Progress, attach_progress
from ._report import Report, build_report

__all__ = ["BatchAlloter", "Caller", "Runner", "caller_of"]

# Tasks pickled together up to this size are sent as one blob per worker.
BLOB_MOST = 1 << 20
# How long a call whose tasks have all ended waits for its workers to let go of its
# shared segments (they answer at once unless the machine is overloaded).
FREE_WAIT = 2.0

T = TypeVar("T")
R = TypeVar("R")
_A = TypeVar("_A", bound="BatchAlloter")


class Runner(Protocol):
    """What runs a batch's tasks: it must settle every task, come what may."""

    def submit(self, batch: Batch) -> None:
        """Start running ``batch`` (raise if the runner cannot take it)."""


@dataclass
class Launch:
    """What a launched call holds until it finishes: its context hook, progress bar
    and the shared segments of its arguments."""

    batch: Batch
    ctx: Context | None = None
    token: int | None = None
    bar: Progress | None = None


class Caller:
    """The machinery of one alloter's calls: its options, its runner, its batches.

    ``parallelism`` is how many tasks may run at once (chunk sizes and read-ahead
    are cut for it); ``blob_most`` is the size up to which a call's tasks are pickled
    together as one blob (0: each task on its own). With ``items_alone`` (a runner
    that hears of a task only when it ends: Ray), a map whose items are judged one by
    one (keep-going, task timeouts, retries) sends each item as a task of its own.
    With ``shares`` (a runner that sends the batch's shared segments along: the
    pool), big buffers of the tasks go to shared memory (``share_threshold``).
    """

    def __init__(
        self,
        options: CallOptions,
        runner: Runner,
        parallelism: int,
        blob_most: int = BLOB_MOST,
        *,
        items_alone: bool = False,
        shares: bool = False,
    ) -> None:
        self.options = options
        self.runner = runner
        self.parallelism = parallelism
        self.blob_most = blob_most
        self.items_alone = items_alone
        self.shares = shares

    def with_options(self, options: CallOptions) -> Caller:
        """The same runner and parallelism, other options."""
        return Caller(
            options,
            self.runner,
            self.parallelism,
            self.blob_most,
            items_alone=self.items_alone,
            shares=self.shares,
        )

    def outbox(self) -> _shm.Outbox | None:
        """Where a new call's big buffers go (``None``: they travel in the pickles)."""
        threshold = self.options.share_threshold
        return _shm.Outbox(threshold) if self.shares and threshold is not None else None

    def chunksize_for(self, chunksize: int | None, keep_going: bool) -> int | None:
        """The chunk size a map uses (one item per chunk where items must go alone)."""
        options = self.options
        judged = keep_going or options.task_timeout is not None or options.retries > 0
        return 1 if self.items_alone and judged else chunksize

    # -- a whole call --------------------------------------------------------------

    def call(self, tasks: Sequence[Callable[[], Any]], ctx: Context | None) -> list[Any]:
        """Run ``tasks``; their results in order, or raise the call's outcome."""
        batch = self.prepare(tasks, ctx)
        self.run(batch, ctx, len(tasks))
        return batch.results()

    def report(self, tasks: Sequence[Callable[[], Any]], ctx: Context | None) -> Report:
        """Run ``tasks`` and wait until every one has settled; never raises for a task."""
        started = time.perf_counter()
        batch = self.prepare(tasks, ctx, measure=True)
        self.run(batch, ctx, len(tasks), settle=True)
        return build_report(batch, time.perf_counter() - started)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        chunksize: int | None,
        *,
        keep_going: bool = False,
    ) -> list[Any]:
        """``fn`` over a sequence, cut into chunks; results in order.

        ``keep_going`` (``errors="return"``): a failed item's :class:`TaskError` in
        its place, the others run on.
        """
        batch = self.map_batch(fn, items, chunksize, keep_going=keep_going)
        if batch is None:
            return []
        self.run(batch, None, len(items))
        return list(itertools.chain.from_iterable(batch.results()))

    def map_batch(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        chunksize: int | None,
        *,
        keep_going: bool = False,
    ) -> Batch | None:
        """The batch of a map over a sequence (``None`` for no items), not launched."""
        started = time.monotonic()
        chunksize = self.chunksize_for(chunksize, keep_going)
        chunks = _mapping.chunk_list(fn, items, chunksize, self.parallelism)
        if not chunks:
            return None
        if self.shares:
            batch = self.prepare_map(fn, chunks, started=started, keep_going=keep_going)
        else:
            batch = self.prepare(
                chunks,
                None,
                started=started,
                locate=_mapping.first_unpicklable_item,
                keep_going=keep_going,
                chunked=True,
            )
        batch.even = True
        for slot, chunk in zip(batch.slots, chunks, strict=True):
            slot.base = chunk.start
            slot.size = len(chunk.items)
        return batch

    # -- the steps ---------------------------------------------------------------

    def prepare(
        self,
        tasks: Sequence[Callable[[], Any]],
        ctx: Context | None,
        *,
        measure: bool = False,
        started: float | None = None,
        locate: Callable[[Any, int], int] | None = None,
        keep_going: bool = False,
        chunked: bool = False,
    ) -> Batch:
        """Check and pickle the tasks (nothing starts if that fails), make the batch."""
        if started is None:
            started = time.monotonic()  # the call's timeout counts pickling too
        outbox = self.outbox()
        try:
            payloads, blob = self._payloads(tasks, locate, outbox)
            batch = self.new_batch(
                payloads,
                ctx,
                measure=measure,
                started=started,
                keep_going=keep_going,
                chunked=chunked,
                outbox=outbox,
            )
        except BaseException:
            if outbox is not None:
                outbox.release()
            raise
        batch.blob = blob
        return batch

    def prepare_map(
        self,
        fn: Callable[[Any], Any],
        chunks: Sequence[_mapping.Chunk],
        *,
        started: float,
        keep_going: bool,
    ) -> Batch:
        """A map's batch for the pool: ``fn`` pickled once as the blob, each chunk's
        payload only its items (see :func:`_mapping.split_map`)."""
        outbox = self.outbox()
        try:
            blob, payloads = _mapping.split_map(fn, chunks, outbox)
            batch = self.new_batch(
                payloads, None, started=started, keep_going=keep_going, chunked=True, outbox=outbox
            )
        except BaseException:
            if outbox is not None:
                outbox.release()
            raise
        batch.blob = blob
        return batch

    def run(self, batch: Batch, ctx: Context | None, total: int, *, settle: bool = False) -> None:
        """Submit ``batch`` and wait for its outcome (and, with ``settle``, every task)."""
        launch = self.launch(batch, ctx, total)
        try:
            self.wait(batch, settle=settle)
        finally:
            self.finish(launch)

    def _payloads(
        self,
        tasks: Sequence[Callable[[], Any]],
        locate: Callable[[Any, int], int] | None = None,
        outbox: _shm.Outbox | None = None,
    ) -> tuple[list[Any], Any]:
        """Per-task payloads, or one blob of all tasks when that is small enough.

        Pickling the list at once writes shared code and globals once, which makes
        many small tasks much cheaper; big tasks are pickled one by one so that a
        worker is only sent what it runs. With an ``outbox``, a payload (or the blob)
        whose big buffers went there is a ``(data, refs)`` tuple instead of bytes.
        """
        for i, task in enumerate(tasks):
            if not callable(task):
                raise TypeError(f"task {i} is not callable: {task!r}")
        dumps: Callable[[Any], Any] = _transport.dumps if outbox is None else outbox.pack
        if len(tasks) > 1 and self.blob_most > 0:
            try:
                blob = dumps(list(tasks))
            except Exception:
                blob = None  # find which task fails below
            if blob is not None and len(_data(blob)) <= self.blob_most:
                return [None] * len(tasks), blob
        payloads = []
        for i, task in enumerate(tasks):
            try:
                payloads.append(dumps(task))
            except Exception as exc:
                # For a map, ``locate`` turns the chunk's position into the item's.
                index = i if locate is None else locate(task, i)
                raise SerializationError(index, f"{type(exc).__name__}: {exc}") from exc
        return payloads, None

    def new_batch(
        self,
        payloads: list[Any],
        ctx: Context | None,
        *,
        measure: bool = False,
        open_input: bool = False,
        started: float | None = None,
        keep_going: bool = False,
        chunked: bool = False,
        outbox: _shm.Outbox | None = None,
    ) -> Batch:
        """A batch with the call's deadline (the sooner of the timeout and ``ctx``'s).

        ``outbox`` holds the shared buffers of its tasks (released when the call
        finishes); an open batch (``open_input``) gets one of its own here.
        """
        if ctx is not None:
            if ctx.cancelled:
                raise _cancelled_error(ctx)
            if ctx.expired:
                raise ExecTimeout("the context's deadline had passed before the call")
        options = self.options
        now = time.monotonic() if started is None else started
        deadline = None if options.timeout is None else now + options.timeout
        message = f"the call did not finish within its timeout of {options.timeout} s"
        if (
            ctx is not None
            and ctx.deadline is not None
            and (deadline is None or ctx.deadline < deadline)
        ):
            deadline = ctx.deadline
            message = "the context's deadline passed before the call finished"
        batch = Batch(
            payloads,
            deadline=deadline,
            options=options,
            timeout_message=message,
            measure=measure,
            open_input=open_input,
            keep_going=keep_going,
            chunked=chunked,
            items_alone=self.items_alone,
        )
        batch.started_at = now
        batch.outbox = self.outbox() if open_input and outbox is None else outbox
        return batch

    def launch(self, batch: Batch, ctx: Context | None, total: int | None) -> Launch:
        """Submit ``batch``: from here on its tasks may run. :meth:`finish` cleans up."""
        launch = Launch(batch, ctx)
        if batch.decided.is_set():
            self.finish(launch)
            return launch
        if self.options.progress:
            launch.bar = attach_progress(batch, total)
        if ctx is not None:
            launch.token = _context.on_cancel(ctx, lambda: batch.cancel(_cancelled_error(ctx)))
        try:
            self.runner.submit(batch)
        except BaseException:
            # Its tasks may have started (a KeyboardInterrupt as the runner took it).
            batch.cancel(Cancelled("the call could not be submitted"))
            self.finish(launch)
            raise
        return launch

    @staticmethod
    def wait(batch: Batch, *, settle: bool) -> None:
        """Wait for the outcome (``settle``: for every task); an escape ends the call."""
        try:
            batch.wait_decided()
            batch.wait_logs()  # an ended batch: what its tasks logged until then first
            if settle:
                wait_interruptibly(batch.settled)
        except BaseException:
            # KeyboardInterrupt (or any other escape): end the call's tasks, then go.
            batch.cancel(Cancelled("the caller was interrupted"))
            raise

    @staticmethod
    def finish(launch: Launch) -> None:
        """Undo what :meth:`launch` set up; the call's shared segments go.

        Tasks still running keep what they mapped until they end, and no task of a
        decided batch is sent any more, so the parent's copies may go now.
        """
        batch = launch.batch
        if batch.outbox is not None:
            batch.outbox.release()
            freed = batch.segments_freed
            if freed is not None and batch.settled.is_set():
                # Every task has ended: the workers let go of the segments in a moment
                # (a message each), and the call returns once they have.
                freed.wait(FREE_WAIT)
        if launch.ctx is not None:
            _context.remove_callback(launch.ctx, launch.token)
            launch.ctx = None
        if launch.bar is not None:
            launch.bar.close()
            launch.bar = None


class BatchAlloter(AsyncCalls):
    """The calls of an alloter; a subclass says which runner runs its batches.

    Each call also has an awaitable form (``exec_async``, ``exec_report_async``,
    ``map_async``, ``imap_async``: see :class:`~alloter_mp._aio.AsyncCalls`).

    A subclass sets ``_caller`` (a :class:`Caller` over its runner and options) and
    ``_limit``, and implements :meth:`close`.
    """

    _caller: Caller
    _limit: int | None

    def close(self) -> None:
        """Release what this alloter holds."""
        raise NotImplementedError

    # -- properties ------------------------------------------------------------

    @property
    def limit(self) -> int | None:
        """The most tasks of this alloter that run at once (``None``: no limit)."""
        return self._limit

    @property
    def timeout(self) -> float | None:
        """Seconds for one whole call, or ``None``."""
        return self._caller.options.timeout

    # -- running ---------------------------------------------------------------

    def exec(self, *tasks: Callable[[], Any]) -> list[Any]:
        """Run every task; return their results in task order.

        Raises :class:`TaskError` (or :class:`WorkerCrashed`) as soon as the first
        task fails, :class:`ExecTimeout` when the timeout passes; in both cases the
        other tasks are ended.
        """
        return self._caller.call(tasks, None)

    def exec_with_context(self, ctx: Context, *tasks: Callable[[], Any]) -> list[Any]:
        """Like :meth:`exec`, ended by ``ctx``: :class:`Cancelled` when it is
        cancelled, :class:`ExecTimeout` when its deadline passes."""
        if not isinstance(ctx, Context):
            raise TypeError(f"ctx must be an alloter_mp.Context, not {type(ctx).__name__}")
        return self._caller.call(tasks, ctx)

    def exec_report(self, *tasks: Callable[[], Any], ctx: Context | None = None) -> Report:
        """Run like :meth:`exec`, but return a :class:`Report` instead of raising.

        The report is complete: it waits until every task has ended (returned,
        been killed or been skipped) and says what each one cost.
        """
        if ctx is not None and not isinstance(ctx, Context):
            raise TypeError(f"ctx must be an alloter_mp.Context, not {type(ctx).__name__}")
        return self._caller.report(tasks, ctx)

    def map(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        chunksize: int | None = None,
        errors: str = "raise",
    ) -> list[R]:
        """``fn(item)`` for every item, results in order, with the outcomes of :meth:`exec`.

        A failure's ``TaskError.index`` is the item's position. Items travel in chunks
        (``chunksize=None`` picks a size) so that tiny functions run at full speed.
        ``errors="return"``: an item whose call failed (raised, crashed, timed out)
        gives its :class:`TaskError` in place of its result, and every other item
        still runs; the call's timeout and a cancellation still end everything.
        """
        keep_going = check_errors(errors)
        if not isinstance(iterable, Sized):
            return list(self.imap(fn, iterable, chunksize=chunksize, errors=errors))
        check_fn(fn)
        chunksize = check_chunksize(chunksize)
        # A sequence is sliced as it is (a range stays a range); anything else is listed.
        source: Any = iterable
        items = source if isinstance(source, Sequence) else list(source)
        return self._caller.map(fn, items, chunksize, keep_going=keep_going)

    def imap(
        self,
        fn: Callable[[T], R],
        iterable: Iterable[T],
        *,
        chunksize: int | None = None,
        ordered: bool = True,
        errors: str = "raise",
    ) -> Iterator[R]:
        """Like :meth:`map`, yielding results as they come.

        In input order, or in completion order with ``ordered=False``. The iterable
        is read lazily with a bounded number of items in flight. Closing the iterator
        early ends the outstanding work; the timeout counts from this call.
        ``errors`` as for :meth:`map`.
        """
        keep_going = check_errors(errors)
        check_fn(fn)
        chunksize = check_chunksize(chunksize)
        return _mapping.imap(self._caller, fn, iterable, chunksize, ordered, keep_going)

    def with_options(self: _A, **options: Any) -> _A:
        """A new alloter with some options of a call replaced, on the same workers.

        ``timeout``, ``task_timeout``, ``cancel_grace``, ``retries``, ``retry_on``,
        ``retry_delay``, ``memory_limit``, ``progress``, ``relay_logs`` and
        ``capture_output`` may be replaced; the new
        alloter shares this one's workers and its ``limit`` (the tasks of both count
        against it together). Options that shape the workers (``limit``,
        ``start_method``, ``initializer``, ...) raise ``TypeError``. Closing the new
        alloter never closes this one.
        """
        shaping = sorted(set(options) & _WORKER_OPTIONS)
        if shaping:
            raise TypeError(
                f"with_options() cannot change {', '.join(shaping)}: it shapes the workers, "
                "which the new alloter shares (make a new alloter instead)"
            )
        return self._derive(self._caller.options.replace(**options))

    def _derive(self: _A, options: CallOptions) -> _A:
        """A new alloter sharing this one's runner and limit, with ``options``."""
        raise NotImplementedError

    def __enter__(self: _A) -> _A:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def caller_of(alloter: BatchAlloter) -> Caller:
    """The :class:`Caller` behind ``alloter``, for code of this package that runs its
    own kind of call through the same steps (the command line's ``call``)."""
    return alloter._caller


# Options of a constructor that shape the workers, not a call.
_WORKER_OPTIONS = frozenset(
    {
        "limit",
        "start_method",
        "initializer",
        "initargs",
        "max_tasks_per_worker",
        "threads_per_worker",
        "address",
        "num_cpus",
        "pool",
    }
)


def _data(payload: Any) -> bytes:
    """The pickle of a payload, whether or not its big buffers were shared."""
    return payload if isinstance(payload, bytes) else payload[0]


def _cancelled_error(ctx: Context) -> Cancelled:
    reason = ctx.reason
    return Cancelled("the context was cancelled" + (f": {reason}" if reason is not None else ""))
