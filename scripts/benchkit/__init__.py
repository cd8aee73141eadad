"""The benchmark behind ``scripts/bench.py``: alloter_mp against its peers.

Where things live:

* ``config``      the run's settings (``Config``) from the command line's numbers
* ``cli``         the command line, and the entry of the fresh interpreters
* ``engine``      the rounds: which library runs which workload, every cell under a
                  watchdog, leftover processes reaped; fresh interpreters for the
                  workloads that need one
* ``procs``       process hygiene: descendants, reaping, the SIGALRM watchdog
* ``cells``       one measurement (``Cell``) and the summary of several
* ``adapters/``   one module per library: the same operations on each
* ``workloads/``  one module per workload; ``workloads/__init__`` lists them in the
                  order of the table
* ``render``      the markdown table and the JSON dump
* ``chart``       the ratios against the peers as an image (``--chart``)
* ``targets``     the issues' speed targets, PASS/MISS against this run
* ``tasks``, ``np_tasks``  the functions the workers run

Workers import ``benchkit.tasks`` (and ``benchkit.np_tasks``), so this file imports
nothing.
"""
