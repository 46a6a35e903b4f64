"""Logs (SPEC 8.3): what a workflow's code prints or logs while a worker runs it is
captured per step into Redis, shown by ``inst.logs()``, ``%wf logs`` and ``nbflow logs``,
and never printed where the caller (a notebook cell, a test) would see it."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from support import poll
from traitlets.config import Config

from nbflow import Engine, InstanceNotFoundError, WorkflowEntrypoint, capture
from nbflow.cli import main
from nbflow.notebook import use_engine

log = logging.getLogger("tests.flows")


def lines(frame: pd.DataFrame) -> list[tuple[Any, str, str]]:
    """The (step, stream, line) of each row, oldest first."""
    return list(zip(frame["step"], frame["stream"], frame["line"], strict=True))


class Chatty(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> int:
        def load() -> int:
            print("loading", 3, "rows")
            print("careful", file=sys.stderr)
            log.info("loaded %d rows", 3)
            log.debug("not captured: below INFO")
            return 3

        n = step.do("load", load)
        return int(step.do("double", lambda: n * 2))


class AsyncChatty(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> int:
        async def fetch() -> int:
            print("fetching")
            await asyncio.sleep(0)
            log.warning("slow network")
            return 1

        def count() -> int:  # a sync callback of an async run (the pool in a thread worker)
            sys.stdout.write("counting ")
            sys.stdout.write("done\n")
            return 2

        a = await step.do("fetch", fetch)
        b = await step.do("count", count)
        both = await asyncio.gather(
            step.do("left", lambda: print("left side") or 1),
            step.do("right", lambda: print("right side") or 2),
        )
        return a + b + sum(both)


class Sleepy(WorkflowEntrypoint):
    """Prints outside steps before and after a sleep, so its run is replayed."""

    def run(self, event: Any, step: Any) -> str:
        print("run begins")
        step.do("first", lambda: print("in first") or 1)
        print("before the nap")
        step.sleep("nap", "200 milliseconds")
        print("after the nap")
        step.do("second", lambda: print("in second") or 2)
        return "done"


class Flood(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> int:
        def noisy() -> int:
            for i in range(event.payload["lines"]):
                print(f"line {i:05d} " + "x" * 40)
            return 1

        step.do("noisy", noisy)
        return int(step.do("quiet", lambda: 2))


# -- capture in the in-process worker ----------------------------------------------------


def test_print_stderr_and_logging_in_sync_callbacks_are_captured_per_step(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(Chatty).create(id="chatty")
    assert inst.wait(timeout=20)["status"] == "complete"
    frame = inst.logs()
    assert list(frame.columns) == ["time", "step", "stream", "line"]
    assert lines(frame) == [
        ("load", "stdout", "loading 3 rows"),
        ("load", "stderr", "careful"),
        ("load", "INFO", "loaded 3 rows"),
    ]
    assert str(frame["time"].dt.tz) == "UTC"
    assert frame["time"].is_monotonic_increasing


def test_async_callbacks_sync_callbacks_on_the_pool_and_parallel_branches_are_captured(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(AsyncChatty).create(id="async-chatty")
    assert inst.wait(timeout=20) == {"status": "complete", "output": 6}
    got = set(lines(inst.logs()))
    assert got == {
        ("fetch", "stdout", "fetching"),
        ("fetch", "WARNING", "slow network"),
        ("count", "stdout", "counting done"),
        ("left", "stdout", "left side"),
        ("right", "stdout", "right side"),
    }


def test_inline_callbacks_of_a_foreground_worker_are_captured(engine: Engine) -> None:
    inst = engine.register(Chatty).create(id="inline")
    engine.run_worker()  # this (main) thread: sync callbacks inline under SIGALRM
    assert inst.status()["status"] == "complete"
    assert [line for _, _, line in lines(inst.logs())] == [
        "loading 3 rows",
        "careful",
        "loaded 3 rows",
    ]


def test_lines_run_prints_outside_steps_are_logged_once_across_a_replay(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(Sleepy).create(id="sleepy")
    assert inst.wait(timeout=20)["status"] == "complete"
    assert lines(inst.logs()) == [
        (None, "stdout", "run begins"),
        ("first", "stdout", "in first"),
        (None, "stdout", "before the nap"),
        (None, "stdout", "after the nap"),
        ("second", "stdout", "in second"),
    ]


def test_nothing_leaks_into_the_callers_stdout_while_a_worker_runs(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    print("the caller's own line")
    engine.start_worker()
    inst = engine.register(AsyncChatty).create(id="quiet")
    other = engine.register(Chatty).create(id="quiet-too")
    assert inst.wait(timeout=20)["status"] == "complete"
    assert other.wait(timeout=20)["status"] == "complete"
    print("and another")
    out, err = capsys.readouterr()
    assert out == "the caller's own line\nand another\n"
    assert err == ""
    assert len(inst.logs()) == 5 and len(other.logs()) == 3


def test_a_step_log_is_bounded_and_a_marker_says_how_many_lines_were_dropped(
    engine: Engine,
) -> None:
    inst = engine.register(Flood).create(id="flood", params={"lines": 3000})
    engine.run_worker()
    assert inst.status()["status"] == "complete"
    frame = inst.logs("noisy")
    stored = frame["line"].tolist()
    marker, kept = stored[0], stored[1:]
    assert kept[-1].startswith("line 02999 ")  # the newest lines stay
    dropped = 3000 - len(kept)
    assert dropped > 0
    assert frame["stream"].iloc[0] == "WARNING"
    assert marker.startswith(f"[nbflow] {dropped} earlier lines of this step dropped")
    assert kept == [f"line {i:05d} " + "x" * 40 for i in range(dropped, 3000)]
    raw = engine.redis.hget(engine.keys.logs(inst.id), "noisy#1")
    assert raw is not None and len(raw) <= capture.STEP_LOG_BYTES + 100


def test_logs_of_a_replayed_step_stay_bounded_across_runs(engine: Engine) -> None:
    class Twice(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> int:
            def noisy(ctx: Any) -> int:
                for i in range(1200):
                    print(f"attempt {ctx.attempt} line {i:04d} " + "y" * 40)
                if ctx.attempt == 1:
                    raise RuntimeError("try again")
                return 1

            return int(step.do("noisy", {"retries": {"limit": 1, "delay": 0}}, noisy))

    inst = engine.register(Twice).create(id="twice")
    engine.run_worker()
    assert inst.status() == {"status": "complete", "output": 1}
    stored = inst.logs()["line"].tolist()
    assert stored[0].startswith("[nbflow] ") and "earlier lines of this step dropped" in stored[0]
    assert stored[-1].startswith("attempt 2 line 1199 ")
    count = int(stored[0].split()[1])
    assert count + len(stored) - 1 == 2400


def test_a_line_redrawn_with_carriage_returns_keeps_what_it_shows_last(engine: Engine) -> None:
    class Bar(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            def body() -> None:
                for i in range(1, 4):
                    sys.stderr.write(f"\rworking {i}/3")
                sys.stderr.write("\n")
                print("windows line\r")

            step.do("bar", body)

    inst = engine.register(Bar).create(id="bar")
    engine.run_worker()
    assert lines(inst.logs()) == [
        ("bar", "stderr", "working 3/3"),
        ("bar", "stdout", "windows line"),
    ]


def test_a_workflow_that_prints_nothing_stores_no_log(engine: Engine) -> None:
    class Quiet(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> int:
            return int(step.do("a", lambda: 1)) + int(step.do("b", lambda: 2))

    inst = engine.register(Quiet).create(id="silent")
    engine.run_worker()
    assert inst.status() == {"status": "complete", "output": 3}
    assert inst.logs().empty and list(inst.logs().columns) == ["time", "step", "stream", "line"]
    assert not engine.redis.exists(engine.keys.logs(inst.id))


def test_logging_below_info_and_from_nbflow_itself_is_not_captured(engine: Engine) -> None:
    class Levels(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            def body() -> None:
                log.debug("debug")
                log.info("info")
                log.error("error")
                logging.getLogger("nbflow").warning("nbflow's own")
                logging.getLogger("nbflow.child").warning("nbflow's child")

            step.do("levels", body)

    inst = engine.register(Levels).create(id="levels")
    engine.run_worker()
    assert lines(inst.logs()) == [("levels", "INFO", "info"), ("levels", "ERROR", "error")]


def test_a_logged_exception_keeps_its_traceback_lines(engine: Engine) -> None:
    class Oops(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            def body() -> None:
                try:
                    raise KeyError("missing")
                except KeyError:
                    log.exception("lookup failed")

            step.do("oops", body)

    inst = engine.register(Oops).create(id="oops")
    engine.run_worker()
    got = inst.logs()["line"].tolist()
    assert got[0] == "lookup failed"
    assert got[1] == "Traceback (most recent call last):"
    assert got[-1] == "KeyError: 'missing'"
    assert set(inst.logs()["stream"]) == {"ERROR"}


def test_the_users_own_handlers_keep_working_outside_and_inside_steps(engine: Engine) -> None:
    """A handler writing elsewhere than the console (here a buffer) sees the records of
    steps too; the user's own logging outside steps is unchanged."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    mine = logging.getLogger("tests.mine")
    mine.addHandler(handler)
    mine.setLevel(logging.INFO)
    try:

        class Mine(WorkflowEntrypoint):
            def run(self, event: Any, step: Any) -> None:
                step.do("work", lambda: mine.info("inside a step"))

        inst = engine.register(Mine).create(id="mine")
        engine.run_worker()
        mine.info("outside any step")
        assert buffer.getvalue() == "inside a step\noutside any step\n"
        assert lines(inst.logs()) == [("work", "INFO", "inside a step")]
    finally:
        mine.removeHandler(handler)
        mine.setLevel(logging.NOTSET)


