"""Contract section 10, output: ``capture_output=True`` catches a task's fds 1 and 2 apart.

Tasks run in a bare child process (:mod:`_bareworker`) that captures around each
task as a pool worker will; a crashed task's output is read by the parent from its
own descriptors of the capture files.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker

import pytest
from _bareworker import BareWorker, Died

from alloter_mp._anonfile import AnonFile
from alloter_mp._capture import TAIL_BYTES, TRIM_AT, read_tail


@pytest.fixture
def worker() -> Iterator[BareWorker]:
    w = BareWorker()
    try:
        yield w
    finally:
        w.close()


_KEEP: list[object] = []


def everything() -> str:
    print("print to stdout")
    print("print to stderr", file=sys.stderr)
    os.write(1, b"os.write to 1\n")
    os.write(2, b"os.write to 2\n")
    subprocess.run(["echo", "from a child process"], check=True)
    subprocess.run(["sh", "-c", "echo child stderr >&2"], check=True)
    libc = ctypes.CDLL(None)
    # C's stdout fully buffered (PYTHONUNBUFFERED would make it unbuffered), so this
    # sits in stdio's buffer until the capture's fflush.
    buffer = ctypes.create_string_buffer(8192)
    _KEEP.append(buffer)  # stdio uses it after this function returns
    libc.setvbuf(ctypes.c_void_p.in_dll(libc, "stdout"), buffer, 0, len(buffer))  # _IOFBF
    libc.printf(b"from C, unflushed")
    return "done"


def test_print_os_write_c_and_child_processes_are_caught_apart(worker):
    (status, value), (out, err) = worker.run(everything, capture=True)
    assert (status, value) == ("ok", "done")
    assert out == ("print to stdout\nos.write to 1\nfrom a child process\nfrom C, unflushed")
    assert err == "print to stderr\nos.write to 2\nchild stderr\n"


def test_the_next_task_starts_with_empty_streams(worker):
    worker.run(everything, capture=True)
    _, (out, err) = worker.run(lambda: print("second"), capture=True)
    assert (out, err) == ("second\n", "")
    _, (out, err) = worker.run(lambda: None, capture=True)
    assert (out, err) == ("", "")


def test_only_the_last_mib_of_each_stream_is_kept(worker):
    def task() -> None:
        sys.stdout.write("a" * TAIL_BYTES)
        sys.stdout.write("b" * 1000 + "THE END")
        sys.stderr.write("é" * TAIL_BYTES)  # 2 bytes each: the cut falls inside one

    _, (out, err) = worker.run(task, capture=True)
    assert len(out.encode()) == TAIL_BYTES
    assert out.endswith("b" * 1000 + "THE END") and out.startswith("a")
    assert err == "é" * (TAIL_BYTES // 2)


def test_undecodable_bytes_are_replaced(worker):
    _, (out, _) = worker.run(lambda: os.write(1, b"ok \xff\xfe done"), capture=True)
    assert out == "ok \ufffd\ufffd done"


def test_the_workers_own_descriptors_are_back_after_a_captured_task():
    # spawn: the child's descriptors 1 and 2 are this process's, which capfd would
    # replace; here a pipe stands in for its 1, read after the child stopped.
    resource_tracker.ensure_running()  # a helper started now would hold the pipe too
    read_end, write_end = os.pipe()
    saved = os.dup(1)
    os.dup2(write_end, 1)
    try:
        w = BareWorker("spawn")
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(write_end)
    try:
        _, (out, _) = w.run(lambda: os.write(1, b"captured\n"), capture=True)
        w.run(lambda: os.write(1, b"not captured\n"))
    finally:
        w.close()
    os.set_blocking(read_end, False)
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b"not captured\n"
    assert out == "captured\n"


def replace_stdout() -> None:
    sys.stdout = io.StringIO()  # as a parent's replaced stream, inherited under fork


def test_print_is_caught_when_sys_stdout_is_not_on_descriptor_1(worker):
    worker.run(replace_stdout)
    _, (out, _) = worker.run(lambda: print("caught anyway"), capture=True)
    (_, kind), _ = worker.run(lambda: type(sys.stdout).__name__)
    assert out == "caught anyway\n"
    assert kind == "StringIO"  # put back after the task


@pytest.mark.parametrize("how", ["exit", "kill", "segfault"])
def test_the_parent_reads_the_output_of_a_task_that_died(worker, how):
    def task() -> None:
        print("last words")
        os.write(2, b"on stderr\n")
        sys.stdout.flush()
        if how == "exit":
            os._exit(3)
        elif how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            ctypes.string_at(0)

    worker.run(lambda: print("an earlier task"), capture=True)
    with pytest.raises(Died) as died:
        worker.run(task, capture=True)
    assert died.value.output is not None
    out, err = died.value.output
    assert out == "last words\n"
    assert err.startswith("on stderr\n")
    if how == "segfault":  # faulthandler wrote its report to descriptor 2
        assert "Segmentation fault" in err and "in task" in err


def test_a_long_stream_does_not_grow_its_file_without_end(worker):
    chunk = 64 * 1024

    def task() -> None:
        line = b"z" * (chunk - 1) + b"\n"
        end = time.monotonic() + 1.5
        written = 0
        while written < 6 * TRIM_AT or time.monotonic() < end:
            os.write(1, line)
            written += chunk
            if written % (4 * TAIL_BYTES) == 0:
                time.sleep(0.02)  # room for the trimming thread on a busy machine
        os.write(1, b"tail")

    _, (out, _) = worker.run(task, capture=True)
    assert out.endswith("z\ntail") and len(out) == TAIL_BYTES
    stat = os.fstat(worker.files.out.fd)
    assert stat.st_size > 6 * TRIM_AT
    assert stat.st_blocks * 512 < 3 * TRIM_AT, "the head of the file was not freed"


def test_read_tail_of_a_short_and_an_empty_file():
    f = AnonFile.create("t")
    try:
        assert read_tail(f.fd) == ""
        os.write(f.fd, b"short")
        assert read_tail(f.fd) == "short"
        assert read_tail(f.fd, most=3) == "ort"
    finally:
        f.close()


def test_anonymous_files_have_no_name_even_without_memfd(monkeypatch):
    def no_memfd(*args: object) -> int:
        raise OSError("not here")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    f = AnonFile.create("fallback", 4096)
    try:
        stat = os.fstat(f.fd)
        assert stat.st_nlink == 0 and stat.st_size == 4096
    finally:
        f.close()
