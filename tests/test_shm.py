"""Big pickle buffers through shared memory between real processes.

A parent and a child (tests/_shm_peer.py) talk over a duplex multiprocessing Pipe
as a pool and its worker will: a pickled message, then the descriptors it
announces. What the child loads it describes (read-only? in a shared mapping, or a
copy?), and it sends results back the same way. Leaks are looked for where they
would be: the processes' descriptor tables and mappings (/proc), and /dev/shm.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _shm_peer
import pytest

from alloter_mp import _shm

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MiB = 1 << 20
BACKENDS = [
    pytest.param(None, id="memfd" if _shm._HAS_MEMFD else "default"),
    pytest.param(False, id="posix-shm"),
]


class Peer:
    """A child process serving _shm_peer requests, and what it was sent so far."""

    def __init__(self, method: str = "forkserver", anonymous_files: bool | None = None) -> None:
        ctx = multiprocessing.get_context(method)
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_shm_peer.serve, args=(child, anonymous_files))
        self.proc.start()
        child.close()
        self.sent = 0  # segments of the current outbox the child has
        self.anonymous_files = anonymous_files

    def send(self, message: tuple[Any, ...], outbox: _shm.Outbox | None = None) -> None:
        fds = outbox.fds(self.sent) if outbox is not None else []
        self.conn.send_bytes(pickle.dumps((*message, len(fds)) if outbox else message))
        _shm.send_fds(self.conn, fds)
        self.sent += len(fds)

    def load(
        self,
        outbox: _shm.Outbox,
        packs: list[_shm.Packed],
        result_bytes: int = 0,
        hold: bool = False,
    ) -> tuple[Any, Any]:
        fds = outbox.fds(self.sent)
        self.conn.send_bytes(pickle.dumps(("load", packs, len(fds), result_bytes, hold)))
        _shm.send_fds(self.conn, fds)
        self.sent += len(fds)
        packed, count = pickle.loads(self.conn.recv_bytes())
        with _shm.Inbox(_shm.recv_fds(self.conn, count)) as inbox:
            report, result = inbox.loads(packed)
        return report, result

    def ask(self, *message: Any) -> Any:
        self.conn.send_bytes(pickle.dumps(message))
        return pickle.loads(self.conn.recv_bytes())

    def close(self) -> None:
        self.conn.close()
        self.proc.join(10)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> Iterator[Peer]:
    anonymous = getattr(request, "param", None)
    p = Peer(anonymous_files=anonymous)
    try:
        yield p
    finally:
        p.close()


def holders(tag: str, pids: list[int] | None = None) -> list[str]:
    """Processes with a descriptor or mapping whose name contains ``tag``."""
    found = []
    for entry in os.listdir("/proc") if pids is None else [str(p) for p in pids]:
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    if tag in os.readlink(f"/proc/{entry}/fd/{fd}"):
                        found.append(f"{entry} fd {fd}")
                except OSError:
                    pass
            with open(f"/proc/{entry}/maps") as f:
                found.extend(f"{entry} map" for line in f if tag in line)
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def shm_names(prefix: str) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def shared(description: dict[str, Any]) -> bool:
    """The child's array lies in one of our segments, not in a copy."""
    mapping = description["mapping"]
    return f"memfd:{_shm.MEMFD_NAME}" in mapping or "/dev/shm/amp" in mapping


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("peer", BACKENDS, indirect=True)
def test_big_array_travels_shared_and_read_only(peer: Peer) -> None:
    big = np.arange(32 * MiB, dtype=np.float64)  # 256 MiB
    expected = float(big.sum())
    with _shm.Outbox(anonymous_files=peer.anonymous_files) as out:
        packed = out.dumps([big])
        assert len(packed.data) < 4096  # the data did not go into the pickle
        (report,), result = peer.load(out, [packed], result_bytes=32 * MiB)
    (row,) = report
    assert row["kind"] == "ndarray" and row["nbytes"] == big.nbytes
    assert row["checksum"] == expected
    assert row["readonly"]
    assert shared(row), row["mapping"]
    # The result came back the same way.
    assert isinstance(result, np.ndarray) and result.shape == (4 * MiB,)
    assert not result.flags.writeable
    assert float(result[0]) == 2.5 and float(result[-1]) == 2.5
    assert shared(_shm_peer.describe(result))
    with pytest.raises(ValueError, match="read-only"):
        result[0] = 1.0


