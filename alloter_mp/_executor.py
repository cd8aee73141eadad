"""The concurrent.futures face: :class:`ProcessPoolExecutor` and its futures.

A drop-in for :class:`concurrent.futures.ProcessPoolExecutor` that keeps the
alloter's promises: a crashing call fails its own future and the pool heals,
cancelling (with ``kill_on_cancel`` or :meth:`Future.kill`) really stops the work,
and nothing outlives a call.

Futures are views of slots. An executor has one long-lived batch (open, keep-going:
a failure ends nothing but its own call, and settled slots are forgotten), fed by
``submit`` as ``imap`` feeds one. The runner's thread settles a slot, and the
batch's ``on_slot_done`` callback resolves the slot's future (the slot carries it as
its ``owner``). So the rules stay in the batch:

* ``Future.cancel()`` of a queued call withdraws its slot; of a call handed to a
  worker it returns ``False`` (the standard rule), unless it kills;
* killing a future ends its slot alone (``batch.cancel_task``): told through
  ``cancelled()``, its process tree killed after ``cancel_grace``;
* ``shutdown(cancel_futures=True)`` ends what has not started
  (``batch.end_unstarted``): tasks sent ahead to a busy worker are skipped there;
* ``terminate_workers()``/``kill_workers()`` end the batch with no grace.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import pickle
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import process as _cf_process
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import _pool, _transport
from ._batch import Batch, Slot, wait_interruptibly
from ._errors import (
    InitializerFailed,
    MemoryLimitExceeded,
    SerializationError,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
)
from ._options import CallOptions, default_limit
from ._poolrun import Quota
from ._states import TaskStatus

if TYPE_CHECKING:
    from ._pool import WorkerPool

__all__ = ["BrokenWorker", "Future", "ProcessPoolExecutor", "UnpicklableCall"]

BrokenProcessPool = _cf_process.BrokenProcessPool
# The standard library's holder of a remote traceback's text (typeshed says
# otherwise: it takes the text).
_RemoteTraceback: Callable[[str], Exception] = _cf_process._RemoteTraceback  # type: ignore[assignment]

# The standard library's words for the same situations.
_SHUTDOWN = "cannot schedule new futures after shutdown"
_EXITING = "cannot schedule new futures after interpreter shutdown"
_BROKEN = "A child process terminated abruptly, the process pool is not usable anymore"
_BROKEN_PENDING = (
    "A process in the process pool was terminated abruptly while the future was running or pending."
)
# At interpreter exit, calls still pending on an executor nobody shut down get this
# long (all executors together) to finish before the pool ends them: a program
# that submits and leaves still sees short work done, and a stuck call cannot hang
# the exit.
EXIT_WAIT = 2.0

_log = logging.getLogger("concurrent.futures")


# -- errors -----------------------------------------------------------------------


class BrokenWorker(WorkerCrashed, BrokenProcessPool):
    """A worker died running the call: a :class:`WorkerCrashed` that code written for
    the standard library catches as ``BrokenProcessPool`` (only this future failed:
    the executor heals)."""


class BrokenWorkerMemory(MemoryLimitExceeded, BrokenProcessPool):
    """The call passed the memory limit and its worker was killed (see
    :class:`BrokenWorker`)."""


class UnpicklableCall(SerializationError, pickle.PicklingError):
    """The call's function or arguments cannot be pickled (it never ran)."""


def _retyped(error: TaskError, cls: type[TaskError]) -> TaskError:
    """``error``, with the same fields, as an instance of its subclass ``cls``."""
    new = cls.__new__(cls)
    new.__dict__.update(error.__dict__)
    new.args = error.args
    return new


