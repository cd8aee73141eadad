"""Plant known bugs in a copy of alloter_mp, one at a time, and check the tests catch them.

Each bug is a small edit of the package (exact text replaced, in one file) and the
tests meant to catch it. For each bug the script copies the package to a temporary
directory, applies the edit, runs those tests against the copy (``PYTHONPATH``
points at it; the repository's own package is not importable from there) and
prints ``caught`` (the tests failed) or ``SURVIVED`` (they passed). First, a control
run checks that those tests pass on the package as it is. An edit whose
text is no longer found in the package is reported as ``STALE``: the package
changed and the bug must be written again, it is not silently skipped.

    python scripts/plant_bugs.py              # every bug, after a control run (< 10 min)
    python scripts/plant_bugs.py --list
    python scripts/plant_bugs.py escalation-2s kill-late-after-grace

Exit status 0 when every bug was caught, 1 otherwise.

The edits are written against the package as of issue 17 (before its restructure);
a STALE line says which to rewrite.
"""

from __future__ import annotations

import argparse
import os
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


BUGS = [
    # -- issue 17: claims that planted bugs survived -----------------------------
    Bug(
        "exec-waits-for-siblings",
        "exec raises at once, siblings not awaited",
        "_calls.py",
        "        self._run(batch, ctx, len(tasks))\n        return batch.results()",
        "        self._run(batch, ctx, len(tasks), settle=True)\n        return batch.results()",
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
        "token = ctx._on_cancel(lambda: batch.cancel(_cancelled_error(ctx)))",
        "token = ctx._on_cancel(lambda: (time.sleep(0.4), batch.cancel(_cancelled_error(ctx))))",
        ("test_ending.py::test_context_cancel_reaches_exec_within_50_ms",),
    ),
    Bug(
        "model-context-cancel-late",
        "Cancelled soon after ctx.cancel(), in exec mode (the model)",
        "_calls.py",
        "token = ctx._on_cancel(lambda: batch.cancel(_cancelled_error(ctx)))",
        "token = ctx._on_cancel(lambda: (time.sleep(0.4), batch.cancel(_cancelled_error(ctx))))",
        ("test_model.py::test_random_faulty_batches_keep_the_contract",),
    ),
    Bug(
        "owner-limit-ignored",
        "limit bounds the tasks running at once (map on a bigger shared pool)",
        "_pool.py",
        "        return self.limit is not None and self.active >= self.limit\n",
        "        return False\n",
        ("test_map.py::test_map_respects_limit_and_fail_fast_timing",),
    ),
    Bug(
        "map-waits-for-siblings",
        "map raises at once on the first failure",
        "_calls.py",
        "        self._run(batch, None, len(iterable))\n",
        "        self._run(batch, None, len(iterable), settle=True)\n",
        ("test_map.py::test_map_respects_limit_and_fail_fast_timing",),
    ),
    Bug(
        "alloter-runs-in-pairs",
        "Alloter gives every task its own process at once",
        "_alloter.py",
        "        self._owner.limit = None\n",
        "        self._owner.limit = 2\n        self._pool._max_tasks = 1\n",
        ("test_core.py::test_alloter_gives_every_task_its_own_process",),
    ),
    Bug(
        "crash-taken-for-timeout",
        "a crash is WorkerCrashed (the 300-call leak loop checks outcomes)",
        "_pool.py",
        "                batch.task_failed(head, WorkerCrashed(index, exitcode, w.pid), crashed=True)\n",
        "                batch.task_killed(head)\n",
        ("test_core.py::test_no_process_or_fd_leak_after_300_mixed_calls",),
    ),
    Bug(
        "timeout-raised-as-cancelled",
        "the timeout is ExecTimeout, from exec and from raise_for_status",
        "_batch.py",
        'return self._end("timeout", ExecTimeout(self.timeout_message))',
        'return self._end("timeout", Cancelled(self.timeout_message))',
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
    # -- earlier promises the suite already held ---------------------------------
    Bug(
        "no-group-kill",
        "a killed task's children die with it (orphaned grandchild: only the group)",
        "_proctree.py",
        "        os.killpg(pid, sig)\n",
        "        pass\n",
        ("test_start_methods.py::test_timeout_kills_the_task_and_its_children",),
    ),
    Bug(
        "no-descendant-kill",
        "a killed task's children die with it (child in a session of its own)",
        "_proctree.py",
        "            proc.send_signal(sig)\n",
        "            pass\n",
        ("test_start_methods.py::test_timeout_kills_the_task_and_its_children",),
    ),
    Bug(
        "no-lifeline",
        "the parent SIGKILLed: workers and their children die",
        "_worker.py",
        "        lifeline.poll(None)\n",
        "        time.sleep(10**6)\n",
        ("test_parent_death.py::test_sigkill_of_the_parent_mid_batch_leaves_nothing_alive",),
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
]


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
                why = [line for line in out.stdout.splitlines() if line.startswith("E ")]
                return "caught\n" + "\n".join(f"{'':11}{line}" for line in why[:3])
            return "caught"
        # 2-5: interrupted, internal error, usage error, nothing collected.
        return f"ERROR (pytest exit {out.returncode}): {out.stdout[-500:]}{out.stderr[-500:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="bugs to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
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
    if not opts.no_control:
        # A test that fails anyway would make every bug look caught.
        tests = sorted({t for bug in chosen for t in bug.tests})
        t0 = time.monotonic()
        verdict = check(None, tests, opts.timeout)
        took = time.monotonic() - t0
        if verdict != "SURVIVED":
            print(f"control run FAILED ({verdict}, {took:.1f}s): the tests fail without any bug")
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
