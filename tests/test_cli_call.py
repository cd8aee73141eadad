"""``alloter-mp call``: the real command in subprocesses, on a module in the test's folder.

Calls that must be ended write their worker's pid to a file first, so the test can
check afterwards that no worker is left running them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _env import with_repo
from _procs import kill_all, wait_dead

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

MODULE = textwrap.dedent(
    """
    import os, time

    def describe(*args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    def square(x):
        return x * x

    def nap(seconds):
        time.sleep(seconds)
        return seconds

    def boom(x):
        if x == 3:
            raise ValueError(f"bad input {x}")
        return x

    def pid_then_sleep(name):
        with open(name + ".pid", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(1000)

    def fail_when_ready(names):
        while not all(os.path.exists(n + ".pid") for n in names):
            time.sleep(0.02)
        raise RuntimeError("gave up")

    def dispatch(kind, arg):
        return {"nap": nap, "pid": pid_then_sleep, "fail": fail_when_ready}[kind](arg)

    def die(x):
        if x == 2:
            os._exit(9)
        return x

    def chatty(x):
        print("chatter", x)
        return x

    def unjsonable(x):
        return {x}

    class Box:
        @staticmethod
        def double(x):
            return 2 * x

    not_a_function = 42
    """
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "calltasks.py").write_text(MODULE)
    return tmp_path


def call(
    *args: str, lines: list[str], cwd: Path, timeout: float = 45
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m alloter_mp call ARGS`` with ``lines`` on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "alloter_mp", "call", *args],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=with_repo(),
        timeout=timeout,
    )


def out_values(res: subprocess.CompletedProcess[str]) -> list[object]:
    return [json.loads(line) for line in res.stdout.splitlines()]


def pids_dead(pids: list[int]) -> bool:
    """True once every pid is gone or a zombie (allowing 5 s for the kill to land)."""
    alive = wait_dead([(pid, None) for pid in pids], 5.0)
    kill_all([(pid, None) for pid in alive])  # do not leak them into the other tests
    return not alive


def read_pids(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("*.pid"))]


# -- calls and results -------------------------------------------------------------------


def test_lists_objects_and_scalars(workdir: Path) -> None:
    res = call(
        "calltasks:describe",
        lines=['[1, "two"]', '{"a": 1, "b": [2]}', "5", '"text"', "null", "[]"],
        cwd=workdir,
    )
    assert res.returncode == 0, res.stderr
    assert out_values(res) == [
        {"args": [1, "two"], "kwargs": {}},
        {"args": [], "kwargs": {"a": 1, "b": [2]}},
        {"args": [5], "kwargs": {}},
        {"args": ["text"], "kwargs": {}},
        {"args": [None], "kwargs": {}},
        {"args": [], "kwargs": {}},
    ]
    assert res.stderr == ""


def test_results_come_in_input_order(workdir: Path) -> None:
    naps = ["0.6", "0.3", "0", "0.4", "0.1"]
    res = call("-j", "4", "calltasks:nap", lines=naps, cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert out_values(res) == [float(n) if "." in n else int(n) for n in naps]


def test_many_small_calls(workdir: Path) -> None:
    res = call("-j", "2", "calltasks:square", lines=[str(i) for i in range(500)], cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert out_values(res) == [i * i for i in range(500)]


def test_blank_lines_are_ignored_and_no_input_is_fine(workdir: Path) -> None:
    res = call("calltasks:square", lines=["2", "", "  ", "3"], cwd=workdir)
    assert (res.returncode, out_values(res)) == (0, [4, 9])
    res = call("calltasks:square", lines=[], cwd=workdir)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_dotted_function_and_stdlib_module(workdir: Path) -> None:
    assert out_values(call("calltasks:Box.double", lines=["21"], cwd=workdir)) == [42]
    assert out_values(call("operator:add", lines=["[1, 2]", "[3, 4]"], cwd=workdir)) == [3, 7]


def test_print_goes_to_stderr_not_into_the_results(workdir: Path) -> None:
    res = call("calltasks:chatty", lines=["1", "2"], cwd=workdir)
    assert res.returncode == 0
    assert out_values(res) == [1, 2]
    assert "chatter 1" in res.stderr and "chatter 2" in res.stderr


def test_printed_lines_of_concurrent_calls_never_mix(workdir: Path) -> None:
    res = call("-j", "2", "calltasks:chatty", lines=[str(i) for i in range(300)], cwd=workdir)
    assert res.returncode == 0, res.stderr
    printed = [line for line in res.stderr.splitlines() if line]
    assert sorted(printed) == sorted(f"chatter {i}" for i in range(300))


def test_the_current_directory_is_importable_from_an_entry_script(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # As the installed console script does: sys.path[0] is the script's folder, not cwd.
    bindir = tmp_path_factory.mktemp("bin")
    entry = bindir / "entry.py"
    entry.write_text(
        "import sys\nfrom alloter_mp.cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    res = subprocess.run(
        [sys.executable, str(entry), "call", "calltasks:square", "-j", "2"],
        input="3\n4\n",
        capture_output=True,
        text=True,
        cwd=workdir,
        env=with_repo(),
        timeout=45,
    )
    assert res.returncode == 0, res.stderr
    assert out_values(res) == [9, 16]


def test_progress_bar(workdir: Path) -> None:
    res = call("--progress", "calltasks:square", lines=["1", "2"], cwd=workdir)
    assert res.returncode == 0
    assert out_values(res) == [1, 4]
    assert "2/2" in res.stderr


# -- failures --------------------------------------------------------------------------------


def test_a_failure_prints_the_remote_traceback_and_exits_1(workdir: Path) -> None:
    res = call("-j", "1", "calltasks:boom", lines=["1", "2", "3", "4"], cwd=workdir)
    assert res.returncode == 1
    # Fast return: results before the failure are written as far as they are known.
    values = out_values(res)
    assert values == [1, 2][: len(values)]
    assert "Traceback" in res.stderr
    assert 'calltasks.py", line' in res.stderr and "in boom" in res.stderr
    assert "ValueError: bad input 3" in res.stderr
    assert "line 3" in res.stderr.splitlines()[-1]


def test_a_failure_ends_the_other_calls(workdir: Path) -> None:
    lines = [
        json.dumps(["pid", "a"]),
        json.dumps(["pid", "b"]),
        json.dumps(["fail", ["a", "b"]]),
        json.dumps(["pid", "never"]),
    ]
    started = time.monotonic()
    res = call("-j", "3", "calltasks:dispatch", lines=lines, cwd=workdir)
    assert time.monotonic() - started < 30
    assert res.returncode == 1
    assert "RuntimeError: gave up" in res.stderr
    pids = read_pids(workdir)
    assert len(pids) == 2 and not (workdir / "never.pid").exists()
    assert pids_dead(pids)


def test_keep_going_writes_error_lines_and_exits_1(workdir: Path) -> None:
    res = call("--keep-going", "-j", "2", "calltasks:boom", lines=["1", "3", "5", "3"], cwd=workdir)
    assert res.returncode == 1
    error = {"error": {"type": "ValueError", "message": "bad input 3"}}
    assert out_values(res) == [1, error, 5, error]
    assert res.stderr.count("Traceback") == 2
    assert "2 of 4 calls failed" in res.stderr


def test_keep_going_survives_a_dead_worker(workdir: Path) -> None:
    res = call("--keep-going", "-j", "2", "calltasks:die", lines=["1", "2", "3"], cwd=workdir)
    assert res.returncode == 1
    first, dead, third = out_values(res)
    assert (first, third) == (1, 3)
    assert isinstance(dead, dict)
    assert dead["error"]["type"] == "WorkerCrashed"
    assert "9" in dead["error"]["message"]


def test_a_dead_worker_fails_the_run(workdir: Path) -> None:
    res = call("-j", "1", "calltasks:die", lines=["1", "2", "3"], cwd=workdir)
    assert res.returncode == 1
    assert out_values(res) in ([], [1])
    assert "line 2" in res.stderr


def test_a_result_json_cannot_hold_is_a_failure(workdir: Path) -> None:
    res = call("calltasks:unjsonable", lines=["1"], cwd=workdir)
    assert res.returncode == 1
    assert "not JSON serializable" in res.stderr


# -- timeout and signals ------------------------------------------------------------------------


@pytest.mark.parametrize("keep_going", [False, True])
def test_timeout_exits_124_and_ends_the_calls(workdir: Path, keep_going: bool) -> None:
    flags = ["--keep-going"] if keep_going else []
    lines = [json.dumps(["nap", 0]), json.dumps(["pid", "a"]), json.dumps(["pid", "b"])]
    started = time.monotonic()
    res = call(*flags, "-j", "3", "--timeout", "2", "calltasks:dispatch", lines=lines, cwd=workdir)
    elapsed = time.monotonic() - started
    assert res.returncode == 124, res.stderr
    assert 2.0 <= elapsed < 30
    assert "timed out" in res.stderr
    assert out_values(res) == [0]
    pids = read_pids(workdir)
    assert len(pids) == 2
    assert pids_dead(pids)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("keep_going", [False, True])
def test_interrupt_ends_the_calls(
    workdir: Path, sig: signal.Signals, status: int, keep_going: bool
) -> None:
    flags = ["--keep-going"] if keep_going else []
    (workdir / "inputs.txt").write_text('"a"\n"b"\n"c"\n')
    with open(workdir / "inputs.txt", "rb") as stdin:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alloter_mp",
                "call",
                *flags,
                "-j",
                "2",
                "calltasks:pid_then_sleep",
            ],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=with_repo(),
        )
    try:
        end = time.monotonic() + 20
        while len(list(workdir.glob("*.pid"))) < 2 or not all(
            p.read_text() for p in workdir.glob("*.pid")
        ):
            assert time.monotonic() < end, "the calls never started"
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status
    pids = read_pids(workdir)
    assert len(pids) == 2 and not (workdir / "c.pid").exists()
    assert pids_dead(pids)


# -- user errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "lines", "expect"),
    [
        ("no_such_module_xyz:f", ["1"], "no module named"),
        ("calltasks:missing", ["1"], "no function"),
        ("calltasks:not_a_function", ["1"], "not callable"),
        ("calltasks", ["1"], "MODULE:FUNCTION"),
        ("calltasks.py:square", ["1"], "module name"),
        ("calltasks:square", ["1", "{oops"], "line 2 is not valid JSON"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    workdir: Path, target: str, lines: list[str], expect: str
) -> None:
    res = call(target, lines=lines, cwd=workdir)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.splitlines()) == 1
    assert "error:" in res.stderr and expect in res.stderr
    assert "Traceback" not in res.stderr


def test_a_module_that_fails_to_import_is_a_one_line_error(workdir: Path) -> None:
    (workdir / "broken.py").write_text("raise ImportError('needs numpy')\n")
    res = call("broken:f", lines=["1"], cwd=workdir)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "needs numpy" in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["calltasks:square", "-j", "-2"],
        ["calltasks:square", "--timeout", "-1"],
        ["calltasks:square", "extra"],
    ],
)
def test_bad_arguments_exit_2(workdir: Path, args: list[str]) -> None:
    res = call(*args, lines=["1"], cwd=workdir)
    assert res.returncode == 2
    assert "error:" in res.stderr.splitlines()[-1]
    assert "Traceback" not in res.stderr


def test_help_has_examples(workdir: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "alloter_mp", "call", "--help"],
        capture_output=True,
        text=True,
        env=with_repo(),
        timeout=45,
    )
    assert res.returncode == 0
    for text in ("MODULE:FUNCTION", "--keep-going", "--timeout", "examples", "124"):
        assert text in res.stdout
