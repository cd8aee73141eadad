"""ProcessAlloter, Alloter and run(): batches run by the local worker pool.

The calls themselves (checking, pickling, waiting, reports, map) are
:class:`~alloter_mp._calls.BatchAlloter`'s; a process alloter hands each batch to
its :class:`~alloter_mp.WorkerPool` within its :class:`~alloter_mp._pool.Quota`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _pool
from ._batch import Batch
from ._calls import BatchAlloter, Caller
from ._errors import AlloterError, TaskTimeout, WorkerCrashed
from ._handle import WorkerStats
from ._options import SHARE_THRESHOLD, CallOptions, check_limit, default_limit
from ._pool import WorkerPool
from ._poolrun import Quota

if TYPE_CHECKING:
    from ._executor import ProcessPoolExecutor

__all__ = ["Alloter", "ProcessAlloter", "run"]


class _PoolRunner:
    """Runs an alloter's batches on a pool, within the alloter's quota."""

    __slots__ = ("pool", "quota")

    def __init__(self, pool: WorkerPool, quota: Quota) -> None:
        self.pool = pool
        self.quota = quota

    def submit(self, batch: Batch) -> None:
        _pool.submit(self.pool, batch, self.quota)


class ProcessAlloter(BatchAlloter):
    """Run batches of callables in worker processes, at most ``limit`` at once.

    ``alloter.exec(f, g, lambda: h(3))`` runs the tasks in worker processes and
    returns their results in task order. The first task to fail makes ``exec`` raise
    :class:`TaskError` at once and ends its siblings; ``timeout`` bounds the whole
    call and really stops the work. Workers start on first use and stay warm; one
    alloter may be used by several threads at once (``limit`` then bounds them all).
    ``close()`` (or a ``with`` block) stops the workers.

    Options: ``cancel_grace`` seconds a running sibling gets to notice
    :func:`cancelled` before its worker is killed; ``start_method`` of the workers
    (default ``"forkserver"`` where available); ``initializer(*initargs)`` run in
    each new worker; ``max_tasks_per_worker`` to replace workers after that many
    tasks; ``memory_limit`` in bytes of a worker's resident memory; ``progress`` to
    show a progress bar on stderr; ``threads_per_worker`` for each worker's native
    thread pools (OpenMP, BLAS, numexpr: default ``available_cpus() // limit``, at
    least 1; variables set in the environment win); ``share_threshold`` in bytes
    (default 1 MiB, ``None``: never): arguments' and results' pickle protocol 5
    buffers (numpy arrays, ``pickle.PickleBuffer``) this big travel through shared
    memory, written once per call and read-only where they arrive.

    Per task: ``task_timeout`` seconds a task may run, counted from its own start
    (past it the task is ended and fails with :class:`TaskTimeout`); ``retries``
    more runs for a task whose failure matches ``retry_on`` (by default a crash or a
    task timeout), ``retry_delay * 2**(k-1)`` seconds after its k-th failure.

    Seeing inside: ``relay_logs`` (on by default) hands every ``logging`` record of a
    task to this process's logging, with ``record.task_index`` and the worker's
    ``record.process``, and shows its warnings here, under this process's levels,
    filters and warning filters (taken when a call starts); ``capture_output=True``
    keeps each task's stdout and stderr (descriptors 1 and 2: C code and child
    processes included) in :attr:`TaskReport.stdout`/``stderr`` and on a
    :class:`TaskError`, the last 1 MiB of each, instead of letting them through.
    """

    def __init__(
        self,
        limit: int | None = None,
        *,
        timeout: float | None = None,
        task_timeout: float | None = None,
        cancel_grace: float = 0.5,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (WorkerCrashed, TaskTimeout),
        retry_delay: float = 0.0,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        memory_limit: int | None = None,
        progress: bool = False,
        threads_per_worker: int | None = None,
        share_threshold: int | None = SHARE_THRESHOLD,
        relay_logs: bool = True,
        capture_output: bool = False,
    ) -> None:
        size = check_limit("limit", limit) or default_limit()
        options = CallOptions.checked(
            timeout=timeout,
            task_timeout=task_timeout,
            cancel_grace=cancel_grace,
            retries=retries,
            retry_on=retry_on,
            retry_delay=retry_delay,
            memory_limit=memory_limit,
            progress=progress,
            share_threshold=share_threshold,
            relay_logs=relay_logs,
            capture_output=capture_output,
        )
        pool = self._make_pool(
            size=size,
            start_method=start_method,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=max_tasks_per_worker,
            threads_per_worker=threads_per_worker,
        )
        self._limit: int | None = size
        self._setup(pool, Quota(size), options, owns_pool=True)

    def _setup(self, pool: WorkerPool, quota: Quota, options: CallOptions, owns_pool: bool) -> None:
        self._pool = pool
        self._quota = quota
        self._owns_pool = owns_pool
        parallelism = quota.limit or pool.size
        self._caller = Caller(options, _PoolRunner(pool, quota), parallelism, shares=True)
        # An alloter dropped without close() still stops the workers it started.
        self._finalizer: Any = weakref.finalize(self, pool.close, wait=False) if owns_pool else None

    @staticmethod
    def _make_pool(**options: Any) -> WorkerPool:
        return WorkerPool(**options)

    @property
    def pool(self) -> WorkerPool:
        """The pool this alloter runs on."""
        return self._pool

    def stats(self) -> list[WorkerStats]:
        """One :class:`WorkerStats` per live worker of this alloter's pool."""
        return self._pool.stats()

    def executor(self, *, kill_on_cancel: bool = False) -> ProcessPoolExecutor:
        """A :class:`~alloter_mp.ProcessPoolExecutor` on this alloter's workers.

        Its calls share this alloter's workers and ``limit`` (and its
        ``task_timeout``, ``cancel_grace``, ``memory_limit`` and retries); its
        ``shutdown()`` never closes this alloter. ``kill_on_cancel`` as for the
        executor.
        """
        from ._executor import ProcessPoolExecutor

        return ProcessPoolExecutor._over(
            self._pool, self._quota, self._caller.options, kill_on_cancel=kill_on_cancel
        )

    def with_pool(self, pool: WorkerPool) -> ProcessAlloter:
        """A new alloter with the same options that runs on ``pool`` (never closing it)."""
        if not isinstance(pool, WorkerPool):
            raise TypeError(f"pool must be a WorkerPool, not {type(pool).__name__}")
        other = object.__new__(type(self))
        other._limit = self._limit
        other._setup(pool, Quota(self._quota.limit), self._caller.options, owns_pool=False)
        return other

    def _derive(self, options: CallOptions) -> ProcessAlloter:
        other = object.__new__(type(self))
        other._limit = self._limit
        other._setup(self._pool, self._quota, options, owns_pool=False)
        return other

    def close(self) -> None:
        """Stop this alloter's workers (a pool given by ``with_pool``, or the workers of
        the alloter this one was made from by ``with_options``, are left running)."""
        if self._owns_pool:
            self._finalizer.detach()
            self._pool.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} limit={self._limit} timeout={self.timeout} "
            f"start_method={self._pool.start_method!r}>"
        )


