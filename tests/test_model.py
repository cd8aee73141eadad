"""A randomized model test: random batches of faulty tasks against the contract.

Each example draws a limit (1-5) and a batch whose size is drawn relative to it
(empty, under the limit, at it, a few rounds of it, many rounds; at most 30 tasks),
made of tasks of the kinds in :mod:`_faults` (return a value, raise, sleep briefly,
sleep past the timeout, segfault, ``os._exit``, SIGKILL itself, ignore SIGTERM and
spin, start a child and hang, return an unpicklable value, allocate past the memory
limit, wait for ``cancelled()``, fail the first runs and then return). A batch has
one of six shapes: only tasks that return (so that non-empty batches succeed),
ordinary work with one fault in it, ordinary work with tasks that never end by
themselves (so that a deadline or a cancel ends the batch), a weighted mix,
ordinary work with flaky tasks (retried), or ordinary work with tasks that hang
under a per-task timeout. It also draws a timeout, a ``cancel_grace``, a memory
limit, sometimes a ``Context`` (with a deadline, cancelled from another thread, or
cancelled before the call) and the per-task options of contract section 9
(``task_timeout``, ``retries``, ``retry_on``, ``retry_delay``). It runs the batch
on a fresh alloter through ``exec``/``exec_with_context``, ``exec_report``, ``map``
or ``imap`` (the batch's tasks become the items; ``errors="raise"`` or
``"return"``, a chunk size, in or out of order, and an ``imap`` may be closed after
its first results) and checks:

* the outcome is one the contract allows: the results in order when every task
  returns (with ``errors="return"``, a failed item's ``TaskError`` in its place,
  with its own index, the right type and cause); otherwise an error of the right
  type whose index is a task that really ran and really fails on the run it names
  (``WorkerCrashed`` with the right exit code for a crash, ``MemoryLimitExceeded``
  for the memory hog, ``TaskTimeout`` with the task's own timeout, a ``TaskError``
  caused by the task's ``ValueError``...) and that was its last attempt (a failure
  that ``retry_on`` matches is the outcome only once the retries ran out, or the
  call's deadline left no time for the next one); ``ExecTimeout`` only once the
  deadline passed and soon after it; ``Cancelled`` only once the context was
  cancelled (the moment ``cancel()`` was called, not when its timer was due) and
  soon after;
* every run of every task, as its markers tell (each run appends a line with its
  start time): no task runs more than ``retries + 1`` times; a task runs again only
  after a run that failed in a way ``retry_on`` matches; nothing starts after the
  call returned (beyond ``Target.late`` for a start already under way: the
  contract says queued tasks never start once the call has ended);
* a retried failure never ends the siblings: a cooperative task sees
  ``cancelled()`` only once the call has ended (no sooner than the deadline, the
  cancel, or the start of the final failure's run) or its own task timeout passed;
  the outcome is never a failure that was to be retried;
* a report agrees with what ran: ``skipped`` tasks never started and count 0
  attempts, ``attempts`` is the number of runs seen (one more only for a run killed
  before it could write its marker), ``ok`` tasks returned on their last run with
  their result, ``error``/``crashed``/``timeout`` carry the task's own error of the
  right type for what its last run does, ``timeout`` without a ``TaskTimeout`` and
  ``cancelled`` only once the call ended that way;
* timing: a call that ends by itself (every task returned, or failed in place)
  returns no later than its last task's end by itself, where a task that hangs is
  ended at its start + ``task_timeout`` + grace + the kill escalation (plus
  ``Target.late``); a ``TaskTimeout`` that ends an ``exec`` comes by then too;
* the outcome is forced where the model can tell: a batch whose tasks all return
  (flaky ones once retried) with time to spare succeeds; an ``errors="return"``
  map whose tasks all end by themselves with time to spare returns every item; a
  batch with an instant failure that is not retried among its first ``limit`` tasks
  fails with a ``TaskError`` before any deadline (fast return);
* afterwards: the worker of every run that had to be killed or crashed is dead,
  every child process a task started is dead, a cooperative task saw
  ``cancelled()`` on each run (when the grace allowed it), the only processes left
  are the alloter's live workers, with no descendants; the alloter still runs a
  batch correctly; after ``close()`` no process is left and the open file
  descriptors are back to their baseline.

Each example records what it exercised (``hypothesis.event``: success, success
beyond the limit, task error, crash, memory limit, timeout and context cancel in
exec and report mode, a cooperative task told, a task killed, queued tasks skipped,
a retry that succeeded, retries exhausted, a task timeout, failures in place, map
and imap results, an imap closed early); the fixed run then asserts a minimum count
of each (``MIN_COVERAGE``), so a change that stops exercising one fails instead of
passing quietly. The summary (``-s``) prints the counts.

The runner is a parameter (:class:`Target`): this module checks
``ProcessAlloter``; ``test_model_ray.py`` runs the same scenarios and checks on
``RayAlloter``, adapting only what its contract says differs there.

Two tests: the fixed examples (derandomized and drawn before any runs, so the same
200 on every run, plus a few written out, ``EXPLICIT``; ``ALLOTER_MODEL_EXAMPLES``
changes how many are drawn, ``ALLOTER_MODEL_ONLY=3,17`` runs only those), and a
fresh random run beside them (``ALLOTER_MODEL_FRESH_EXAMPLES``, default 40, 0 turns
it off) whose seed is printed at its start (``-s``, or in the captured output of a
failure); ``ALLOTER_MODEL_SEED=<seed>`` replays it. Each example's choices come from
one seed that Hypothesis draws (see :class:`Choices`: drawn choice by choice, the
200 examples were about 80 different scenarios); ``ALLOTER_MODEL_SHRINK=1`` draws
them choice by choice instead and turns on shrinking (slow: every shrink step runs
real processes). A failure prints the scenario (``note``) and Hypothesis's
``@reproduce_failure`` blob.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import _faults as F
import pytest
from _faults import Fault
from hypothesis import HealthCheck, Phase, event, given, note, seed, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from alloter_mp import (
    Cancelled,
    Context,
    ExecTimeout,
    MemoryLimitExceeded,
    ProcessAlloter,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
)

if TYPE_CHECKING:
    from alloter_mp._calls import BatchAlloter

T = TypeVar("T")

# Hypothesis imports libcst to print a patch for a failing example; libcst triggers a
# DeprecationWarning (mypy_extensions), which the strict warning filter turns into an
# internal error that hides the failure. Import it here, once, with warnings ignored.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

EXAMPLES = int(os.environ.get("ALLOTER_MODEL_EXAMPLES", "200"))
SEED = os.environ.get("ALLOTER_MODEL_SEED")
SHRINK = os.environ.get("ALLOTER_MODEL_SHRINK") == "1"

MEMORY_LIMIT = 96 * 1024 * 1024
# How late ExecTimeout / Cancelled may come (the contract says 50 ms; this leaves
# room for a loaded 2-core CI machine while still catching a missed deadline).
LATE = 0.3
# The pool's SIGTERM -> SIGKILL escalation (alloter_mp._handle.KILL_ESCALATION).
ESCALATION = 0.2
# How long after the grace a killed worker may still live (the escalation plus room).
KILL_SLACK = ESCALATION + 2.5

# -- the model of a run -----------------------------------------------------------------

# What one run of a task does by itself (its "fate").
RETURNS = "returns"
RAISES = "raises"  # a TaskError caused by its ValueError
UNPICKLABLE_RESULT = "returns an unpicklable result"  # a TaskError saying so
CRASHES = "crashes"  # WorkerCrashed
MEMORY_KILLED = "passes the memory limit"  # MemoryLimitExceeded
TIMES_OUT = "passes its task timeout"  # TaskTimeout
HANGS = "hangs"  # never ends by itself: only the call's end stops it

# The retry_on tuples the scenarios use, and the fates each one retries (contract
# section 9: matched against WorkerCrashed, TaskTimeout and MemoryLimitExceeded
# themselves, else against the type of the task's own exception; (Exception,)
# retries everything).
RETRY_ON: dict[str, tuple[tuple[type[BaseException], ...], frozenset[str]]] = {
    "default": ((WorkerCrashed, TaskTimeout), frozenset({CRASHES, MEMORY_KILLED, TIMES_OUT})),
    "Exception": (
        (Exception,),
        frozenset({RAISES, UNPICKLABLE_RESULT, CRASHES, MEMORY_KILLED, TIMES_OUT}),
    ),
    "ValueError": ((ValueError,), frozenset({RAISES})),
    "WorkerCrashed": ((WorkerCrashed,), frozenset({CRASHES, MEMORY_KILLED})),
    "TaskTimeout": ((TaskTimeout,), frozenset({TIMES_OUT})),
}
# How long the memory hog takes to pass the limit, at most.
MEMORY_FILL = 0.5
# How long a crashed worker may take to be replaced (a retry waits for it).
RESPAWN = 0.5


def retried_by(retry_on: str, fate: str) -> bool:
    """Whether the ``retry_on`` of that name matches a failure of this fate."""
    return fate in RETRY_ON[retry_on][1]


def retried(sc: Scenario, fate: str) -> bool:
    """Whether the scenario's ``retry_on`` matches a failure of this fate."""
    return retried_by(sc.retry_on, fate)


