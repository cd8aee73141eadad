"""Measure ``alloter-mp run`` on a long input: when the first job starts, and memory.

    python scripts/cli_stream_memory.py --lines 1000000 --seconds 60

A producer writes ``--lines`` input lines into the tool's stdin through a pipe (as
``seq N | alloter-mp run ...`` would); each job is ``echo`` of its input. The script
reports when the first job's output arrived and whether the producer had finished
writing by then, and samples the tool's resident memory every half second until
all jobs ran or ``--seconds`` passed (then the tool is interrupted, as Ctrl-C would).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import psutil


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args()

    tool = subprocess.Popen(
        [sys.executable, "-m", "alloter_mp", "run", "-j", str(args.jobs), "--", "echo", "{}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert tool.stdin is not None and tool.stdout is not None
    written = threading.Event()
    started = time.monotonic()

    def produce() -> None:
        stdin = tool.stdin
        assert stdin is not None
        try:
            block = []
            for n in range(1, args.lines + 1):
                block.append(f"{n}\n")
                if len(block) == 1000:
                    stdin.write("".join(block).encode())
                    block.clear()
            stdin.write("".join(block).encode())
            stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        written.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    first = tool.stdout.readline()
    first_at = time.monotonic() - started
    producer_done_at_first = written.is_set()
    lines_out = 1 if first else 0

    def consume() -> None:
        nonlocal lines_out
        assert tool.stdout is not None
        for _ in tool.stdout:
            lines_out += 1

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    proc = psutil.Process(tool.pid)
    samples: list[tuple[float, int, int]] = []
    while tool.poll() is None and time.monotonic() - started < args.seconds:
        try:
            samples.append((time.monotonic() - started, proc.memory_info().rss, lines_out))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    interrupted = tool.poll() is None
    if interrupted:
        os.kill(tool.pid, signal.SIGINT)
    tool.wait(timeout=60)
    consumer.join(timeout=10)
    elapsed = time.monotonic() - started

    print(f"input lines: {args.lines:,}; -j {args.jobs}")
    print(
        f"first job's output after {first_at * 1000:.0f} ms; the producer had "
        f"{'finished' if producer_done_at_first else 'NOT finished'} writing the input then"
    )
    print(
        f"jobs done: {lines_out:,} in {elapsed:.1f} s"
        + (" (stopped with SIGINT at the time limit)" if interrupted else " (all)")
    )
    if samples:
        rss = [r for _, r, _ in samples]
        print(
            f"tool RSS: first {rss[0] / 2**20:.1f} MiB, max {max(rss) / 2**20:.1f} MiB, "
            f"last {rss[-1] / 2**20:.1f} MiB over {len(rss)} samples"
        )
        step = max(1, len(samples) // 8)
        for at, r, out in samples[::step]:
            print(f"  t={at:6.1f} s  rss={r / 2**20:6.1f} MiB  jobs done={out:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
