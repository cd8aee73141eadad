"""``alloter-mp run``: the real command in subprocesses.

Jobs that must be ended sleep with a unique marker argument (``sleep 1000.<n>``),
so that a job left behind is found by scanning the process table afterwards.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest
from _env import with_repo
from _tasks import most_at_once

_counter = itertools.count()

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")


def tool(
    *args: str, stdin: bytes = b"", cwd: Path | None = None, timeout: float = 45
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m alloter_mp ARGS`` to the end."""
    proc = subprocess.run(
        [sys.executable, "-m", "alloter_mp", *args],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=with_repo(),
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def start_tool(*args: str, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m alloter_mp ARGS`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "alloter_mp", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=with_repo(),
    )


def marker() -> str:
    """A unique ``sleep`` argument: 1000 seconds and a bit."""
    return f"1000.{os.getpid()}{next(_counter):03d}"


def living(mark: str) -> list[psutil.Process]:
    """Processes (zombies excluded) whose command line holds ``mark``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if mark in " ".join(proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def assert_none_left(mark: str) -> None:
    """No process with ``mark`` survives (signals are asynchronous: allow 2 s)."""
    end = time.monotonic() + 2.0
    while living(mark) and time.monotonic() < end:
        time.sleep(0.05)
    left = living(mark)
    for proc in left:  # do not leak them into the other tests
        proc.kill()
    assert not left, f"left behind: {[p.info['cmdline'] for p in left]}"


def wait_for_files(*paths: Path, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() and p.read_text().strip() for p in paths):
        assert time.monotonic() < end, f"never appeared: {paths}"
        time.sleep(0.02)


def read_report(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def finish(proc: subprocess.Popen[bytes], timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out.decode(), err.decode()


# -- inputs, placeholders, output ---------------------------------------------------------


def test_stdin_lines_become_jobs_in_input_order() -> None:
    res = tool("run", "-j", "1", "--", "echo", "{}", stdin=b"a\nb c\nd\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "a\nb c\nd\n"
    assert res.stderr == ""


def test_inputs_after_triple_colon() -> None:
    res = tool("run", "--", "echo", "<{}>", ":::", "x", "y z")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "<x>\n<y z>\n"


def test_placeholder_in_several_arguments_and_inside_words() -> None:
    res = tool("run", "--", "echo", "pre-{}-post", "{}{}", ":::", "q")
    assert res.stdout == "pre-q-post qq\n"


def test_without_placeholder_the_input_is_appended() -> None:
    res = tool("run", "--", "echo", "hello", ":::", "world")
    assert res.stdout == "hello world\n"


def test_the_separator_is_optional() -> None:
    res = tool("run", "-j", "2", "echo", "-n", "{}.", ":::", "a")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "a."


def test_no_shell_is_involved() -> None:
    res = tool("run", "--", "echo", "{}", ":::", "$HOME; echo injected")
    assert res.stdout == "$HOME; echo injected\n"


def test_nul_separated_inputs() -> None:
    res = tool("run", "-0", "--", "echo", "[{}]", stdin=b"a b\0c\0")
    assert res.stdout == "[a b]\n[c]\n"


def test_jobs_get_no_stdin() -> None:
    res = tool("run", "--", "sh", "-c", 'cat; echo "done $1"', "sh", stdin=b"one\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "done one\n"


def test_no_input_runs_nothing() -> None:
    res = tool("run", "--", "false", stdin=b"")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    res = tool("run", "--", "false", ":::")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_output_is_in_input_order_whatever_the_finish_order() -> None:
    script = 'sleep "$1"; echo "out $1"; echo "err $1" >&2'
    res = tool("run", "-j", "3", "--", "sh", "-c", script, "sh", ":::", "1.0", "0.5", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "out 1.0\nout 0.5\nout 0\n"
    assert res.stderr == "err 1.0\nerr 0.5\nerr 0\n"


def test_unordered_output_follows_completion() -> None:
    script = 'sleep "$1"; echo "$1"'
    res = tool(
        "run", "--unordered", "-j", "3", "--", "sh", "-c", script, "sh", ":::", "2.0", "1.0", "0"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "0\n1.0\n2.0\n"


def test_lines_of_different_jobs_never_mix() -> None:
    code = (
        "import sys, time\n"
        "tag = sys.argv[1]\n"
        "for i in range(150):\n"
        "    sys.stdout.write(f'{tag} {i} ' + 'x' * 60 + '\\n'); sys.stdout.flush()\n"
        "    sys.stderr.write(f'{tag} e{i}\\n'); sys.stderr.flush()\n"
        "    time.sleep(0.001)\n"
    )
    tags = ["A", "B", "C", "D"]
    for flag in ([], ["--unordered"]):
        res = tool("run", *flag, "-j", "4", "--", sys.executable, "-c", code, "{}", ":::", *tags)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert len(lines) == 600
        assert all(line.endswith("x" * 60) for line in lines)
        # each job's lines form one block, in the job's own order
        blocks = [lines[k : k + 150] for k in range(0, 600, 150)]
        for block in blocks:
            tag = block[0].split()[0]
            assert [line.split()[:2] for line in block] == [[tag, str(i)] for i in range(150)]
        order = [block[0].split()[0] for block in blocks]
        assert sorted(order) == tags
        if not flag:
            assert order == tags
        err_lines = res.stderr.splitlines()
        assert len(err_lines) == 600
        for k in range(0, 600, 150):
            assert len({line.split()[0] for line in err_lines[k : k + 150]}) == 1


# -- the limit ------------------------------------------------------------------------------


def test_at_most_n_jobs_run_at_once(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "start = time.time(); time.sleep(1.0); end = time.time()\n"
        "open(sys.argv[1] + '.span', 'w').write(f'{start} {end}')\n"
    )
    inputs = [str(i) for i in range(5)]
    res = tool(
        "run", "-j", "2", "--", sys.executable, "-c", code, "{}", ":::", *inputs, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    spans = [tuple(map(float, (tmp_path / f"{i}.span").read_text().split())) for i in inputs]
    assert most_at_once(spans) == 2


def test_one_job_at_a_time_runs_in_input_order(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = 'echo "start $1" >> log; sleep 0.05; echo "end $1" >> log'
    res = tool("run", "-j", "1", "--", "sh", "-c", script, "sh", ":::", "a", "b", "c", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split("\n")[:-1] == [
        "start a",
        "end a",
        "start b",
        "end b",
        "start c",
        "end c",
    ]


# -- failures ---------------------------------------------------------------------------------


def test_first_failure_ends_the_running_jobs_and_skips_the_rest(tmp_path: Path) -> None:
    mark = marker()
    script = (
        'if [ "$1" = fail ]; then\n'
        "  while [ ! -s s1.pid ] || [ ! -s s2.pid ]; do sleep 0.02; done\n"
        '  echo "failing now" >&2; exit 3\n'
        "fi\n"
        'echo $$ > "$1.pid"; echo "running $1"\n'
        f"sleep {mark}; true\n"  # `; true`: sleep is a child of sh, not exec'd
    )
    report = tmp_path / "report.jsonl"
    started = time.monotonic()
    res = tool(
        "run", "-j", "3", "--report", str(report), "--", "sh", "-c", script, "sh",
        ":::", "fail", "s1", "s2", "s3", "s4", cwd=tmp_path,
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert res.returncode == 3, res.stderr
    assert_none_left(mark)
    assert not (tmp_path / "s3.pid").exists() and not (tmp_path / "s4.pid").exists()
    assert res.stdout == "running s1\nrunning s2\n"  # the killed jobs' output is kept
    assert "failing now" in res.stderr
    assert "Traceback" not in res.stderr
    lines = read_report(report)
    assert [line["input"] for line in lines] == ["fail", "s1", "s2", "s3", "s4"]
    assert [line["status"] for line in lines] == [
        "failed",
        "killed",
        "killed",
        "skipped",
        "skipped",
    ]
    assert [line["exit_code"] for line in lines] == [3, -15, -15, None, None]
    for line in lines:
        assert set(line) >= {"input", "status", "exit_code", "wall_s", "peak_rss"}
        assert isinstance(line["wall_s"], float) and line["wall_s"] >= 0
        assert isinstance(line["peak_rss"], int) and line["peak_rss"] >= 0


def test_a_job_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    mark = marker()
    report = tmp_path / "r.jsonl"
    script = f'trap "" TERM; echo $$ > "$1.pid"; sleep {mark}; true'
    proc = start_tool(
        "run", "--grace", "0.3", "--report", str(report), "--", "sh", "-c", script, "sh",
        ":::", "stubborn", "b", cwd=tmp_path,
    )  # fmt: skip
    wait_for_files(tmp_path / "stubborn.pid", tmp_path / "b.pid")
    proc.send_signal(signal.SIGINT)
    code, _, _ = finish(proc)
    assert code == 130
    assert_none_left(mark)
    assert [line["exit_code"] for line in read_report(report)] == [-9, -9]


def test_a_descendant_in_a_session_of_its_own_is_ended_too(tmp_path: Path) -> None:
    mark = marker()
    code = f"import os, time; os.setsid(); open('escaped.pid', 'w').write(str(os.getpid())); time.sleep({mark})"
    script = f'{sys.executable} -c "{code}" & wait'
    res_proc = start_tool("run", "--", "sh", "-c", script, ":::", "x", cwd=tmp_path)
    wait_for_files(tmp_path / "escaped.pid")
    pid = int((tmp_path / "escaped.pid").read_text())
    assert os.getpgid(pid) != os.getpgid(res_proc.pid)
    res_proc.send_signal(signal.SIGTERM)
    code_, _, _ = finish(res_proc)
    assert code_ == 143
    assert_none_left(mark)


def test_what_a_failed_job_leaves_behind_is_ended(tmp_path: Path) -> None:
    failed_mark, ok_mark = marker(), marker()
    script = (
        f'if [ "$1" = bad ]; then sleep {failed_mark} & echo $! > bad.pid; exit 1; fi\n'
        f"sleep {ok_mark} >/dev/null 2>&1 & echo $! > ok.pid\n"
    )
    res = tool(
        "run", "--keep-going", "--", "sh", "-c", script, "sh", ":::", "bad", "ok", cwd=tmp_path
    )
    assert res.returncode == 1
    assert_none_left(failed_mark)
    # a job that succeeded may leave a daemon on purpose: it is not touched
    survivors = living(ok_mark)
    for proc in survivors:
        proc.kill()
    assert len(survivors) == 1


def test_death_by_signal_gives_128_plus_n(tmp_path: Path) -> None:
    report = tmp_path / "r.jsonl"
    res = tool("run", "--report", str(report), "--", "sh", "-c", "kill -9 $$", ":::", "x")
    assert res.returncode == 137
    (line,) = read_report(report)
    assert (line["status"], line["exit_code"]) == ("failed", -9)


def test_failing_job_output_is_passed_through() -> None:
    res = tool("run", "--", "sh", "-c", "echo out-$1; echo err-$1 >&2; exit 4", "sh", ":::", "z")
    assert res.returncode == 4
    assert res.stdout == "out-z\n"
    assert res.stderr.startswith("err-z\n")


def test_keep_going_runs_everything_and_reports_the_first_failure_in_input_order(
    tmp_path: Path,
) -> None:
    script = (
        'case "$1" in\n'
        "  slowfail) sleep 0.5; echo slowfail; exit 5;;\n"
        "  fastfail) echo fastfail; exit 7;;\n"
        '  *) sleep 0.2; echo "$1";;\n'
        "esac\n"
    )
    report = tmp_path / "r.jsonl"
    res = tool(
        "run", "-j", "4", "--keep-going", "--report", str(report), "--", "sh", "-c", script,
        "sh", ":::", "a", "slowfail", "fastfail", "d", "e", "f",
    )  # fmt: skip
    assert res.returncode == 5, res.stderr
    assert res.stdout == "a\nslowfail\nfastfail\nd\ne\nf\n"
    lines = read_report(report)
    assert [line["status"] for line in lines] == ["ok", "failed", "failed", "ok", "ok", "ok"]
    assert [line["exit_code"] for line in lines] == [0, 5, 7, 0, 0, 0]
    assert "2 of 6 jobs failed" in res.stderr


def test_a_missing_command_is_127_with_one_line() -> None:
    res = tool("run", "--", "no-such-command-alloter", "{}", ":::", "a", "b")
    assert res.returncode == 127
    assert res.stderr.count("\n") == 1
    assert "no-such-command-alloter" in res.stderr
    assert "not found" in res.stderr


# -- timeout and signals ------------------------------------------------------------------------


def test_timeout_ends_everything_with_124(tmp_path: Path) -> None:
    mark = marker()
    report = tmp_path / "r.jsonl"
    started = time.monotonic()
    res = tool(
        "run", "-j", "2", "--timeout", "1", "--report", str(report), "--",
        "sh", "-c", f"sleep {mark}; true", ":::", "a", "b", "c",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert res.returncode == 124
    assert 1.0 <= elapsed < 20
    assert "timed out" in res.stderr
    assert_none_left(mark)
    lines = read_report(report)
    assert [line["status"] for line in lines] == ["timeout", "timeout", "skipped"]
    assert lines[0]["exit_code"] == -15 and lines[2]["exit_code"] is None
    assert lines[0]["wall_s"] >= 0.9


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_ends_every_job(tmp_path: Path, sig: signal.Signals, status: int) -> None:
    mark = marker()
    report = tmp_path / "r.jsonl"
    script = f'echo $$ > "$1.pid"; sleep {mark}; true'
    proc = start_tool(
        "run", "-j", "2", "--report", str(report), "--", "sh", "-c", script, "sh",
        ":::", "a", "b", "c", cwd=tmp_path,
    )  # fmt: skip
    wait_for_files(tmp_path / "a.pid", tmp_path / "b.pid")
    proc.send_signal(sig)
    code, _, err = finish(proc)
    assert code == status
    assert "interrupted" in err
    assert_none_left(mark)
    assert not (tmp_path / "c.pid").exists()
    assert [line["status"] for line in read_report(report)] == ["killed", "killed", "skipped"]


# -- report and progress --------------------------------------------------------------------------


def test_report_measures_time_and_memory(tmp_path: Path) -> None:
    code = "import sys, time; x = bytearray(int(sys.argv[1]) << 20); time.sleep(0.3)"
    report = tmp_path / "r.jsonl"
    res = tool("run", "--report", str(report), "--", sys.executable, "-c", code, ":::", "1", "150")
    assert res.returncode == 0, res.stderr
    small, big = read_report(report)
    assert small["status"] == big["status"] == "ok"
    assert small["exit_code"] == big["exit_code"] == 0
    assert small["command"] == [sys.executable, "-c", code, "1"]
    assert 0.3 <= big["wall_s"] < 20
    assert big["peak_rss"] >= 150 << 20
    assert 0 < small["peak_rss"] < 150 << 20


def test_progress_bar_on_stderr() -> None:
    res = tool("run", "--progress", "--", "true", ":::", "a", "b", "c")
    assert res.returncode == 0
    assert res.stdout == ""
    assert "3/3" in res.stderr


# -- the command line itself ----------------------------------------------------------------------


def test_help_has_examples() -> None:
    top = tool("--help")
    assert top.returncode == 0
    assert "run" in top.stdout and "call" in top.stdout and "examples" in top.stdout
    run = tool("run", "--help")
    assert run.returncode == 0
    for text in (":::", "{}", "--keep-going", "--timeout", "--report", "124", "examples"):
        assert text in run.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["run"],
        ["run", "--"],
        ["run", "-j", "-1", "--", "echo"],
        ["run", "-j", "two", "--", "echo"],
        ["run", "--timeout", "0", "--", "echo"],
        ["run", "--timeout", "soon", "--", "echo"],
        ["run", "--bogus", "--", "echo"],
        ["run", "--report", "/nonexistent-dir/x/r.jsonl", "--", "echo", ":::", "a"],
    ],
)
def test_bad_arguments_exit_2_with_an_error_line(args: list[str]) -> None:
    res = tool(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith("alloter-mp")
    assert "error:" in res.stderr.splitlines()[-1]
    assert "Traceback" not in res.stderr


def test_console_script_is_the_same_command() -> None:
    # The script pip installed for this interpreter, not the first alloter-mp on PATH
    # (an older install there would be tested instead).
    try:
        dist = importlib.metadata.distribution("alloter-mp")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("alloter-mp is not installed (pip install -e .): no console script")
    exe = Path(sysconfig.get_path("scripts")) / "alloter-mp"
    assert exe.is_file(), (
        f"alloter-mp {dist.version} is installed for {sys.executable}, "
        f"but its console script is not at {exe}"
    )
    res = subprocess.run(
        [str(exe), "run", "--", "echo", ":::", "same"],
        capture_output=True,
        text=True,
        env=with_repo(),
        timeout=45,
    )
    assert (res.returncode, res.stdout) == (0, "same\n"), res.stderr