def fates(sc: Scenario, fault: Fault, run: int) -> frozenset[str]:
    """What run ``run`` (1-based) of ``fault`` may do by itself."""
    kind = fault.kind
    tt = sc.task_timeout
    if kind == F.FLAKY:
        how, failures = fault.param
        if run > failures:
            return frozenset({RETURNS})
        kind = {"raise": F.RAISE, "exit": F.EXIT, "hang": F.SLEEP_LONG}[how]
    if kind == F.SLEEP and tt is not None and fault.param > tt - SLEEP_MARGIN:
        return frozenset({RETURNS, TIMES_OUT})
    if kind in F.BENIGN:
        return frozenset({RETURNS})
    if kind == F.RAISE:
        return frozenset({RAISES})
    if kind == F.UNPICKLABLE:
        return frozenset({UNPICKLABLE_RESULT})
    if kind == F.MEMORY:
        return frozenset({MEMORY_KILLED} if tt is None else {MEMORY_KILLED, TIMES_OUT})
    if kind in F.CRASHING:
        return frozenset({CRASHES})
    assert kind in F.HANGING, kind
    return frozenset({HANGS} if tt is None else {TIMES_OUT})


def run_length(sc: Scenario, fault: Fault, fate: str, escalation: float) -> float:
    """How long a run of this fate lasts at most by itself, from its start."""
    if fate == RETURNS:
        return float(fault.param) if fault.kind == F.SLEEP else 0.0
    if fate == TIMES_OUT:
        assert sc.task_timeout is not None
        return sc.task_timeout + sc.grace + escalation
    if fate == MEMORY_KILLED:
        return MEMORY_FILL
    if fate == HANGS:
        return math.inf
    return 0.0


def expected_runs(sc: Scenario, fault: Fault) -> list[frozenset[str]]:
    """The fates of the runs a task makes when nothing ends the call: it runs again
    while its run may fail in a way that is retried and retries remain."""
    out = []
    for run in range(1, sc.retries + 2):
        possible = fates(sc, fault, run)
        out.append(possible)
        if not any(retried(sc, fate) for fate in possible):
            break
    return out


def _chain(sc: Scenario, fault: Fault, escalation: float) -> float:
    """How long a task may take by itself, all its runs and retry delays included."""
    total = 0.0
    for k, possible in enumerate(expected_runs(sc, fault), start=1):
        total += max(run_length(sc, fault, fate, escalation) for fate in possible)
        if k > 1:
            total += sc.retry_delay * 2 ** (k - 2)
        if CRASHES in possible or MEMORY_KILLED in possible:
            total += RESPAWN
    return total


def _worst_length(sc: Scenario) -> float:
    chains = [_chain(sc, f, ESCALATION) for f in sc.faults]
    return sum(chains) / sc.limit + max(chains, default=0.0)


# -- scenarios ------------------------------------------------------------------------

# Kinds weighted so that most batches mix a few faults into ordinary work.
_KIND_WEIGHTS = {
    F.VALUE: 10,
    F.SLEEP: 3,
    F.RAISE: 2,
    F.SEGFAULT: 1,
    F.EXIT: 1,
    F.SIGKILL_SELF: 1,
    F.UNPICKLABLE: 1,
    F.MEMORY: 1,
    F.SLEEP_LONG: 1,
    F.COOPERATIVE: 1,
    F.IGNORE_TERM: 1,
    F.CHILD_HANG: 1,
}
_WEIGHTED_KINDS = [k for k, n in _KIND_WEIGHTS.items() for _ in range(n)]
# The one fault of a "one-fault" batch: every kind alike (the weights above would
# make the rare ones, the memory hog say, too rare to count on).
_FAULT_KINDS = [k for k in F.ALL_KINDS if k not in F.BENIGN]
_HANGS_KINDS = [F.VALUE, F.VALUE, F.SLEEP, *sorted(F.HANGING)]  # sorted: sets vary by run
_ORDINARY = [F.VALUE, F.VALUE, F.SLEEP]
# What hangs under a task timeout: a cooperative task (told by its own timeout) as
# often as the rest together, and a flaky one whose first runs hang.
_TIMEOUTS_KINDS = [*sorted(F.HANGING), F.COOPERATIVE, F.COOPERATIVE, F.FLAKY]

_PARAMS: dict[str, Sequence[Any]] = {
    F.VALUE: range(10_001),
    F.SLEEP: (0.01, 0.02, 0.05, 0.1, 0.2, 0.3),
    F.EXIT: (0, 1, 3, 70),
    F.CHILD_HANG: F.CHILD_MODES,
}

# What a batch is made of: only tasks that return (so that non-empty batches do
# succeed, and "results in task order" is proven on them), ordinary work with one
# fault somewhere in it, ordinary work with tasks that never end by themselves (so
# that a deadline or a cancel ends the batch, not a failure), the weighted mix,
# ordinary work with flaky tasks (they fail their first runs: retries), or ordinary
# work with a few tasks that hang under a task timeout (they end alone).
SHAPES = ("benign", "benign", "one-fault", "one-fault", "one-fault", "hangs", "hangs", "hangs")
SHAPES += ("mixed", "mixed", "flaky", "flaky", "flaky", "timeouts", "timeouts")
_CTX_MODES = ("none", "none", "none", "deadline", "deadline")
_CTX_MODES += ("cancel", "cancel", "child_cancel", "pre_cancelled", "pre_cancelled")
# A batch that cannot end by itself is ended by a cancel (exec or report) as often
# as by a deadline: both must be seen often enough to count.
_CTX_MODES_HANGS = ("none", "deadline", "cancel", "cancel", "child_cancel")
# Flaky batches and batches with task timeouts: mostly left to run (retries and
# tasks ended alone are what they prove), sometimes ended.
_CTX_MODES_PER_TASK = ("none", "none", "none", "deadline", "cancel")
_CTX_MODES_BY_SHAPE = {
    "hangs": _CTX_MODES_HANGS,
    "flaky": _CTX_MODES_PER_TASK,
    "timeouts": _CTX_MODES_PER_TASK,
}
# How many tasks, relative to the limit: none, fewer than the limit, as many, a few
# rounds of it, or many rounds (at most MOST_TASKS).
SIZES = ("empty", "under", "at", "at", "rounds", "rounds", "rounds", "many", "many")
# A batch of only benign tasks is the one that succeeds: more of them go past the
# limit, so that "results in task order" is proven across rounds of workers.
SIZES_BENIGN = ("empty", "under", "at", "rounds", "rounds", "rounds", "many", "many")
# Flaky batches and batches with task timeouts: their retries and hangs cost time.
SIZES_PER_TASK = ("under", "at", "at", "rounds", "rounds", "many")
MOST_TASKS = 30

# The calls: the context modes are exec's and exec_report's (map and imap take
# none); an imap may instead be closed by its consumer after its first results.
ENTRIES = ("exec", "exec", "exec", "exec", "report", "report", "report", "report")
ENTRIES += ("map", "map", "imap", "imap")

# Per-task options (contract section 9). Task timeouts leave every benign task
# (at most 0.3 s of sleep) room to finish, except where SLEEP_MARGIN says.
TASK_TIMEOUTS = (0.3, 0.5, 0.8)
RETRY_DELAYS = (0.0, 0.0, 0.02, 0.05)
# A sleep this close to the task timeout may pass it (a worker's start is counted).
SLEEP_MARGIN = 0.2
# Flaky batches retry everything more often than the rest (so that retries succeed).
_RETRY_ON_FLAKY = ("Exception", "Exception", *sorted(RETRY_ON))


