"""Contract section 10, logging and warnings: the relay's two halves, with real processes.

The worker side (:mod:`alloter_mp._logrelay`) runs in a bare child process
(:mod:`_bareworker`), the parent side (:mod:`alloter_mp._logreceive`) here; the
tests look at what the parent's own handlers and warning filters receive.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
from _bareworker import BareWorker, Died
from _logs import Collect

from alloter_mp._logreceive import LogReceiver, snapshot
from alloter_mp._logrelay import LOGS, WorkerRelay

# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def worker() -> Iterator[BareWorker]:
    w = BareWorker()
    try:
        yield w
    finally:
        w.close()


# -- tasks (module level: they pickle by reference) ---------------------------------


def log_many(n: int, name: str = "app") -> int:
    log = logging.getLogger(name)
    for i in range(n):
        log.info("record %d of %s", i, n)
    return os.getpid()


def log_levels() -> list[bool]:
    for name in ("app", "app.db", "other"):
        log = logging.getLogger(name)
        log.debug("%s debug", name)
        log.info("%s info", name)
        log.warning("%s warning", name)
    # What the worker's loggers allow: the parent's levels, so nothing is made in vain.
    return [
        logging.getLogger("app.db").isEnabledFor(logging.DEBUG),
        logging.getLogger("other").isEnabledFor(logging.INFO),
    ]


def log_then_die(how: str) -> None:
    log = logging.getLogger("app")
    for i in range(3):
        log.warning("before the end %d", i)
    if how == "exit":
        os._exit(7)
    elif how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        ctypes.string_at(0)  # segfault


def log_then_sleep(seconds: float) -> str:
    logging.getLogger("app").warning("started")
    time.sleep(seconds)
    return "slept"


# -- records -----------------------------------------------------------------------


def test_records_reach_the_parents_handler_in_order_with_task_index_and_pid(logs, worker):
    (status, pid), _ = worker.run(lambda: log_many(200), index=5)
    assert status == "ok"
    assert logs.messages() == [f"record {i} of 200" for i in range(200)]
    first = logs.records[0]
    assert {r.task_index for r in logs.records} == {5}
    assert {r.process for r in logs.records} == {pid} != {os.getpid()}
    assert first.name == "app" and first.levelname == "INFO" and first.levelno == logging.INFO
    assert first.funcName == "log_many" and first.pathname == __file__
    assert first.args == () and first.exc_info is None
    # The relayed record keeps the worker's time, counted from the parent's start.
    assert abs(first.created - time.time()) < 30
    assert 0 < first.relativeCreated < (time.time() - first.created + 600) * 1000


def test_records_of_tasks_keep_their_own_index(logs, worker):
    for index in (0, 1, 2):
        worker.run(lambda: log_many(3), index=index)
    assert [r.task_index for r in logs.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_chunks_item_offset_is_added_to_the_index(logs):
    w = BareWorker(words=True)
    try:
        w.run(lambda: log_many(1), index=100, offset=7)
    finally:
        w.close()
    assert [r.task_index for r in logs.records] == [107]


def test_the_parents_levels_decide_and_silenced_records_are_never_made(logs, worker):
    logging.getLogger("app").setLevel(logging.DEBUG)
    logging.getLogger("other").setLevel(logging.ERROR)
    (status, enabled), _ = worker.run(log_levels)
    assert status == "ok"
    assert logs.messages() == [
        "app debug",
        "app info",
        "app warning",
        "app.db debug",
        "app.db info",
        "app.db warning",
    ]
    assert enabled == [True, False]


def test_a_level_changed_between_batches_applies_to_the_next(logs, worker):
    worker.run(lambda: logging.getLogger("noisy").debug("hidden"))
    logging.getLogger("noisy").setLevel(logging.DEBUG)
    worker.run(lambda: logging.getLogger("noisy").debug("shown"))
    logging.getLogger("noisy").setLevel(logging.NOTSET)
    logging.disable(logging.WARNING)
    worker.run(lambda: logging.getLogger("noisy").warning("disabled"))
    assert logs.messages() == ["shown"]


def test_the_parents_filters_and_disabled_loggers_decide(logs, worker):
    logging.getLogger("app").addFilter(lambda r: "secret" not in r.getMessage())
    logs.addFilter(lambda r: r.name != "app.db")
    logging.getLogger("other").disabled = True

    def task() -> None:
        logging.getLogger("app").warning("public")
        logging.getLogger("app").warning("a secret")
        logging.getLogger("app.db").warning("db")
        logging.getLogger("other").warning("off")

    worker.run(task)
    assert logs.messages() == ["public"]


def test_handlers_of_the_parents_named_loggers_see_relayed_records(logs, worker):
    own = Collect()
    app = logging.getLogger("app")
    app.addHandler(own)
    app.propagate = False
    try:
        worker.run(lambda: logging.getLogger("app.db").warning("to app only"))
    finally:
        app.removeHandler(own)
    assert own.messages() == ["to app only"]
    assert logs.records == []  # propagation stops where the parent says


def test_tracebacks_stacks_and_extras_travel_as_text_or_values(logs, worker):
    def task() -> None:
        log = logging.getLogger("app")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.exception("failed %s", "here")
        log.warning("with stack", stack_info=True)
        lock = threading.Lock()  # does not pickle
        log.warning("extras", extra={"user": "ann", "tags": ["a", "b"], "lock": lock})

    worker.run(task)
    failed, stacked, extras = logs.records
    assert failed.getMessage() == "failed here"
    assert "ZeroDivisionError: division by zero" in failed.exc_text
    assert "ZeroDivisionError" in logging.Formatter().format(failed)
    assert "in task" in stacked.stack_info
    assert extras.user == "ann" and extras.tags == ["a", "b"]
    assert isinstance(extras.lock, str) and "lock" in extras.lock


def test_an_extra_whose_class_exists_only_in_the_worker_arrives_as_its_repr(logs, worker):
    def task() -> None:
        class Local:  # pickles by reference, cannot be unpickled in the parent
            def __repr__(self) -> str:
                return "<Local thing>"

        Local.__module__ = "module_only_in_the_worker"
        sys.modules["module_only_in_the_worker"] = type(sys)("module_only_in_the_worker")
        sys.modules["module_only_in_the_worker"].Local = Local  # type: ignore[attr-defined]
        logging.getLogger("app").warning("odd", extra={"thing": Local()})

    worker.run(task)
    (record,) = logs.records
    assert record.thing == "<Local thing>"


def test_a_message_that_cannot_format_is_reported_in_the_worker_not_relayed(logs, worker):
    def task() -> str:
        logging.getLogger("app").warning("%d", "not a number")
        logging.getLogger("app").warning("next")
        return "survived"

    (status, value), _ = worker.run(task)
    assert (status, value) == ("ok", "survived")
    assert logs.messages() == ["next"]


def test_records_from_the_tasks_threads_all_arrive(logs, worker):
    def task() -> None:
        def spin(t: int) -> None:
            for i in range(300):
                logging.getLogger("app").info("thread %d record %d", t, i)

        threads = [threading.Thread(target=spin, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    worker.run(task)
    assert len(logs.records) == 1200
    for t in range(4):
        mine = [m for m in logs.messages() if m.startswith(f"thread {t} ")]
        assert mine == [f"thread {t} record {i}" for i in range(300)]


def test_a_burst_bigger_than_the_journal_and_a_record_bigger_than_it(logs, worker):
    def task() -> None:
        log = logging.getLogger("app")
        for i in range(20_000):
            log.info("burst %d %s", i, "x" * 100)
        log.warning("huge %s", "y" * (3 << 20))
        log.info("after")

    (status, _), _ = worker.run(task)
    assert status == "ok"
    messages = logs.messages()
    assert len(messages) == 20_002
    assert messages[:20_000] == [f"burst {i} {'x' * 100}" for i in range(20_000)]
    assert messages[20_000] == "huge " + "y" * (3 << 20)
    assert messages[-1] == "after"


def test_records_show_up_while_a_long_task_runs(logs, worker):
    worker.start(lambda: log_then_sleep(3.0))
    t0 = time.monotonic()
    while not logs.records and time.monotonic() - t0 < 2.0:
        assert not worker.poll_logs(0.05)
    assert logs.messages() == ["started"], "the record waited for the task to end"
    outcome, _ = worker.wait()
    assert outcome == ("ok", "slept")


@pytest.mark.parametrize("how", ["exit", "kill", "segfault"])
def test_records_of_a_task_that_then_dies_arrive(logs, worker, how):
    with pytest.raises(Died):
        worker.run(lambda: log_then_die(how), index=4)
    assert logs.messages() == [f"before the end {i}" for i in range(3)]
    assert {r.task_index for r in logs.records} == {4}


def test_records_sent_before_a_death_are_not_delivered_twice(logs, worker):
    worker.run(lambda: log_many(5))
    with pytest.raises(Died):
        worker.run(lambda: log_then_die("exit"))
    assert logs.messages() == [f"record {i} of 5" for i in range(5)] + [
        f"before the end {i}" for i in range(3)
    ]


def test_relay_off_sends_nothing_and_gives_the_worker_its_own_logging_back(logs, worker):
    def setup() -> tuple[int, int]:
        return len(logging.getLogger().handlers), logging.getLogger().level

    (_, own), _ = worker.run(setup, snap=None)
    worker.run(lambda: log_many(3), snap=None)
    assert logs.records == []
    (_, relaying), _ = worker.run(setup)  # on: one handler, the parent's level
    assert relaying == (1, logging.INFO)
    (_, back), _ = worker.run(setup, snap=None)
    assert back == own
    worker.run(lambda: log_many(2))
    assert logs.messages() == ["record 0 of 2", "record 1 of 2"]


def test_a_task_that_removes_the_relay_handler_gets_it_back_next_batch(logs, worker):
    worker.run(lambda: logging.basicConfig(force=True, level=logging.CRITICAL))
    worker.run(lambda: log_many(1))
    assert logs.messages() == ["record 0 of 1"]


def test_under_fork_the_parents_copied_handlers_do_not_write_twice(logs, tmp_path):
    path = tmp_path / "log.txt"
    file_handler = logging.FileHandler(path)
    logging.getLogger("app").addHandler(file_handler)
    w = BareWorker("fork")
    try:
        w.run(lambda: logging.getLogger("app").warning("once"))
    finally:
        w.close()
        logging.getLogger("app").removeHandler(file_handler)
        file_handler.close()
    assert path.read_text() == "once\n"
    assert logs.messages() == ["once"]


def test_a_process_forked_by_the_task_does_not_write_into_the_relay(logs, worker):
    def task() -> str:
        pid = os.fork()
        if pid == 0:
            logging.getLogger("app").warning("from the grandchild")
            os._exit(0)
        os.waitpid(pid, 0)
        logging.getLogger("app").warning("from the worker")
        return "ok"

    (status, _), _ = worker.run(task)
    assert status == "ok"
    assert logs.messages() == ["from the worker"]


@pytest.mark.slow
@pytest.mark.parametrize("formatted", [False, True], ids=["collecting", "formatting"])
def test_ten_thousand_records_cost_at_most_three_times_logging_in_process(logs, worker, formatted):
    """Issue 14's target: 10,000 INFO records to a parent handler <= 3x in-process.

    "collecting" keeps records in a list, the cheapest handler there is, which makes
    the relay's share the largest; "formatting" writes formatted lines to /dev/null.
    Best of 5 each way, on a shared 2-core machine: slack for the others' load is
    already in the bound (measured ratios are given in the printout).
    """
    n = 10_000
    log = logging.getLogger("app")
    if formatted:
        logging.getLogger().removeHandler(logs)
        sink = open(os.devnull, "w")  # noqa: SIM115 - closed below
        handler: logging.Handler = logging.StreamHandler(sink)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
        )
        logging.getLogger().addHandler(handler)
    else:
        handler = logs

    def here() -> float:
        logs.records.clear()
        t0 = time.perf_counter()
        for i in range(n):
            log.info("record %d of %s", i, n)
        return time.perf_counter() - t0

    def there() -> float:
        logs.records.clear()
        t0 = time.perf_counter()
        (status, _), _ = worker.run(lambda: log_many(n))
        took = time.perf_counter() - t0
        assert status == "ok"
        if not formatted:
            assert len(logs.records) == n
        return took

    try:
        worker.run(lambda: log_many(10))  # a warm worker, as in a pool
        # Interleaved, so that a burst of load from elsewhere hits both alike.
        pairs = [(here(), there()) for _ in range(5)]
        in_process = min(pair[0] for pair in pairs)
        relayed = min(pair[1] for pair in pairs)
    finally:
        if formatted:
            logging.getLogger().removeHandler(handler)
            sink.close()
    ratio = relayed / in_process
    print(
        f"\n10,000 records: in process {in_process * 1e3:.1f} ms, "
        f"relayed {relayed * 1e3:.1f} ms, ratio {ratio:.2f}"
    )
    assert ratio <= 3.0


# -- warnings ----------------------------------------------------------------------


class AppWarning(UserWarning):
    pass


def warn_here(category: type[Warning] = UserWarning) -> int:
    line = sys._getframe().f_lineno + 1
    warnings.warn("look out", category, stacklevel=1)
    return line


def test_a_warning_is_shown_in_the_parent_with_its_category_and_place(worker):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        (_, line), _ = worker.run(lambda: warn_here(AppWarning))
    (w,) = shown
    assert w.category is AppWarning and str(w.message) == "look out"
    assert w.filename == __file__ and w.lineno == line


def test_a_warning_category_the_parent_cannot_rebuild_becomes_a_user_warning(worker):
    def task() -> None:
        class Odd(Warning):
            pass

        warnings.warn("strange", Odd, stacklevel=1)

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        worker.run(task)
    (w,) = shown
    assert w.category is UserWarning
    assert "Odd" in str(w.message) and "strange" in str(w.message)


def test_the_parents_warning_filters_decide(worker):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="look")
        worker.run(warn_here)
        assert shown == []
        # DeprecationWarning is ignored by a fresh interpreter's filters, not by these.
        worker.run(lambda: warn_here(DeprecationWarning))
        assert [w.category for w in shown] == []
        warnings.filterwarnings("always", category=DeprecationWarning)
        worker.run(lambda: warn_here(DeprecationWarning))
        assert [w.category for w in shown] == [DeprecationWarning]


def test_default_action_shows_a_warning_once_per_place_across_tasks(worker):
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        sys.modules[__name__].__dict__.pop("__warningregistry__", None)
        for _ in range(3):
            worker.run(warn_here)
    assert len(shown) == 1


def test_an_error_filter_of_the_parent_raises_in_the_task_as_it_would_here(worker):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("error", AppWarning)
        (status, text), _ = worker.run(lambda: warn_here(AppWarning))
    assert status == "err" and "AppWarning: look out" in text
    assert shown == []


def warn_late() -> bool:
    loaded = "_latewarning" in sys.modules
    import _latewarning

    warnings.warn("late", _latewarning.LateWarning, stacklevel=1)
    return loaded


def test_a_filter_never_imports_its_category_in_the_worker(worker):
    import _latewarning

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        warnings.simplefilter("error", _latewarning.LateWarning)
        # Its module was not loaded when the batch began: the filter could not apply
        # there, so the warning is shown here rather than lost.
        (status, loaded), _ = worker.run(warn_late)
        assert (status, loaded) == ("ok", False)
        assert [w.category for w in shown] == [_latewarning.LateWarning]
        # From the next batch on the worker has the module, and the filter.
        (status, text), _ = worker.run(warn_late)
    assert status == "err" and "LateWarning: late" in text
    assert len(shown) == 1


def test_warnings_are_not_relayed_with_the_relay_off(worker):
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        worker.run(warn_here, snap=None)
    assert shown == []


# -- the halves in one process -------------------------------------------------------


def test_snapshot_lists_only_loggers_with_a_level_or_disabled(logs):
    logging.getLogger("app.db").setLevel(logging.ERROR)
    logging.getLogger("other").disabled = True
    root_level, disable, levels, off, filters, default = snapshot()
    assert root_level == logging.INFO and disable == logging.NOTSET
    assert ("app.db", logging.ERROR) in levels
    assert "app" not in dict(levels) and "other" in off
    assert default in ("default", "always", "ignore", "error", "module", "once")
    assert all(isinstance(f[2], tuple) for f in filters)


def test_snapshot_is_reused_until_a_level_filter_or_disabled_flag_changes(logs):
    first = snapshot()
    assert snapshot() is first
    logging.getLogger("noisy").setLevel(logging.DEBUG)
    second = snapshot()
    assert ("noisy", logging.DEBUG) in second[2]
    logging.disable(logging.ERROR)
    assert snapshot()[1] == logging.ERROR
    logging.disable(logging.NOTSET)
    logging.getLogger("other").disabled = True
    logging.getLogger("noisy").setLevel(logging.INFO)
    assert "other" in snapshot()[3]
    logging.getLogger("other").disabled = False  # no level changed: still seen
    assert "other" not in snapshot()[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AppWarning)
        assert snapshot()[4][0][:3] == ("ignore", None, (__name__, "AppWarning"))
    assert snapshot()[4][0][2] != (__name__, "AppWarning")


def test_an_in_memory_relay_hands_frames_over_by_take(logs):
    relay = WorkerRelay(None)
    relay.configure(snapshot())
    try:
        relay.index = 3
        logging.getLogger("app").debug("below the level")
        assert relay.take() == b""  # silenced records never become frames
        logging.getLogger("app").info("kept %s", "this")
        frames = relay.take()
    finally:
        relay.configure(None)
    assert logs.records == []  # the relay's handler stood in for the parent's meanwhile
    LogReceiver().deliver(frames, position=lambda index, offset: 10 * index + offset)
    assert logs.messages() == ["kept this"] and logs.records[0].task_index == 30


def test_a_failing_filter_of_the_parent_does_not_stop_the_other_records(logs, capsys):
    relay = WorkerRelay(None)
    relay.configure(snapshot())
    try:
        logging.getLogger("app").warning("boom")
        logging.getLogger("app").warning("fine")
        frames = relay.take()
    finally:
        relay.configure(None)

    def bad(record: logging.LogRecord) -> bool:
        if record.getMessage() == "boom":
            raise RuntimeError("filter bug")
        return True

    logging.getLogger("app").addFilter(bad)
    LogReceiver().deliver(frames)
    assert logs.messages() == ["fine"]
    assert "filter bug" in capsys.readouterr().err


def test_the_logs_message_kind_is_not_one_of_the_workers():
    from alloter_mp import _sight, _worker

    kinds = [getattr(_worker, name) for name in _worker.__all__ if name.isupper()]
    kinds.remove(_worker.SKIPPED)  # a result code, not a message kind
    kinds += [LOGS, _sight.CONFIG, _sight.OUTPUT]
    assert len(set(kinds)) == len(kinds) == 11
