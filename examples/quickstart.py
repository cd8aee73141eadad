"""Quickstart: fan a CPU-bound job out over worker processes, and compare with serial.

Counts the primes below 2,400,000 in 8 slices, once in this process and once with
ProcessAlloter, then prints both results and timings. Run it:

    python examples/quickstart.py
"""

from __future__ import annotations

import os
import time

from alloter_mp import ProcessAlloter, TaskError


def count_primes(lo: int, hi: int) -> int:
    """Count primes in [lo, hi) by trial division: deliberately CPU-bound."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            count += n == 2
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def main() -> None:
    limit, slices = 2_400_000, 8
    step = limit // slices
    bounds = [(i * step, (i + 1) * step) for i in range(slices)]

    start = time.perf_counter()
    serial = [count_primes(lo, hi) for lo, hi in bounds]
    serial_s = time.perf_counter() - start

    workers = os.cpu_count() or 1
    with ProcessAlloter(workers, timeout=120) as alloter:
        start = time.perf_counter()
        # Each task is a callable with no arguments: a lambda, closure or partial.
        parallel = alloter.exec(*[lambda lo=lo, hi=hi: count_primes(lo, hi) for lo, hi in bounds])
        parallel_s = time.perf_counter() - start

        # A failing task raises TaskError with its index and the worker's traceback.
        try:
            alloter.exec(lambda: count_primes(0, 10), lambda: 1 / 0)
        except TaskError as err:
            print(f"as expected: {err} (task {err.index})")

    assert parallel == serial
    print(f"primes below {limit:,} per slice: {parallel}")
    print(f"total: {sum(parallel):,}")
    print(f"serial:   {serial_s:6.2f} s")
    print(
        f"parallel: {parallel_s:6.2f} s on {workers} worker processes "
        f"({serial_s / parallel_s:.2f}x faster)"
    )


if __name__ == "__main__":
    main()
