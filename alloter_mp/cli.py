"""The ``alloter-mp`` command (also ``python -m alloter_mp``).

This module only reads the command line and reports user errors; the work is
done by :mod:`alloter_mp._cli_run` (``run``: a program per input) and
:mod:`alloter_mp._cli_call` (``call``: a Python function in worker processes).
User errors end with one ``error:`` line and status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NoReturn, TextIO

__all__ = ["main"]

_PROG = "alloter-mp"

_DESCRIPTION = """\
Fan work out over processes with a limit, one overall timeout, and the first
failure ending the rest (the command-line face of the alloter_mp library).
"""

_EPILOG = """\
examples:
  ls *.log | alloter-mp run -j 4 -- gzip -9 {}
  alloter-mp run --timeout 60 -- curl -fsS -o {}.html https://{} ::: example.org example.com
  printf '[1, 2]\\n[3, 4]\\n' | alloter-mp call operator:add

run "alloter-mp run --help" or "alloter-mp call --help" for the details.
"""

_RUN_DESCRIPTION = """\
Run COMMAND once per input: each line of stdin, or each argument after ':::'.
'{}' in COMMAND's arguments is replaced by the input (also inside a longer
argument, e.g. {}.gz); without '{}' the input is added as the last argument.
COMMAND runs without a shell; write one yourself for pipes or redirections.

Jobs start in input order, at most N at once. Each job's stdout and stderr are
captured and written without mixing lines of different jobs, in input order.
Without --keep-going the first job that fails ends the running jobs (their
whole process groups) and skips the rest, and its exit status is the tool's.
Jobs start while stdin is still being read, so an input that never ends
(tail -f) works, with flat memory.

exit status: 0 all jobs succeeded; the failing job's status (128+N if a signal
N killed it); 124 --timeout passed, or the failing job ran past --job-timeout;
127 COMMAND not found; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM);
2 bad arguments.
"""

_RUN_EPILOG = """\
examples:
  # checksum every file found, 8 at a time
  find . -type f | alloter-mp run -j 8 -- sha256sum {}
  # inputs as arguments; '{}' inside a longer argument
  alloter-mp run -- cp {} backup/{}.bak ::: a.conf b.conf c.conf
  # a shell for redirections: pass the input as "$1", never paste it into the script
  ls *.txt | alloter-mp run -- sh -c 'gzip -c "$1" > "$1.gz"' sh {}
  # every job runs even if some fail; a JSON line per job in jobs.jsonl
  alloter-mp run --keep-going --report jobs.jsonl -- ping -c1 {} ::: host1 host2
  # give the whole batch 10 minutes (exit status 124 if it takes longer)
  alloter-mp run --timeout 600 --progress -- ./process.sh {} < list.txt
  # --job-timeout: end any one job that runs longer than 30 s (status timeout)
  alloter-mp run --job-timeout 30 --keep-going -- ./fetch.sh {} < urls.txt
  # --retries: run a failed (or timed out) job up to 3 more times
  alloter-mp run --retries 3 -- curl -fsS -O {} < urls.txt
  # --report + --resume: after a crash or Ctrl-C, run only what did not succeed
  alloter-mp run --report done.jsonl --resume -- ./convert.sh {} < files.txt
  # endless input: jobs start as lines arrive
  tail -f app.log | grep --line-buffered ERROR | alloter-mp run -j 2 -- ./alert.sh {}
  # --trace: a timeline to open in ui.perfetto.dev or chrome://tracing
  alloter-mp run --trace run.json -j 4 -- gzip -9 {} ::: *.log

report lines look like:
  {"index": 0, "input": "a", "command": ["gzip", "a"], "status": "ok",
   "exit_code": 0, "wall_s": 0.012, "peak_rss": 1589248, "attempts": 1}
  status is one of ok, failed, killed (ended because another job failed or
  the tool was interrupted), timeout (--job-timeout or --timeout passed),
  skipped (never started: exit_code null). With --resume, an input whose last
  line in FILE says "ok" for the same command is not run again, and new lines
  are appended to FILE.

for GNU parallel users (more in docs/cli.md):
  parallel -j N                     alloter-mp run -j N
  parallel --keep-order (-k)        the default here (--unordered: without -k)
  parallel --timeout S              --job-timeout S (--timeout is the whole run)
  parallel --retries N              --retries N-1 (N more runs here, N in all there)
  parallel --joblog F --resume-failed   --report F --resume
  parallel --halt now,fail=1        the default here
  parallel --halt never             --keep-going
"""

_CALL_DESCRIPTION = """\
Call a Python function once per line of stdin, in worker processes. Each line is
one JSON value: a list is passed as positional arguments, an object as keyword
arguments, anything else as the only argument (blank lines are ignored). One JSON
line with the result is written per input, in input order. MODULE is imported
as 'python -m' would, so modules in the current directory are found; print()
inside the function goes to stderr.

