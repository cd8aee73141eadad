"""Shared fixtures: alloters that are closed after each test, checked for leaks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
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
