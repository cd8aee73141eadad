"""Native thread pools capped per worker: what a worker's BLAS really runs with.

Each check runs a fresh parent script, so the parent's own imports are what they are
in a user's program (under "fork" a library the parent loaded keeps its thread
count: a documented limit, so the fork parent here has no numpy). A task in the
worker imports numpy and asks threadpoolctl how many threads its BLAS uses. On this
kind of machine (2 usable CPUs) a pool of 2 gives each worker 1 thread, and one of 1
gives 2: the test can tell a cap from a default.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alloter_mp import _threads, available_cpus

pytest.importorskip("numpy")
pytest.importorskip("threadpoolctl")

METHODS = multiprocessing.get_all_start_methods()

needs_two_cpus = pytest.mark.skipif(available_cpus() < 2, reason="needs 2 usable CPUs")

_PROBE = """
def blas_threads():
    import os
    import numpy
    import threadpoolctl
    counts = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
    return counts, {n: os.environ.get(n) for n in names}
"""

_SCRIPT = """
import json, os, sys
{top_import}
from alloter_mp import ProcessAlloter
{probe}
if __name__ == "__main__":
    method, limit, per_worker = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    for name, value in json.loads(sys.argv[4]).items():
        os.environ[name] = value  # set by "the user" after the fork server may have started
    with ProcessAlloter(limit, start_method=method, threads_per_worker=per_worker) as a:
        print(json.dumps(a.exec(*[blas_threads] * limit)))
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _threads.THREAD_VARIABLES}
    return env


def _run(
    tmp_path: Path,
    method: str,
    limit: int,
    per_worker: int | None = None,
    *,
    set_later: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    top_import: str = "",
) -> list[tuple[list[int], dict[str, str]]]:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(_SCRIPT).format(top_import=top_import, probe=textwrap.dedent(_PROBE))
    )
    argv = [sys.executable, str(script), method, str(limit), json.dumps(per_worker)]
    argv.append(json.dumps(set_later or {}))
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env() if env is None else env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows: list[tuple[list[int], dict[str, str]]] = json.loads(done.stdout.splitlines()[-1])
    return rows


@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_two_workers_on_two_cpus_run_one_blas_thread_each(tmp_path: Path, method: str) -> None:
    rows = _run(tmp_path, method, 2)
    assert len(rows) == 2
    for counts, variables in rows:
        assert counts and set(counts) == {1}, rows
        assert set(variables.values()) == {"1"}, variables


@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_one_worker_gets_both_cpus(tmp_path: Path, method: str) -> None:
    rows = _run(tmp_path, method, 1)
    assert [counts for counts, _ in rows] == [[2]]


@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_threads_per_worker_overrides(tmp_path: Path, method: str) -> None:
    rows = _run(tmp_path, method, 2, per_worker=2)
    for counts, variables in rows:
        assert set(counts) == {2}, rows
        assert set(variables.values()) == {"2"}, variables


@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_user_setting_wins(tmp_path: Path, method: str) -> None:
    env = {**_clean_env(), "OPENBLAS_NUM_THREADS": "2"}
    rows = _run(tmp_path, method, 2, env=env)
    for counts, variables in rows:
        assert set(counts) == {2}, rows
        assert variables["OPENBLAS_NUM_THREADS"] == "2"
        assert variables["OMP_NUM_THREADS"] == "1"  # the others are still capped


@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_user_setting_made_after_the_parent_started_wins(tmp_path: Path, method: str) -> None:
    rows = _run(tmp_path, method, 2, set_later={"OPENBLAS_NUM_THREADS": "2"})
    for counts, _ in rows:
        assert set(counts) == {2}, rows


@needs_two_cpus
@pytest.mark.parametrize("method", [m for m in METHODS if m != "fork"])
def test_script_importing_numpy_at_top_is_capped_too(tmp_path: Path, method: str) -> None:
    # spawn and forkserver children import __main__ (and so numpy) before the
    # worker's entry runs: the variables must be set before that.
    rows = _run(tmp_path, method, 2, top_import="import numpy")
    for counts, _ in rows:
        assert set(counts) == {1}, rows


@needs_two_cpus
def test_forkserver_started_by_an_earlier_pool_caps_the_next(tmp_path: Path) -> None:
    if "forkserver" not in METHODS:
        pytest.skip("no forkserver")
    script = tmp_path / "two_pools.py"
    script.write_text(
        textwrap.dedent(
            """
            import json
            import numpy
            from alloter_mp import ProcessAlloter
            {probe}
            if __name__ == "__main__":
                out = []
                for limit in (1, 2):
                    with ProcessAlloter(limit, start_method="forkserver") as a:
                        out.append(sorted(set(sum((c for c, _ in a.exec(*[blas_threads] * limit)), []))))
                print(json.dumps(out))
            """
        ).format(probe=textwrap.dedent(_PROBE))
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[2], [1]]


# -- the pieces --------------------------------------------------------------------


def test_thread_count() -> None:
    cpus = available_cpus()
    assert _threads.thread_count(1) == cpus
    assert _threads.thread_count(cpus) == 1
    assert _threads.thread_count(cpus * 4) == 1
    assert _threads.thread_count(2, 7) == 7


def test_worker_env_keeps_the_users_values() -> None:
    env = _threads.worker_env(3, {"MKL_NUM_THREADS": "5", "PATH": "/bin"})
    assert env == {name: "5" if name == "MKL_NUM_THREADS" else "3" for name in env}
    assert set(env) == set(_threads.THREAD_VARIABLES)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_threads_per_worker_is_checked(bad: object) -> None:
    from alloter_mp import ProcessAlloter, WorkerPool

    with pytest.raises((TypeError, ValueError)):
        ProcessAlloter(1, threads_per_worker=bad)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        WorkerPool(1, threads_per_worker=bad)  # type: ignore[arg-type]


def test_name_sets_the_environment_when_unpickled_without_alloter_mp(tmp_path: Path) -> None:
    # The child unpickles the name before the parent's sys.path is set up: the
    # pickle must name only the standard library.
    import pickle

    name = _threads.carrying_env("alloter_mp-worker", {"ALLOTER_MP_PROBE": "7"})
    blob = tmp_path / "name.pickle"
    blob.write_bytes(pickle.dumps({"name": name}))
    assert b"alloter_mp." not in blob.read_bytes()
    code = (
        "import os, pickle, sys; d = pickle.load(open(sys.argv[1], 'rb'));"
        "print(type(d['name']).__name__, d['name'], os.environ['ALLOTER_MP_PROBE'],"
        " 'alloter_mp' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(blob)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    ).stdout.split()
    assert out == ["str", "alloter_mp-worker", "7", "False"]
