"""How many CPUs this process may really use: affinity mask and cgroup CPU quota.

``os.cpu_count()`` counts the machine. A process pinned by ``taskset`` (or a
container's cpuset) may run on fewer, and a container given a CPU quota (``docker
run --cpus=1.5``: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``) gets that much CPU time per period however many CPUs it sees.
Starting more busy workers than that only makes them wait for each other.

The quota is found the way the kernel applies it: from ``/proc/self/cgroup`` (which
cgroup this process is in) and ``/proc/self/mountinfo`` (where that hierarchy is
mounted), every cgroup from ours up to the mount's root counts, since a parent's
quota bounds its children's. Files are read under a ``root`` directory so that tests
can lay out a fake ``/proc`` and ``/sys/fs/cgroup``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

__all__ = ["available_cpus", "cgroup_cpu_limit"]


def available_cpus() -> int:
    """The number of CPUs this process may really use (at least 1).

    The CPU affinity mask (``os.sched_getaffinity``, where the platform has it,
    else ``os.cpu_count()``), lowered by a cgroup v1 or v2 CPU quota rounded up:
    a container limited to 1.5 CPUs on a 4-CPU machine gives 2. It is the default
    ``limit`` of the alloters and of ``alloter-mp -j 0``.
    """
    return _available(_affinity_count(), cgroup_cpu_limit())


def _available(affinity: int, quota: float | None) -> int:
    count = affinity
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _affinity_count() -> int:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return len(getaffinity(0))
        except OSError:
            pass
    return os.cpu_count() or 1


def cgroup_cpu_limit(root: str = "/") -> float | None:
    """The tightest CPU quota of this process's cgroups, in CPUs; ``None`` without one.

    ``root`` prefixes every path read (``/proc/self/...`` and the cgroup mounts), for
    tests. Anything unreadable or malformed counts as no quota: this only ever lowers
    a count, so a wrong guess must err towards the affinity mask.
    """
    limits = [q for q in _quotas(root) if q is not None]
    return min(limits) if limits else None


def _read(root: str, path: str) -> str | None:
    try:
        with open(os.path.join(root, path.lstrip("/")), encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _quotas(root: str) -> Iterator[float | None]:
    memberships = _read(root, "/proc/self/cgroup")
    mountinfo = _read(root, "/proc/self/mountinfo")
    if memberships is None or mountinfo is None:
        return
    mounts = _cgroup_mounts(mountinfo)
    for line in memberships.splitlines():
        # "hierarchy-id:controllers:path"; v2 is "0::path", v1 names its controllers.
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            mount = mounts.get("cgroup2")
            if mount is not None:
                for directory in _up_the_tree(mount, path):
                    yield _v2_quota(_read(root, os.path.join(directory, "cpu.max")))
        elif "cpu" in controllers.split(","):
            mount = mounts.get("cpu")
            if mount is not None:
                for directory in _up_the_tree(mount, path):
                    yield _v1_quota(
                        _read(root, os.path.join(directory, "cpu.cfs_quota_us")),
                        _read(root, os.path.join(directory, "cpu.cfs_period_us")),
                    )


def _cgroup_mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """``{"cgroup2" | "cpu": (root within the hierarchy, mount point)}``."""
    found: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        # "id parent major:minor root mountpoint options [optional...] - fstype source super"
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 1:
            continue
        hierarchy_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        fstype = tail[0]
        if fstype == "cgroup2":
            found.setdefault("cgroup2", (hierarchy_root, mount_point))
        elif fstype == "cgroup" and len(tail) >= 3 and "cpu" in tail[2].split(","):
            found.setdefault("cpu", (hierarchy_root, mount_point))
    return found


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _up_the_tree(mount: tuple[str, str], path: str) -> Iterator[str]:
    """Our cgroup's directory under the mount point, then each parent up to the mount.

    A mount may show only part of the hierarchy (a container sees its own cgroup as
    the root): the mount's root is cut from the front of the path. A path outside the
    mounted part cannot be read, so nothing is yielded for it.
    """
    hierarchy_root, mount_point = mount
    # (normpath keeps a leading "//": strip every leading slash first)
    path = os.path.normpath("/" + path.lstrip("/"))
    hierarchy_root = os.path.normpath("/" + hierarchy_root.lstrip("/"))
    if hierarchy_root != "/":
        if path == hierarchy_root:
            path = "/"
        elif path.startswith(hierarchy_root + "/"):
            path = path[len(hierarchy_root) :]
        else:
            return
    while True:
        yield os.path.join(mount_point, path.lstrip("/"))
        if path == "/":
            return
        path = os.path.dirname(path)


def _v2_quota(text: str | None) -> float | None:
    # "max 100000" (no quota) or "150000 100000" (1.5 CPUs).
    if text is None:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(quota: str | None, period: str | None) -> float | None:
    # cfs_quota_us is -1 without a quota.
    if quota is None or period is None:
        return None
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None
    return q / p
