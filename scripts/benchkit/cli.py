"""The command line of ``scripts/bench.py`` (see its docstring for the user's view)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .cells import error_text
from .chart import draw_chart
from .config import make_config
from .engine import Run, fresh_child, log
from .procs import kill_everything
from .render import render, to_json, write_page
from .summary import write_summary
from .workloads import BY_KEY, WORKLOADS

DESCRIPTION = "Benchmark alloter_mp against its peers, side by side, in one run."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per measurement (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, small N")
    ap.add_argument("--tasks", type=int, default=0, help="N for submit/map (default 10000)")
    ap.add_argument("--json", metavar="FILE", help="dump raw numbers as JSON")
    ap.add_argument(
        "--chart",
        metavar="FILE",
        help="draw alloter_mp's ratio against each peer to FILE (.png, .svg; needs matplotlib)",
    )
    ap.add_argument(
        "--page",
        metavar="FILE",
        help="write the run's table into FILE between its bench table markers "
        "(docs/performance.md)",
    )
    ap.add_argument(
        "--summary",
        metavar="FILE",
        help="write a short table (ours, ProcessPoolExecutor, the best peer) into FILE "
        "between its bench summary markers (README.md)",
    )
    ap.add_argument(
        "--from-json",
        metavar="FILE",
        help="run nothing: draw --chart and write --summary from the JSON dump of an earlier run",
    )
    ap.add_argument(
        "--libs",
        help="comma-separated subset: ours,ppe,mp_pool,loky,pebble,mpire,joblib",
    )
    ap.add_argument(
        "--workloads",
        help="comma-separated subset: " + ",".join(w.key for w in WORKLOADS),
    )
    ap.add_argument("--_fresh", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._fresh:
        return fresh_child(args._fresh, WORKLOADS)
    if args.from_json:
        if not (args.chart or args.summary):
            ap.error("--from-json needs --chart FILE or --summary FILE")
        with open(args.from_json) as f:
            _draw(json.load(f), args)
        return 0
    if args.workers < 1 or args.rounds < 1:
        ap.error("--workers and --rounds must be >= 1")

    cfg = make_config(args)
    libs = set(args.libs.split(",")) if args.libs else None
    keys = set(args.workloads.split(",")) if args.workloads else set(BY_KEY)
    unknown = keys - set(BY_KEY)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    try:
        import alloter_mp  # noqa: F401
    except Exception as e:
        log(f"alloter_mp does not import ({error_text(e)}); its rows will show the error")

    run = Run(cfg, libs, [w for w in WORKLOADS if w.key in keys], WORKLOADS)
    t0 = time.perf_counter()
    try:
        run.run()
    except KeyboardInterrupt:
        log("interrupted; printing what was measured")
        run.finish()
    finally:
        kill_everything()
    print(render(run))
    log(f"total {time.perf_counter() - t0:.1f} s")
    data = to_json(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2, default=str)
        log(f"raw numbers written to {args.json}")
    _draw(data, args)
    if args.page:
        write_page(run, args.page)
        log(f"table written into {args.page}")
    return 0


def _draw(data: dict[str, Any], args: argparse.Namespace) -> None:
    """What a run's JSON dump is enough for (a run, or a saved one): chart, summary."""
    if args.chart:
        draw_chart(data, args.chart)
        log(f"chart drawn to {args.chart}")
    if args.summary:
        write_summary(data, args.summary)
        log(f"summary written into {args.summary}")