class Choices:
    """Where a scenario's choices come from: one seed per example, drawn by
    Hypothesis, or (``ALLOTER_MODEL_SHRINK=1``) Hypothesis itself, choice by choice.

    Why a seed: Hypothesis's generation makes up to five near-copies of each example
    it draws, each with one draw copied over another of the same kind, so 200
    examples drawn choice by choice were about 80 different scenarios (measured:
    runs of up to seven that differ in a task or two). Real processes make every
    example cost a fraction of a second; a seed each makes every example its own.
    Shrinking needs the choices drawn one by one, so that it can simplify them.
    """

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.rng = None if SHRINK else random.Random(draw(st.integers(0, 2**64 - 1)))

    def one(self, options: Sequence[T]) -> T:
        if self.rng is None:
            return self.draw(st.sampled_from(options))
        return self.rng.choice(options)

    def number(self, low: int, high: int) -> int:
        if self.rng is None:
            return self.draw(st.integers(low, high))
        return self.rng.randint(low, high)


def _fault(choose: Choices, kinds: Sequence[str], memory: bool) -> Fault:
    kind = choose.one(kinds)
    if kind == F.MEMORY and not memory:
        kind = F.RAISE  # without a memory limit the hog would never be stopped
    param = choose.one(_PARAMS[kind]) if kind in _PARAMS else None
    return Fault(kind, param)


# How a flaky task fails, by the fate retry_on must match to retry it.
_FLAKY_MODE_OF = {RAISES: "raise", CRASHES: "exit", TIMES_OUT: "hang"}


def _flaky(choose: Choices, task_timeout: float | None, retry_on: str) -> Fault:
    # Mostly a way of failing that retry_on retries (so that retries do succeed, or
    # run out), sometimes any (a failure that is not retried).
    matched = sorted(m for fate, m in _FLAKY_MODE_OF.items() if retried_by(retry_on, fate))
    how = choose.one([*matched, *matched, *matched, *F.FLAKY_MODES])
    if how == "hang" and task_timeout is None:
        how = "raise"  # nothing would end its hanging runs but the call's end
    return Fault(F.FLAKY, (how, choose.one([1, 1, 2, 3])))


def _size(choose: Choices, limit: int, sizes: tuple[str, ...] = SIZES) -> int:
    size = choose.one(sizes)
    if size == "empty":
        return 0
    if size == "under":
        return choose.number(1, max(1, limit - 1))
    if size == "at":
        return limit
    if size == "rounds":
        return choose.number(limit + 1, min(MOST_TASKS, 3 * limit))
    return choose.number(min(MOST_TASKS, 3 * limit + 1), MOST_TASKS)


@dataclass
class Scenario:
    limit: int
    timeout: float | None
    grace: float
    memory_limit: int | None
    ctx_mode: str  # none | deadline | cancel | child_cancel | pre_cancelled
    ctx_after: float
    entry: str  # exec | report | map | imap
    faults: list[Fault] = field(default_factory=list)
    shape: str = "mixed"
    task_timeout: float | None = None
    retries: int = 0
    retry_on: str = "default"  # a key of RETRY_ON
    retry_delay: float = 0.0
    errors: str = "raise"  # map and imap
    chunksize: int | None = None  # map and imap
    ordered: bool = True  # imap
    close_after: int | None = None  # imap: the consumer closes it after this many results

    def short(self) -> str:
        kinds = ",".join(f.kind if f.param is None else f"{f.kind}({f.param})" for f in self.faults)
        call = self.entry
        if self.entry in ("map", "imap"):
            call += f"(errors={self.errors}, chunksize={self.chunksize}"
            if self.entry == "imap":
                call += f", ordered={self.ordered}, close_after={self.close_after}"
            call += ")"
        return (
            f"limit={self.limit} timeout={self.timeout} grace={self.grace} "
            f"memory_limit={self.memory_limit} task_timeout={self.task_timeout} "
            f"retries={self.retries} retry_on={self.retry_on} retry_delay={self.retry_delay} "
            f"ctx={self.ctx_mode}@{self.ctx_after} entry={call} shape={self.shape} "
            f"tasks=[{kinds}]"
        )

    def options(self) -> tuple[Any, ...]:
        return (
            self.limit,
            self.timeout,
            self.grace,
            self.memory_limit is not None,
            self.ctx_mode,
            self.ctx_after,
            self.entry,
            self.task_timeout,
            self.retries,
            self.retry_on,
            self.retry_delay,
            self.errors,
            self.chunksize,
            self.ordered,
            self.close_after,
        )

    def alloter_options(self) -> dict[str, Any]:
        """The options of the alloter under test (both targets take them all)."""
        return {
            "timeout": self.timeout,
            "cancel_grace": self.grace,
            "memory_limit": self.memory_limit,
            "task_timeout": self.task_timeout,
            "retries": self.retries,
            "retry_on": RETRY_ON[self.retry_on][0],
            "retry_delay": self.retry_delay,
        }

    @property
    def keep_going(self) -> bool:
        return self.entry in ("map", "imap") and self.errors == "return"


@st.composite
def scenarios(draw: st.DrawFn, memory_limit: int = MEMORY_LIMIT) -> Scenario:
    choose = Choices(draw)
    # A memory hog meets a memory limit (else it would be a RAISE, see ``_fault``).
    memory = choose.one([True, True, False])
    limit = choose.number(1, 5)
    shape = choose.one(SHAPES)
    # Per-task options: always for the shapes made for them, else one batch in three.
    per_task = shape in ("flaky", "timeouts") or choose.one([False, False, True])
    task_timeout = None
    retries, retry_on, retry_delay = 0, "default", 0.0
    if per_task:
        task_timeout = choose.one(TASK_TIMEOUTS if shape == "timeouts" else (None, *TASK_TIMEOUTS))
        retries = choose.one((1, 2, 2) if shape == "flaky" else (0, 1, 2))
        retry_on = choose.one(_RETRY_ON_FLAKY if shape == "flaky" else sorted(RETRY_ON))
        retry_delay = choose.one(RETRY_DELAYS)
    if shape == "benign":
        n = _size(choose, limit, SIZES_BENIGN)
        tasks = [_fault(choose, _ORDINARY, memory) for _ in range(n)]
    elif shape in ("flaky", "timeouts"):
        n = _size(choose, limit, SIZES_PER_TASK)
        tasks = [_fault(choose, _ORDINARY, memory) for _ in range(n)]
        for _ in range(choose.number(1, min(3, n))):
            if shape == "flaky":
                special = _flaky(choose, task_timeout, retry_on)
            else:
                special = _fault(choose, _TIMEOUTS_KINDS, memory)
                if special.kind == F.FLAKY:
                    special = Fault(F.FLAKY, ("hang", choose.one([1, 2])))
            tasks[choose.number(0, n - 1)] = special
    else:
        n = _size(choose, limit)
        if shape == "one-fault" and n:
            tasks = [_fault(choose, _ORDINARY, memory) for _ in range(n - 1)]
            tasks.insert(choose.number(0, n - 1), _fault(choose, _FAULT_KINDS, memory))
        elif shape == "hangs":
            tasks = [_fault(choose, _HANGS_KINDS, memory) for _ in range(n)]
        else:
            tasks = [_fault(choose, _WEIGHTED_KINDS, memory) for _ in range(n)]
    entry = choose.one(ENTRIES)
    sc = Scenario(
        limit=limit,
        timeout=choose.one(
            # Benign, flaky and timeouts batches mostly get time to finish: success
            # (after retries) and tasks ended alone are what they prove.
            [None, None, None, None, 0.6, 1.0, 1.5]
            if shape in ("benign", "flaky", "timeouts")
            else [None, None, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5]
        ),
        grace=choose.one([0.0, 0.02, 0.05, 0.1, 0.25, 0.3]),
        memory_limit=memory_limit if memory else None,
        ctx_mode=choose.one(_CTX_MODES_BY_SHAPE.get(shape, _CTX_MODES)),
        ctx_after=choose.one([0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2]),
        entry=entry,
        faults=tasks,
        shape=shape,
        task_timeout=task_timeout,
        retries=retries,
        retry_on=retry_on,
        retry_delay=retry_delay,
    )
    if entry in ("map", "imap"):
        sc.ctx_mode = "none"  # they take no context
        sc.errors = choose.one(["raise", "return", "return"])
        sc.chunksize = choose.one([None, 1, 1, 2, 3])
        if entry == "imap":
            sc.ordered = choose.one([True, True, False])
            sc.close_after = choose.one([None, None, None, 1, 3])
    hangs = any(HANGS in fates(sc, f, 1) for f in sc.faults)
    if hangs and sc.timeout is None and sc.ctx_mode == "none":
        # Something must end a batch that cannot end by itself.
        if entry in ("exec", "report"):
            sc.ctx_mode = "deadline"
        else:
            sc.timeout = sc.ctx_after + 0.3
    if sc.timeout is None and sc.ctx_mode == "none" and _worst_length(sc) > SELF_MOST:
        sc.timeout = 2.0  # retried hangs could take long: keep the example short
    return sc


