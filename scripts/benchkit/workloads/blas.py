"""blas: BLAS-heavy tasks (matrix products) on ``--workers`` workers: CPU efficiency.

efficiency = ideal / makespan, where ideal = tasks x (CPU seconds of one task with a
single BLAS thread, measured once per run in a fresh interpreter) / workers: the
share of the workers' CPUs that went into useful work.  Unlike the pure-Python ``cpu``
workload the reference is not the tasks' own CPU time, which counts the spinning of
oversubscribed BLAS threads as work.  Issue 15: at least joblib's (joblib caps the
BLAS threads of its workers).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from ..adapters import Lib
from ..cells import Cell
from .numpy_base import CORETYPE_VARS, NumpyWorkload

if TYPE_CHECKING:
    from ..engine import Ctx, Run

ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def _blas_text(info: list[dict[str, Any]]) -> str:
    if not info:
        return "BLAS unknown (no threadpoolctl)"
    return ", ".join(
        f"{d['internal_api']} {d.get('architecture') or ''} {d['num_threads']} thread(s)".replace(
            "  ", " "
        )
        for d in info
    )


class Blas(NumpyWorkload):
    key = "blas"
    title = "{k} matrix products {bn}x{bn}, limit {w}: CPU efficiency"
    unit = "%"
    higher_better = True
    fmt = "pct"
    log_name = "numpy: matrix products"

    def prepare(self, run: Run) -> None:
        from ..engine import log

        env = {k: v for k, v in os.environ.items() if k not in CORETYPE_VARS}
        env.update(dict.fromkeys(ONE_THREAD, "1"))
        code = (
            "import json, sys; from benchkit import np_tasks; "
            "print(json.dumps(np_tasks.calibrate(int(sys.argv[1]))))"
        )
        try:
            out = subprocess.run(
                [sys.executable, "-c", code, str(run.cfg.blas_n)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            ref = json.loads(out.stdout.strip().splitlines()[-1])
        except Exception as e:
            err = getattr(e, "stderr", "") or ""
            log(f"blas task: no single-thread reference ({e}) {err.strip()[-200:]}")
            return
        run.state["blas_cpu_s"] = ref["cpu_s"]
        run.state["blas_ref"] = ref["blas"]
        log(
            f"blas task: {run.cfg.blas_n}x{run.cfg.blas_n} product = "
            f"{ref['cpu_s'] * 1e3:.0f} ms CPU single-threaded ({_blas_text(ref['blas'])})"
        )

    def value(self, ctx: Ctx, lib: Lib) -> Cell:
        from .. import np_tasks

        cfg = ctx.cfg
        one = ctx.state.get("blas_cpu_s")
        if not one:
            raise RuntimeError("no single-thread reference (see the log)")
        self.warm_numpy(lib, cfg.workers)
        jobs = [(k, cfg.blas_n) for k in range(cfg.np_tasks)]
        t0 = time.perf_counter()
        outs = lib.submit_each(np_tasks.matmul, jobs)
        makespan = time.perf_counter() - t0
        if len(outs) != len(jobs) or not all(math.isfinite(o["sum"]) for o in outs):
            raise RuntimeError("wrong results")
        ideal = len(jobs) * one / cfg.workers
        return Cell(
            value=100.0 * ideal / makespan,
            extra={
                "makespan_s": makespan,
                "ideal_s": ideal,
                "cpu_s": [o["cpu_s"] for o in outs],
                "threads": max(o["threads"] for o in outs),
                "blas": outs[0]["blas"],
            },
        )

    def note(
        self, label: str, cells: list[Cell], meta: dict[str, Any], rows: dict[str, list[Cell]]
    ) -> list[str]:
        ok = [c for c in cells if c.value is not None]
        if not ok:
            return []
        ms = statistics.median(c.extra["makespan_s"] for c in ok)
        ideal = statistics.median(c.extra["ideal_s"] for c in ok)
        cpu = statistics.median(sum(c.extra["cpu_s"]) for c in ok)
        return [
            f"makespan {ms:.3f} s, ideal {ideal:.3f} s, task CPU {cpu:.2f} s",
            f"workers: {_blas_text(ok[-1].extra['blas'])}",
        ]


WORKLOAD = Blas()
