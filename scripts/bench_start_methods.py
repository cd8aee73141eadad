"""How long a new pool takes to run its first tasks, per start method.

    python scripts/bench_start_methods.py [--rounds 9]

For each of fork, forkserver and spawn: the first pool of the program (for
forkserver this includes starting the fork server), then the median over rounds of
a new ProcessAlloter(2) running two no-op tasks (split into creating, running and
closing), and the time to replace a crashed worker and run one task on it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import time

from alloter_mp import ProcessAlloter, WorkerCrashed


def noop() -> int:
    return 1


def crash() -> None:
    os._exit(1)


def new_pool(method: str) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    alloter = ProcessAlloter(2, start_method=method)
    t1 = time.perf_counter()
    alloter.exec(noop, noop)
    t2 = time.perf_counter()
    alloter.close()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def replace_crashed(method: str, rounds: int) -> float:
    times = []
    with ProcessAlloter(1, start_method=method) as alloter:
        alloter.exec(noop)
        for _ in range(rounds):
            with contextlib.suppress(WorkerCrashed):
                alloter.exec(crash)
            start = time.perf_counter()
            alloter.exec(noop)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(
        f"{'method':<11} {'first pool':>10} {'create':>8} {'2 tasks':>8} {'close':>8} "
        f"{'total':>8} {'replace+task':>13}   (ms, medians of {args.rounds})"
    )
    for method in ("fork", "forkserver", "spawn"):
        if method not in multiprocessing.get_all_start_methods():
            continue
        first = sum(new_pool(method))
        rows = [new_pool(method) for _ in range(args.rounds)]
        create, run, close = (statistics.median(col) * 1000 for col in zip(*rows, strict=True))
        again = replace_crashed(method, args.rounds) * 1000
        print(
            f"{method:<11} {first * 1000:10.1f} {create:8.2f} {run:8.2f} {close:8.2f} "
            f"{create + run + close:8.2f} {again:13.2f}"
        )


if __name__ == "__main__":
    main()
