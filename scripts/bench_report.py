#!/usr/bin/env python
"""What reporting costs: exec_report against exec on the same tiny tasks, side by side.

    python scripts/bench_report.py                    # 2,000 tasks, 9 rounds, 2 workers
    python scripts/bench_report.py --tasks 2000 --rounds 15 --workers 2

Both calls run on one warm alloter, alternating within each round (the order flips
every round), so they see the same workers, the same machine load and the same
caches. Each task is ``functools.partial(abs, -i)``: it pickles by reference and does
next to nothing, so what is measured is the per-task machinery. exec_report adds, per
task, a reset of the worker's memory high-water mark (a write to
/proc/self/clear_refs) and a read of /proc/self/status, a CPU-time reading, and at the
end one TaskReport per task.

Prints the time of every round, the medians, the ratio exec_report / exec and the
overhead per task.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

from alloter_mp import ProcessAlloter


def _tasks(n: int) -> list[functools.partial[int]]:
    return [functools.partial(abs, -i) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per call (2000)")
    parser.add_argument("--rounds", type=int, default=9, help="measured rounds (9)")
    parser.add_argument("--workers", type=int, default=2, help="alloter limit (2)")
    args = parser.parse_args(argv)

    n = args.tasks
    expected = list(range(n))
    times: dict[str, list[float]] = {"exec": [], "exec_report": []}
    with ProcessAlloter(args.workers) as alloter:

        def run_exec() -> float:
            tasks = _tasks(n)
            t0 = time.perf_counter()
            results = alloter.exec(*tasks)
            elapsed = time.perf_counter() - t0
            assert results == expected
            return elapsed

        def run_report() -> float:
            tasks = _tasks(n)
            t0 = time.perf_counter()
            report = alloter.exec_report(*tasks)
            elapsed = time.perf_counter() - t0
            assert report.ok and report.results == expected
            assert all(t.peak_rss > 0 for t in report.tasks)
            return elapsed

        # Warm up: workers started, code paths and caches hot.
        run_exec()
        run_report()

        print(
            f"alloter_mp exec vs exec_report: {n} tiny tasks per call, "
            f"limit {args.workers}, {args.rounds} rounds, python {sys.version.split()[0]}, "
            f"{os.cpu_count()} cpus"
        )
        print(f"{'round':>5}  {'exec ms':>9}  {'exec_report ms':>14}  {'ratio':>6}")
        for r in range(args.rounds):
            pair = [("exec", run_exec), ("exec_report", run_report)]
            if r % 2:
                pair.reverse()
            got = {name: fn() for name, fn in pair}
            for name, value in got.items():
                times[name].append(value)
            print(
                f"{r + 1:>5}  {got['exec'] * 1e3:>9.1f}  {got['exec_report'] * 1e3:>14.1f}  "
                f"{got['exec_report'] / got['exec']:>6.2f}"
            )

    med_exec = statistics.median(times["exec"])
    med_report = statistics.median(times["exec_report"])
    ratios = [b / a for a, b in zip(times["exec"], times["exec_report"], strict=True)]
    print()
    print(f"median exec         {med_exec * 1e3:8.1f} ms  ({n / med_exec:,.0f} tasks/s)")
    print(f"median exec_report  {med_report * 1e3:8.1f} ms  ({n / med_report:,.0f} tasks/s)")
    print(f"ratio of medians    {med_report / med_exec:8.2f}")
    print(f"median of ratios    {statistics.median(ratios):8.2f}")
    print(f"overhead per task   {(med_report - med_exec) / n * 1e6:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
