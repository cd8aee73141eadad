"""The other end of the shared-memory tests: a process that reads what it is sent.

It runs in a real child process (any start method) on one end of a duplex
multiprocessing Pipe, speaking the way a worker will: a pickled message, then the
descriptors it announces. For what it loads it reports whether each array is
read-only and whether its memory lies in a shared mapping (from /proc/self/maps), so
the tests can tell a shared view from a copy.
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
import time
from typing import Any

from alloter_mp import _shm


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapping_of(address: int) -> str:
    """The path of the mapping holding ``address`` in this process ('' if anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5].strip() if len(fields) > 5 else ""
    raise LookupError(f"{address:#x} is not mapped")


def describe(obj: Any) -> dict[str, Any]:
    import numpy as np

    if isinstance(obj, memoryview):
        array = np.frombuffer(obj, dtype=np.uint8)
        kind = "memoryview"
        readonly = obj.readonly
    elif isinstance(obj, np.ndarray):
        array = obj
        kind = "ndarray"
        readonly = not obj.flags.writeable
    else:
        return {"kind": type(obj).__name__, "value": obj}
    address = array.__array_interface__["data"][0]
    return {
        "kind": kind,
        "readonly": readonly,
        "address": address,
        "mapping": mapping_of(address) if array.nbytes else "",
        "checksum": float(array.astype(np.float64, copy=False).sum()) if array.size else 0.0,
        "nbytes": int(array.nbytes),
    }


def serve(conn: Any, anonymous_files: bool | None = None) -> None:
    """Answer the tests' requests until the pipe closes."""
    inbox = _shm.Inbox()
    held: list[Any] = []
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "load":
            # ("load", [packed, ...], new segment count, result size in bytes, hold)
            _, packs, new, result_bytes, hold = message
            inbox.add(_shm.recv_fds(conn, new))
            objects = [inbox.loads(p) for p in packs]
            report = [[describe(o) for o in obj] for obj in objects]
            if hold:
                held.append(objects)
            del objects
            reply_result(conn, report, result_bytes, anonymous_files)
        elif kind == "call":
            # ("call", packed function, new segment count): run it on what it closes over
            _, packed, new = message
            inbox.add(_shm.recv_fds(conn, new))
            conn.send_bytes(pickle.dumps(inbox.loads(packed)()))
        elif kind == "release":
            inbox.release()
            held.clear()
            gc.collect()
            conn.send_bytes(pickle.dumps(open_fds()))
        elif kind == "fds":
            conn.send_bytes(pickle.dumps(open_fds()))
        elif kind == "sleep":
            time.sleep(message[1])
        elif kind == "exit":
            return


def reply_result(conn: Any, report: Any, result_bytes: int, anonymous_files: bool | None) -> None:
    import numpy as np

    result = np.full(result_bytes // 8, 2.5) if result_bytes else None
    with _shm.Outbox(anonymous_files=anonymous_files) as out:
        packed = out.dumps((report, result), result=True)
        out.seal()
        conn.send_bytes(pickle.dumps((packed, out.segment_count)))
        _shm.send_fds(conn, out.fds())
    # Our copies are closed: the segment now lives in the pipe and the parent.


if __name__ == "__main__":  # pragma: no cover - run by hand to poke at it
    sys.exit("run by the tests")
