"""The numpy tasks of the benchmark's workers (numpy is imported with this module, so
the no-op tasks in ``tasks`` stay light)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

_BLAS: list[dict[str, Any]] | None = None


def blas_info() -> list[dict[str, Any]]:
    """The BLAS this process runs: library, kernel (OpenBLAS core type) and threads,
    as threadpoolctl sees them ([] without threadpoolctl).  Read once per process."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import threadpool_info
        except ImportError:
            _BLAS = []
        else:
            _BLAS = [
                {k: d.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                for d in threadpool_info()
                if d.get("user_api") == "blas"
            ]
    return _BLAS


def warm(i: int) -> int:
    """Import numpy and start its BLAS in this worker (one tiny product)."""
    a = np.ones((64, 64))
    float((a @ a)[0, 0])
    return i


def slice_sum(job: tuple[Any, int, int]) -> float:
    """``job = (array, k, parts)``: the sum of the array's k-th of ``parts`` slices."""
    arr, k, parts = job
    step = -(-len(arr) // parts)
    return float(arr[k * step : (k + 1) * step].sum())


def block(job: tuple[int, int]) -> Any:
    """``job = (k, n)``: a new float64 array of ``n`` items, all ``k``."""
    k, n = job
    return np.full(n, float(k))


def matmul(job: tuple[int, int]) -> dict[str, Any]:
    """``job = (seed, n)``: the product of two random n x n matrices; returns a
    checksum, the process's CPU seconds for the task (every thread of it), this
    process's thread count and its BLAS."""
    seed, n = job
    c0 = time.process_time()
    rng = np.random.default_rng(seed)
    a = rng.random((n, n))
    b = rng.random((n, n))
    total = float((a @ b).sum())
    cpu = time.process_time() - c0
    return {
        "sum": total,
        "cpu_s": cpu,
        "threads": len(os.listdir("/proc/self/task")),
        "blas": blas_info(),
    }


def calibrate(n: int, reps: int = 3) -> dict[str, Any]:
    """CPU seconds of one ``matmul`` task here (the caller runs this with one BLAS
    thread: the work a task is, without any parallelism)."""
    matmul((0, 64))
    cpu = statistics.median(matmul((k, n))["cpu_s"] for k in range(reps))
    return {"cpu_s": cpu, "blas": blas_info()}