# A batch may run by itself this long at most (retried hangs); past it, a timeout.
SELF_MOST = 3.0


# -- bookkeeping for the whole run -------------------------------------------------------


@dataclass
class RunStats:
    examples: int = 0
    first_failure: int | None = None
    fd_baseline: int | None = None
    worst_late: float = 0.0
    # How late, past start + task_timeout + grace + escalation, a task ended by its
    # own timeout ended its call (the worst seen; negative: never late).
    worst_task_end: float = -math.inf
    outcomes: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    # What the examples exercised (see ``_coverage``), asserted by the fixed run.
    coverage: Counter[str] = field(default_factory=Counter)
    options: set[tuple[Any, ...]] = field(default_factory=set)
    tasks: int = 0
    started: int = 0
    runs: int = 0
    seconds: float = 0.0
    # The latest a task started after its call returned (negative: never after).
    worst_start_after: float = -math.inf


# -- the runner under test --------------------------------------------------------------


class Target:
    """The runner under test and what its contract says: here ``ProcessAlloter``.

    A subclass (``test_model_ray.RayTarget``) overrides what differs on another runner;
    the scenarios and every check are shared.
    """

    name = "process"
    memory_limit = MEMORY_LIMIT
    late = LATE  # how late ExecTimeout / Cancelled / a decision may come
    kill_slack = KILL_SLACK  # how long after the grace a killed worker may still live
    # How long after its grace a task that ignores being told may take to die.
    escalation = ESCALATION
    # An instant failure among the tasks that start at once must raise a TaskError
    # within ``fast_return`` s when no deadline comes before ``fast_end`` s.
    fast_end = 1.0
    fast_return = 0.9
    # A batch that ends by itself must do so when no deadline comes before twice its
    # ideal time plus ``spare`` s.
    spare = 0.5
    per_task = 0.0  # and plus this much per task

    def __init__(self) -> None:
        self.run = RunStats()

    def make(self, sc: Scenario) -> BatchAlloter:
        return ProcessAlloter(sc.limit, **sc.alloter_options())

    def at_once(self, limit: int) -> int:
        """How many of a batch's tasks really run at once."""
        return limit

    def start_slack(self, sc: Scenario) -> float:
        """How long after a call returned a task may still start: one the worker had
        begun to start when the call ended (queued tasks never start)."""
        return self.late

    def expected_exitcode(self, fault: Fault) -> int | None:
        return F.expected_exitcode(fault)

    def warm_up(self) -> None:
        """Start what lives as long as the program (fork server, resource tracker...)."""
        with ProcessAlloter(2) as a:
            a.exec(lambda: 1, lambda: 2)

    def check_processes(self, sc: Scenario, a: Any, wait: float) -> None:
        """After the batch: the only processes left are the alloter's live workers."""

        def only_workers() -> bool:
            workers = {s.pid for s in a.stats()}
            procs = F.live_descendants()
            return {p.pid for p in procs} == workers and len(workers) <= sc.limit

        assert _wait_for(only_workers, wait), (
            f"processes {[(p.pid, p.cmdline()) for p in F.live_descendants()]} "
            f"but live workers {[s.pid for s in a.stats()]}"
        )

    def check_usable(self, a: Any, sc: Scenario) -> None:
        """After the batch: the alloter still runs a batch correctly."""
        tasks = [lambda i=i: i * i for i in range(2 * sc.limit + 1)]
        # The same workers without the scenario's short timeout: replacing the
        # workers it killed may take longer than that on a loaded machine.
        got = a.with_options(timeout=None).exec_with_context(Context(timeout=15.0), *tasks)
        assert got == [i * i for i in range(len(tasks))], (
            "the alloter gives wrong results afterwards"
        )

    def check_fds(self, baseline: int) -> None:
        """After ``close()``: the open file descriptors are back to their baseline."""
        assert _wait_for(lambda: F.open_fds() <= baseline, 2.0), (
            f"open fds {F.open_fds()} after close(), baseline {baseline}"
        )


PROCESS = Target()


def _fd_baseline(target: Target) -> int:
    if target.run.fd_baseline is None:
        # Warm up: the fork server, the resource tracker and lazily opened files.
        target.warm_up()
        _wait_for(lambda: not F.live_descendants(), 5.0)
        target.run.fd_baseline = F.open_fds()
    return target.run.fd_baseline


