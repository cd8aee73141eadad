#!/usr/bin/env python
"""Benchmark alloter_mp against its peers, side by side, in one run.

    python scripts/bench.py                 # 5 rounds, 2 workers
    python scripts/bench.py --quick         # smoke run, about a minute
    python scripts/bench.py --rounds 9 --workers 2 --json bench.json
    python scripts/bench.py --libs ours,mp_pool --workloads submit,map
    # the documentation's chart and table (docs/performance.md), from a whole run:
    python scripts/bench.py --json bench.json --chart docs/images/bench_ratios.png --page docs/performance.md
    python scripts/bench.py --from-json bench.json --chart ratios.png   # redraw only

Libraries: alloter_mp, concurrent.futures.ProcessPoolExecutor, multiprocessing.Pool,
loky, pebble, mpire and joblib (each with its default start method unless a row says
otherwise).  A library that is missing or fails prints ``error: ...`` in its cell;
the run goes on.

Workloads (every round runs every library; the library order rotates per round):

  submit    N no-op tasks, one submit per task, on a warm pool (tasks/s)
  map       N no-op items through each library's map at its best chunk size (items/s)
  rt        warm round trip of one task (us)
  cold      new pool, 2 tasks, close (s)
  cpu       8 x ~100 ms pure-Python CPU tasks: efficiency = (worker CPU / workers) / makespan
  failfast  one task raising at once among 20 sleeping 200 ms: failing task's end until
            the caller sees the error (ms)
  timeout   a task looping forever under a 0.5 s timeout: caller back minus 0.5 s (ms),
            and whether the looping process still lives 1 s later
  mem       idle USS of parent + workers after warm-up, measured in a fresh interpreter (MB)
  mem8      the same for a pool of 8 workers, alloter_mp and ProcessPoolExecutor under
            the same start methods (MB)
  np_in     one 256 MiB float64 array given to 8 tasks that each sum a slice (s)
  np_out    8 tasks each returning a 32 MiB float64 array (s)
  blas      8 products of 1500 x 1500 matrices on --workers workers: CPU efficiency =
            (8 x one product's single-threaded CPU time / workers) / makespan (%)
  logs      a task's 10,000 INFO records to a handler of the caller, against the same
            logging in the caller (ms; alloter_mp only: no peer relays logs)
  relay     N no-op tasks, one submit each, log relay on vs off on the same workers
            (tasks/s; alloter_mp only)

The numpy workloads (np_in, np_out, blas) compare alloter_mp with
ProcessPoolExecutor and joblib; each of their cells runs in a fresh interpreter
without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (the machine's notes: those slow a
current numpy; only this command drops them), and the blas row names the BLAS kernel
the workers ran (with threadpoolctl installed).  --quick makes them 64 MiB in, 8 MiB
out and 1000 x 1000: a smoke run, not the sizes issue 15's targets name.

submit and map time each call, repeated within a round for up to 0.25 s (at most 25
calls) and take the median, so a call of a few milliseconds is not one noisy sample.
The 1-min load average is printed: on a shared machine every number moves with it.

Floors: a raw ``os.fork`` + ``multiprocessing.Pipe`` echo (round trip, cold start and
one-message-per-task throughput) shows what the operating system itself costs.

The script cleans up every process it starts: after each cell it kills whatever new
descendant is still alive (and reports it as a leak), a watchdog (SIGALRM) bounds
every cell, and at exit every descendant is killed and reaped.

--chart FILE draws alloter_mp's ratio against each peer, per workload, on a log
scale (right of 1: alloter_mp did better), from the run just made or, with
--from-json, from the JSON of an earlier one (benchkit/chart.py; needs matplotlib).
--page FILE writes the run's table into FILE between its "bench table" markers.

The code is the package ``scripts/benchkit`` (its ``__init__`` maps it); this file
only sets up the import paths.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
# Interpreters started later (spawn, forkserver, loky, the fresh interpreters) must
# find both the library under test and the benchmark's task modules.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT, HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)

from benchkit.cli import main  # noqa: E402  (needs the sys.path set-up above)

if __name__ == "__main__":
    sys.exit(main())
