"""ProcessAlloter, Alloter and run(): batches run by the local worker pool.

The calls themselves (checking, pickling, waiting, reports, map) are
:class:`~alloter_mp._calls.BatchAlloter`'s; a process alloter hands each batch to
its :class:`~alloter_mp._pool.WorkerPool`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ._batch import Batch
from ._calls import BatchAlloter, _check_limit
from ._errors import AlloterError
from ._handle import WorkerStats
from ._pool import WorkerPool, _Owner

__all__ = ["Alloter", "ProcessAlloter", "run"]


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
    least 1; variables set in the environment win).
    """

    def __init__(
        self,
        limit: int | None = None,
        *,
        timeout: float | None = None,
        cancel_grace: float = 0.5,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        memory_limit: int | None = None,
        progress: bool = False,
        threads_per_worker: int | None = None,
    ) -> None:
        self._set_options(_check_limit(limit), timeout, cancel_grace, memory_limit, progress)
        self._options = {
            "start_method": start_method,
            "initializer": initializer,
            "initargs": initargs,
            "max_tasks_per_worker": max_tasks_per_worker,
            "threads_per_worker": threads_per_worker,
        }
        self._pool = self._make_pool()
        self._owns_pool = True
        self._owner = _Owner(self._limit, self._memory_limit)
        self._finalizer: Any = weakref.finalize(self, self._pool.close, wait=False)

    def _make_pool(self) -> WorkerPool:
        return WorkerPool(self._limit, **self._options)  # type: ignore[arg-type]

    @property
    def pool(self) -> WorkerPool:
        """The pool this alloter runs on."""
        return self._pool

    def _submit(self, batch: Batch) -> None:
        self._pool._submit(batch, self._owner, self._memory_limit)

    def stats(self) -> list[WorkerStats]:
        """One :class:`WorkerStats` per live worker of this alloter's pool."""
        return self._pool.stats()

    def with_pool(self, pool: WorkerPool) -> ProcessAlloter:
        """A new alloter with the same options that runs on ``pool`` (never closing it)."""
        if not isinstance(pool, WorkerPool):
            raise TypeError(f"pool must be a WorkerPool, not {type(pool).__name__}")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._pool = pool
        other._owns_pool = False
        other._owner = _Owner(self._limit, self._memory_limit)
        other._finalizer = None
        return other

    def close(self) -> None:
        """Stop this alloter's workers (a pool given by ``with_pool`` is left open)."""
        if self._owns_pool:
            self._finalizer.detach()
            self._pool.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} limit={self._limit} timeout={self._timeout} "
            f"start_method={self._pool.start_method!r}>"
        )


class Alloter(ProcessAlloter):
    """An alloter with no limit: every task of a call gets its own process.

    Idle workers are kept warm up to the number of CPUs; the rest stop after a call.
    Same outcomes as :class:`ProcessAlloter`.
    """

    def __init__(
        self,
        *,
        timeout: float | None = None,
        cancel_grace: float = 0.5,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        memory_limit: int | None = None,
        progress: bool = False,
        threads_per_worker: int | None = None,
    ) -> None:
        super().__init__(
            None,
            timeout=timeout,
            cancel_grace=cancel_grace,
            start_method=start_method,
            initializer=initializer,
            initargs=initargs,
            max_tasks_per_worker=max_tasks_per_worker,
            memory_limit=memory_limit,
            progress=progress,
            threads_per_worker=threads_per_worker,
        )
        self._owner.limit = None

    def _make_pool(self) -> WorkerPool:
        return WorkerPool(self._limit, _elastic=True, **self._options)  # type: ignore[arg-type]


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