def test_results_outlive_the_inbox_and_free_when_dropped(peer: Peer) -> None:
    with _shm.Outbox() as out:
        _, result = peer.load(out, [out.dumps([1])], result_bytes=8 * MiB)
    gc.collect()
    # The inbox is released, the child closed its copy: only our mapping remains
    # (before Python 3.13 an mmap object keeps a descriptor of its own as well).
    assert float(result.sum()) == 2.5 * MiB
    tag = f"memfd:{_shm.MEMFD_NAME}-{peer.proc.pid}"
    held = holders(tag, [os.getpid(), peer.proc.pid])
    assert [h for h in held if not h.startswith(f"{os.getpid()} fd")] == [f"{os.getpid()} map"]
    assert len(held) == (1 if sys.version_info >= (3, 13) else 2), held
    del result
    gc.collect()
    assert holders(tag, [os.getpid(), peer.proc.pid]) == []


def test_one_array_for_many_tasks_is_written_once(peer: Peer) -> None:
    big = np.arange(4 * MiB, dtype=np.float64)  # 32 MiB
    tasks = [(i, big) for i in range(8)]
    with _shm.Outbox() as out:
        packs = [out.dumps(task) for task in tasks]
        assert out.shared_bytes == big.nbytes
        assert out.segment_count == 1
        assert os.fstat(out.fds()[0]).st_size == big.nbytes
        assert {p.refs for p in packs} == {packs[0].refs}
        report, _ = peer.load(out, packs)
    rows = [described[1] for described in report]  # (i, big) -> the array's row
    assert len(rows) == 8
    # One mapping in the child, shared by the 8 tasks.
    assert len({row["address"] for row in rows}) == 1
    assert all(row["readonly"] and shared(row) for row in rows)


def test_views_of_one_array_are_written_once() -> None:
    big = np.arange(2 * MiB, dtype=np.float64)
    with _shm.Outbox() as out:
        out.dumps(big)
        out.dumps(big.view())
        out.dumps(big.reshape(1024, -1))
        assert out.shared_bytes == big.nbytes
        out.dumps(big[:MiB])  # another buffer: half the bytes
        assert out.shared_bytes == big.nbytes + big.nbytes // 2


def test_read_only_source_is_written_once() -> None:
    big = np.arange(2 * MiB, dtype=np.float64)
    big.flags.writeable = False
    with _shm.Outbox() as out:
        out.dumps([big])
        out.dumps({"again": big})
        assert out.shared_bytes == big.nbytes


def test_buffers_written_later_reach_a_reader_that_has_the_segment(peer: Peer) -> None:
    # The arena grows after the child has its descriptor: no new descriptor needed.
    with _shm.Outbox() as out:
        first = np.full(MiB, 1.0)
        report1, _ = peer.load(out, [out.dumps([first])])
        second = np.full(3 * MiB, 3.0)
        packed = out.dumps([second])
        assert out.segment_count == 1 and peer.sent == 1
        report2, _ = peer.load(out, [packed])
    assert report1[0][0]["checksum"] == MiB
    assert report2[0][0]["checksum"] == 9.0 * MiB
    assert shared(report2[0][0])


@pytest.mark.parametrize("peer", BACKENDS, indirect=True)
def test_pickle_buffer_travels_shared(peer: Peer) -> None:
    payload = bytearray(os.urandom(3 * MiB))
    with _shm.Outbox(anonymous_files=peer.anonymous_files) as out:
        packed = out.dumps([pickle.PickleBuffer(payload)])
        assert len(packed.refs) == 1
        (report,), _ = peer.load(out, [packed])
    (row,) = report
    assert row["kind"] == "memoryview" and row["readonly"] and shared(row)
    assert row["checksum"] == float(np.frombuffer(payload, dtype=np.uint8).sum())


def test_small_buffers_stay_in_the_pickle(peer: Peer) -> None:
    small = np.arange(1000, dtype=np.float64)  # 8 KB
    with _shm.Outbox() as out:
        packed = out.dumps([small, pickle.PickleBuffer(bytearray(100))])
        assert packed.refs == ()
        assert out.segment_count == 0
        # An ordinary pickle: readable without the module.
        loaded = pickle.loads(packed.data)
        assert np.array_equal(loaded[0], small) and loaded[0].flags.writeable
        (report,), _ = peer.load(out, [packed])
    assert report[0]["mapping"] == "" or not shared(report[0])
    assert not report[0]["readonly"]  # a copy of its own, as without sharing


