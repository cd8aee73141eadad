"""Run a mixed batch with exec_report and print what each task cost.

    python examples/report_demo.py [--out DIR]

The batch has tasks that return, a CPU burner, a sleeper, one that allocates memory,
one that raises, and siblings that are ended by that failure: the report shows every
one of them with its status, wall time, CPU time, peak memory and worker pid. Its
timeline is written to DIR (default: the system's temporary folder) as a Chrome
trace (``report_timeline.json``: open it in ui.perfetto.dev or chrome://tracing) and,
when matplotlib is installed (``pip install 'alloter-mp[plot]'``), as an image
(``report_timeline.png``). A second batch runs under a memory limit, where a runaway
task is killed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import alloter_mp
from alloter_mp import ProcessAlloter

MiB = 2**20


def count_primes(n: int) -> int:
    """CPU-bound work: count the primes below ``n``."""
    sieve = bytearray([1]) * n
    sieve[:2] = b"\0\0"
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, n, i)))
    return sum(sieve)


def burn(seconds: float) -> str:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return f"burned {seconds} s"


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return f"slept {seconds} s"


def allocate(mib: int) -> str:
    blocks = [bytearray(MiB) for _ in range(mib)]  # zero-filled, so resident
    return f"held {len(blocks)} MiB"


def bad_input() -> None:
    time.sleep(0.5)
    raise ValueError("record 17 has no 'id' field")


def polite_long_job() -> str:
    """Checks cancelled() and stops early when a sibling fails."""
    for step in range(200):
        if alloter_mp.cancelled():
            return f"stopped at step {step}"
        time.sleep(0.01)
    return "finished"


def grow_forever() -> None:
    blocks = []
    while True:
        blocks.append(bytearray(10 * MiB))


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a mixed batch and show its report.")
    parser.add_argument("--out", default=tempfile.gettempdir(), help="where the timeline goes")
    out = parser.parse_args().out

    with ProcessAlloter(3, cancel_grace=0.3) as alloter:
        alloter.exec(*[lambda: nap(0.05)] * 3)  # start the workers: the timeline shows tasks
        report = alloter.exec_report(
            bad_input,  # fails at 0.5 s: ends the rest of the batch
            polite_long_job,  # running then: cancelled, returns early
            lambda: count_primes(2_000_000),  # the other tasks take turns on the third worker
            lambda: burn(0.2),
            lambda: nap(0.2),
            lambda: allocate(120),
            lambda: nap(0.2),  # running at 0.5 s: cancelled
            lambda: nap(0.1),  # still queued then: skipped
            lambda: nap(0.1),
        )
        print("A mixed batch, limit 3:")
        print(report)
        print()
        print("ok:", report.ok, "| counts:", json.dumps(report.counts()))
        print("failure:", report.to_dict()["error"])
        trace = os.path.join(out, "report_timeline.json")
        report.to_chrome_trace(trace)
        print(f"timeline: {trace} (open it in ui.perfetto.dev or chrome://tracing)")
        image = os.path.join(out, "report_timeline.png")
        # matplotlib's first use on a machine says it builds a font cache: not news here.
        logging.getLogger("matplotlib").setLevel(logging.ERROR)
        try:
            report.plot(image)
        except ImportError as exc:
            print(f"no image: {exc}")
        else:
            print(f"timeline image: {image}")
        print()
        print("workers now:")
        for row in alloter.stats():
            print(
                f"  pid {row.pid}: {row.rss / MiB:.1f} MiB resident, "
                f"{row.cpu_percent:.0f}% cpu, {row.tasks_done} tasks done"
            )

    with ProcessAlloter(2, memory_limit=200 * MiB, cancel_grace=0.0) as alloter:
        report = alloter.exec_report(lambda: allocate(50), grow_forever, lambda: nap(5))
        print()
        print("Under memory_limit=200 MiB:")
        print(report)


if __name__ == "__main__":
    main()
