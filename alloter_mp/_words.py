"""The words of shared memory between the parent and one worker process.

Each worker has a small array of 64-bit integers in shared memory. Both sides read
it without locks or messages, which is what makes them cheap enough to touch per
task (and per item of a map chunk):

* the parent writes ``CANCEL_BATCH`` and ``CANCEL_TASK`` to end work: the task sees
  :func:`alloter_mp.cancelled` turn ``True`` and the worker skips what it holds of
  that batch;
* the worker writes what it is doing, so that the parent, reading the words when
  the worker dies or a timer fires, knows which task ran (and which never started),
  which item of a chunk, and since when.

Every task the parent sends to a worker gets a sequence number (``seq``), counted
per worker from 1; a task is named in the words by that number, never by its index
in a call, so that words left over from an earlier call cannot be mistaken for the
current one.

Each word has a single writer; a reader may see a word a moment late but never
torn.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CANCEL_BATCH",
    "CANCEL_TASK",
    "COUNT",
    "ITEM",
    "RUNNING",
    "SKIP_FROM",
    "SKIP_TO",
    "STARTED",
    "START_NS",
    "new_words",
    "task_key",
    "view",
]

# Written by the parent.
CANCEL_BATCH = 0  # the id of a batch that has ended: its tasks are cancelled
CANCEL_TASK = 1  # the task_key() of one task the parent ended on its own
SKIP_FROM = 6  # tasks with SKIP_FROM <= seq <= SKIP_TO are skipped without starting
SKIP_TO = 7
# Written by the worker.
RUNNING = 2  # seq of the task running now; 0 between tasks
STARTED = 3  # seq of the last task started (it only grows)
ITEM = 4  # offset, in a map chunk, of the item running now
START_NS = 5  # time.monotonic() * 1e9 when the running task (or chunk item) started
COUNT = 8

# Items of a chunk are told apart in a task key by the low bits.
_ITEM_BITS = 32


def task_key(seq: int, item: int = 0) -> int:
    """The key naming task ``seq`` (item ``item`` of it, for a map chunk)."""
    return (seq << _ITEM_BITS) | item


def new_words(ctx: Any) -> Any:
    """A zeroed shared array of :data:`COUNT` words, made with multiprocessing ``ctx``."""
    return ctx.RawArray("q", COUNT)


def view(words: Any) -> memoryview:
    """The words as a memoryview of int64: cheaper to index than the array itself."""
    return memoryview(words).cast("B").cast("q")
