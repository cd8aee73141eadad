"""Shared fixtures: alloters that are closed after each test, checked for leaks.

Tests marked ``ray`` share one local Ray, started on first use and bound to the
loopback address; they run after every other test, so that Ray's processes and
threads never sit beside the leak checks of the rest of the suite. Without Ray
installed (the ``ray`` extra), the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import _env
import _procs
import pytest
from _logs import Collect, root_logs
from _procs import wait_no_descendants

from alloter_mp import ProcessAlloter


@pytest.fixture
def alloter() -> Iterator[ProcessAlloter]:
    a = ProcessAlloter(2, cancel_grace=0.2)
    try:
        yield a
    finally:
        a.close()
    assert not wait_no_descendants(), "workers left behind after close()"


@pytest.fixture
def logs() -> Iterator[Collect]:
    """A handler on the root logger at INFO; the logging setup is put back afterwards."""
    with root_logs() as handler:
        yield handler


def pytest_collection_modifyitems(config: Any, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)


# Ray resolves 127.0.0.1 to the machine's outbound address unless this is set before
# it is imported; the tests' Ray must listen on the loopback address only. A token
# is pointless then, and would be written to the home directory.
_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """The session's local Ray (2 CPUs, no dashboard, loopback only)."""
    if not _env.HAVE_RAY:
        pytest.skip(_env.NO_RAY)
    saved = dict(os.environ)
    os.environ.update(_RAY_ENV)
    before = {p.pid for p in _procs.live_descendants()}
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    _procs.RAY_ROOTS.update(p.pid for p in _procs.live_descendants() if p.pid not in before)
    try:
        yield ray
    finally:
        ray.shutdown()
        _procs.RAY_ROOTS.clear()
        # ray.init sets variables of its own; later tests must not inherit them.
        os.environ.clear()
        os.environ.update(saved)
