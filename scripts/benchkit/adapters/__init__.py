"""One adapter per library, and the lists of them the workloads draw from.

A new library is a module here with a ``Lib`` subclass, added to ``all_libs``.
"""

from __future__ import annotations

from .base import Lib
from .joblib_parallel import Joblib
from .loky_pool import Loky
from .mp_pool import MpPool
from .mpire_pool import Mpire
from .ours import Ours
from .pebble_pool import Pebble
from .ppe import PPE

__all__ = ["PPE", "Joblib", "Lib", "Loky", "MpPool", "Mpire", "Ours", "Pebble", "all_libs"]


def all_libs() -> list[Lib]:
    """Every library, each with its default start method, in the table's order."""
    return [Ours(), PPE(), MpPool(), Loky(), Pebble(), Mpire(), Joblib()]


def start_method_libs() -> list[Lib]:
    """Every library, with alloter_mp and ProcessPoolExecutor also under the start
    methods the targets compare them at."""
    return [
        Ours(),
        Ours("fork"),
        PPE(),
        PPE("fork"),
        PPE("forkserver"),
        MpPool(),
        Loky(),
        Pebble(),
        Mpire(),
        Joblib(),
    ]
