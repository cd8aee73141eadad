"""The same fan-out on Ray: a local Ray here, a cluster with one argument changed.

Counts the primes below 1,200,000 in 8 slices with RayAlloter, shows the first
failure ending a call, and prints a report. With no Ray running it starts a local
one (2-3 s) and shuts it down at the end; on a cluster, pass its address:

    pip install -e '.[ray]'
    python examples/ray_fanout.py            # a local Ray, listening on 127.0.0.1
    python examples/ray_fanout.py auto       # the cluster this machine belongs to
"""

from __future__ import annotations

import sys
import time

from alloter_mp import TaskError
from alloter_mp.ray import RayAlloter


def count_primes(lo: int, hi: int) -> int:
    """Count primes in [lo, hi) by trial division: deliberately CPU-bound."""
    count = 0
    for n in range(max(lo, 2), hi):
        d = 2
        while d * d <= n:
            if n % d == 0:
                break
            d += 1
        else:
            count += 1
    return count


def main() -> None:
    address = sys.argv[1] if len(sys.argv) > 1 else None
    limit, slices = 1_200_000, 8
    step = limit // slices
    bounds = [(i * step, (i + 1) * step) for i in range(slices)]

    with RayAlloter(timeout=300, address=address) as alloter:
        start = time.perf_counter()
        counts = alloter.exec(*[lambda lo=lo, hi=hi: count_primes(lo, hi) for lo, hi in bounds])
        print(f"primes below {limit:,}: {sum(counts):,} ({time.perf_counter() - start:.2f} s)")

        # map sends items in chunks: one Ray task per chunk, results in item order.
        print("squares:", alloter.map(lambda x: x * x, range(10)))

        try:
            alloter.exec(lambda: count_primes(0, 10), lambda: 1 / 0)
        except TaskError as err:
            print(f"as expected: {err} (task {err.index})")

        report = alloter.exec_report(lambda: count_primes(0, 200_000), lambda: 1 / 0)
        print(report)


if __name__ == "__main__":
    main()
