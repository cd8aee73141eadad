"""The settings of one run, from the command line's numbers."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass
class Config:
    workers: int = 2
    rounds: int = 5
    n_tasks: int = 10_000
    chunks: list[int] = field(default_factory=lambda: [1, 16, 64, 256, 1250])
    rt_calls: int = 200
    cpu_tasks: int = 8
    cpu_seconds: float = 0.100
    ff_sleepers: int = 20
    ff_sleep: float = 0.200
    timeout: float = 0.5
    alive_after: float = 1.0
    cell_budget: float = 120.0
    rep_budget: float = 0.25  # submit/map: repeat a call within a round up to this long
    rep_most: int = 25
    quick: bool = False
    # numpy workloads: the sizes issue 15's targets state (smaller with --quick)
    np_tasks: int = 8
    np_in_mib: int = 256
    np_out_mib: int = 32
    blas_n: int = 1500
    mem_pool: int = 8  # workers of the pool whose idle memory "mem8" measures


def make_config(args: argparse.Namespace) -> Config:
    c = Config(workers=args.workers, rounds=args.rounds, quick=args.quick)
    if args.quick:
        c.rounds = 1 if args.rounds == 5 else args.rounds
        c.n_tasks = 2000
        c.rt_calls = 50
        c.rep_budget = 0.1
        c.cpu_seconds = 0.05
        c.cell_budget = 30.0
        c.np_in_mib = 64
        c.np_out_mib = 8
        c.blas_n = 1000
    if args.tasks:
        c.n_tasks = args.tasks
    even = max(1, -(-c.n_tasks // (4 * c.workers)))  # multiprocessing.Pool.map's default
    c.chunks = [64, even] if args.quick else [1, 16, 64, 256, even]
    c.chunks = sorted(set(c.chunks))
    return c