def test_threshold_splits_one_object(peer: Peer) -> None:
    with _shm.Outbox(threshold=64 * 1024) as out:
        packed = out.dumps([np.zeros(1000), np.ones(10_000)])  # 8 KB and 80 KB
        assert len(packed.refs) == 1
        (report,), _ = peer.load(out, [packed])
    assert not shared(report[0]) and shared(report[1])


def test_threshold_none_shares_nothing() -> None:
    with _shm.Outbox(threshold=None) as out:
        packed = out.dumps(np.zeros(4 * MiB))
        assert packed.refs == () and out.segment_count == 0
        assert len(packed.data) > 32 * MiB


def test_closure_over_an_array_goes_through_cloudpickle(peer: Peer) -> None:
    big = np.arange(MiB, dtype=np.float64)

    def task() -> float:
        return float(big.sum()) + 1.0

    with _shm.Outbox() as out:
        packed = out.dumps(task)
        assert len(packed.refs) == 1 and out.shared_bytes == big.nbytes
        peer.send(("call", packed), out)
        assert pickle.loads(peer.conn.recv_bytes()) == float(big.sum()) + 1.0


def test_a_failed_plain_pickle_attempt_leaves_no_buffer_behind() -> None:
    # Plain pickle meets the array, then fails on the lambda; cloudpickle starts over.
    big = np.arange(MiB, dtype=np.float64)
    with _shm.Outbox() as out:
        packed = out.dumps([big, lambda: 1])
        assert len(packed.refs) == 1 and out.shared_bytes == big.nbytes


def test_no_room_for_a_segment_falls_back_to_the_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_shm.os, "pwrite", full)
    monkeypatch.setattr(_shm, "_new_unlinked_shm", full)
    big = np.arange(MiB, dtype=np.float64)
    with _shm.Outbox() as out:
        packed = out.dumps([big])
        assert packed.refs == ()
        assert np.array_equal(pickle.loads(packed.data)[0], big)


def test_released_outbox_refuses_more() -> None:
    out = _shm.Outbox()
    out.dumps(np.zeros(MiB))
    out.release()
    out.release()
    assert out.fds() == []
    with pytest.raises(RuntimeError):
        out.dumps(np.zeros(MiB))


# -- descriptors and segments leave nothing behind ------------------------------------


@pytest.mark.parametrize("peer", BACKENDS, indirect=True)
def test_no_descriptor_or_segment_outlives_a_call(peer: Peer) -> None:
    before_fds = open_fds()
    child_before = peer.ask("fds")
    before_shm = shm_names("amp")
    for round_ in range(3):
        arrays = [np.full(MiB + i, float(round_)) for i in range(3)]
        with _shm.Outbox(anonymous_files=peer.anonymous_files) as out:
            packs = [out.dumps((a, arrays[0])) for a in arrays]
            report, result = peer.load(out, packs, result_bytes=2 * MiB, hold=True)
            assert len(report) == 3
        peer.sent = 0
        del result
        assert peer.ask("release") == child_before
    gc.collect()
    assert open_fds() == before_fds
    assert shm_names("amp") - before_shm == set()
    tag_parent = f"memfd:{_shm.MEMFD_NAME}-{os.getpid()}"
    tag_child = f"memfd:{_shm.MEMFD_NAME}-{peer.proc.pid}"
    pids = [os.getpid(), peer.proc.pid]
    assert holders(tag_parent, pids) == [] and holders(tag_child, pids) == []


def test_many_descriptors_in_one_go(peer: Peer) -> None:
    # More than the kernel's 253 per message: sent in several.
    with _shm.Outbox(anonymous_files=False, threshold=1) as out:
        arrays = [np.full(16, float(i)) for i in range(300)]
        packed = out.dumps(arrays)
        assert out.segment_count == 300
        (report,), _ = peer.load(out, [packed])
    assert [row["checksum"] for row in report] == [16.0 * i for i in range(300)]


