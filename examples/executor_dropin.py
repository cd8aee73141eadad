"""A program written for concurrent.futures, switched to alloter_mp by its import line.

The program scores some inputs in worker processes with the standard API: submit,
as_completed, map. One input makes its worker die (as a segfault or the out-of-
memory killer would). With the standard library's ProcessPoolExecutor that death
breaks the whole pool: every other pending future fails with BrokenProcessPool and
the executor refuses new work. With alloter_mp's, only the future whose call died
fails (with an error that is still a BrokenProcessPool, so this code catches it);
the pool replaces the worker and the rest of the program runs on. Run it:

    python examples/executor_dropin.py            # alloter_mp's executor
    python examples/executor_dropin.py --stdlib   # the standard library's, to compare
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool

if "--stdlib" in sys.argv:
    from concurrent.futures import ProcessPoolExecutor
else:
    from alloter_mp import ProcessPoolExecutor  # the one line that changes


def score(n: int) -> int:
    """Some CPU work; input 13 kills its worker process, as a crash would."""
    if n == 13:
        os._exit(1)
    time.sleep(0.05)
    return sum(i * i for i in range(n * 10_000)) % 1_000_003


def main() -> None:
    print(f"using {ProcessPoolExecutor.__module__}.ProcessPoolExecutor")
    with ProcessPoolExecutor(max_workers=2) as executor:
        futures = {executor.submit(score, n): n for n in range(10, 18)}
        for future in as_completed(futures):
            n = futures[future]
            try:
                print(f"  score({n}) = {future.result()}")
            except BrokenProcessPool as err:
                print(f"  score({n}) failed: {type(err).__name__}: {err}")

        try:
            later = list(executor.map(score, [20, 21, 22]))
            print(f"after the crash, map still works: {later}")
        except BrokenProcessPool as err:
            print(f"after the crash, the executor is unusable: {err}")


if __name__ == "__main__":
    main()