def test_a_console_handler_is_quiet_inside_steps_and_prints_outside(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like ``logging.basicConfig()`` in a notebook: a handler on the root logger writing
    to the console prints the user's records outside steps; inside steps they go to the
    instance's log instead (not into the cell, and not twice)."""
    engine.run_worker()  # installs the capture (sys.stdout is now its stand-in)
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(handler)
    talk = logging.getLogger("tests.console")
    try:

        class Talk(WorkflowEntrypoint):
            def run(self, event: Any, step: Any) -> None:
                step.do("talk", lambda: talk.warning("from the step"))

        inst = engine.register(Talk).create(id="talk")
        engine.run_worker()  # each job quiets console handlers added since
        talk.warning("from the caller")
        assert capsys.readouterr().out == "from the caller\n"
        assert lines(inst.logs()) == [("talk", "WARNING", "from the step")]
    finally:
        logging.getLogger().removeHandler(handler)


def test_a_thread_the_caller_runs_meanwhile_prints_normally(
    worker_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    release = threading.Event()

    class Held(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            step.do("held", lambda: release.wait(10) and print("held step"))

    inst = worker_engine.register(Held).create(id="held")
    poll(lambda: inst.status()["status"] == "running", what="running")
    printer = threading.Thread(target=lambda: print("caller thread"))
    printer.start()
    printer.join()
    release.set()
    assert inst.wait(timeout=10)["status"] == "complete"
    assert capsys.readouterr().out == "caller thread\n"
    assert lines(inst.logs()) == [("held", "stdout", "held step")]


def test_lines_of_a_long_running_step_show_while_it_runs(worker_engine: Engine) -> None:
    release = threading.Event()

    class Long(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            def body() -> None:
                print("started the long part")
                release.wait(20)
                print("finished it")

            step.do("long", body)

    inst = worker_engine.register(Long).create(id="long")
    try:
        poll(lambda: len(inst.logs()) == 1, timeout=15, what="the first line, mid-step")
        assert inst.status()["status"] == "running"
        assert lines(inst.logs()) == [("long", "stdout", "started the long part")]
    finally:
        release.set()
    assert inst.wait(timeout=20)["status"] == "complete"
    assert [line for _, _, line in lines(inst.logs())] == ["started the long part", "finished it"]


# -- restarts, retention, errors ----------------------------------------------------------


def test_restart_from_a_step_keeps_the_log_before_it_and_a_full_restart_clears_it(
    engine: Engine,
) -> None:
    inst = engine.register(Sleepy).create(id="again")
    engine.run_worker()
    while inst.status()["status"] != "complete":
        engine.run_worker()
    before = lines(inst.logs())
    inst.restart(from_step="second")
    while inst.status()["status"] != "complete":
        engine.run_worker()
    assert lines(inst.logs()) == before  # "second" ran again: its lines once, not twice
    inst.restart()
    assert inst.logs().empty
    while inst.status()["status"] != "complete":
        engine.run_worker()
    assert lines(inst.logs()) == before


def test_retention_deletes_the_log_with_the_instance(redis_url: str, names: Any) -> None:
    from conftest import cleanup_prefix

    prefix, queue = names
    eng = Engine(redis_url, prefix=prefix, queue=queue, retention=0.0)
    try:
        inst = eng.register(Chatty).create(id="kept-briefly")
        eng.run_worker()
        poll(lambda: not eng.redis.exists(eng.keys.state(inst.id)), what="purged")
        assert not eng.redis.exists(eng.keys.logs(inst.id))
    finally:
        cleanup_prefix(eng.redis, prefix, queue)


def test_unknown_instance_and_unknown_step_are_clear_errors(engine: Engine) -> None:
    inst = engine.register(Chatty).create(id="known")
    engine.run_worker()
    assert inst.logs("double").empty  # ran, printed nothing
    with pytest.raises(ValueError, match=r"has no step 'nope' \(its steps: load, double\)"):
        inst.logs("nope")
    engine.redis.delete(engine.keys.state("known"))
    with pytest.raises(InstanceNotFoundError, match="no instance 'known'"):
        inst.logs()


def test_a_step_filter_takes_one_occurrence_or_all_of_them(engine: Engine) -> None:
    class Loop(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            for i in range(3):
                step.do("item", lambda i=i: print(f"item {i}"))

    inst = engine.register(Loop).create(id="loop")
    engine.run_worker()
    assert lines(inst.logs("item")) == [
        ("item", "stdout", "item 0"),
        ("item#2", "stdout", "item 1"),
        ("item#3", "stdout", "item 2"),
    ]
    assert lines(inst.logs("item#2")) == [("item#2", "stdout", "item 1")]


# -- CLI workers and the nbflow logs command -------------------------------------------------

CLI_MODULE = textwrap.dedent(
    """
    import logging, sys
    from nbflow import WorkflowEntrypoint

    class CliChatty(WorkflowEntrypoint):
        def run(self, event, step):
            print("cli run starts")
            def load():
                print("cli load")
                print("cli warn", file=sys.stderr)
                logging.getLogger("cli.flows").warning("cli logged")
                return 1
            step.do("load", load)
            return step.do("end", lambda: 2)
    """
)


@pytest.fixture
def cli_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "log_flows.py").write_text(CLI_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_cli_worker_captures_and_nbflow_logs_prints_the_lines(
    engine: Engine, cli_module: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from log_flows import CliChatty  # type: ignore[import-not-found]

    inst = engine.register(CliChatty).create(id="cli-logs")
    env = dict(os.environ, PYTHONPATH=f"{cli_module}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    common = ["--redis", redis_url, "--prefix", engine.prefix]
    done = subprocess.run(
        [sys.executable, "-m", "nbflow.cli", "worker", *common, "--queue", engine.queue_name]
        + ["--import", "log_flows", "--burst"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert inst.status() == {"status": "complete", "output": 2}
    # the worker's own console shows none of the workflow's lines
    for text in ("cli run starts", "cli load", "cli warn", "cli logged"):
        assert text not in done.stdout and text not in done.stderr
    assert lines(inst.logs()) == [
        (None, "stdout", "cli run starts"),
        ("load", "stdout", "cli load"),
        ("load", "stderr", "cli warn"),
        ("load", "WARNING", "cli logged"),
    ]

    assert main(["logs", inst.id, *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[1] for line in out] == [
        "- stdout: cli run starts",
        "load stdout: cli load",
        "load stderr: cli warn",
        "load WARNING: cli logged",
    ]
    assert out[0][:2] == "20" and out[0].split(" ")[0].endswith("Z")

    assert main(["logs", inst.id, "--step", "load", *common]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["logs", inst.id, "--step", "end", *common]) == 0
    assert capsys.readouterr().out == "no log lines for step 'end'\n"
    assert main(["logs", inst.id, "--step", "nope", *common]) == 2
    assert "has no step 'nope' (its steps: load, end)" in capsys.readouterr().err
    assert main(["logs", "no-such-id", *common]) == 1
    assert "no instance 'no-such-id'" in capsys.readouterr().err


# -- %wf logs ---------------------------------------------------------------------------


@pytest.fixture
def shell(engine: Engine) -> Iterator[InteractiveShell]:
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "nbflow")
    use_engine(engine)
    yield shell
    use_engine(None)


def test_wf_logs_shows_all_lines_or_one_steps(shell: InteractiveShell, engine: Engine) -> None:
    inst = engine.register(Chatty).create(id="magic-logs")
    engine.run_worker()
    frame = shell.run_line_magic("wf", "logs magic-logs")
    assert isinstance(frame, pd.DataFrame) and len(frame) == 3
    one = shell.run_line_magic("wf", "logs magic-logs load")
    assert lines(one) == lines(inst.logs("load"))
    with pytest.raises(UsageError, match=r"has no step 'nope'.*usage: %wf logs ID \[STEP\]"):
        shell.run_line_magic("wf", "logs magic-logs nope")
    with pytest.raises(UsageError, match="unknown instance 'ghost'"):
        shell.run_line_magic("wf", "logs ghost")
    with pytest.raises(UsageError, match=r"usage: %wf logs ID \[STEP\]"):
        shell.run_line_magic("wf", "logs")


def test_the_stdout_stand_in_lets_ipython_replace_its_write_method_for_a_cell() -> None:
    """IPython 9's ``run_cell`` tees output by setting ``sys.stdout.write`` and putting
    it back after the cell; with nbflow's stand-in installed that must work (it once
    raised AttributeError in every cell of a kernel running a worker)."""
    import io

    from nbflow.capture import _Proxy

    out = io.StringIO()
    proxy = _Proxy(out, "stdout")
    seen: list[str] = []
    original = proxy.write

    def tee(text: str) -> int:
        seen.append(text)
        return original(text)

    proxy.write = tee  # type: ignore[method-assign]
    print("hello", file=proxy)
    proxy.write = original  # type: ignore[method-assign]
    print("again", file=proxy)
    assert seen == ["hello", "\n"] and out.getvalue() == "hello\nagain\n"
