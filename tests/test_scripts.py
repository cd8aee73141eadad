"""The ready-made scripts in ``scripts/``, run as a user would run them."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import psutil
import pytest
from _env import REPO, with_repo

CHECKSUM = REPO / "scripts" / "checksum_tree.py"


def checksum(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECKSUM), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=with_repo(),
        timeout=45,
    )


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("checksum_tree", CHECKSUM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "top.txt").write_bytes(b"top\n")
    (root / "a" / "one.bin").write_bytes(os.urandom(3 << 20))  # several read blocks
    (root / "a" / "b" / "with space.txt").write_bytes(b"")
    (root / "a" / "b" / "z.txt").write_bytes(b"zzz")
    (root / "link").symlink_to(root / "top.txt")
    return root


def expected(root: Path, algorithm: str = "sha256") -> str:
    names = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    )
    return "".join(
        f"{hashlib.new(algorithm, (root / n).read_bytes()).hexdigest()}  {n}\n" for n in names
    )


def test_checksums_every_regular_file_sorted(tree: Path) -> None:
    res = checksum("-j", "2", str(tree))
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected(tree)
    assert len(res.stdout.splitlines()) == 4  # the symlink is not followed
    assert res.stderr == ""


def test_output_file_and_algorithm(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "sums.md5"
    res = checksum("--algorithm", "md5", "-o", str(out), str(tree))
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert out.read_text() == expected(tree, "md5")


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU sha256sum")
def test_sha256sum_can_check_the_output(tree: Path, tmp_path: Path) -> None:
    sums = tmp_path / "sums.txt"
    assert checksum("-o", str(sums), str(tree)).returncode == 0
    check = subprocess.run(
        ["sha256sum", "-c", str(sums)], cwd=tree, capture_output=True, text=True, timeout=45
    )
    assert check.returncode == 0, check.stdout + check.stderr
    (tree / "top.txt").write_bytes(b"changed\n")
    check = subprocess.run(
        ["sha256sum", "-c", str(sums)], cwd=tree, capture_output=True, text=True, timeout=45
    )
    assert check.returncode == 1


def test_an_empty_folder_gives_no_lines(tmp_path: Path) -> None:
    res = checksum(str(tmp_path))
    assert (res.returncode, res.stdout) == (0, "")


def test_timeout_stops_the_hashing(tmp_path: Path) -> None:
    big = tmp_path / "big" / "sparse.bin"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of holes: minutes of hashing, no disk used
    proc = subprocess.Popen(
        [sys.executable, str(CHECKSUM), "-j", "1", "--timeout", "1.5", str(big.parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=with_repo(),
    )
    started = time.monotonic()
    seen: set[psutil.Process] = set()
    try:
        while proc.poll() is None and time.monotonic() - started < 40:
            try:
                seen.update(psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 124, err
    assert time.monotonic() - started < 30
    assert out == "" and "timed out" in err
    assert seen, "the script never started a worker"
    end = time.monotonic() + 5
    while any(_alive(p) for p in seen) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [p.pid for p in seen if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    "args",
    [["/nonexistent/folder"], ["-a", "nope", "."], ["--timeout", "0", "."], ["-j", "x", "."], []],
)
def test_bad_arguments_exit_2(args: list[str], tmp_path: Path) -> None:
    res = checksum(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert "error:" in res.stderr and "Traceback" not in res.stderr


def test_help() -> None:
    res = checksum("--help")
    assert res.returncode == 0
    assert "sha256sum" in res.stdout and "--timeout" in res.stdout


def test_names_that_need_escaping() -> None:
    script = load_script()
    assert script.sum_line("ab", "plain name") == "ab  plain name\n"
    assert script.sum_line("ab", "new\nline") == "\\ab  new\\nline\n"
    assert script.sum_line("ab", "back\\slash") == "\\ab  back\\\\slash\n"


def test_hash_file_matches_hashlib(tmp_path: Path) -> None:
    script = load_script()
    data = os.urandom((2 << 20) + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert script.hash_file(str(path)) == hashlib.sha256(data).hexdigest()
    assert script.hash_file(str(path), "blake2b") == hashlib.blake2b(data).hexdigest()


BENCH = REPO / "scripts" / "bench.py"


def test_bench_quick_smoke() -> None:
    """The benchmark's command line, on two libraries and two workloads: the table has
    one row per library (and the floor), and the targets of both issues print."""
    res = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--libs", "ours,ppe", "--workloads", "rt,cold"],
        capture_output=True,
        text=True,
        env=with_repo(),
        timeout=50,
    )
    assert res.returncode == 0, res.stderr
    rows = [ln.split("|")[2].strip() for ln in res.stdout.splitlines() if ln.startswith("| ")]
    default = f"ProcessPoolExecutor (default: {multiprocessing.get_all_start_methods()[0]})"
    assert rows[1:] == [
        "alloter_mp",
        default,
        "floor: fork + Pipe",
        "alloter_mp",
        "alloter_mp (fork)",
        default,
        "ProcessPoolExecutor (fork)",
        "ProcessPoolExecutor (forkserver)",
        "floor: fork + Pipe",
    ]
    assert "error:" not in res.stdout
    assert "Targets (issue 4):" in res.stdout and "Targets (issue 15):" in res.stdout
    assert "LEAKED" not in res.stdout


def test_bench_targets_pass_and_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numpy targets of issue 15 compare in the right direction (rows in seconds:
    lower is better; the BLAS row in %: higher is better)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from benchkit.adapters import PPE
    from benchkit.cells import Cell
    from benchkit.config import Config
    from benchkit.engine import Run
    from benchkit.targets import issue15
    from benchkit.workloads import WORKLOADS

    run = Run(Config(), None, WORKLOADS, WORKLOADS)
    ppe = PPE().name
    for wl, label, value in [
        ("np_in", "alloter_mp", 0.1),
        ("np_in", ppe, 1.0),  # 10x faster: PASS
        ("np_in", "joblib", 0.05),  # slower than joblib: MISS
        ("np_out", "alloter_mp", 0.6),
        ("np_out", ppe, 1.0),  # 1.7x faster: MISS (2x asked)
        ("blas", "alloter_mp", 90.0),
        ("blas", "joblib", 80.0),  # higher efficiency: PASS
    ]:
        run.add(wl, label, Cell(value=value))
    lines = issue15(run)

    def mark(start: str) -> str:
        (line,) = [ln for ln in lines if ln.startswith(start, 9)]
        return line[3:7]

    assert mark(f"one 256 MiB array to 8 tasks >= 5x faster than {ppe}: 10.00x") == "PASS"
    assert mark("one 256 MiB array to 8 tasks no slower than joblib: 0.50x") == "MISS"
    assert mark(f"8 results of 32 MiB back >= 2x faster than {ppe}: 1.67x") == "MISS"
    assert mark("8 matrix products 1500x1500, limit 2: CPU efficiency >= joblib's") == "PASS"
    assert mark("exec 10,000 tiny tasks >= 3.0x multiprocessing.Pool.apply_async") == "n/a "


def test_bench_chart_from_a_saved_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--from-json --chart draws a saved run without running it; the ratios put
    alloter_mp's better results right of 1 whatever the unit's direction, and leave
    out floors and our own variants."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from benchkit.chart import advantages

    def row(median: float, **meta: object) -> dict[str, object]:
        return {"median": median, "meta": meta, "extra": [{}]}

    data = {
        "config": {"workers": 2, "rounds": 1, "n_tasks": 100},
        "cpu_count": 2,
        "workloads": {
            "submit": {
                "title": "{n} no-op tasks",
                "unit": "tasks/s",
                "higher_is_better": True,
                "rows": {
                    "alloter_mp": row(300.0),
                    "alloter_mp (fork)": row(900.0),
                    "multiprocessing.Pool": row(100.0),
                    "ref: fork + Pipe": row(50.0, floor=True),
                },
            },
            "rt": {
                "title": "round trip",
                "unit": "us",
                "higher_is_better": False,
                "rows": {"alloter_mp": row(200.0), "loky": row(100.0)},
            },
            "logs": {
                "title": "ours alone",
                "unit": "ms",
                "higher_is_better": False,
                "rows": {"alloter_mp": row(1.0)},
            },
        },
    }
    rows = advantages(data)
    assert [(title.split("\n")[0], pairs) for title, pairs in rows] == [
        ("100 no-op tasks", [("multiprocessing.Pool", 3.0, False)]),
        ("round trip", [("loky", 0.5, False)]),
    ]
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(data))
    chart = tmp_path / "ratios.png"
    res = subprocess.run(
        [sys.executable, str(BENCH), "--from-json", str(saved), "--chart", str(chart)],
        capture_output=True,
        text=True,
        env=with_repo(),
        timeout=50,
    )
    assert res.returncode == 0, res.stderr
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_bench_page_gets_the_runs_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--page writes the run's table between the page's markers, and only there."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from benchkit.adapters import PPE
    from benchkit.cells import Cell
    from benchkit.config import Config
    from benchkit.engine import Run
    from benchkit.render import PAGE_END, PAGE_START, write_page
    from benchkit.workloads import WORKLOADS

    run = Run(Config(), None, WORKLOADS, WORKLOADS)
    run.add("rt", "alloter_mp", Cell(value=100.0))
    run.add("rt", PPE().name, Cell(value=200.0))
    page = tmp_path / "performance.md"
    page.write_text(f"# Before\n\n{PAGE_START}\nold table\n{PAGE_END}\n\nAfter.\n")
    write_page(run, str(page))
    text = page.read_text()
    assert text.startswith("# Before\n\n" + PAGE_START) and text.endswith(PAGE_END + "\n\nAfter.\n")
    assert "old table" not in text
    assert "| warm round trip of one task (us, lower is better) | alloter_mp | 100 |" in text
    assert f"| | {PPE().name} | 200 | 0.50x | ours better |" in text.replace("|  |", "| |")


def test_bench_summary_from_a_saved_run(tmp_path: Path) -> None:
    """--from-json --summary writes the README's short table between its markers:
    alloter_mp, ProcessPoolExecutor and the row's best peer, with the advantage over
    each (above 1x: ours better, whatever the unit's direction)."""

    def row(median: float, **meta: object) -> dict[str, object]:
        return {"median": median, "meta": meta, "extra": [{}]}

    data = {
        "config": {"workers": 2, "rounds": 3},
        "cpu_count": 2,
        "python": "3.11.7 (main)",
        "load_average_1min": [0.5, 1.25],
        "workloads": {
            "rt": {
                "title": "round trip",
                "unit": "us",
                "fmt": "us",
                "higher_is_better": False,
                "rows": {
                    "alloter_mp": row(200.0),
                    "ProcessPoolExecutor (default: fork)": row(400.0),
                    "loky": row(100.0),
                    "ref: fork + Pipe": row(10.0, floor=True),
                },
            },
            "submit": {
                "title": "submits",
                "unit": "tasks/s",
                "higher_is_better": True,
                "rows": {"alloter_mp": row(3000.0), "pebble": row(1000.0)},
            },
            "timeout": {
                "title": "overshoot",
                "unit": "ms",
                "fmt": "ms",
                "higher_is_better": False,
                "rows": {
                    "alloter_mp": row(2.0),
                    "pebble": {"median": 1.0, "meta": {}, "extra": [{}, {"spinning": True}]},
                },
            },
            "alone": {
                "title": "ours only",
                "unit": "s",
                "higher_is_better": False,
                "rows": {"alloter_mp": row(1.0)},
            },
        },
    }
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(data))
    page = tmp_path / "README.md"
    start, end = "<!-- bench summary: start -->", "<!-- bench summary: end -->"
    page.write_text(f"# Before\n\n{start}\nold\n{end}\n\nAfter.\n")
    res = subprocess.run(
        [sys.executable, str(BENCH), "--from-json", str(saved), "--summary", str(page)],
        capture_output=True,
        text=True,
        env=with_repo(),
        timeout=50,
    )
    assert res.returncode == 0, res.stderr
    text = page.read_text()
    assert text.startswith(f"# Before\n\n{start}") and text.endswith(f"{end}\n\nAfter.\n")
    assert "old" not in text
    assert "median of 3 round(s), 2 CPUs, Python 3.11.7, 1-min load average 0.50-1.25" in text
    # lower is better: 400/200 = 2x over PPE, 100/200 = 0.5x against the best (loky)
    assert "| round trip (us, lower is better) | 200 | 400 | loky: 100 | 2.00x | 0.50x |" in text
    assert "| submits (tasks/s, higher is better) | 3,000 | - | pebble: 1,000 | - | 3.00x |" in text
    assert "| overshoot (ms, lower is better) | 2.0 | - | pebble: 1.0 (its task ran on) |" in text
    assert "ours only" not in text  # no peer, no line


