"""The public surface: exactly these names, each saying it comes from ``alloter_mp``.

A public name that appears or disappears must be added here or removed on purpose:
this list is the package's promise, the private modules behind it are not.
"""

from __future__ import annotations

import inspect
import pickle
import types

import alloter_mp
import alloter_mp.ray

PUBLIC = {
    "Alloter",
    "AlloterError",
    "Cancelled",
    "Context",
    "ExecTimeout",
    "MemoryLimitExceeded",
    "ProcessAlloter",
    "ProcessPoolExecutor",
    "RemoteError",
    "Report",
    "SerializationError",
    "TaskError",
    "TaskReport",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerPool",
    "WorkerStats",
    "__version__",
    "available_cpus",
    "cancelled",
    "raise_if_cancelled",
    "run",
    "time_left",
}

# Submodules a user may import by name.
SUBMODULES = {"cli", "ray"}


def test_all_is_exactly_the_public_names() -> None:
    assert isinstance(alloter_mp.__all__, tuple)
    assert sorted(alloter_mp.__all__) == list(alloter_mp.__all__), "keep __all__ sorted"
    assert set(alloter_mp.__all__) == PUBLIC


def test_no_public_name_outside_all() -> None:
    stray = {
        name
        for name, value in vars(alloter_mp).items()
        if not name.startswith("_")
        and name not in PUBLIC
        and not (isinstance(value, types.ModuleType) and name in SUBMODULES)
    }
    assert not stray, f"public names not in __all__: {sorted(stray)}"


def test_public_names_say_they_come_from_the_package() -> None:
    for name in PUBLIC - {"__version__"}:
        obj = getattr(alloter_mp, name)
        assert obj.__module__ == "alloter_mp", f"{name}.__module__ is {obj.__module__}"
    assert alloter_mp.ray.RayAlloter.__module__ == "alloter_mp.ray"
    assert alloter_mp.ray.__all__ == ["RayAlloter"]


def test_pickled_errors_name_the_package_not_a_private_file() -> None:
    for error in (
        alloter_mp.TaskError(1, "m"),
        alloter_mp.WorkerCrashed(2, -9, 1),
        alloter_mp.TaskTimeout(3, 1.0),
        alloter_mp.ExecTimeout("late"),
        alloter_mp.SerializationError(4, "no"),
        alloter_mp.RemoteError("X", "y"),
    ):
        data = pickle.dumps(error)
        assert b"alloter_mp._" not in data, type(error).__name__
        assert type(pickle.loads(data)) is type(error)


def test_public_names_and_their_public_methods_have_docstrings() -> None:
    for name in PUBLIC - {"__version__"}:
        obj = getattr(alloter_mp, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr} has no docstring"
