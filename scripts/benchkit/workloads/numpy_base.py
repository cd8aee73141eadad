"""What the numpy workloads share: a fresh interpreter per cell, run without the
machine's OpenBLAS core-type variables, and the peers issue 15 compares.

Some machines here set OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE because older OpenBLAS
builds compute wrong results or crash without them; they slow a current numpy.  The
machine's notes say to unset both together for the benchmark's command alone, and to
check which kernel then runs: the numpy interpreters are started without them (the
bench's own process, its other workloads, the tests and CI keep them), and the BLAS
row notes the kernel the workers ran (threadpoolctl).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..adapters import Lib
from .base import Workload

if TYPE_CHECKING:
    from ..engine import Run

CORETYPE_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


class NumpyWorkload(Workload):
    kind = "fresh"
    needs = ("submit_each",)
    peers = frozenset({"ours", "ppe", "joblib"})
    env_unset = CORETYPE_VARS
    fresh_timeout = 150.0
    budget = 180.0

    def warm_numpy(self, lib: Lib, workers: int) -> None:
        """numpy imported and its BLAS started in every worker before timing."""
        from .. import np_tasks

        items = list(range(4 * workers))
        if lib.submit_each(np_tasks.warm, items) != items:
            raise RuntimeError("wrong results")

    def header(self, run: Run) -> list[str]:
        found = [f"{k}={os.environ[k]}" for k in CORETYPE_VARS if k in os.environ]
        return [
            "numpy workloads: each cell in a fresh interpreter without "
            + " and ".join(CORETYPE_VARS)
            + f" ({'here: ' + ', '.join(found) if found else 'not set here'})"
        ]
