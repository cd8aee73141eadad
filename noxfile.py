"""The project's checks and its suite on every supported Python, each in a venv of its own.

``nox -l`` lists the sessions; ``nox -s NAME`` runs one, ``nox`` runs lint, types
and the whole suite on each Python. Arguments after ``--`` go to pytest.

* ``lint``: ``ruff check`` and ``ruff format --check``;
* ``types``: strict ``mypy`` (configured in pyproject.toml);
* ``tests-3.10`` ... ``tests-3.13``: the whole suite, Ray included, as the README's
  test command runs it;
* ``fast-3.10`` ... ``fast-3.13``: the fast subset, ``pytest -m 'not slow'`` without
  Ray installed, so the Ray tests skip saying so (CI runs it on 3.10 and 3.13).

Each Python is looked up as ``python3.X`` on PATH: with pyenv, put all four there
with ``export PYENV_VERSION=3.11.7:3.10.13:3.12.1:3.13.0`` (``.ci/run`` does).
"""

from __future__ import annotations

import nox
from packaging.requirements import Requirement

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
FAST = "not slow"

nox.options.sessions = ["lint", "types", "tests"]
# A Python that cannot be found is a failure, not a skipped session.
nox.options.error_on_missing_interpreters = True

_DEV = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["dev"]


def _dev_requirement(name: str) -> str:
    """The ``dev`` extra's requirement for ``name``, so that the pin lives in one place."""
    return next(req for req in _DEV if Requirement(req).name == name)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check on the whole tree."""
    session.install(_dev_requirement("ruff"))
    session.run("ruff", "check")
    session.run("ruff", "format", "--check")


@nox.session
def types(session: nox.Session) -> None:
    """Strict mypy on alloter_mp."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite, Ray included."""
    session.install("-e", ".[test,ray]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS)
def fast(session: nox.Session) -> None:
    """The fast subset: no slow test, and no Ray installed (its tests skip)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", FAST, *session.posargs)