def _wait_for(condition: Any, timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


# -- one example ----------------------------------------------------------------------


@dataclass
class Observed:
    outcome: BaseException | None
    # What the call gave, in the order it gave it: exec's (or a successful report's)
    # results, map's list, the items an imap yielded (up to its close). None when
    # the call raised.
    results: list[Any] | None
    report: Any
    elapsed: float
    deadline: float | None  # relative to the call's start
    cancel_at: float | None  # relative to the call's start (an imap: when it was closed)
    t0: float = 0.0  # monotonic time of the call's start
    returned: float = 0.0  # monotonic time the call returned (an imap: was closed)
    closed: bool = False  # an imap closed by its consumer before its end


def _run_batch(a: BatchAlloter, sc: Scenario, tasks: list[Any], d: str) -> Observed:
    ctx: Context | None = None
    parent: Context | None = None
    timer: threading.Timer | None = None
    t0 = time.monotonic()
    cancel_at: float | None = None
    cancelled_at: list[float] = []
    if sc.ctx_mode == "deadline":
        ctx = Context(timeout=sc.ctx_after)
    elif sc.ctx_mode in ("cancel", "child_cancel"):
        parent = Context()
        ctx = parent.child() if sc.ctx_mode == "child_cancel" else parent

        def cancel(parent: Context = parent) -> None:
            # The moment of the cancel itself: a Timer may fire late on a busy machine.
            cancelled_at.append(time.monotonic())
            parent.cancel("model")

        timer = threading.Timer(sc.ctx_after, cancel)
    elif sc.ctx_mode == "pre_cancelled":
        ctx = Context()
        ctx.cancel("before the call")
        cancel_at = 0.0
    deadlines = []
    if sc.timeout is not None:
        deadlines.append(sc.timeout)
    if ctx is not None and ctx.deadline is not None:
        deadlines.append(ctx.deadline - t0)
    deadline = min(deadlines) if deadlines else None

    outcome: BaseException | None = None
    results: list[Any] | None = None
    report = None
    closed = False
    fn = F.make_item_fn(sc.faults, d)
    items = range(len(sc.faults))
    t0 = time.monotonic()
    if timer is not None:
        timer.start()
    try:
        if sc.entry == "report":
            report = a.exec_report(*tasks, ctx=ctx)
            try:
                report.raise_for_status()
            except (TaskError, ExecTimeout, Cancelled) as exc:
                outcome = exc
        elif sc.entry == "map":
            results = a.map(fn, items, chunksize=sc.chunksize, errors=sc.errors)
        elif sc.entry == "imap":
            results = []
            it = a.imap(fn, items, chunksize=sc.chunksize, ordered=sc.ordered, errors=sc.errors)
            try:
                for value in it:
                    results.append(value)
                    if sc.close_after is not None and len(results) >= sc.close_after:
                        closed = True
                        cancelled_at.append(time.monotonic())
                        break
            finally:
                it.close()  # leaving the loop early: the outstanding work ends
        elif ctx is not None:
            results = a.exec_with_context(ctx, *tasks)
        else:
            results = a.exec(*tasks)
    except (TaskError, ExecTimeout, Cancelled) as exc:
        outcome = exc
        results = None
    finally:
        returned = time.monotonic()
        elapsed = returned - t0
        if timer is not None:
            timer.cancel()
            timer.join()
        # Relative to the call's start; None if the call ended before the cancel.
        cancel_at = cancelled_at[0] - t0 if cancelled_at else cancel_at
    if report is not None:
        results = None if outcome is not None else [t.result for t in report.tasks]
    return Observed(outcome, results, report, elapsed, deadline, cancel_at, t0, returned, closed)


# -- the checks ---------------------------------------------------------------------

# Two stamps of the one monotonic clock, read by different processes.
CLOCK_EPS = 0.005
# A task timeout counts from the worker's start of the task, a little before the
# task writes its start marker (it is unpickled first): a cooperative task told by
# its own timeout may see cancelled() this much before marker + task_timeout.
TOLD_EARLY = 0.15


def _fate_of(error: BaseException) -> str | None:
    """The fate of a run that failed with ``error``."""
    if isinstance(error, TaskTimeout):
        return TIMES_OUT
    if isinstance(error, MemoryLimitExceeded):
        return MEMORY_KILLED
    if isinstance(error, WorkerCrashed):
        return CRASHES
    if isinstance(error, TaskError):
        return RAISES if isinstance(error.__cause__, ValueError) else UNPICKLABLE_RESULT
    return None


def _check_task_error(
    sc: Scenario, target: Target, i: int, error: Any, runs: list[Any], where: str
) -> str:
    """``error`` is task ``i``'s own failure, of its last run: check it against what
    that run does; return its fate."""
    assert isinstance(error, TaskError), f"{where}: {error!r} is no TaskError"
    assert error.index == i, f"{where}: its TaskError names task {error.index}"
    assert runs, f"{where}: a failure of a task that never started"
    fault = sc.faults[i]
    fate = _fate_of(error)
    possible = fates(sc, fault, len(runs))
    assert fate in possible, (
        f"{where}: {error!r} says it {fate}, but run {len(runs)} of a {fault.kind}"
        f"({fault.param}) {' or '.join(sorted(possible))}"
    )
    if fate in (CRASHES, MEMORY_KILLED):
        assert error.exitcode == target.expected_exitcode(fault), (
            f"{where}: exitcode {error.exitcode}"
        )
    else:
        assert not isinstance(error, WorkerCrashed), f"{where}: {error!r} is no crash"
    if fate == MEMORY_KILLED:
        assert error.limit == sc.memory_limit, f"{where}: {error!r}"
        assert error.peak_rss > sc.memory_limit, f"{where}: {error!r}"
    elif fate == RAISES:
        assert f"fault in task {i}" in str(error) and "ValueError" in str(error), where
        assert f"fault in task {i}" in error.remote_traceback, where
    elif fate == UNPICKLABLE_RESULT:
        assert "pickle" in str(error).lower(), f"{where}: {error}"
    elif fate == TIMES_OUT:
        assert isinstance(error, TimeoutError), f"{where}: {error!r}"
        assert error.timeout == sc.task_timeout, f"{where}: {error!r}"
    return fate


def _check_final(
    sc: Scenario, obs: Observed, i: int, fate: str, n: int, where: str, *, ended_after: bool
) -> None:
    """A failure that counts (the outcome, a report's status, an item in place) is the
    task's last attempt: ``retry_on`` does not match it, or its retries ran out, or
    the call's deadline left no time for the next run, or (``ended_after``) the
    call ended while the retry waited."""
    if not retried(sc, fate) or n >= sc.retries + 1 or ended_after:
        return
    delay = sc.retry_delay * 2 ** (n - 1)
    assert obs.deadline is not None and obs.elapsed + delay >= obs.deadline - 0.01, (
        f"{where}: a failure that retry_on matches counts after {n} of {sc.retries + 1} runs"
    )


def _check_outcome(sc: Scenario, obs: Observed, d: str, target: Target) -> None:
    runs = F.runs(d)
    out = obs.outcome
    deadline, cancel_at, elapsed = obs.deadline, obs.cancel_at, obs.elapsed
    # exec, map and imap return at the decision; exec_report waits for every task.
    timed = sc.entry != "report"
    late_ok = target.late

    if sc.ctx_mode == "pre_cancelled" and sc.faults:
        assert isinstance(out, Cancelled), f"a cancelled context must raise Cancelled, got {out!r}"
        assert not runs, f"a call under a cancelled context started tasks {sorted(runs)}"
        return

    if out is None:
        assert obs.results is not None
        if not obs.closed:
            assert len(obs.results) == len(sc.faults), (
                f"{len(obs.results)} results for {len(sc.faults)} tasks"
            )
        if deadline is not None and timed and not obs.closed:
            assert elapsed < deadline + late_ok, "returned results long after the deadline"
        return  # the results themselves: _check_results

    if isinstance(out, TaskError):
        i = out.index
        assert 0 <= i < len(sc.faults), f"TaskError.index {i} is not a task"
        where = f"the outcome, task {i}"
        fate = _check_task_error(sc, target, i, out, runs.get(i, []), where)
        _check_final(sc, obs, i, fate, len(runs[i]), where, ended_after=False)
        assert not sc.keep_going, f"errors='return' raised {out!r}"
        if deadline is not None and timed:
            assert elapsed < deadline + late_ok, "TaskError came long after the deadline"
        if cancel_at is not None and timed:
            assert elapsed < cancel_at + late_ok, "TaskError came long after the cancellation"
        return

    if isinstance(out, ExecTimeout):
        assert deadline is not None, "ExecTimeout without any deadline"
        assert elapsed >= deadline - 0.002, f"ExecTimeout after {elapsed:.3f}s, deadline {deadline}"
        late = elapsed - deadline
        if timed:
            target.run.worst_late = max(target.run.worst_late, late)
            assert late < late_ok, f"ExecTimeout {late:.3f}s after the deadline"
        if cancel_at is not None:
            assert cancel_at + late_ok > deadline, "the earlier cancellation should have won"
        return

    if isinstance(out, Cancelled):
        assert sc.entry in ("exec", "report"), f"{sc.entry} takes no context: {out!r}"
        assert cancel_at is not None, f"Cancelled without a cancellation: {out!r}"
        assert elapsed >= cancel_at - 0.002, f"Cancelled after {elapsed:.3f}s, before the cancel"
        late = elapsed - cancel_at
        if timed:
            target.run.worst_late = max(target.run.worst_late, late)
            assert late < late_ok, f"Cancelled {late:.3f}s after ctx.cancel()"
        if deadline is not None:
            assert deadline + late_ok > cancel_at, "the earlier deadline should have won"
        return

    raise AssertionError(f"unexpected outcome {out!r}")


def _index_of(value: Any) -> int:
    """The task a value the call gave belongs to (results carry their index)."""
    if isinstance(value, TaskError):
        return value.index
    assert isinstance(value, tuple) and len(value) == 3 and value[0] == "r", repr(value)
    return int(value[1])


def _check_results(sc: Scenario, obs: Observed, d: str, target: Target) -> None:
    """What a call that did not raise gave: each task's result, or with
    ``errors="return"`` its TaskError in place, as its last run ended."""
    if obs.outcome is not None or obs.results is None:
        return
    runs = F.runs(d)
    indexes = []
    for position, value in enumerate(obs.results):
        i = _index_of(value) if not sc.ordered else position
        assert 0 <= i < len(sc.faults), f"result {value!r} at {position} is no task's"
        indexes.append(i)
        fault, ran = sc.faults[i], runs.get(i, [])
        where = f"task {i} ({fault.kind}, ran {len(ran)} times) gave {value!r}"
        if isinstance(value, TaskError):
            assert sc.keep_going, f"{where} among the results without errors='return'"
            fate = _check_task_error(sc, target, i, value, ran, where)
            _check_final(sc, obs, i, fate, len(ran), where, ended_after=False)
        else:
            assert value == fault.expected_result(i), (
                f"{where}: results are not the tasks' results in task order"
            )
            assert ran and RETURNS in fates(sc, fault, len(ran)), (
                f"{where}, but its run {len(ran)} cannot return"
            )
    if obs.closed:
        assert len(indexes) <= (sc.close_after or 0), "more items than the consumer took"
        assert len(set(indexes)) == len(indexes), f"items given twice: {indexes}"
        if sc.ordered:
            assert indexes == list(range(len(indexes))), f"items out of order: {indexes}"
    else:
        assert sorted(indexes) == list(range(len(sc.faults))), f"items given: {indexes}"


def _can_succeed(sc: Scenario, fault: Fault) -> bool:
    """Whether the task surely returns in the end: each run but the last fails in a
    way that is retried, and the last returns."""
    chain = expected_runs(sc, fault)
    return chain[-1] == {RETURNS} and all(
        RETURNS not in possible and all(retried(sc, fate) for fate in possible)
        for possible in chain[:-1]
    )


def _check_forced(sc: Scenario, obs: Observed, target: Target) -> None:
    """Where the model can tell the outcome for sure, it must be that one."""
    ends_at = [t for t in (obs.deadline, obs.cancel_at) if t is not None]
    first_end = min(ends_at) if ends_at else None
    if sc.ctx_mode == "pre_cancelled" or sc.close_after is not None or not sc.faults:
        return
    # Every task returns in the end (with errors="return": ends by itself), and no
    # deadline comes before twice its ideal time: the call gives every result.
    if sc.keep_going:
        settles = all(HANGS not in p for f in sc.faults for p in expected_runs(sc, f))
    else:
        settles = all(_can_succeed(sc, f) for f in sc.faults)
    if settles:
        chains = [_chain(sc, f, target.escalation) for f in sc.faults]
        budget = 2 * (sum(chains) / target.at_once(sc.limit) + max(chains))
        budget += target.spare + target.per_task * len(sc.faults)
        if first_end is None or first_end > budget:
            assert obs.outcome is None, (
                f"a batch that ends by itself in {budget:.2f}s did not: {obs.outcome!r}"
            )
    # A failure that is not retried among the tasks that start at once: fast return.
    instant = {F.RAISE, F.SEGFAULT, F.EXIT, F.SIGKILL_SELF, F.UNPICKLABLE}
    first = target.at_once(sc.limit)
    if (
        sc.entry in ("exec", "report")
        and any(
            f.kind in instant and not any(retried(sc, fate) for fate in fates(sc, f, 1))
            for f in sc.faults[:first]
        )
        and (first_end is None or first_end >= target.fast_end)
    ):
        assert isinstance(obs.outcome, TaskError), (
            f"an instant failure among the first {first} tasks must be a fast TaskError, "
            f"got {obs.outcome!r} after {obs.elapsed:.3f}s"
        )
        if sc.entry == "exec":
            assert obs.elapsed < target.fast_return, f"fast return took {obs.elapsed:.3f}s"


STATUSES = ("ok", "error", "crashed", "timeout", "cancelled", "skipped")
# The status of a task's own failure, by its fate.
_STATUS_OF = {
    RAISES: "error",
    UNPICKLABLE_RESULT: "error",
    CRASHES: "crashed",
    MEMORY_KILLED: "crashed",
    TIMES_OUT: "timeout",
}


def _check_report(sc: Scenario, obs: Observed, d: str, target: Target) -> None:
    report = obs.report
    if report is None:
        return
    runs = F.runs(d)
    out = obs.outcome
    assert [t.index for t in report.tasks] == list(range(len(sc.faults)))
    for t in report.tasks:
        i, fault = t.index, sc.faults[t.index]
        ran = runs.get(i, [])
        n = len(ran)
        where = (
            f"task {i} ({fault.kind}, ran {n} times) is {t.status} "
            f"after {t.attempts} attempts ({t.error!r})"
        )
        assert t.status in STATUSES, where
        if t.status == "skipped":
            assert n == 0, f"{where}, but it started"
            assert t.attempts == 0, f"{where}: a skipped task has 0 attempts"
            continue
        # A run killed before it could write its start marker is an attempt too.
        killed = t.status in ("timeout", "cancelled")
        assert t.attempts == n or (killed and t.attempts == n + 1), (
            f"{where}: attempts must count the runs"
        )
        if t.status == "ok":
            assert RETURNS in fates(sc, fault, n), f"{where}, but run {n} cannot return"
            assert t.result == fault.expected_result(i), where
        elif t.status in ("error", "crashed") or isinstance(t.error, TaskTimeout):
            # The task's own failure: of its last run, or a run whose retry was still
            # waiting when the call ended.
            fate = _check_task_error(sc, target, i, t.error, ran, where)
            if t.status in ("error", "crashed") or out is None:
                assert t.status == _STATUS_OF[fate], where
            ended_after = out is not None and getattr(out, "index", None) != i
            _check_final(sc, obs, i, fate, n, where, ended_after=ended_after)
        elif t.status == "timeout":
            assert isinstance(out, ExecTimeout), f"{where}, but the call did not time out"
        else:
            assert out is not None and not isinstance(out, ExecTimeout), (
                f"{where}, but the call was not cancelled ({out!r})"
            )


def _earliest_end(sc: Scenario, obs: Observed, runs: dict[int, Any]) -> float | None:
    """The soonest (monotonic) the call can have ended: what may tell its tasks."""
    out = obs.outcome
    if obs.closed and obs.cancel_at is not None:
        return obs.t0 + obs.cancel_at
    if isinstance(out, ExecTimeout) and obs.deadline is not None:
        return obs.t0 + obs.deadline
    if isinstance(out, Cancelled) and obs.cancel_at is not None:
        return obs.t0 + obs.cancel_at
    if isinstance(out, TaskError) and runs.get(out.index):
        # No sooner than the start of the run whose failure decided it.
        return float(runs[out.index][-1][1])
    return None


def _check_runs(sc: Scenario, obs: Observed, d: str, target: Target) -> None:
    """Every run of every task, as its markers tell, against the rules of retries and
    of a call's end."""
    runs = F.runs(d)
    for i, ran in runs.items():
        assert 0 <= i < len(sc.faults), f"a marker of task {i}, which is not in the batch"
        fault = sc.faults[i]
        # No task runs more than retries + 1 times.
        assert len(ran) <= sc.retries + 1, (
            f"task {i} ({fault.kind}) ran {len(ran)} times with retries={sc.retries}"
        )
        # A task runs again only after a run that failed in a way that is retried.
        for run in range(1, len(ran)):
            possible = fates(sc, fault, run)
            assert any(retried(sc, fate) for fate in possible), (
                f"task {i} ({fault.kind}) ran again after its run {run}, which "
                f"{' or '.join(sorted(possible))} (retry_on {sc.retry_on})"
            )
    # Nothing starts after the call returned (beyond a start already under way).
    for ran in runs.values():
        for _, t in ran:
            target.run.worst_start_after = max(target.run.worst_start_after, t - obs.returned)
    slack = target.start_slack(sc)
    late = sorted(
        (round(t - obs.returned, 3), i)
        for i, ran in runs.items()
        for _, t in ran
        if t > obs.returned + slack
    )
    assert not late, f"(seconds after the call returned, task) that started then: {late}"
    # A cooperative task is told only by the call's end or its own task timeout: a
    # failure that is retried ends nothing.
    end = _earliest_end(sc, obs, runs)
    tt = sc.task_timeout
    for i, told in F.cancels(d).items():
        starts = [t for _, t in runs.get(i, [])]
        for at in told:
            # The run it belongs to: the last that started before (one process wrote
            # both lines, and a retry starts only once the run before it ended).
            before = [t for t in starts if t <= at]
            assert before, f"task {i} saw cancelled() before it started"
            start = before[-1]
            own = tt is not None and at >= start + tt - TOLD_EARLY
            ended = end is not None and at >= end - CLOCK_EPS
            assert own or ended, (
                f"task {i} saw cancelled() {at - obs.t0:.3f}s into the call, "
                f"{at - start:.3f}s after its start, before the call ended "
                f"({'never' if end is None else f'{end - obs.t0:.3f}s'}) or its own "
                f"task timeout ({tt})"
            )
            if own and end is None:
                # Told by its own timeout alone: in time.
                assert at <= start + tt + target.late, (
                    f"task {i} was told of its task timeout {at - start - tt:.3f}s late"
                )


def _check_timing(sc: Scenario, obs: Observed, d: str, target: Target) -> None:
    """A call that ends by itself returns by its last task's end; a task that hangs
    ends by its start + task_timeout + grace + the kill escalation."""
    runs = F.runs(d)
    out = obs.outcome
    run = target.run
    if isinstance(out, TaskTimeout) and sc.entry != "report" and runs.get(out.index):
        assert sc.task_timeout is not None
        due = runs[out.index][-1][1] + sc.task_timeout + sc.grace + target.escalation
        run.worst_task_end = max(run.worst_task_end, obs.returned - due)
        assert obs.returned <= due + target.late, (
            f"TaskTimeout of task {out.index} came {obs.returned - due:.3f}s after its "
            "start + task_timeout + grace + escalation"
        )
    if out is not None or obs.closed or not sc.faults:
        return
    ends = []
    for i, fault in enumerate(sc.faults):
        ran = runs.get(i)
        if not ran:
            continue  # _check_results says why
        possible = fates(sc, fault, len(ran))
        ends.append(ran[-1][1] + max(run_length(sc, fault, f, target.escalation) for f in possible))
    if ends:
        due = max(ends)
        if sc.task_timeout is not None:
            run.worst_task_end = max(run.worst_task_end, obs.returned - due)
        assert obs.returned <= due + target.late, (
            f"the call returned {obs.returned - due:.3f}s after its last task's end"
        )


def _must_die(sc: Scenario, fault: Fault, run: int) -> bool:
    """Whether the worker of this run must be dead afterwards (killed or crashed)."""
    if fault.kind == F.FLAKY:
        how, failures = fault.param
        return run <= failures and how in ("exit", "hang")
    return fault.kind in F.MUST_BE_KILLED or fault.kind in F.CRASHING


def _check_cleanup(sc: Scenario, obs: Observed, a: BatchAlloter, d: str, target: Target) -> None:
    runs = F.runs(d)
    wait = sc.grace + target.kill_slack
    # Every run that ignores cancelled() and never returns had its worker killed.
    must_die = [
        (pid, None)
        for i, ran in runs.items()
        for k, (pid, _) in enumerate(ran, start=1)
        if _must_die(sc, sc.faults[i], k)
    ]
    alive = F.wait_dead(must_die, wait)
    assert not alive, f"workers of killed or crashed tasks still alive: {alive}"
    # Whatever the tasks started died with them.
    kids = [(pid, created) for _, pid, created in F.children(d)]
    alive = F.wait_dead(kids, wait)
    assert not alive, f"child processes of killed tasks still alive: {alive}"
    # A cooperative task ends only when told (the call's end, its own timeout): with
    # a grace that lets it notice, each of its runs saw cancelled().
    if sc.grace >= 0.25:
        coop = {i: len(ran) for i, ran in runs.items() if sc.faults[i].kind == F.COOPERATIVE}

        def all_told() -> bool:
            told = F.cancels(d)
            return all(len(told.get(i, [])) >= n for i, n in coop.items())

        assert _wait_for(all_told, wait), (
            f"cooperative tasks (index: runs) {coop} never saw cancelled() on some run: "
            f"{ {i: len(t) for i, t in F.cancels(d).items()} }"
        )

    target.check_processes(sc, a, wait)


def _cleanup_leftovers(d: str) -> None:
    F.kill_all([(pid, created) for _, pid, created in F.children(d)])
    for p in F.live_descendants():
        F.kill_all([(p.pid, None)])
    shutil.rmtree(d, ignore_errors=True)


def _finals(sc: Scenario, obs: Observed) -> dict[int, BaseException | None]:
    """What counted of each task that ended by itself: ``None`` (returned) or its own
    failure, as the call or its report said."""
    out: dict[int, BaseException | None] = {}
    if obs.report is not None:
        for t in obs.report.tasks:
            if t.status == "ok":
                out[t.index] = None
            elif t.status in ("error", "crashed") or isinstance(t.error, TaskTimeout):
                out[t.index] = t.error
    elif obs.results is not None:
        for value in obs.results:
            out[_index_of(value)] = value if isinstance(value, TaskError) else None
    if isinstance(obs.outcome, TaskError):
        out[obs.outcome.index] = obs.outcome
    return out


def _coverage(sc: Scenario, obs: Observed, d: str) -> list[str]:
    """What this example exercised, once its checks passed (see ``MIN_COVERAGE``)."""
    out = obs.outcome
    runs = F.runs(d)
    started = set(runs)
    kinds = []
    if not sc.faults:
        kinds.append("empty batch")
    elif out is None and not obs.closed:
        kinds.append("success")
        if len(sc.faults) > sc.limit:
            kinds.append("success beyond the limit")
        if sc.entry in ("map", "imap"):
            kinds.append(f"{sc.entry} results")
    if obs.closed:
        kinds.append("imap closed early")
    finals = _finals(sc, obs)
    # A crash or a memory kill that counted: the outcome, a report's status, in place.
    if any(isinstance(e, MemoryLimitExceeded) for e in finals.values()):
        kinds.append("memory limit")
    if any(
        isinstance(e, WorkerCrashed) and not isinstance(e, MemoryLimitExceeded)
        for e in finals.values()
    ):
        kinds.append("crash")
    if isinstance(out, TaskError) and not isinstance(out, WorkerCrashed):
        kinds.append("task error")
    elif isinstance(out, ExecTimeout):
        kinds.append(f"timeout ({sc.entry if sc.entry == 'report' else 'exec'})")
    elif isinstance(out, Cancelled):
        if sc.ctx_mode == "pre_cancelled":
            kinds.append("context cancelled before the call")
        else:
            kinds.append(f"context cancel ({sc.entry})")
    if F.saw_cancel(d):
        kinds.append("cooperative task saw cancelled()")
    if any(sc.faults[i].kind in F.MUST_BE_KILLED for i in started):
        kinds.append("task killed")
    if out is not None and sc.faults and len(started) < len(sc.faults):
        kinds.append("queued tasks skipped")
    if any(error is None and len(runs.get(i, [])) > 1 for i, error in finals.items()):
        kinds.append("retry succeeded")
    if any(
        error is not None and sc.retries > 0 and len(runs.get(i, [])) == sc.retries + 1
        for i, error in finals.items()
    ):
        kinds.append("retries exhausted")
    if any(isinstance(error, TaskTimeout) for error in finals.values()):
        kinds.append("task timeout")
    if sc.keep_going and out is None and any(isinstance(v, TaskError) for v in obs.results or []):
        kinds.append("failures in place (errors='return')")
    return kinds


def _record_coverage(run: RunStats, sc: Scenario, obs: Observed, d: str) -> None:
    for kind in _coverage(sc, obs, d):
        if currently_in_test_context():
            event(kind)  # shown by --hypothesis-show-statistics
        run.coverage[kind] += 1
    run.options.add(sc.options())
    run.tasks += len(sc.faults)
    runs = F.runs(d)
    run.started += len(runs)
    run.runs += sum(len(r) for r in runs.values())


def _note(text: str) -> None:
    """What a failure should print: Hypothesis's note, or, for the fixed examples
    (run outside Hypothesis), kept for the failure's message."""
    if currently_in_test_context():
        note(text)
    else:
        _NOTES.append(text)


_NOTES: list[str] = []


def run_scenario(sc: Scenario, target: Target = PROCESS) -> None:
    run = target.run
    _NOTES.clear()
    baseline = _fd_baseline(target)
    run.examples += 1
    began = time.monotonic()
    _note(f"{target.name} example #{run.examples}: {sc.short()}")
    d = tempfile.mkdtemp(prefix="alloter-model-")
    tasks = [F.make_task(f, i, d) for i, f in enumerate(sc.faults)]
    try:
        a = target.make(sc)
        try:
            obs = _run_batch(a, sc, tasks, d)
            _note(
                f"outcome {obs.outcome!r} after {obs.elapsed:.3f}s "
                f"(deadline {obs.deadline}, cancel at {obs.cancel_at}); runs "
                f"{ {i: [round(t - obs.t0, 3) for _, t in r] for i, r in sorted(F.runs(d).items())} }"
            )
            if obs.report is not None:
                _note(f"statuses {[(t.status, t.attempts) for t in obs.report.tasks]}")
            elif obs.results is not None:
                _note(f"results {obs.results!r}")
            run.outcomes[type(obs.outcome).__name__ if obs.outcome else "results"] += 1
            run.sizes[f"{len(sc.faults) // 10 * 10}+"] += 1
            _check_outcome(sc, obs, d, target)
            _check_results(sc, obs, d, target)
            _check_forced(sc, obs, target)
            _check_report(sc, obs, d, target)
            _check_timing(sc, obs, d, target)
            _check_cleanup(sc, obs, a, d, target)
            target.check_usable(a, sc)
            # Read after the cleanup waits: a run that started late shows by now.
            _check_runs(sc, obs, d, target)
            _record_coverage(run, sc, obs, d)
        except BaseException:
            _cleanup_leftovers(d)  # so that close() cannot hang on what a bug left running
            raise
        finally:
            a.close()
        assert _wait_for(lambda: not F.live_descendants(), 5.0), (
            f"processes left after close(): {[p.pid for p in F.live_descendants()]}"
        )
        target.check_fds(baseline)
    except BaseException:
        if run.first_failure is None:
            run.first_failure = run.examples
            print(
                f"\n[model] first failure at {target.name} example #{run.examples}", file=sys.stderr
            )
        raise
    finally:
        _cleanup_leftovers(d)
        run.seconds += time.monotonic() - began


_phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if SHRINK else [])
# Shared with test_model_ray.py: derandomized unless ALLOTER_MODEL_SEED is set.
_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=SEED is None,
    database=None,
    phases=_phases,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The least each kind of example must occur in the fixed examples (scaled for
# ALLOTER_MODEL_EXAMPLES): a generator change that stops exercising one of them,
# or a runner that stops producing it, fails the run instead of passing quietly.
# About half of what the fixed examples reach (the same scenarios on every run;
# which outcome one ends with moves a little with the machine's load).
MIN_COVERAGE = {
    # Reached (one run): success 48, beyond the limit 22, task error 46, crash 17,
    # memory 3, timeouts 30/12, cancels 12/18, before the call 12, cooperative 42,
    # killed 65, skipped 71; retry succeeded 16, retries exhausted 21, task timeout
    # 29, failures in place 15, map 12, imap 10, imap closed 11.
    "success": 24,
    "success beyond the limit": 11,
    "task error": 23,
    "crash": 8,
    "memory limit": 2,
    "timeout (exec)": 15,
    "timeout (report)": 6,
    "context cancel (exec)": 6,
    "context cancel (report)": 9,
    "context cancelled before the call": 6,
    "cooperative task saw cancelled()": 21,
    "task killed": 32,
    "queued tasks skipped": 35,
    # Per-task control (contract section 9).
    "retry succeeded": 8,
    "retries exhausted": 10,
    "task timeout": 14,
    "failures in place (errors='return')": 7,
    "map results": 6,
    "imap results": 5,
    "imap closed early": 5,
}


def fixed_scenarios(count: int = EXAMPLES) -> list[Scenario]:
    """The fixed examples: drawn once, derandomized, before any of them runs.

    Drawing them while they run would not fix them: Hypothesis's example stream
    moves with how long each example takes (a loaded machine drew other scenarios),
    while a draw with nothing else going on is the same on every run.
    """
    drawn: list[Scenario] = []

    @settings(_settings, max_examples=count, derandomize=True, phases=[Phase.generate])
    @given(scenarios())
    def draw(sc: Scenario) -> None:
        drawn.append(sc)

    draw()
    return drawn + EXPLICIT


def _explicit(entry: str, ctx_mode: str, *faults: Fault, **options: Any) -> Scenario:
    base: dict[str, Any] = dict(
        limit=2, timeout=None, grace=0.1, memory_limit=None, ctx_after=0.3, shape="explicit"
    )
    base.update(options)
    return Scenario(entry=entry, ctx_mode=ctx_mode, faults=list(faults), **base)


# Written out, after the drawn ones: the kinds the drawn examples may miss (a memory
# hog, a crash, each context ending in both modes, a retry that succeeds, retries
# that run out, task timeouts in place, an imap closed), so that each is always there.
EXPLICIT = (
    [
        _explicit(
            entry,
            "none",
            Fault(F.VALUE, 1),
            Fault(F.MEMORY),
            Fault(F.SLEEP, 0.3),
            memory_limit=MEMORY_LIMIT,
        )
        for entry in ("exec", "report")
    ]
    + [
        _explicit(
            entry, "none", Fault(F.VALUE, 1), Fault(F.SEGFAULT), Fault(F.COOPERATIVE), grace=0.3
        )
        for entry in ("exec", "report")
    ]
    + [
        _explicit(entry, mode, Fault(F.SLEEP_LONG), Fault(F.COOPERATIVE), Fault(F.VALUE, 2))
        for entry in ("exec", "report")
        for mode in ("cancel", "deadline", "pre_cancelled")
    ]
    + [
        # Per-task control: a crash retried until it succeeds; retries that run out;
        # task timeouts (retried) with the failures in place; an imap closed early.
        _explicit(
            "exec",
            "none",
            Fault(F.FLAKY, ("exit", 1)),
            Fault(F.SLEEP, 0.2),
            Fault(F.VALUE, 3),
            retries=1,
        ),
        _explicit(
            "report",
            "none",
            Fault(F.FLAKY, ("raise", 3)),
            Fault(F.SLEEP, 0.1),
            Fault(F.VALUE, 4),
            retries=2,
            retry_on="ValueError",
        ),
        _explicit(
            "map",
            "none",
            Fault(F.VALUE, 5),
            Fault(F.SLEEP_LONG),
            Fault(F.RAISE),
            Fault(F.COOPERATIVE),
            Fault(F.VALUE, 6),
            errors="return",
            chunksize=2,
            task_timeout=0.3,
            retries=1,
            grace=0.25,
        ),
        _explicit(
            "imap",
            "none",
            Fault(F.VALUE, 7),
            Fault(F.SLEEP, 0.3),
            Fault(F.IGNORE_TERM),
            Fault(F.VALUE, 8),
            close_after=1,
            grace=0.0,
            timeout=1.5,
        ),
    ]
)


def run_fixed(target: Target, only: str | None = None) -> None:
    """Run the fixed examples on ``target`` (``only``: the example numbers to run,
    as in ``ALLOTER_MODEL_ONLY=3,17``), naming the one that fails."""
    chosen = {int(n) for n in only.split(",")} if only else None
    for number, sc in enumerate(fixed_scenarios(), start=1):
        if chosen is not None and number not in chosen:
            continue
        try:
            run_scenario(sc, target)
        except BaseException:
            print(
                f"\n[model] fixed example {number} failed: {sc.short()}\n"
                + "".join(f"[model] {line}\n" for line in _NOTES)
                + f"[model] rerun it alone with ALLOTER_MODEL_ONLY={number}",
                file=sys.stderr,
            )
            raise


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_faulty_batches_keep_the_contract() -> None:
    """The fixed examples (the same on every run), then what they covered."""
    only = os.environ.get("ALLOTER_MODEL_ONLY")
    run_fixed(PROCESS, only)
    if only:
        return
    run = PROCESS.run
    if EXAMPLES < 100:
        return  # too few examples for the minimums to mean anything
    short = {
        kind: (run.coverage[kind], math.ceil(least * EXAMPLES / 200))
        for kind, least in MIN_COVERAGE.items()
        if run.coverage[kind] < math.ceil(least * EXAMPLES / 200)
    }
    assert not short, f"the model exercised too little of (count, least): {short}"


# A fresh random run beside the fixed one, different on every run (CI included):
# ALLOTER_MODEL_FRESH_EXAMPLES examples (0 turns it off); its seed is printed, and
# ALLOTER_MODEL_SEED=<seed> replays it.
FRESH_EXAMPLES = int(os.environ.get("ALLOTER_MODEL_FRESH_EXAMPLES", "40"))
FRESH = Target()
FRESH.name = "process (fresh seed)"


@pytest.mark.timeout(600)
def test_random_faulty_batches_with_a_fresh_seed() -> None:
    if FRESH_EXAMPLES <= 0:
        pytest.skip("ALLOTER_MODEL_FRESH_EXAMPLES=0")
    value = int(SEED) if SEED is not None else random.SystemRandom().randrange(2**32)
    print(
        f"\n[model] fresh seed {value}; replay it with "
        f"ALLOTER_MODEL_SEED={value} pytest tests/test_model.py -k fresh_seed",
        file=sys.stderr,
    )

    @seed(value)
    @settings(_settings, max_examples=FRESH_EXAMPLES, derandomize=False)
    @given(scenarios())
    def examples(sc: Scenario) -> None:
        run_scenario(sc, FRESH)

    examples()


def print_summary(target: Target) -> None:
    run = target.run
    coverage = ", ".join(f"{k}: {n}" for k, n in sorted(run.coverage.items()))
    print(
        f"\n[model] {target.name}: examples run: {run.examples}, first failure: "
        f"{run.first_failure}, worst lateness of ExecTimeout/Cancelled: "
        f"{run.worst_late * 1000:.1f} ms\n"
        f"[model] outcomes {dict(run.outcomes)}; batch sizes {dict(run.sizes)}\n"
        f"[model] {len(run.options)} distinct option sets; tasks started "
        f"{run.started} of {run.tasks}, {run.runs} runs; {run.seconds:.1f} s in examples; "
        f"worst end of a task timeout past start + task_timeout + grace + escalation: "
        f"{run.worst_task_end * 1000:.1f} ms; latest start after a call returned: "
        f"{run.worst_start_after * 1000:.1f} ms\n"
        f"[model] covered: {coverage}"
    )


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Any:
    yield
    print_summary(PROCESS)
    if FRESH.run.examples:
        print_summary(FRESH)
