"""The same alloter on a Ray cluster: :class:`RayAlloter`.

>>> from alloter_mp.ray import RayAlloter                  # doctest: +SKIP
>>> with RayAlloter(8, timeout=60.0, address="auto") as alloter:
...     alloter.map(score, items)

Ray is an optional extra (``pip install 'alloter-mp[ray]'``); ``import alloter_mp``
never imports it, and this module imports it only when an alloter is made.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any

from ._calls import BatchAlloter, Caller
from ._errors import TaskTimeout, WorkerCrashed
from ._options import CallOptions, check_limit
from ._ray_runner import RayRunner, import_ray

__all__ = ["RayAlloter"]


class RayAlloter(BatchAlloter):
    """Run batches of callables as Ray tasks, at most ``limit`` of them at once.

    The calls and their outcomes are those of :class:`~alloter_mp.ProcessAlloter`:
    results in task order; the first failure raises :class:`~alloter_mp.TaskError`
    with the remote traceback and ends the siblings (queued tasks are never handed to
    Ray, running ones see :func:`~alloter_mp.cancelled` and their Ray worker is
    killed ``cancel_grace`` seconds later); ``timeout`` bounds the whole call and
    ends what still runs the same way; a dead Ray worker is a
    :class:`~alloter_mp.WorkerCrashed` (``exitcode`` ``None``: Ray does not say).
    Nothing runs twice (a task whose Ray worker died before the task started is
    handed to Ray again: it never ran).

    ``address=None`` joins the Ray already initialised in this process, or else
    starts a local one (no dashboard, listening on the loopback address only);
    ``"auto"`` or ``"ray://host:port"`` joins a cluster (a Ray already initialised
    in this process is used as it is).
    :meth:`close` shuts down only a Ray this alloter started (or connected to) itself.
    ``limit`` bounds this alloter's tasks in flight on the cluster, all calls
    together (``None``: the cluster's CPUs divided by ``num_cpus``, the CPUs each task
    asks Ray for); a task handed to Ray counts as running even while Ray queues it.
    ``memory_limit`` (bytes of a task's Ray worker), ``progress``, ``relay_logs``
    and ``capture_output`` work as on the process alloter (except that the records
    and output of a task whose Ray worker dies are lost with it). The tasks' code
    must be importable on every node (or travel by value: functions defined in
    ``__main__`` do).
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
        address: str | None = None,
        num_cpus: float = 1,
        memory_limit: int | None = None,
        progress: bool = False,
        relay_logs: bool = True,
        capture_output: bool = False,
    ) -> None:
        limit = check_limit("limit", limit)
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)):
            raise TypeError(f"num_cpus must be a number, not {num_cpus!r}")
        if not num_cpus > 0:
            raise ValueError(f"num_cpus must be > 0, not {num_cpus!r}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str or None, not {type(address).__name__}")
        # Check every option before Ray starts: a bad one must not leave a cluster behind.
        options = CallOptions.checked(
            timeout=timeout,
            task_timeout=task_timeout,
            cancel_grace=cancel_grace,
            retries=retries,
            retry_on=retry_on,
            retry_delay=retry_delay,
            memory_limit=memory_limit,
            progress=progress,
            relay_logs=relay_logs,
            capture_output=capture_output,
        )
        ray = import_ray()
        self._owns_ray = False
        if not ray.is_initialized():
            if address is None:
                _start_local_ray(ray)
            else:
                ray.init(address=address)
            self._owns_ray = True
        self._ray = ray
        if not limit:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            limit = max(1, int(cpus // num_cpus))
        self._limit: int | None = limit
        self._num_cpus = num_cpus
        try:
            self._runner = RayRunner(ray, limit, num_cpus)
        except BaseException:
            if self._owns_ray:  # leave no Ray behind for an alloter that never was
                ray.shutdown()
            raise
        # Each task is its own Ray task: pickled alone (blob_most=0). A map judged
        # item by item goes one item per Ray task: a Ray task reports only once.
        self._caller = Caller(options, self._runner, limit, blob_most=0, items_alone=True)
        self._owns_runner = True
        self._closed = False
        # An alloter dropped without close() still ends its calls and its thread.
        self._finalizer: weakref.finalize[Any, Any] | None = weakref.finalize(
            self, self._runner.close, wait=False
        )

    def _derive(self, options: CallOptions) -> RayAlloter:
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._caller = self._caller.with_options(options)
        other._owns_runner = False
        other._owns_ray = False
        other._finalizer = None
        return other

    def close(self) -> None:
        """End what still runs, and shut Ray down if this alloter started it.

        An alloter made by :meth:`with_options` closes nothing: its runner is the
        original's."""
        if self._closed or not self._owns_runner:
            self._closed = True
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        self._runner.close()
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} limit={self._limit} timeout={self.timeout} "
            f"num_cpus={self._num_cpus}>"
        )


def _start_local_ray(ray: Any) -> None:
    """Start a local Ray with no dashboard, listening on the loopback address only.

    Ray turns a node address of 127.0.0.1 into the machine's outbound address unless
    its "cluster" setting is off; that setting is read from the environment when Ray
    is imported, so it is turned off here for the start (and in the environment the
    Ray processes inherit) when the program has not chosen otherwise.
    """
    with _ray_cluster_setting(ray, enabled=False):
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")


@contextlib.contextmanager
def _ray_cluster_setting(ray: Any, *, enabled: bool) -> Iterator[None]:
    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    if name in os.environ:  # the program chose: leave it be
        yield
        return
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    saved = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[name] = "1" if enabled else "0"
    if saved is not None:
        constants.ENABLE_RAY_CLUSTER = enabled  # type: ignore[union-attr]
    try:
        yield
    finally:
        del os.environ[name]
        if saved is not None:
            constants.ENABLE_RAY_CLUSTER = saved  # type: ignore[union-attr]