class Alloter(ProcessAlloter):
    """An alloter with no limit: every task of a call gets its own process.

    Idle workers are kept warm up to the number of CPUs; the rest stop after a call.
    Same outcomes as :class:`ProcessAlloter`. Its :attr:`limit` is ``None``.
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        task_timeout: float | None = None,
        cancel_grace: float = 0.5,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (WorkerCrashed, TaskTimeout),
        retry_delay: float = 0.0,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        memory_limit: int | None = None,
        progress: bool = False,
        threads_per_worker: int | None = None,
        share_threshold: int | None = SHARE_THRESHOLD,
        relay_logs: bool = True,
        capture_output: bool = False,
    ) -> None:
        options = CallOptions.checked(
            timeout=timeout,
            task_timeout=task_timeout,
            cancel_grace=cancel_grace,
            retries=retries,
            retry_on=retry_on,
            retry_delay=retry_delay,
            memory_limit=memory_limit,
            progress=progress,
            share_threshold=share_threshold,
            relay_logs=relay_logs,
            capture_output=capture_output,
        )
        pool = self._make_pool(
            size=default_limit(),
            start_method=start_method,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=max_tasks_per_worker,
            threads_per_worker=threads_per_worker,
        )
        self._limit = None
        self._setup(pool, Quota(None), options, owns_pool=True)

    @staticmethod
    def _make_pool(**options: Any) -> WorkerPool:
        return _pool.elastic_pool(**options)


def run(*tasks: Callable[[], Any], timeout: float | None = None) -> bool:
    """Run every task in its own process; ``True`` when all returned within ``timeout``.

    The simple form: it never raises for a task's failure, a crash or the timeout
    (``False`` then). Tasks that are not callable still raise ``TypeError``.
    """
    with Alloter(timeout=timeout) as alloter:
        try:
            alloter.exec(*tasks)
        except AlloterError:
            return False
    return True
