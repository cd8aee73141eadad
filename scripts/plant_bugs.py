"""Plant known bugs in a copy of alloter_mp, one at a time, and check the tests catch them.

Each bug is a small edit of the package (exact text replaced, in one file) and the
tests meant to catch it. For each bug the script copies the package to a temporary
directory, applies the edit, runs those tests against the copy (``PYTHONPATH``
points at it; the repository's own package is not importable from there) and
prints ``caught`` (the tests failed) or ``SURVIVED`` (they passed). First, a control
run checks that those tests pass on the package as it is. An edit whose
text is no longer found exactly once in the package is reported as ``STALE``: the
package changed and the bug must be written again, it is not silently skipped.
``--check-stale`` only does that check (and that each named test still exists),
without running anything: ``tests/test_scripts.py`` runs it in CI.

    python scripts/plant_bugs.py              # every bug, after a control run (< 10 min)
    python scripts/plant_bugs.py --list
    python scripts/plant_bugs.py --check-stale
    python scripts/plant_bugs.py escalation-2s kill-late-after-grace

Exit status 0 when every bug was caught (or, with ``--check-stale``, none is stale),
1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alloter_mp"
TESTS = ROOT / "tests"


@dataclass(frozen=True)
class Bug:
    name: str
    why: str  # the promise it breaks
    file: str  # inside alloter_mp/
    old: str
    new: str
    tests: tuple[str, ...]  # pytest ids, relative to tests/
    # For a bug that makes the tests hang: the per-test timeout (s) for its run, so
    # that the hang is caught sooner than at the suite's own timeout.
    hang: float | None = None


BUGS = [
    # -- issue 17: claims that planted bugs survived before it -------------------------
    Bug(
        "exec-waits-for-siblings",
        "exec raises at once, siblings not awaited",
        "_calls.py",
        "        self.run(batch, ctx, len(tasks))\n        return batch.results()",
        "        self.run(batch, ctx, len(tasks), settle=True)\n        return batch.results()",
        ("test_ending.py::test_exec_raises_while_a_sibling_ignoring_cancellation_still_runs",),
    ),
    Bug(
        "escalation-2s",
        "SIGKILL 0.2 s after SIGTERM",
        "_handle.py",
        "KILL_ESCALATION = 0.2",
        "KILL_ESCALATION = 2.0",
        ("test_ending.py::test_sigkill_follows_for_a_task_ignoring_sigterm",),
    ),
    Bug(
        "sigkill-without-sigterm",
        "SIGTERM first, SIGKILL only for a task that ignores it",
        "_handle.py",
        "_proctree.signal_tree(self.pid, _proctree.SIGTERM, self.tree)",
        "_proctree.signal_tree(self.pid, _proctree.SIGKILL, self.tree)",
        ("test_ending.py::test_sigterm_comes_first_at_the_end_of_the_grace",),
    ),
    Bug(
        "kill-late-after-grace",
        "killed when the grace ends; cancel_grace=0 kills at once",
        "_batch.py",
        "return self.ended_at + self.cancel_grace",
        "return self.ended_at + self.cancel_grace + 0.6",
        ("test_ending.py::test_cancel_grace_zero_kills_at_once",),
    ),
    Bug(
        "context-cancel-late",
        "Cancelled within 50 ms of ctx.cancel()",
        "_calls.py",
        "launch.token = _context.on_cancel(ctx, lambda: batch.cancel(_cancelled_error(ctx)))",
        "launch.token = _context.on_cancel(ctx, lambda: (time.sleep(0.4),"
        " batch.cancel(_cancelled_error(ctx))))",
        ("test_ending.py::test_context_cancel_reaches_exec_within_50_ms",),
    ),
    Bug(
        "model-context-cancel-late",
        "Cancelled soon after ctx.cancel(), in exec mode (the model)",
        "_calls.py",
        "launch.token = _context.on_cancel(ctx, lambda: batch.cancel(_cancelled_error(ctx)))",
        "launch.token = _context.on_cancel(ctx, lambda: (time.sleep(0.4),"
        " batch.cancel(_cancelled_error(ctx))))",
        ("test_model.py::test_random_faulty_batches_keep_the_contract",),
    ),
    Bug(
        "owner-limit-ignored",
        "limit bounds the tasks running at once (map on a bigger shared pool)",
        "_poolrun.py",
        "        return self.limit is not None and self.active >= self.limit\n",
        "        return False\n",
        ("test_map.py::test_map_respects_limit_and_fail_fast_timing",),
    ),
    Bug(
        "map-waits-for-siblings",
        "map raises at once on the first failure",
        "_calls.py",
        "        self.run(batch, None, len(items))\n",
        "        self.run(batch, None, len(items), settle=True)\n",
        ("test_map.py::test_map_respects_limit_and_fail_fast_timing",),
    ),
    Bug(
        "alloter-runs-in-pairs",
        "Alloter gives every task its own process at once",
        "_alloter.py",
        "        self._setup(pool, Quota(None), options, owns_pool=True)\n",
        "        self._setup(pool, Quota(2), options, owns_pool=True)\n",
        ("test_core.py::test_alloter_gives_every_task_its_own_process",),
    ),
    Bug(
        "crash-taken-for-timeout",
        "a crash is WorkerCrashed (the 300-call leak loop checks outcomes)",
        "_pool.py",
        "        batch.task_failed(slot, error, crashed=True)\n\n    def _release",
        "        batch.task_killed(slot)\n\n    def _release",
        ("test_core.py::test_no_process_or_fd_leak_after_300_mixed_calls",),
    ),
    Bug(
        "timeout-raised-as-cancelled",
        "the timeout is ExecTimeout, from exec and from raise_for_status",
        "_batch.py",
        "return self._end(EndKind.TIMEOUT, ExecTimeout(self.timeout_message))",
        "return self._end(EndKind.TIMEOUT, Cancelled(self.timeout_message))",
        ("test_report.py::test_raise_for_status_raises_what_exec_raises",),
    ),
    Bug(
        "ray-crash-names-a-bogus-pid",
        "WorkerCrashed.pid on Ray is the worker the task ran in",
        "_ray_runner.py",
        "        error = WorkerCrashed(slot.base, None, slot.pid, message=message)\n",
        "        error = WorkerCrashed(slot.base, None, None if slot.pid is None"
        " else slot.pid + 4_000_000, message=message)\n",
        ("test_ray.py::test_dead_worker_is_worker_crashed",),
    ),
    Bug(
        "soak-small-leak-per-call",
        "no growth over thousands of calls (a string kept per call)",
        "_batch.py",
        "        self.id = next(_ids)\n",
        "        self.id = next(_ids); Batch.__init__.__dict__.setdefault('kept', [])"
        ".append(repr(self.id))\n",
        ("test_soak.py",),
    ),
    Bug(
        "soak-raw-memory-leak",
        "no RSS growth (64 KiB of C memory kept per call)",
        "_batch.py",
        "        self.id = next(_ids)\n",
        "        self.id = next(_ids); _c = __import__('ctypes'); "
        "_c.pythonapi.PyMem_RawMalloc.restype = _c.c_void_p; "
        "_c.memset(_c.pythonapi.PyMem_RawMalloc(65536), 1, 65536)\n",
        ("test_soak.py",),
    ),
    # -- promises the suite held before issue 17 -------------------------------------------
    Bug(
        "no-group-kill",
        "a killed task's children die with it (orphaned grandchild: only the group)",
        "_proctree.py",
        "        os.killpg(pgid, sig)\n",
        "        pass\n",
        ("test_start_methods.py::test_timeout_kills_the_task_and_its_children[fork]",),
    ),
    Bug(
        "no-descendant-kill",
        "a killed task's children die with it (child in a session of its own)",
        "_proctree.py",
        "            proc.send_signal(sig)\n",
        "            pass\n",
        ("test_start_methods.py::test_timeout_kills_the_task_and_its_children[fork]",),
    ),
    Bug(
        "no-lifeline",
        "the parent SIGKILLed: workers and their children die",
        "_worker.py",
        "        lifeline.poll(None)\n",
        "        time.sleep(10**6)\n",
        ("test_parent_death.py::test_sigkill_of_the_parent_mid_batch_leaves_nothing_alive[fork]",),
    ),
    Bug(
        "dead-worker-not-replaced",
        "a dead worker is replaced at once",
        "_pool.py",
        "                self._spawn()\n",
        "                pass\n",
        ("test_core.py::test_a_dead_worker_is_replaced_at_once",),
    ),
    Bug(
        "dead-worker-pipe-kept",
        "no descriptor leak",
        "_pool.py",
        "        w.close()\n",
        "        pass\n",
        ("test_core.py::test_no_process_or_fd_leak_after_300_mixed_calls",),
    ),
    Bug(
        "interrupt-leaves-tasks-running",
        "KeyboardInterrupt in exec ends the call's tasks before it propagates",
        "_calls.py",
        '            batch.cancel(Cancelled("the caller was interrupted"))\n',
        "            pass\n",
        ("test_core.py::test_keyboard_interrupt_ends_the_tasks_and_propagates",),
        hang=12,
    ),
    Bug(
        "siblings-never-told",
        "running siblings of a failure see cancelled() before they are killed",
        "_pool.py",
        "                    w.words[_words.CANCEL_BATCH] = batch.id\n",
        "                    pass\n",
        ("test_core.py::test_running_siblings_see_cancelled_then_get_killed_after_grace",),
    ),
    Bug(
        "memory-limit-4x",
        "a worker past memory_limit is killed with MemoryLimitExceeded",
        "_pool.py",
        "        if rss > limit:\n",
        "        if rss > 4 * limit:\n",
        ("test_memory_limit.py::test_exec_raises_memory_limit_exceeded_and_the_pool_heals",),
    ),
    # -- an idle worker's death (issue 17's defect) -----------------------------------------
    Bug(
        "idle-death-blames-unstarted",
        "a task its dead worker never started goes back to the queue, no WorkerCrashed",
        "_pool.py",
        "            if not batch.task_unstarted(slot):\n"
        "                self._blame(w, batch, slot, slot.base, exitcode)\n",
        "            self._blame(w, batch, slot, slot.base, exitcode)\n",
        (
            "test_parent_death.py::test_idle_worker_killed_then_an_immediate_call_succeeds"
            "[2-SIGKILL-one]",
        ),
    ),
    Bug(
        "started-word-off-by-one",
        "the STARTED word tells a task never started from the one that ran",
        "_pool.py",
        "            if seq > started:\n                never.append(slot)\n",
        "            if seq > started + 1:\n                never.append(slot)\n",
        (
            "test_parent_death.py::test_idle_worker_killed_then_an_immediate_call_succeeds"
            "[1-SIGTERM-all]",
        ),
    ),
    # -- per-task options: task_timeout, retries, keep-going, max_tasks_per_worker -------------
    Bug(
        "task-timeout-unchecked",
        "task_timeout ends a task that runs too long",
        "_pool.py",
        "        if batch is None or batch.task_timeout is None or batch.ending:\n"
        "            return\n",
        "        return\n",
        ("test_per_task.py::test_task_timeout_ends_a_spinning_task_and_its_process",),
        hang=12,
    ),
    Bug(
        "task-timeout-late",
        "TaskTimeout at the task's own deadline (told then, killed after the grace)",
        "_pool.py",
        "        deadline = start + batch.task_timeout\n",
        "        deadline = start + batch.task_timeout + 0.5\n",
        ("test_per_task.py::test_task_timeout_ends_a_spinning_task_and_its_process",),
    ),
    Bug(
        "retries-one-fewer",
        "retries=n runs a failing task up to n + 1 times",
        "_batch.py",
        "        if attempts > self.retries or not self._retryable(error):\n",
        "        if attempts >= self.retries or not self._retryable(error):\n",
        ("test_per_task.py::test_a_crashing_task_is_retried_until_it_succeeds",),
    ),
    Bug(
        "retries-one-more",
        "retries=n runs a failing task at most n + 1 times",
        "_batch.py",
        "        if attempts > self.retries or not self._retryable(error):\n",
        "        if attempts > self.retries + 1 or not self._retryable(error):\n",
        ("test_per_task.py::test_retries_run_out_and_the_last_failure_counts",),
    ),
    Bug(
        "item-retries-one-fewer",
        "a map item is retried within its chunk as often as retries= says",
        "_batch.py",
        "            if attempts <= self.retries and (self.deadline is None"
        " or not_before < self.deadline):\n",
        "            if attempts < self.retries and (self.deadline is None"
        " or not_before < self.deadline):\n",
        ("test_per_task.py::test_a_failed_item_is_retried_within_its_chunk",),
    ),
    Bug(
        "keep-going-item-raises",
        'map(errors="return") puts a failed item in its place instead of raising',
        "_batch.py",
        "        if self.end_kind is None and not self.keep_going:\n            return error\n",
        "        if self.end_kind is None:\n            return error\n",
        ("test_per_task.py::test_map_errors_return_puts_each_failure_in_place[3]",),
    ),
    Bug(
        "chunk-crash-fails-the-whole-chunk",
        "a crash mid-chunk fails only the item that ran; the rest of the chunk runs",
        "_pool.py",
        "        if slot.item_state is not None and slot.status is TaskStatus.RUNNING:\n",
        "        if False:\n",
        ("test_per_task.py::test_map_errors_return_puts_each_failure_in_place[3]",),
    ),
    Bug(
        "max-tasks-ignored",
        "max_tasks_per_worker: a worker runs at most that many tasks",
        "_pool.py",
        "        w.room = self._max_tasks\n",
        "        w.room = None\n",
        ("test_max_tasks.py::test_one_task_per_worker_three_tasks_three_workers",),
    ),
    Bug(
        "max-tasks-room-not-counted",
        "max_tasks_per_worker counts the tasks sent (sent ahead too)",
        "_pool.py",
        "        if w.room is not None:\n            w.room -= len(slots)\n",
        "",
        ("test_max_tasks.py::test_many_tiny_tasks_respect_the_maximum",),
    ),
    # -- executor and async -----------------------------------------------------------------
    Bug(
        "executor-crash-breaks-the-pool",
        "ProcessPoolExecutor: a crash fails its own future only, the pool heals",
        "_executor.py",
        "        if isinstance(error, InitializerFailed):\n",
        "        if isinstance(error, (InitializerFailed, WorkerCrashed)):\n",
        ("test_executor.py::test_a_crash_fails_one_future_and_the_pool_heals",),
    ),
    Bug(
        "executor-crash-not-broken-process-pool",
        "a crashed call's future raises BrokenProcessPool (and WorkerCrashed)",
        "_executor.py",
        "        return _retyped(error, BrokenWorker)\n",
        "        return error\n",
        ("test_executor.py::test_a_crash_fails_one_future_and_the_pool_heals",),
    ),
    Bug(
        "executor-failed-future-unresolved",
        "every future is resolved: a failed call's future gets its exception",
        "_executor.py",
        "        future._fail(_future_error(error))\n",
        "        pass\n",
        ("test_executor.py::test_a_crash_fails_one_future_and_the_pool_heals",),
        hang=12,
    ),
    Bug(
        "async-cancel-not-passed-on",
        "cancelling an awaited exec_async ends the call's worker processes",
        "_aio.py",
        '        batch.cancel(Cancelled("the awaiting task was cancelled"))\n'
        "        await _until_settled(batch)\n",
        "        await _until_settled(batch)\n",
        ("test_async.py::test_task_cancel_ends_the_work_before_the_await_returns",),
        hang=12,
    ),
    Bug(
        "async-cancel-returns-early",
        "a cancelled exec_async returns only once its processes have ended",
        "_aio.py",
        '        batch.cancel(Cancelled("the awaiting task was cancelled"))\n'
        "        await _until_settled(batch)\n",
        '        batch.cancel(Cancelled("the awaiting task was cancelled"))\n',
        ("test_async.py::test_task_cancel_ends_the_work_before_the_await_returns",),
    ),
    # -- shared memory --------------------------------------------------------------------
    Bug(
        "shm-release-not-sent",
        "no segment outlives its call: workers are told to let go (RELEASE)",
        "_pool.py",
        "                    w.conn.send_bytes(pickle.dumps((_worker.RELEASE, run.batch.id)))\n",
        "                    pass\n",
        ("test_shared.py::test_nothing_outlives_a_failed_call",),
    ),
    Bug(
        "shm-worker-keeps-mapping",
        "no segment outlives its call: a worker unmaps on RELEASE",
        "_worker.py",
        "                held.release(msg[1])\n",
        "                pass\n",
        ("test_shared.py::test_nothing_outlives_a_failed_call",),
    ),
    # -- log relay and output capture -------------------------------------------------------
    Bug(
        "crash-journal-not-read",
        "records of a task that then crashes reach the parent before the call returns",
        "_pool.py",
        "        w.sight.recover(None if w.run is None else w.run.batch)\n",
        "        pass\n",
        ("test_sight.py::test_records_of_a_task_that_then_crashes_arrive_before_the_call_returns",),
    ),
    Bug(
        "journal-end-not-published",
        "the journal says where its frames end, for the parent to read after a death",
        "_logrelay.py",
        "        self.end = end\n        WORD.pack_into(buf, 8, end)\n",
        "        self.end = end\n",
        ("test_logrelay.py::test_records_of_a_task_that_then_dies_arrive",),
    ),
    Bug(
        "journal-generation-kept",
        "records sent before a death are not delivered twice",
        "_logrelay.py",
        "        self.gen += 1\n        WORD.pack_into(self.buf, 0, self.gen)\n\n\nclass _MemoryJournal",
        "        self.gen += 1\n\n\nclass _MemoryJournal",
        ("test_logrelay.py::test_records_sent_before_a_death_are_not_delivered_twice",),
    ),
    Bug(
        "logs-not-awaited-at-the-end",
        "records written before the call ended arrive before it returns",
        "_calls.py",
        "            batch.wait_logs()  # an ended batch: what its tasks logged until then first\n",
        "",
        ("test_sight.py::test_records_written_before_the_call_ended_arrive_before_it_returns",),
    ),
    Bug(
        "crash-output-not-read",
        "capture_output: the output of a task that crashed is kept in its error",
        "_pool.py",
        "                head.output = w.sight.read_output()\n",
        "                pass\n",
        ("test_sight.py::test_the_output_of_a_task_that_crashed_or_timed_out_is_kept",),
    ),
    Bug(
        "capture-c-output-not-flushed",
        "capture_output catches what C code left in stdio's buffers",
        "_capture.py",
        "        _flush_python()\n        self._fflush()\n        for name, stream in self._replaced:\n",
        "        _flush_python()\n        for name, stream in self._replaced:\n",
        ("test_capture.py::test_print_os_write_c_and_child_processes_are_caught_apart",),
    ),
    Bug(
        "capture-previous-output-kept",
        "each captured task starts with empty streams",
        "_capture.py",
        "                os.ftruncate(file.fd, 0)\n",
        "                pass\n",
        ("test_capture.py::test_the_next_task_starts_with_empty_streams",),
    ),
    Bug(
        "results-kept-in-a-cycle",
        "a call's results go with the caller's last reference (no cycle keeps them)",
        "_pool.py",
        "        run.batch.detach()\n",
        "        pass\n",
        ("test_shared.py::test_shared_results_go_when_the_caller_drops_them",),
    ),
    Bug(
        "results-kept-until-the-next-turn",
        "the pool lets a settled call go at once, not at its next turn",
        "_pool.py",
        "        self._touched.discard(run)\n",
        "        pass\n",
        ("test_shared.py::test_shared_results_go_when_the_caller_drops_them",),
    ),
]


def stale(bug: Bug) -> str | None:
    """Why ``bug`` can no longer be planted as written (``None``: it can).

    Its text must occur exactly once in its file, and each test it names must exist
    (text matching only: nothing is imported or run).
    """
    path = PACKAGE / bug.file
    if not path.exists():
        return f"alloter_mp/{bug.file} does not exist"
    found = path.read_text().count(bug.old)
    if found != 1:
        return f"its text occurs {found} times in alloter_mp/{bug.file}, not once"
    if bug.old == bug.new:
        return "its edit changes nothing"
    for test in bug.tests:
        file, _, rest = test.partition("::")
        test_path = TESTS / file
        if not test_path.exists():
            return f"tests/{file} does not exist"
        name = rest.partition("[")[0]
        if name and not re.search(
            rf"^(async )?def {re.escape(name)}\(", test_path.read_text(), re.M
        ):
            return f"tests/{file} has no test {name}"
    return None


def plant(bug: Bug | None, into: Path) -> bool:
    """Copy the package into ``into`` with ``bug`` applied; ``False`` if the edit is stale."""
    shutil.copytree(PACKAGE, into / "alloter_mp", ignore=shutil.ignore_patterns("__pycache__"))
    if bug is None:
        return True
    path = into / "alloter_mp" / bug.file
    text = path.read_text() if path.exists() else ""
    if text.count(bug.old) != 1:
        return False
    path.write_text(text.replace(bug.old, bug.new))
    return True


def check(bug: Bug | None, tests: list[str], timeout: float, verbose: bool = False) -> str:
    """Run ``tests`` on a copy of the package with ``bug`` planted (``None``: as it is)."""
    with tempfile.TemporaryDirectory(prefix=f"plant-{bug.name if bug else 'control'}-") as tmp:
        if not plant(bug, Path(tmp)):
            return "STALE"
        env = dict(os.environ, PYTHONPATH=tmp)
        args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
        args += ["--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")]
        if bug is not None and bug.hang is not None:
            args += ["--timeout", str(bug.hang)]  # a hang is what this bug makes
        args += [str(TESTS / t) for t in tests]
        try:
            out = subprocess.run(
                args, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "caught (hung)"  # every test has a timeout: a hang is a failure
        if out.returncode == 0:
            return "SURVIVED"
        if out.returncode == 1:
            if verbose:  # how it was caught: the first lines of pytest's failure report
                lines = out.stdout.splitlines()
                which = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
                why = [line for line in lines if line.startswith("E ")][:3] + which[:2]
                return "caught\n" + "\n".join(f"{'':11}{line}" for line in why)
            return "caught"
        # 2-5: interrupted, internal error, usage error, nothing collected.
        return f"ERROR (pytest exit {out.returncode}): {out.stdout[-500:]}{out.stderr[-500:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="bugs to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument(
        "--check-stale",
        action="store_true",
        help="only check that every bug can still be planted and its tests exist",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per bug")
    parser.add_argument("-v", "--verbose", action="store_true", help="show how each was caught")
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control run (the chosen tests on the package as it is, which must pass)",
    )
    opts = parser.parse_args()
    if opts.list:
        for bug in BUGS:
            print(f"{bug.name:30} {bug.why}  [{bug.file}; {', '.join(bug.tests)}]")
        return 0
    chosen = [b for b in BUGS if not opts.names or b.name in opts.names]
    unknown = set(opts.names) - {b.name for b in BUGS}
    if unknown:
        parser.error(f"unknown bugs: {sorted(unknown)}")
    if opts.check_stale:
        problems = [(bug.name, why) for bug in chosen if (why := stale(bug)) is not None]
        for name, why in problems:
            print(f"STALE      {name:30} {why}")
        print(f"{len(chosen) - len(problems)} of {len(chosen)} planted bugs can be planted")
        return 1 if problems else 0
    if not opts.no_control:
        # A test that fails anyway would make every bug look caught.
        tests = sorted({t for bug in chosen for t in bug.tests})
        t0 = time.monotonic()
        verdict, _, why = check(None, tests, opts.timeout, verbose=True).partition("\n")
        took = time.monotonic() - t0
        if verdict != "SURVIVED":
            print(f"control run FAILED ({verdict}, {took:.1f}s): the tests fail without any bug")
            print(why)
            return 1
        print(f"{'passes':10} {'(control: no bug)':30} {took:6.1f}s  the tests pass on the package")
    bad = 0
    for bug in chosen:
        t0 = time.monotonic()
        verdict, _, why = check(bug, list(bug.tests), opts.timeout, opts.verbose).partition("\n")
        bad += not verdict.startswith("caught")
        print(f"{verdict:10} {bug.name:30} {time.monotonic() - t0:6.1f}s  {bug.why}", flush=True)
        if why:
            print(why, flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} planted bugs caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
