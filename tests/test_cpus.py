"""available_cpus(): the affinity mask for real, the cgroup quota on fake trees.

The quota arithmetic reads ``/proc/self/cgroup``, ``/proc/self/mountinfo`` and the
cgroup files under a root directory; each test lays out such a tree in ``tmp_path``
(v1, v2, nested cgroups, a container's partial view, "max", missing and garbage
files). The affinity part runs a child pinned to one CPU with
``os.sched_setaffinity`` and checks what it reports, the default ``limit`` included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import alloter_mp
from alloter_mp import _cpus
from alloter_mp._cpus import available_cpus, cgroup_cpu_limit

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
    "33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
)


def _tree(root: Path, files: dict[str, str]) -> str:
    for path, text in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return str(root)


# -- cgroup v2 ---------------------------------------------------------------------


def test_v2_quota(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "0::/job\n",
            "/proc/self/mountinfo": V2_MOUNT,
            "/sys/fs/cgroup/job/cpu.max": "150000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 1.5


def test_v2_max_means_no_quota(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "0::/job\n",
            "/proc/self/mountinfo": V2_MOUNT,
            "/sys/fs/cgroup/job/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) is None


def test_v2_parent_quota_counts(tmp_path: Path) -> None:
    # Our own cgroup allows 3 CPUs, but its parent only 0.5: the parent wins.
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "0::/user.slice/box/job\n",
            "/proc/self/mountinfo": V2_MOUNT,
            "/sys/fs/cgroup/user.slice/box/job/cpu.max": "300000 100000\n",
            "/sys/fs/cgroup/user.slice/box/cpu.max": "max 100000\n",
            "/sys/fs/cgroup/user.slice/cpu.max": "50000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 0.5


def test_v2_child_quota_tighter_than_parent(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "0::/a/b\n",
            "/proc/self/mountinfo": V2_MOUNT,
            "/sys/fs/cgroup/a/b/cpu.max": "200000 100000\n",
            "/sys/fs/cgroup/a/cpu.max": "400000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 2.0


def test_v2_container_sees_its_cgroup_as_root(tmp_path: Path) -> None:
    # Inside a container, the cgroup2 mount's root is the container's cgroup and
    # /proc/self/cgroup says "0::/": the quota is at the mount point itself.
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "0::/\n",
            "/proc/self/mountinfo": V2_MOUNT,
            "/sys/fs/cgroup/cpu.max": "100000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 1.0


def test_v2_mount_of_a_subtree(tmp_path: Path) -> None:
    # The hierarchy is mounted from /kubepods/pod1: our path is cut to what is visible.
    mount = "40 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
            "/proc/self/mountinfo": mount,
            "/sys/fs/cgroup/ctr/cpu.max": "max 100000\n",
            "/sys/fs/cgroup/cpu.max": "250000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 2.5


# -- cgroup v1 ---------------------------------------------------------------------


def test_v1_quota(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "4:memory:/docker/c1\n3:cpu,cpuacct:/docker/c1\n",
            "/proc/self/mountinfo": V1_MOUNTS,
            "/sys/fs/cgroup/cpu,cpuacct/docker/c1/cpu.cfs_quota_us": "250000\n",
            "/sys/fs/cgroup/cpu,cpuacct/docker/c1/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 2.5


def test_v1_minus_one_means_no_quota(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "3:cpu,cpuacct:/\n",
            "/proc/self/mountinfo": V1_MOUNTS,
            "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_limit(root) is None


def test_v1_parent_quota_counts(tmp_path: Path) -> None:
    base = "/sys/fs/cgroup/cpu,cpuacct"
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "3:cpu,cpuacct:/batch/job\n",
            "/proc/self/mountinfo": V1_MOUNTS,
            f"{base}/batch/job/cpu.cfs_quota_us": "-1\n",
            f"{base}/batch/job/cpu.cfs_period_us": "100000\n",
            f"{base}/batch/cpu.cfs_quota_us": "50000\n",
            f"{base}/batch/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 0.5


def test_hybrid_v1_and_v2_take_the_tighter(tmp_path: Path) -> None:
    mounts = V1_MOUNTS + "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "3:cpu,cpuacct:/x\n0::/x\n",
            "/proc/self/mountinfo": mounts,
            "/sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_quota_us": "300000\n",
            "/sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_period_us": "100000\n",
            "/sys/fs/cgroup/unified/x/cpu.max": "120000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == 1.2


def test_escaped_mount_point(tmp_path: Path) -> None:
    mount = "30 23 0:26 / /sys/fs/my\\040cgroups rw - cgroup2 cgroup2 rw\n"
    root = _tree(
        tmp_path,
        {
            "/proc/self/cgroup": "0::/\n",
            "/proc/self/mountinfo": mount,
            "/sys/fs/my cgroups/cpu.max": "70000 100000\n",
        },
    )
    assert cgroup_cpu_limit(root) == pytest.approx(0.7)


# -- what is missing or broken counts as no quota -------------------------------------


@pytest.mark.parametrize(
    "files",
    [
        pytest.param({}, id="no-proc-files"),
        pytest.param({"/proc/self/cgroup": "0::/job\n"}, id="no-mountinfo"),
        pytest.param(
            {"/proc/self/cgroup": "0::/job\n", "/proc/self/mountinfo": V2_MOUNT},
            id="no-cpu-max",
        ),
        pytest.param(
            {"/proc/self/cgroup": "0::/job\n", "/proc/self/mountinfo": V1_MOUNTS},
            id="v2-path-but-only-v1-mounted",
        ),
        pytest.param(
            {
                "/proc/self/cgroup": "0::/job\n",
                "/proc/self/mountinfo": V2_MOUNT,
                "/sys/fs/cgroup/job/cpu.max": "lots 100000\n",
            },
            id="garbage-quota",
        ),
        pytest.param(
            {
                "/proc/self/cgroup": "0::/job\n",
                "/proc/self/mountinfo": V2_MOUNT,
                "/sys/fs/cgroup/job/cpu.max": "100000 0\n",
            },
            id="zero-period",
        ),
        pytest.param(
            {
                "/proc/self/cgroup": "0::/job\n",
                "/proc/self/mountinfo": V2_MOUNT,
                "/sys/fs/cgroup/job/cpu.max": "100000\n",
            },
            id="one-field",
        ),
        pytest.param(
            {
                "/proc/self/cgroup": "3:cpu,cpuacct:/\n",
                "/proc/self/mountinfo": V1_MOUNTS,
                "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
            },
            id="v1-no-period",
        ),
        pytest.param(
            {
                "/proc/self/cgroup": "garbage\n\n::::\n",
                "/proc/self/mountinfo": "not a mountinfo line\n - \n",
            },
            id="garbage-proc-files",
        ),
        pytest.param(
            {
                "/proc/self/cgroup": "0::/elsewhere/job\n",
                "/proc/self/mountinfo": "40 23 0:26 /kubepods /sys/fs/cgroup rw - cgroup2 c rw\n",
                "/sys/fs/cgroup/cpu.max": "100000 100000\n",
            },
            id="cgroup-outside-the-mounted-subtree",
        ),
    ],
)
def test_unusable_files_mean_no_quota(tmp_path: Path, files: dict[str, str]) -> None:
    assert cgroup_cpu_limit(_tree(tmp_path, files)) is None


def test_directory_instead_of_file_means_no_quota(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"/proc/self/cgroup": "0::/job\n", "/proc/self/mountinfo": V2_MOUNT})
    (tmp_path / "sys/fs/cgroup/job/cpu.max").mkdir(parents=True)
    assert cgroup_cpu_limit(root) is None


# -- combining with the affinity mask -------------------------------------------------


@pytest.mark.parametrize(
    ("affinity", "quota", "expected"),
    [
        (8, None, 8),
        (8, 1.5, 2),  # rounded up
        (8, 2.0, 2),
        (8, 0.1, 1),  # at least 1
        (2, 6.0, 2),  # a quota above the mask does not add CPUs
        (1, None, 1),
    ],
)
def test_affinity_lowered_by_quota(affinity: int, quota: float | None, expected: int) -> None:
    assert _cpus._available(affinity, quota) == expected


def test_available_cpus_on_this_machine() -> None:
    count = available_cpus()
    assert isinstance(count, int)
    assert 1 <= count <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert count <= len(os.sched_getaffinity(0))


def test_exported() -> None:
    assert alloter_mp.available_cpus is available_cpus
    assert "available_cpus" in alloter_mp.__all__


# -- the affinity mask, for real -------------------------------------------------------

_PINNED_CHILD = textwrap.dedent(
    """
    import os, sys
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import alloter_mp
    from alloter_mp import ProcessAlloter
    with ProcessAlloter() as a, ProcessAlloter(0) as b:
        print(alloter_mp.available_cpus(), a.limit, b.limit, a.pool.size)
    """
)

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform"
)


@needs_affinity
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="1 CPU")
def test_pinned_child_counts_one_cpu_and_defaults_to_it() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PINNED_CHILD],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert out == ["1", "1", "1", "1"]


@needs_affinity
@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="1 CPU")
@pytest.mark.skipif(shutil.which("taskset") is None, reason="no taskset")
def test_cli_jobs_zero_follows_the_affinity_mask(tmp_path: Path) -> None:
    # Two jobs that each wait for the other to start: with -j 0 on one CPU they run
    # one after the other, so each finds no other running; the marker files say so.
    script = tmp_path / "job.sh"
    script.write_text(
        'touch "$1.running"; sleep 0.3; ls *.running | wc -l > "$1.seen"; rm "$1.running"\n'
    )
    cpu = min(os.sched_getaffinity(0))
    result = subprocess.run(
        ["taskset", "-c", str(cpu), sys.executable, "-m", "alloter_mp", "run", "-j", "0",
         "--", "sh", str(script), "{}", ":::", "a", "b", "c"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = sorted(int((tmp_path / f"{n}.seen").read_text()) for n in "abc")
    assert seen == [1, 1, 1]
