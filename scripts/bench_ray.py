"""RayAlloter beside ProcessAlloter, in one run on this machine.

Two measurements, both alloters with the same limit on the same 2 CPUs:

* overhead of a batch of 200 x 20 ms sleeping tasks: the makespan minus the ideal
  (200 x 20 ms / limit), median over rounds, after a warm-up call;
* the same batch on plain Ray (a remote function, at most 2 in flight, refilled
  with ``ray.wait``) for reference: what Ray itself costs;
* a spinning task under ``timeout=``: how late ``ExecTimeout`` reaches the caller,
  and how long after that the spinning task's process is gone (polled every 1 ms),
  with ``cancel_grace=0`` and with the default grace of 0.5 s.

Ray is started locally, bound to the loopback address.

    python scripts/bench_ray.py [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from alloter_mp import ExecTimeout, ProcessAlloter

LIMIT = 2
TASKS = 200
TASK_SECONDS = 0.02


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _spin(pidfile: str) -> None:
    Path(pidfile).write_text(str(os.getpid()))
    while True:
        pass


def _overhead(alloter: Any, rounds: int) -> list[float]:
    alloter.exec(*[partial(_sleep, 0.001)] * (2 * LIMIT))  # warm: workers up, code loaded
    ideal = TASKS * TASK_SECONDS / LIMIT
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        alloter.exec(*[partial(_sleep, TASK_SECONDS)] * TASKS)
        out.append(time.perf_counter() - started - ideal)
    return out


def _plain_ray(ray: Any, rounds: int) -> list[float]:
    remote = ray.remote(max_retries=0, num_cpus=1)(_sleep)

    def batch(n: int, seconds: float) -> None:
        pending: list[Any] = []
        handed = 0
        while handed < n or pending:
            while handed < n and len(pending) < LIMIT:
                pending.append(remote.remote(seconds))
                handed += 1
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)

    batch(2 * LIMIT, 0.001)
    ideal = TASKS * TASK_SECONDS / LIMIT
    out = []
    for _ in range(rounds):
        started = time.perf_counter()
        batch(TASKS, TASK_SECONDS)
        out.append(time.perf_counter() - started - ideal)
    return out


def _gone(pid: int, most: float = 30.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < most:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.001)
    return time.perf_counter() - started


def _timeout(make: Any, grace: float, rounds: int) -> tuple[list[float], list[float]]:
    late, gone = [], []
    with tempfile.TemporaryDirectory() as d, make(1, timeout=1.0, cancel_grace=grace) as alloter:
        alloter.exec(partial(_sleep, 0.001))
        for r in range(rounds):
            pidfile = Path(d) / f"pid{r}"
            started = time.perf_counter()
            with contextlib.suppress(ExecTimeout):
                alloter.exec(partial(_spin, str(pidfile)))
            late.append(time.perf_counter() - started - 1.0)
            gone.append(_gone(int(pidfile.read_text())))
    return late, gone


def _fmt(values: list[float], scale: float = 1000.0, digits: int = 0) -> str:
    def one(v: float) -> str:
        return f"{v * scale:.{digits}f}"

    return f"{one(statistics.median(values))} [{one(min(values))}-{one(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from alloter_mp.ray import RayAlloter

    started = time.perf_counter()
    ray.init(num_cpus=LIMIT, include_dashboard=False, _node_ip_address="127.0.0.1")
    ray_start = time.perf_counter() - started
    rows: dict[str, dict[str, list[float]]] = {}
    for name, make in (("ProcessAlloter", ProcessAlloter), ("RayAlloter", RayAlloter)):
        with make(LIMIT) as alloter:
            rows[name] = {"overhead": _overhead(alloter, args.rounds)}
        for grace in (0.0, 0.5):
            late, gone = _timeout(make, grace, args.rounds)
            rows[name][f"late_g{grace}"] = late
            rows[name][f"gone_g{grace}"] = gone
    plain = _plain_ray(ray, args.rounds)
    ray.shutdown()

    print(
        f"{TASKS} x {TASK_SECONDS * 1000:.0f} ms tasks, limit {LIMIT}, {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs; local Ray started in {ray_start:.1f} s. "
        "Median [min-max], ms."
    )
    print(
        "| alloter | batch overhead (makespan - 2.0 s) | per task and slot | "
        "ExecTimeout late, grace 0 | process gone after it, grace 0 | "
        "ExecTimeout late, grace 0.5 | process gone after it, grace 0.5 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        per_task = [v / (TASKS / LIMIT) for v in r["overhead"]]
        print(
            f"| {name} | {_fmt(r['overhead'])} | {_fmt(per_task, digits=2)} | "
            f"{_fmt(r['late_g0.0'])} | {_fmt(r['gone_g0.0'])} | "
            f"{_fmt(r['late_g0.5'])} | {_fmt(r['gone_g0.5'])} |"
        )
    per_task = [v / (TASKS / LIMIT) for v in plain]
    print(f"| plain Ray (reference) | {_fmt(plain)} | {_fmt(per_task, digits=2)} | | | | |")
    if args.json:
        raw = {"ray_start_s": ray_start, "rows": rows, "plain_ray": plain}
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
