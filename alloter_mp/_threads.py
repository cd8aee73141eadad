"""Native thread pools capped per worker, so ``limit`` workers do not oversubscribe.

Each BLAS or OpenMP library starts as many threads as it sees CPUs; ``limit``
workers each doing a matrix product would then run ``limit`` times too many threads,
and they mostly wait for each other. The libraries read their thread count from the
environment once, when they are loaded, so a worker must have these variables set
before anything in it loads them.

When that is:

* in the worker's entry, :func:`apply_env`, before the initializer and any task;
* earlier under "spawn" and "forkserver": multiprocessing's child imports the
  parent's ``__main__`` (a script's top-level ``import numpy``) before the worker's
  entry runs. The child unpickles the process name before that import, so the name
  carries the variables (:func:`carrying_env`). The fork server itself must not
  have imported ``__main__``, or the libraries would be loaded there already: the
  pool keeps ``__main__`` out of the server's preload list.
* never under "fork" for a library the parent had already loaded: the child
  inherits it with the thread count it read. Only the libraries the worker loads
  itself are capped then.

A variable the user set in the parent's environment is left as the user set it.
"""

from __future__ import annotations

import importlib
import operator
import os
from collections.abc import Callable, Mapping
from typing import Any

from ._cpus import available_cpus

__all__ = ["THREAD_VARIABLES", "apply_env", "carrying_env", "thread_count", "worker_env"]

# OpenMP, OpenBLAS, MKL, BLIS, numexpr, Apple Accelerate (vecLib).
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def thread_count(workers: int, threads_per_worker: int | None = None) -> int:
    """Threads each of ``workers`` workers may start: the CPUs shared out, at least 1."""
    if threads_per_worker is not None:
        return threads_per_worker
    return max(1, available_cpus() // max(1, workers))


def worker_env(threads: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The thread variables a worker starts with: the user's own value, else ``threads``.

    Every variable is given, the user's included: a fork server started earlier may
    not have the parent's current environment.
    """
    environ = os.environ if environ is None else environ
    return {name: environ.get(name, str(threads)) for name in THREAD_VARIABLES}


def apply_env(env: Mapping[str, str] | None) -> None:
    """In the worker: set the thread variables (nothing to do for ``None``)."""
    if env:
        os.environ.update(env)


class _Call:
    """Pickles as ``func(*args)``: unpickling it makes that call.

    Only the standard library is named in the pickle, so unpickling needs nothing of
    ours on ``sys.path`` (the child has not set up the parent's path yet).
    """

    __slots__ = ("args", "func")

    def __init__(self, func: Callable[..., Any] | _Call, args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args

    def __call__(self, *args: Any) -> Any:  # pickle wants a callable; never called here
        raise TypeError("_Call objects only describe a call to make when unpickled")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.func, self.args)


class _EnvName(str):
    """A process name that sets environment variables in the child that unpickles it."""

    env: dict[str, str]

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # getitem((name, os.environ.update(env)), 0): the update runs, the name is kept.
        os_module = _Call(importlib.import_module, ("os",))
        update = _Call(operator.attrgetter("environ.update"), (os_module,))
        return (operator.getitem, ((str(self), _Call(update, (self.env,))), 0))


def carrying_env(name: str, env: Mapping[str, str] | None) -> str:
    """``name``, made to set ``env`` in a spawn or forkserver child as early as it can.

    The child unpickles its preparation data, which holds the process name, before
    it imports the parent's ``__main__``; the name it ends up with is plain ``name``.
    """
    if not env:
        return name
    carrier = _EnvName(name)
    carrier.env = dict(env)
    return carrier
