"""The model test of ``test_model.py`` on ``RayAlloter``: same scenarios, same checks.

Only what RayAlloter's contract says differs is adapted (:class:`RayTarget`):

* timing bounds are 500 ms instead of 50 ms (how late an end may come, how fast an
  instant failure returns, the time a benign batch needs), and a task handed to Ray
  only runs once one of the session Ray's 2 CPUs is free;
* ``WorkerCrashed.exitcode`` is ``None`` (Ray does not report it), except for a
  memory kill, which the alloter's own guard does with SIGKILL;
* the memory limit counts the whole Ray worker, which idles at about 90 MiB: the
  scenarios' limit is 150 MiB above the process model's (the memory hog of
  ``_faults`` allocates up to 2 GiB, far past it);
* ``stats()`` is not offered and Ray's workers are not our children: instead of "only
  the alloter's live workers remain", the shared checks (the Ray worker of every
  task that had to be killed or crashed is gone, every child process a task started
  is dead: ``_faults`` has no child that escapes Ray's kill, since its "session"
  child is a direct child of the worker and its "orphan" stays in the worker's
  process group) plus "no process of ours is left besides Ray's";
* no exact file-descriptor baseline: the driver's Ray connection opens and closes
  gRPC descriptors on its own schedule, so only a leak that grows is caught.

``ALLOTER_MODEL_RAY_EXAMPLES`` sets the number of examples (default 25);
``ALLOTER_MODEL_SEED`` and ``ALLOTER_MODEL_SHRINK`` work as in ``test_model.py``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import _faults as F
import pytest
from _faults import Fault
from hypothesis import given, seed, settings
from test_model import (
    KILL_SLACK,
    LATE,
    MEMORY_LIMIT,
    SEED,
    Scenario,
    Target,
    _settings,
    _wait_for,
    print_summary,
    run_scenario,
    scenarios,
)

from alloter_mp.ray import RayAlloter

pytestmark = pytest.mark.ray

RAY_EXAMPLES = int(os.environ.get("ALLOTER_MODEL_RAY_EXAMPLES", "25"))

# The contract's timing bound on Ray, and the session Ray's CPUs (conftest).
BOUND = 0.5
RAY_CPUS = 2
RAY_MEMORY_LIMIT = MEMORY_LIMIT + 150 * 1024 * 1024
assert F.MEMORY_MOST > 4 * RAY_MEMORY_LIMIT, "the memory hog must go well past the limit"
# Descriptors the driver's Ray connection may hold beyond the baseline at a time.
FD_SLACK = 48


class RayTarget(Target):
    name = "ray"
    memory_limit = RAY_MEMORY_LIMIT
    late = LATE + BOUND
    kill_slack = KILL_SLACK + BOUND
    fast_end = 1.0 + BOUND
    fast_return = 0.9 + BOUND
    spare = 0.5 + BOUND
    per_task = 0.01  # Ray's scheduling, about 3 ms a task

    def make(self, sc: Scenario) -> RayAlloter:
        return RayAlloter(
            sc.limit, timeout=sc.timeout, cancel_grace=sc.grace, memory_limit=sc.memory_limit
        )

    def at_once(self, limit: int) -> int:
        # Tasks handed to Ray beyond its CPUs wait in Ray's queue.
        return min(limit, RAY_CPUS)

    def expected_exitcode(self, fault: Fault) -> int | None:
        if fault.kind == F.MEMORY:
            return -signal.SIGKILL  # the alloter's memory guard kills the worker itself
        return None

    def warm_up(self) -> None:
        with RayAlloter(RAY_CPUS) as a:
            a.exec(lambda: 1, lambda: 2)

    def check_processes(self, sc: Scenario, a: Any, wait: float) -> None:
        # Ray's workers are the raylet's children, not ours: none of ours is left.
        assert _wait_for(lambda: not F.live_descendants(), wait), (
            f"processes {[(p.pid, p.cmdline()) for p in F.live_descendants()]} left"
        )

    def check_fds(self, baseline: int) -> None:
        assert _wait_for(lambda: F.open_fds() <= baseline + FD_SLACK, 2.0), (
            f"open fds {F.open_fds()} after close(), baseline {baseline} (+{FD_SLACK})"
        )


RAY = RayTarget()


@pytest.mark.timeout(60 + 8 * RAY_EXAMPLES)
@settings(_settings, max_examples=RAY_EXAMPLES)
@given(sc=scenarios(RAY_MEMORY_LIMIT))
def test_random_faulty_batches_keep_the_contract_on_ray(ray_session: Any, sc: Scenario) -> None:
    run_scenario(sc, RAY)


if SEED is not None:
    test_random_faulty_batches_keep_the_contract_on_ray = seed(int(SEED))(
        test_random_faulty_batches_keep_the_contract_on_ray
    )


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Any:
    yield
    print_summary(RAY)
