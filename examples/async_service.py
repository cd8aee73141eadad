"""An asyncio service that fans CPU work out to worker processes, under time budgets.

Three "requests" arrive at once. Each one splits its CPU-bound job into slices and
awaits them with ``alloter.map_async``, inside ``asyncio.timeout(budget)``. Two fit
their budget; the third does not: when its budget expires, the await is cancelled,
and that cancellation reaches the worker processes: the slices still queued never
start and the running ones are killed (after ``cancel_grace``). The await returns
only once they are gone: the handler checks the processes that ran its slices. Meanwhile a
heartbeat shows that the event loop never stopped answering. Run it:

    python examples/async_service.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from alloter_mp import ProcessAlloter


def burn(seconds: float, note_in: str | None = None) -> int:
    """CPU work for about ``seconds``; returns the pid that did it (and notes it in
    the folder ``note_in``, if given, as it starts)."""
    if note_in is not None:
        Path(note_in, str(os.getpid())).touch()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return os.getpid()


async def handle(alloter: ProcessAlloter, name: str, slices: list[float], budget: float) -> str:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as notes:
        try:
            async with time_budget(budget):
                pids = await alloter.map_async(partial(burn, note_in=notes), slices, chunksize=1)
        except TimeoutError:
            took = time.monotonic() - started
            ran = sorted(int(p.name) for p in Path(notes).iterdir())
            alive = [pid for pid in ran if _alive(pid)]
            return (
                f"{name}: over its {budget:.1f} s budget, stopped after {took:.2f} s; "
                f"the processes that ran its slices {ran}: "
                + (f"STILL ALIVE: {alive}" if alive else "all gone")
            )
    took = time.monotonic() - started
    return f"{name}: done in {took:.2f} s ({len(slices)} slices on workers {sorted(set(pids))})"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def time_budget(seconds: float) -> Any:
    """``asyncio.timeout`` (Python 3.11+); on 3.10, a stand-in made of ``call_later``."""
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(seconds)
    return _Budget(seconds)


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.expired = False

        def expire() -> None:
            self.expired = True
            task.cancel()

        self.handle = asyncio.get_running_loop().call_later(self.seconds, expire)

    async def __aexit__(self, kind: Any, *rest: Any) -> None:
        self.handle.cancel()
        if self.expired and kind is asyncio.CancelledError:
            raise TimeoutError


async def heartbeat(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this (every 10 ms)."""
    longest, last = 0.0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    return longest


async def main() -> None:
    with ProcessAlloter(2, cancel_grace=0.2) as alloter:
        await alloter.exec_async(lambda: None)  # start the workers
        stop = asyncio.Event()
        beat = asyncio.create_task(heartbeat(stop))
        requests = [
            handle(alloter, "request A", [0.2, 0.2], budget=2.0),
            handle(alloter, "request B", [0.1] * 4, budget=2.0),
            handle(alloter, "request C", [5.0, 5.0, 5.0], budget=1.0),
        ]
        for line in await asyncio.gather(*requests):
            print(line)
        stop.set()
        print(f"the event loop's longest pause meanwhile: {await beat * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
