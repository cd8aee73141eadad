"""alloter_mp: run batches of Python callables in worker processes.

A concurrency limit, one overall timeout that really stops the work, failures
recovered as errors with the remote traceback, context passing, the first failure
ending its siblings, and a fast return — the promises of Go's *alloter*, carried
over to processes.

>>> from alloter_mp import ProcessAlloter
>>> with ProcessAlloter(4, timeout=30.0) as alloter:          # doctest: +SKIP
...     alloter.exec(lambda: 1, lambda: 2)
[1, 2]
"""

from ._alloter import Alloter, ProcessAlloter, run
from ._context import Context
from ._cpus import available_cpus
from ._errors import (
    AlloterError,
    Cancelled,
    ExecTimeout,
    MemoryLimitExceeded,
    RemoteError,
    SerializationError,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
)
from ._executor import ProcessPoolExecutor
from ._handle import WorkerStats
from ._pool import WorkerPool
from ._report import Report, TaskReport
from ._task import cancelled, raise_if_cancelled, time_left

__version__ = "0.1.0"

# Public names say they come from the package itself, not from the private module
# that defines them: pickles (of errors, say) and tracebacks then name
# ``alloter_mp.TaskError``, which stays true when the code moves between files.
for _name in (
    "Alloter",
    "AlloterError",
    "Cancelled",
    "Context",
    "ExecTimeout",
    "MemoryLimitExceeded",
    "ProcessAlloter",
    "ProcessPoolExecutor",
    "RemoteError",
    "Report",
    "SerializationError",
    "TaskError",
    "TaskReport",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerStats",
    "available_cpus",
    "cancelled",
    "raise_if_cancelled",
    "run",
    "time_left",
):
    globals()[_name].__module__ = __name__
del _name

__all__ = (
    "Alloter",
    "AlloterError",
    "Cancelled",
    "Context",
    "ExecTimeout",
    "MemoryLimitExceeded",
    "ProcessAlloter",
    "ProcessPoolExecutor",
    "RemoteError",
    "Report",
    "SerializationError",
    "TaskError",
    "TaskReport",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerStats",
    "__version__",
    "available_cpus",
    "cancelled",
    "raise_if_cancelled",
    "run",
    "time_left",
)
