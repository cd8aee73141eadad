"""The environment the tests run in and hand to the processes they start.

* ``with_repo()``: the environment for a subprocess that must import this checkout's
  ``alloter_mp`` (``python -m alloter_mp``, the scripts), whatever is installed;
* ``without_ray_settings()``: the environment less the ``RAY_*`` variables that the
  session's Ray set (conftest), for a subprocess that decides about Ray for itself;
* ``HAVE_RAY`` / ``needs_ray``: whether Ray (the ``ray`` extra) is installed, and
  the skip for a test that needs it. Checked with ``find_spec``, not an import:
  importing Ray starts threads of its own beside the leak checks of the suite.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

HAVE_RAY = importlib.util.find_spec("ray") is not None
NO_RAY = "Ray is not installed: pip install -e '.[ray]' to run the Ray tests"
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason=NO_RAY)


def with_repo() -> dict[str, str]:
    """This environment with the checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def without_ray_settings(**extra: str) -> dict[str, str]:
    """This environment less every ``RAY_*`` variable, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**base, **extra}