def test_descriptors_and_messages_keep_their_order() -> None:
    a, b = multiprocessing.Pipe(duplex=True)
    try:
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        a.send_bytes(b"one")
        _shm.send_fds(a, [r1])
        a.send_bytes(b"two")
        _shm.send_fds(a, [r2, w2])
        assert b.recv_bytes() == b"one"
        (got1,) = _shm.recv_fds(b, 1)
        assert b.recv_bytes() == b"two"
        got2, got3 = _shm.recv_fds(b, 2)
        os.write(w1, b"x")
        assert os.read(got1, 1) == b"x"
        os.write(got3, b"y")
        assert os.read(got2, 1) == b"y"
        for fd in (r1, w1, r2, w2, got1, got2, got3):
            os.close(fd)
    finally:
        a.close()
        b.close()


# -- the parent killed mid-call ---------------------------------------------------------

_KILLED_PARENT = """
import multiprocessing, os, pickle, sys, time
import numpy as np
import _shm_peer
from alloter_mp import _shm

if __name__ == "__main__":
    anonymous = {anonymous}
    ctx = multiprocessing.get_context("forkserver")
    conn, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_shm_peer.serve, args=(child, anonymous))
    proc.start()
    child.close()
    out = _shm.Outbox(anonymous_files=anonymous)
    big = np.arange(32 * 2**20, dtype=np.float64)
    packed = out.dumps([big])
    # The child maps the segment and holds on to what it loaded; it then sends a
    # 32 MiB result the parent never reads.
    conn.send_bytes(pickle.dumps(("load", [packed], out.segment_count, 32 * 2**20, True)))
    _shm.send_fds(conn, out.fds())
    more = out.dumps([big + 1])  # written, never sent
    print(proc.pid, flush=True)
    while conn.poll(60) is False:
        pass
    print("result waiting", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("anonymous", [None, False], ids=["memfd", "posix-shm"])
def test_parent_killed_mid_call_leaves_nothing(tmp_path: Path, anonymous: bool | None) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(_KILLED_PARENT).format(anonymous=anonymous))
    before = shm_names("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "result waiting"
        tags = [f"memfd:{_shm.MEMFD_NAME}-{parent.pid}", f"memfd:{_shm.MEMFD_NAME}-{child_pid}"]
        if anonymous is None:
            assert holders(tags[0], [parent.pid, child_pid])  # the test sees segments
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    # The child sees the pipe close and exits; the kernel frees what it held.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.05)
    assert not _alive(child_pid)
    assert [h for tag in tags for h in holders(tag)] == []
    ours = {n for n in shm_names("amp") - before if n.startswith(f"amp{parent.pid:x}")}
    assert ours == set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


_KILLED_WHILE_NAMED = """
import pickle, time
from alloter_mp import _shm

def stuck(name):  # the instant between shm_open and shm_unlink, made long
    print(name, flush=True)
    time.sleep(120)

_shm._unlink_named = stuck
_shm.Outbox(anonymous_files=False).dumps(pickle.PickleBuffer(bytearray(2 << 20)))
"""


def test_resource_tracker_unlinks_a_name_left_by_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "named.py"
    script.write_text(_KILLED_WHILE_NAMED)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the tracker's warning about the name it unlinks
        text=True,
    )
    try:
        assert proc.stdout is not None
        name = proc.stdout.readline().strip().lstrip("/")
        assert name.startswith("amp") and (Path("/dev/shm") / name).exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (Path("/dev/shm") / name).exists():
        time.sleep(0.05)
    assert not (Path("/dev/shm") / name).exists()


def test_a_buffer_that_cannot_be_mapped_is_read_as_a_read_only_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before Python 3.13 each mapping holds a descriptor: thousands of kept results
    # can run out of them. Loading must still give the object.
    big = np.arange(MiB, dtype=np.float64) * 3
    with _shm.Outbox() as out:
        packed = out.dumps([big, big[: MiB // 2]])
        copies = [os.dup(fd) for fd in out.fds()]

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(_shm.mmap, "mmap", refuse)
    with _shm.Inbox(copies) as inbox:
        first, half = inbox.loads(packed)
    assert np.array_equal(first, big) and np.array_equal(half, big[: MiB // 2])
    assert not first.flags.writeable and not half.flags.writeable