A failure prints the remote traceback on stderr and exits 1 (the other calls
are ended). With --keep-going every call runs, a failed input's line is
{"error": {"type": ..., "message": ...}}, and the exit status is 1 at the end.

--report FILE writes one JSON line per input (its status, attempts, times,
worker pid, error, and the result); with --resume, inputs whose last line in
FILE says "ok" for the same MODULE:FUNCTION are not called again: their result
is taken from FILE, so stdout is the same as for a whole run.

exit status: 0 all calls returned; 1 a call failed; 124 --timeout passed, or
the failing call ran past --job-timeout; 130 interrupted (Ctrl-C); 2 bad
arguments, bad JSON, unknown module or function.
"""

_CALL_EPILOG = """\
examples:
  printf '[1, 2]\\n[3, 4]\\n' | alloter-mp call operator:add          # 3, 7
  printf '{"x": 2}\\n{"x": 3}\\n' | alloter-mp call mymodule:square   # square(x=2), ...
  seq 1 100 | alloter-mp call -j 8 --timeout 60 mymodule:simulate
  jq -c '.[]' inputs.json | alloter-mp call --keep-going mymodule:fit > results.jsonl
  # --job-timeout: a call running longer than 60 s fails with TaskTimeout
  seq 1 100 | alloter-mp call --job-timeout 60 --keep-going mymodule:simulate
  # --retries: a call that raises or whose worker dies is run up to 2 more times
  seq 1 100 | alloter-mp call --retries 2 mymodule:flaky
  # --report + --resume: run again after a failure; done inputs are not recomputed
  alloter-mp call --report calls.jsonl --resume mymodule:fit < params.jsonl
  # --trace: a timeline of the workers for ui.perfetto.dev or chrome://tracing
  seq 1 50 | alloter-mp call --trace calls.json mymodule:simulate
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, with a pointer to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _whole_number(text: str, least: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be {least} or more, got {value}")
    return value


def job_limit(text: str) -> int:
    """An argparse type: a whole number of jobs, 0 meaning one per CPU."""
    return _whole_number(text, "0 (one per CPU)")


def _number_of_seconds(text: str, *, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        above = "0 or more seconds" if zero_ok else "a number of seconds above 0"
        raise argparse.ArgumentTypeError(f"must be {above}, got {text!r}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    return _number_of_seconds(text, zero_ok=False)


def _grace(text: str) -> float:
    return _number_of_seconds(text, zero_ok=True)


def _count(text: str) -> int:
    return _whole_number(text, "0")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("alloter-mp")
    except Exception:  # not installed: a source checkout
        package = sys.modules.get("alloter_mp")
        return str(getattr(package, "__version__", "unknown"))


def _add_common(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-j",
        "--jobs",
        metavar="N",
        type=job_limit,
        default=0,
        help=f"run at most N {what} at once (default: 0, one per CPU)",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=seconds,
        help="seconds for the whole batch; when they pass, everything is ended "
        "and the status is 124",
    )
    outcome = (
        "the status is then the first failure's in input order"
        if what == "jobs"
        else "failed inputs get an error line, and the status is 1 at the end (124 if the "
        "first failed input ran past --job-timeout)"
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help=f"run every {what[:-1]} even when some fail; {outcome}",
    )
    how = "failed or timed out" if what == "jobs" else "raised, its worker died, or timed out"
    parser.add_argument(
        "--job-timeout",
        metavar="S",
        type=seconds,
        help=f"seconds one {what[:-1]} may run (counted from its own start); past them it "
        "is ended and fails with status timeout (e.g. --job-timeout 30)",
    )
    parser.add_argument(
        "--retries",
        metavar="N",
        type=_count,
        default=0,
        help=f"run a failed {what[:-1]} ({how}) up to N more times; only its last attempt "
        "counts (e.g. --retries 3)",
    )
    skipped = "skipped and killed jobs included" if what == "jobs" else "with its result"
    parser.add_argument(
        "--report",
        metavar="FILE",
        help=f"write one JSON line per input to FILE ({skipped})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --report FILE: do not run again the inputs whose last line in FILE "
        "says ok for the same command; append to FILE (e.g. --report r.jsonl --resume)",
    )
    parser.add_argument(
        "--trace",
        metavar="FILE",
        help="write a Chrome trace of the run to FILE, for ui.perfetto.dev or "
        "chrome://tracing (e.g. --trace run.json)",
    )
    parser.add_argument("--progress", action="store_true", help="show a progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the whole command (``run`` and ``call``)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=_PROG, description=_DESCRIPTION, epilog=_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="subcommand", metavar="{run,call}", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run a command once per input line (or per argument after :::)",
        usage="%(prog)s [options] [--] COMMAND [ARG...] [::: INPUT...]",
        description=_RUN_DESCRIPTION,
        epilog=_RUN_EPILOG,
        formatter_class=fmt,
    )
    _add_common(run, "jobs")
    run.add_argument(
        "--grace",
        metavar="S",
        type=_grace,
        default=1.0,
        help="seconds an ended job gets after SIGTERM before SIGKILL (default: 1)",
    )
    run.add_argument(
        "--unordered",
        action="store_true",
        help="write each job's output whole as soon as it ends, instead of in input order",
    )
    run.add_argument(
        "-0",
        "--null",
        action="store_true",
        help="stdin inputs are separated by NUL characters (find -print0), not lines",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(handler=_run, subparser=run)

    call = sub.add_parser(
        "call",
        help="call a Python function once per JSON line of stdin",
        usage="%(prog)s [options] MODULE:FUNCTION",
        description=_CALL_DESCRIPTION,
        epilog=_CALL_EPILOG,
        formatter_class=fmt,
    )
    call.add_argument("target", metavar="MODULE:FUNCTION", help="the function to call")
    _add_common(call, "calls")
    call.set_defaults(handler=_call, subparser=call)
    return parser


def _run(args: argparse.Namespace) -> int:
    from alloter_mp import _cli_run
    from alloter_mp._cpus import available_cpus

    run_parser: argparse.ArgumentParser = args.subparser
    command: list[str] = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    inputs: list[str] | None = None
    if ":::" in command:
        cut = command.index(":::")
        command, inputs = command[:cut], command[cut + 1 :]
    if not command:
        run_parser.error("no COMMAND given (put it after the options, e.g. -- echo {})")
    with _Outputs(run_parser, args, _run_key) as outputs:
        if inputs is None and sys.stdin.isatty():
            sys.stderr.write(
                f"{_PROG}: reading inputs from the terminal, one per line; "
                "end with Ctrl-D (or give them after :::)\n"
            )
        opts = _cli_run.RunOptions(
            command=command,
            inputs=inputs,
            stdin=sys.stdin.buffer if inputs is None else None,
            null=args.null,
            limit=args.jobs or available_cpus(),
            timeout=args.timeout,
            job_timeout=args.job_timeout,
            retries=args.retries,
            keep_going=args.keep_going,
            progress=args.progress,
            report=outputs.report,
            done=outputs.done,
            trace=outputs.trace,
            grace=args.grace,
            ordered=not args.unordered,
        )
        return _cli_run.run_jobs(opts)


def _run_key(line: dict[str, Any]) -> Hashable | None:
    from alloter_mp._cli_run import resume_key

    item, command = line.get("input"), line.get("command")
    if not isinstance(item, str) or not isinstance(command, list):
        return None
    if not all(isinstance(arg, str) for arg in command):
        return None
    return resume_key(item, command)


class _Outputs:
    """The files of ``--report`` (and what ``--resume`` read of it) and ``--trace``.

    Opening them is checked before anything runs (a bad path: one error line and
    status 2); they are closed when the command ends.
    """

    def __init__(
        self,
        parser: argparse.ArgumentParser,
        args: argparse.Namespace,
        key: Callable[[dict[str, Any]], Hashable | None],
        keep: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        from alloter_mp._cli_report import ReportFile, load_done

        self.report: ReportFile | None = None
        self.done: dict[int, Any] | None = None
        self.trace: TextIO | None = None
        if args.resume and args.report is None:
            parser.error("--resume needs --report FILE (the file it resumes from)")
        try:
            if args.report is not None:
                what = "read the report"
                if args.resume:
                    self.done = load_done(args.report, key, *(() if keep is None else (keep,)))
                what = "write the report"
                self.report = ReportFile(args.report, append=args.resume)
            if args.trace is not None:
                what = "write the trace"
                self.trace = open(args.trace, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            self.close()
            path = args.trace if what == "write the trace" else args.report
            parser.error(f"cannot {what} {path!r}: {exc.strerror or exc}")

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.report is not None:
            self.report.close()
        if self.trace is not None:
            with contextlib.suppress(OSError):
                self.trace.close()


def _call(args: argparse.Namespace) -> int:
    from alloter_mp import _cli_call

    with _Outputs(args.subparser, args, _cli_call.report_key, _cli_call.report_keep) as outputs:
        return _cli_call.call_command(
            args.target,
            limit=args.jobs or None,
            timeout=args.timeout,
            keep_going=args.keep_going,
            progress=args.progress,
            job_timeout=args.job_timeout,
            retries=args.retries,
            report=outputs.report,
            done=outputs.done,
            trace=outputs.trace,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``alloter-mp`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status; user errors exit with status 2 through argparse.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.subcommand is None:
            parser.error("choose a command: run or call")
        status: int = args.handler(args)
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away: stay quiet, as a pipeline stage does.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
