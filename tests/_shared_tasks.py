"""Tasks for the shared-memory tests: they say where their arrays live.

numpy is imported inside each task, so that importing this module stays cheap.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

MEMFD = "memfd:alloter_mp"


def mapping_of(address: int) -> str:
    """The path of the mapping that holds ``address`` in this process ('' if none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def segment_size(path: str) -> int:
    """The size of the segment this process holds under ``path`` (-1 if none)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path.replace(" (deleted)", "") + " (deleted)":
                return os.fstat(int(fd)).st_size
        except OSError:
            continue
    return -1


def describe(array: Any) -> dict[str, Any]:
    """Where ``array``'s data lies here, and whether it may be written."""
    address = array.__array_interface__["data"][0]
    path = mapping_of(address)
    return {
        "pid": os.getpid(),
        "readonly": not array.flags.writeable,
        "mapping": path,
        "shared": MEMFD in path or "/dev/shm/" in path,
        "segment": segment_size(path) if MEMFD in path else -1,
        "sum": float(array.sum()),
    }


def describe_all(*arrays: Any) -> list[dict[str, Any]]:
    return [describe(a) for a in arrays]


def slow_describe(seconds: float, array: Any) -> dict[str, Any]:
    time.sleep(seconds)
    return describe(array)


def full(n: int, value: float) -> Any:
    import numpy as np

    return np.full(n, value)


def full_or_fail(n: int, value: float) -> Any:
    if value < 0:
        raise ValueError("negative")
    return full(n, value)


def hold(array: Any, seconds: float) -> float:
    """Keep ``array`` mapped for ``seconds``, then say its sum."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
    return float(array[:10].sum())


def fail_with(array: Any, after: float) -> None:
    time.sleep(after)
    raise ValueError(f"failed holding {array.nbytes} bytes")


def crash_with(array: Any, after: float) -> None:
    time.sleep(after)
    os.kill(os.getpid(), signal.SIGKILL)


def total(item: Any) -> float:
    return float(item.sum())
