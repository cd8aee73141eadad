"""The pool's bookkeeping: an alloter's share of it, and a batch it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._batch import Batch

if TYPE_CHECKING:
    from ._handle import WorkerHandle

__all__ = ["PoolRun", "Quota"]


class Quota:
    """An alloter's share of a pool: at most ``limit`` workers busy with its tasks.

    Alloters made from one another (``with_options``) share one quota, and so one
    limit; ``None`` means no limit of its own (the pool's size still bounds it).
    """

    __slots__ = ("active", "limit")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.active = 0

    def full(self) -> bool:
        return self.limit is not None and self.active >= self.limit


class PoolRun:
    """The pool's bookkeeping for one batch it runs."""

    __slots__ = (
        "avg_wall",
        "batch",
        "end_handled",
        "forgotten",
        "holders",
        "params",
        "quota",
        "sharers",
        "waiting",
    )

    def __init__(self, batch: Batch, quota: Quota) -> None:
        self.batch = batch
        self.quota = quota
        self.end_handled = False  # the workers holding its tasks were told it ended
        self.avg_wall: float | None = None  # the batch's task times, for sending ahead
        self.holders = 0  # workers holding tasks of it
        self.waiting = False  # in the pool's queue of runs with tasks to hand over
        self.forgotten = False  # settled and let go by the pool
        # What every TASKS message of this batch tells the worker (see _worker).
        self.params = (
            batch.id,
            batch.deadline,
            batch.measure,
            batch.fail_fast,
            batch.task_timeout,
            batch.per_item,
            batch.share_threshold,
        )
        # Workers that were sent its shared segments and still hold them (then
        # ``batch.segments_freed`` is set once none does: see WorkerPool._free_segments).
        self.sharers: set[WorkerHandle] | None = None