def _without_frames(exc: BaseException) -> BaseException:
    """Drop the tracebacks of ``exc`` and its chain: their frames would keep the
    call's function and arguments alive."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return exc


# -- futures --------------------------------------------------------------------------


class Future(concurrent.futures.Future[Any]):
    """A :class:`concurrent.futures.Future` that can stop its call.

    ``running()`` is ``True`` once the call was handed to a worker. ``cancel()``
    keeps the standard rule (``False`` once the call runs) unless the executor was
    made with ``kill_on_cancel=True``; :meth:`kill` ends the call in any case.
    """

    def __init__(self) -> None:
        super().__init__()
        self._batch: Batch | None = None
        self._slot: Slot | None = None
        self._kill_on_cancel = False

    def running(self) -> bool:
        """``True`` while the call is with a worker (sent or running)."""
        with self._condition:
            if self._state != PENDING:
                return bool(self._state == RUNNING)
            slot = self._slot
            return slot is not None and slot.status is TaskStatus.RUNNING

    def cancel(self) -> bool:
        """Cancel the call: ``True`` if it will not run (or, with ``kill_on_cancel``,
        was ended), ``False`` if it runs or has finished."""
        return self._stop(kill=self._kill_on_cancel)

    def kill(self) -> bool:
        """End the call whatever its state: a queued one never starts, a running one
        is told through :func:`alloter_mp.cancelled` and its process tree is killed
        after ``cancel_grace``. The future ends cancelled at once. ``False`` when the
        future was already done."""
        with self._condition:
            if self._state in (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED):
                return False
        return self._stop(kill=True)

    def result(self, timeout: float | None = None) -> Any:
        """The call's result, or raise its exception (even one that is falsey: the
        standard library's futures before Python 3.14 return ``None`` for those)."""
        value = super().result(timeout)
        error = self._exception
        if error is not None:
            try:
                raise error
            finally:
                error = None
        return value

    def _stop(self, *, kill: bool) -> bool:
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            batch, slot = self._batch, self._slot
        if batch is None or slot is None:
            return self._set_cancelled()
        if not batch.cancel_task(slot, running=kill):
            return self.cancelled()
        # Withdrawn: the batch has already settled the slot (and so this future).
        # Ended while running: the future ends now, the call within the grace.
        self._set_cancelled()
        return self.cancelled()

    def _set_cancelled(self) -> bool:
        """Cancelled and notified at once (the executor never runs a cancelled call)."""
        with self._condition:
            if self._state != PENDING:
                return bool(self._state in (CANCELLED, CANCELLED_AND_NOTIFIED))
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def _resolve(self, result: Any) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.set_result(result)  # (it may have been cancelled, killed, meanwhile)

    def _fail(self, error: BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.set_exception(error)


# -- one executor's batch ---------------------------------------------------------------


class _Stream:
    """An executor's one open batch, and what resolving its futures needs.

    Kept apart from the executor so that an executor dropped without ``shutdown``
    can be collected: the pool holds the batch, the batch this, this no executor.
    """

    def __init__(
        self, pool: WorkerPool, quota: Quota, options: CallOptions, *, owns_pool: bool
    ) -> None:
        self.pool = pool
        self.quota = quota
        self.owns_pool = owns_pool
        self.batch = Batch(
            [],
            options=options,
            open_input=True,
            keep_going=True,
            forget_settled=True,
        )
        self.batch.on_slot_done = self.settle
        self._launch_lock = threading.Lock()
        self.launched = False
        self.closed = False
        # Why pending calls fail rather than end cancelled (the initializer failed);
        # and the error of running calls ended by terminate_workers().
        self.broken: str | None = None
        self.broken_error: BrokenProcessPool | None = None
        self.ended_error: BrokenProcessPool | None = None

    def launch(self) -> None:
        """Hand the batch to the pool, on the first call (no thread before that)."""
        with self._launch_lock:
            if not self.launched:
                _pool.submit(self.pool, self.batch, self.quota)
                self.launched = True

    def settle(self, slot: Slot) -> None:
        """A slot settled (runner's thread, or a canceller's): resolve its future."""
        future: Future | None = slot.owner
        if future is None:
            return
        slot.owner = None
        future._slot = None
        future._batch = None
        status = slot.status
        if status is TaskStatus.OK:
            result, slot.result = slot.result, None
            future._resolve(result)
            return
        error, slot.error = slot.error, None
        if status is TaskStatus.SKIPPED or (status is TaskStatus.CANCELLED and not slot.attempts):
            # It never ran: withdrawn, or ended before it started.
            if self.broken_error is not None:
                future._fail(self.broken_error)
            else:
                future._set_cancelled()
            return
        if status is TaskStatus.CANCELLED:
            # Ended while running: killed alone (the future is cancelled already),
            # or by terminate_workers() or the pool's closing.
            future._fail(self.ended_error or BrokenProcessPool(_BROKEN_PENDING))
            return
        if isinstance(error, InitializerFailed):
            self.break_down(error)
            future._fail(self.broken_error or BrokenProcessPool(_BROKEN_PENDING))
            return
        future._fail(_future_error(error))

    def break_down(self, error: TaskError) -> None:
        """A worker's initializer failed: the executor is broken, as the standard
        library's is (pending calls fail, later submits raise)."""
        if self.broken is not None:
            return
        broken = BrokenProcessPool(_BROKEN_PENDING)
        broken.__cause__ = _RemoteTraceback(f"\n'''\n{error.remote_traceback}'''")
        self.broken_error = broken
        self.broken = _BROKEN
        _log.critical("Exception in initializer:\n%s", error.remote_traceback.rstrip())
        self.batch.cancel(broken)
        self.close()

    def close(self) -> None:
        """No more calls; the pool this executor made stops once the last one ended."""
        if self.closed:
            return
        self.closed = True
        self.batch.close_input()
        if self.owns_pool:
            pool = self.pool
            self.batch.settled.when_set(lambda: pool.close(wait=False))

    def end_running(self, *, hard: bool) -> None:
        """End every call at once (terminate_workers/kill_workers)."""
        batch = self.batch
        self.ended_error = BrokenProcessPool(_BROKEN_PENDING)
        batch.cancel_grace = 0.0
        batch.kill_at_once = hard
        batch.cancel(self.ended_error)

    def wait(self) -> None:
        """Until every call has ended (not from the pool's own thread: it would wait
        for itself)."""
        if not self.launched or threading.current_thread() is self.pool._thread:
            return
        wait_interruptibly(self.batch.settled)


def _future_error(error: BaseException | None) -> BaseException:
    """What a future raises for a failed call."""
    if error is None:
        return BrokenProcessPool(_BROKEN_PENDING)
    if isinstance(error, MemoryLimitExceeded):
        return _retyped(error, BrokenWorkerMemory)
    if isinstance(error, WorkerCrashed):
        return _retyped(error, BrokenWorker)
    if isinstance(error, TaskTimeout) or not isinstance(error, TaskError):
        return error
    cause = error.__cause__
    if cause is None or not error.remote_traceback:
        return error  # no exception of the call's own (its result could not travel)
    # The original exception, with the worker's traceback as the standard library
    # gives it, so that tools looking for it find it.
    cause.__cause__ = _RemoteTraceback(f'\n"""\n{error.remote_traceback}"""')
    return cause


# -- the executor -------------------------------------------------------------------------


class _Call:
    """A call of something that may not be callable: it fails in the worker, as the
    standard library's does, not in ``submit``."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Call, (self.fn, self.args, self.kwargs))


class _ByValue:
    """A call of a function that travels by value (one of ``__main__``, a lambda, a
    closure), its pickled form made once per executor (see :class:`_Pickler`)."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        fn = pickle.loads(self.fn)
        return fn(*self.args, **self.kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ByValue, (self.fn, self.args, self.kwargs))


class _Pickler:
    """Pickles an executor's calls: ``fn(*args, **kwargs)`` made ready to travel.

    A function that travels by reference (defined in an importable module) costs a
    plain pickle. One that must travel by value costs cloudpickle, many times more:
    it is pickled once per executor and kept while the function lives (weakly), so
    a stream of calls of one function defined in ``__main__`` is as cheap as the
    standard library's by-reference calls. As there, the function is the one first
    submitted: globals it reads are those of that moment.
    """

    def __init__(self) -> None:
        # Per function: its pickled form if it travels by value, None if by reference.
        self._functions: weakref.WeakKeyDictionary[Any, bytes | None] = weakref.WeakKeyDictionary()

    def dumps(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if type(fn) is not types.FunctionType:
            if not callable(fn):
                return _transport.dumps(_Call(fn, args, kwargs))
            return _transport.dumps(functools.partial(fn, *args, **kwargs))
        try:
            blob = self._functions[fn]
        except KeyError:
            blob = None if _by_reference(fn) else _transport.dumps(fn)
            self._functions[fn] = blob
        if blob is None:
            return _transport.dumps(functools.partial(fn, *args, **kwargs))
        return _transport.dumps(_ByValue(blob, args, kwargs))


def _by_reference(fn: types.FunctionType) -> bool:
    """Whether ``fn`` pickles by reference: found by its module and name, in a module
    that is neither ``__main__`` nor registered with cloudpickle to travel by value."""
    module = fn.__module__
    if not module or module == "__main__":
        return False
    for name in cloudpickle.list_registry_pickle_by_value():
        if module == name or module.startswith(name + "."):
            return False
    obj: Any = sys.modules.get(module)
    for part in fn.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


def _run_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """``map`` with ``chunksize > 1``: one call runs ``fn`` over a chunk of argument tuples."""
    return [fn(*args) for args in chunk]


def _batched(iterable: Iterable[Any], size: int) -> Iterator[tuple[Any, ...]]:
    it = iter(iterable)
    while chunk := tuple(itertools.islice(it, size)):
        yield chunk


def _result_or_kill(future: Future, timeout: float | None = None) -> Any:
    try:
        return future.result(timeout)
    finally:
        future.kill()  # a no-op once done; ends it if the wait timed out


_exiting = False
_live: weakref.WeakSet[_Stream] = weakref.WeakSet()


class ProcessPoolExecutor(concurrent.futures.Executor):
    """A drop-in for :class:`concurrent.futures.ProcessPoolExecutor` on alloter_mp's
    worker pool.

    Same constructor, same ``submit``/``map``/``shutdown`` and the same errors for bad
    use, with the alloter's promises on top: a worker that dies fails only the future
    whose call it ran (with a :class:`~alloter_mp.WorkerCrashed` that is also a
    ``BrokenProcessPool``) and is replaced; a call's exception is raised as itself,
    caused by the remote traceback; ``task_timeout``, ``cancel_grace`` and
    ``memory_limit`` as for the alloter; ``kill_on_cancel=True`` makes
    ``Future.cancel()`` end a running call (so asyncio cancellation through
    ``run_in_executor`` stops the work), and every future has ``kill()``;
    ``shutdown(cancel_futures=True)`` also cancels calls sent ahead to a busy worker;
    ``terminate_workers()``/``kill_workers()`` end everything at once. An executor
    never shut down leaves no process behind at interpreter exit.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_timeout: float | None = None,
        cancel_grace: float = 0.5,
        memory_limit: int | None = None,
        kill_on_cancel: bool = False,
    ) -> None:
        if max_workers is None:
            workers = default_limit()
        else:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(
                    f"max_workers must be an int or None, not {type(max_workers).__name__}"
                )
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            workers = max_workers
        start_method: str | None = None
        if mp_context is not None:
            get_method = getattr(mp_context, "get_start_method", None)
            if get_method is None:
                raise TypeError(f"mp_context must be a multiprocessing context, not {mp_context!r}")
            start_method = get_method(allow_none=False)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if start_method == "fork":
                raise ValueError(
                    "max_tasks_per_child is incompatible with the 'fork' multiprocessing "
                    "start method; supply a different mp_context."
                )
        options = CallOptions.checked(
            task_timeout=task_timeout, cancel_grace=cancel_grace, memory_limit=memory_limit
        )
        pool = _pool.WorkerPool(
            workers,
            start_method=start_method,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=max_tasks_per_child,
        )
        self._setup(pool, Quota(workers), options, kill_on_cancel, owns_pool=True)

    @classmethod
    def _over(
        cls,
        pool: WorkerPool,
        quota: Quota,
        options: CallOptions,
        *,
        kill_on_cancel: bool = False,
    ) -> ProcessPoolExecutor:
        """An executor on an alloter's workers and limit (see ``alloter.executor()``)."""
        self = cls.__new__(cls)
        # A call's timeout and progress bar mean nothing for a stream of futures.
        options = options.replace(timeout=None, progress=False)
        self._setup(pool, quota, options, kill_on_cancel, owns_pool=False)
        return self

    def _setup(
        self,
        pool: WorkerPool,
        quota: Quota,
        options: CallOptions,
        kill_on_cancel: bool,
        *,
        owns_pool: bool,
    ) -> None:
        self._max_workers = quota.limit or pool.size
        self._kill_on_cancel = bool(kill_on_cancel)
        self._stream = _Stream(pool, quota, options, owns_pool=owns_pool)
        self._shutdown_thread = False
        self._count = itertools.count()
        self._pickler = _Pickler()
        _live.add(self._stream)
        # Dropped without shutdown(): its pending calls still finish, then its pool
        # (if its own) stops, as the standard library's executor does.
        weakref.finalize(self, self._stream.close)

    # -- properties -----------------------------------------------------------------

    @property
    def _broken(self) -> str | bool:
        """The standard library's flag: a message once the executor is broken."""
        return self._stream.broken or False

    @property
    def _processes(self) -> dict[int, Any]:
        """The live worker processes by pid (as the standard library's attribute)."""
        return {
            w.pid: w.proc
            for w in list(self._stream.pool._workers)
            if w.kill_reason is None and not w.stopping
        }

    # -- calls ---------------------------------------------------------------------------

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; returns its :class:`Future`.

        Never raises for the call itself: a function or arguments that cannot be
        pickled fail the future with :class:`~alloter_mp.SerializationError` (also a
        ``pickle.PicklingError``).
        """
        stream = self._stream
        if stream.broken is not None:
            raise BrokenProcessPool(stream.broken)
        if self._shutdown_thread:
            raise RuntimeError(_SHUTDOWN)
        if _exiting:
            raise RuntimeError(_EXITING)
        index = next(self._count)
        future = Future()
        try:
            payload = self._pickler.dumps(fn, args, kwargs)
        except Exception as exc:
            error = UnpicklableCall(index, f"{type(exc).__name__}: {exc}")
            error.__cause__ = _without_frames(exc)
            future.set_exception(error)
            return future
        if not stream.launched:
            try:
                stream.launch()
            except Exception:
                raise RuntimeError(_SHUTDOWN) from None  # its alloter was closed
        future._batch = stream.batch
        future._kill_on_cancel = self._kill_on_cancel
        slot = stream.batch.add(payload, base=index, owner=future)
        if slot is None:
            future._batch = None
            if stream.broken is not None:
                raise BrokenProcessPool(stream.broken)
            raise RuntimeError(_EXITING if _exiting else _SHUTDOWN)
        future._slot = slot
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """A lazy iterator of ``fn(*args)`` for the items of ``iterables``, in order.

        As the standard library's: ``timeout`` (from this call) raises
        ``TimeoutError`` from ``next()``; ``chunksize`` items travel per call;
        ``buffersize`` bounds the calls submitted ahead of what was taken. Leaving the
        iterator early (closing it, or an exception) ends the outstanding calls:
        queued ones never start, running ones are told and ended after the grace.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end = None if timeout is None else timeout + time.monotonic()
        calls: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        if chunksize > 1:
            calls = zip(itertools.repeat(fn), _batched(calls, chunksize))
            fn = _run_chunk
        if buffersize:
            fs: deque[Future] = deque(
                self.submit(fn, *args) for args in itertools.islice(calls, buffersize)
            )
            more: Iterator[tuple[Any, ...]] | None = calls
        else:
            fs = deque(self.submit(fn, *args) for args in calls)
            more = None
        results = _map_results(weakref.ref(self), fn, fs, more, end)
        return _unchunked(results) if chunksize > 1 else results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more calls. ``cancel_futures``: every call that has not started is
        cancelled, calls sent ahead to a busy worker included (running ones finish).
        ``wait``: return once every call has ended and, for an executor that made its
        own workers, once they and its thread are gone."""
        stream = self._stream
        self._shutdown_thread = True
        if cancel_futures:
            stream.batch.end_unstarted()
        stream.close()
        if wait:
            stream.wait()
            if stream.owns_pool and threading.current_thread() is not stream.pool._thread:
                stream.pool.close(wait=True)

    def terminate_workers(self) -> None:
        """End every call at once (SIGTERM to each running call's process tree,
        SIGKILL if it lingers): running calls fail with ``BrokenProcessPool``,
        the others are cancelled, and the executor is shut down."""
        self._force_shutdown(hard=False)

    def kill_workers(self) -> None:
        """As :meth:`terminate_workers`, with SIGKILL at once."""
        self._force_shutdown(hard=True)

    def _force_shutdown(self, *, hard: bool) -> None:
        self.shutdown(wait=False, cancel_futures=True)
        self._stream.end_running(hard=hard)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown_thread else "open"
        return f"<alloter_mp.ProcessPoolExecutor max_workers={self._max_workers} {state}>"


def _map_results(
    executor_ref: weakref.ref[ProcessPoolExecutor],
    fn: Callable[..., Any],
    fs: deque[Future],
    more: Iterator[tuple[Any, ...]] | None,
    end: float | None,
) -> Iterator[Any]:
    """The iterator of ``map``: futures taken in order, none kept once yielded."""
    try:
        fs.reverse()  # popped from the right: the first submitted first
        while fs:
            if more is not None:
                executor = executor_ref()
                args = next(more, None) if executor is not None else None
                if executor is not None and args is not None:
                    fs.appendleft(executor.submit(fn, *args))
                del executor
            if end is None:
                yield _result_or_kill(fs.pop())
            else:
                yield _result_or_kill(fs.pop(), end - time.monotonic())
    finally:
        for future in fs:
            future.kill()


def _unchunked(results: Iterator[list[Any]]) -> Iterator[Any]:
    try:
        for chunk in results:
            chunk.reverse()
            while chunk:
                yield chunk.pop()
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


@atexit.register
def _drain_at_exit() -> None:
    # Registered after the pool's own exit hook (this module imports it), so it runs
    # first: pending calls get EXIT_WAIT seconds to finish, then the pools end them.
    global _exiting
    _exiting = True
    streams = [s for s in list(_live) if s.launched]
    for stream in streams:
        with contextlib.suppress(Exception):
            stream.close()
    end = time.monotonic() + EXIT_WAIT
    for stream in streams:
        left = end - time.monotonic()
        if left <= 0:
            break
        stream.batch.settled.wait(left)