# -- scripts/plant_bugs.py ---------------------------------------------------------------

PLANT = REPO / "scripts" / "plant_bugs.py"


def load_plant_bugs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plant_bugs", PLANT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plant_bugs"] = module  # its dataclass looks its module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["plant_bugs"]
    return module


def test_no_planted_bug_is_stale() -> None:
    """Every planted bug can still be planted (its text occurs exactly once in the
    package) and names tests that exist: the list follows the package. Text matching
    only; the planted-bug run itself takes minutes and is run by hand."""
    res = subprocess.run(
        [sys.executable, str(PLANT), "--check-stale"],
        capture_output=True,
        text=True,
        env=with_repo(),
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "STALE" not in res.stdout
    plant = load_plant_bugs()
    assert f"{len(plant.BUGS)} of {len(plant.BUGS)} planted bugs can be planted" in res.stdout
    names = [bug.name for bug in plant.BUGS]
    assert len(set(names)) == len(names), "two bugs share a name"


def test_the_stale_check_can_fail() -> None:
    plant = load_plant_bugs()
    bug = plant.BUGS[0]
    replace = dataclasses.replace
    assert plant.stale(bug) is None
    assert "occurs 0 times" in plant.stale(replace(bug, old="no such text in the package"))
    many = plant.stale(replace(bug, file="_batch.py", old="with self._lock:"))
    assert many is not None and many.endswith("not once") and "occurs 1 " not in many
    assert "does not exist" in plant.stale(replace(bug, file="_nowhere.py"))
    assert "has no test" in plant.stale(replace(bug, tests=("test_core.py::test_nothing_here",)))
    assert "does not exist" in plant.stale(replace(bug, tests=("test_nowhere.py",)))
    assert "changes nothing" in plant.stale(replace(bug, new=bug.old))
