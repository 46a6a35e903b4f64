"""The ``%wf`` magics (SPEC 6), driven through a bare IPython shell against a real Redis.

Workflow classes are defined by running cells in the shell, as a notebook
would, so the magics find them in ``shell.user_ns``.  Where a test needs runs to
happen it either uses the in-process worker (``%wf worker start``) or runs a
burst worker in the test's own thread (``engine.run_worker()``), which is
deterministic.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from conftest import cleanup_prefix
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from support import poll
from traitlets.config import Config

from nbflow import Engine, WorkflowInstance
from nbflow.notebook import get_engine, use_engine
from nbflow.notebook.magics import USAGE, WorkerState, split_line
from nbflow.records import InstanceStatus
from nbflow.widgets import Dashboard

CELL = """
import pandas as pd
from nbflow import WorkflowEntrypoint

class Greet(WorkflowEntrypoint):
    def run(self, event, step):
        frame = step.do("load", lambda: pd.DataFrame({"x": [1, 2, 3]}))
        return step.do("greet", lambda: f"hello {event.payload['name']} ({len(frame)})")

class Gate(WorkflowEntrypoint):
    def run(self, event, step):
        step.do("before", lambda: 1)
        got = step.wait_for_event("gate", "go", timeout="1 hour")
        return {"got": got["payload"]}

class Counted(WorkflowEntrypoint):
    def run(self, event, step):
        out = []
        for name in ("a", "b", "c"):
            def work(name=name):
                CALLS[name] += 1
                return name
            out.append(step.do(name, work))
        return out

class Plain:
    pass

number = 5
"""


@pytest.fixture(scope="module")
def bare_shell() -> InteractiveShell:
    config = Config()
    config.HistoryManager.hist_file = ":memory:"  # keep the user's ~/.ipython untouched
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "nbflow")
    return shell


@pytest.fixture
def shell(bare_shell: InteractiveShell, engine: Engine) -> Iterator[InteractiveShell]:
    """The shell with the test's engine in use and the workflow cell run."""
    use_engine(engine)
    bare_shell.user_ns["CALLS"] = Counter()
    bare_shell.run_cell(CELL).raise_error()
    yield bare_shell
    bare_shell.run_line_magic("wf", "worker stop")
    dash = bare_shell.magics_manager.registry["WorkflowMagics"]._dashboard
    if dash is not None:
        dash.close()
    use_engine(None)
    bare_shell.reset(new_session=False)


def wf(shell: InteractiveShell, line: str) -> Any:
    return shell.run_line_magic("wf", line)


def calls(shell: InteractiveShell) -> Counter[str]:
    counter: Counter[str] = shell.user_ns["CALLS"]
    return counter


# -- happy paths -----------------------------------------------------------------------


def test_start_run_and_inspect(shell: InteractiveShell) -> None:
    inst = wf(shell, """start Greet --id g1 --params '{"name": "ada"}'""")
    assert isinstance(inst, WorkflowInstance)
    assert inst.id == "g1" and inst.workflow == "Greet"
    assert inst.status() == {"status": "queued"}

    state = wf(shell, "worker start")
    assert isinstance(state, WorkerState) and state.running
    assert repr(state) == "in-process worker: running"

    done = wf(shell, "wait g1 --timeout 10")
    assert isinstance(done, InstanceStatus)
    assert done == {"status": "complete", "output": "hello ada (3)"}
    assert wf(shell, "status g1") == done

    listed = wf(shell, "list")
    assert isinstance(listed, pd.DataFrame)
    assert list(listed["id"]) == ["g1"]
    assert list(wf(shell, "list --workflow Greet --status complete")["id"]) == ["g1"]
    assert wf(shell, "list --status running").empty
    assert wf(shell, "list --workflow Gate").empty

    steps = wf(shell, "steps g1")
    assert isinstance(steps, pd.DataFrame)
    assert list(steps["step"]) == ["load", "greet"]
    assert list(steps["status"]) == ["complete", "complete"]
    frame = wf(shell, "output g1 load")
    pd.testing.assert_frame_equal(frame, pd.DataFrame({"x": [1, 2, 3]}))
    assert wf(shell, "output g1 greet") == "hello ada (3)"

    assert wf(shell, "worker status").running
    assert not wf(shell, "worker stop").running
    assert repr(wf(shell, "worker status")) == "in-process worker: stopped"


def test_unquoted_json_is_kept_whole(shell: InteractiveShell, engine: Engine) -> None:
    wf(shell, 'start Greet --id g2 --params {"name": "bob smith"}')
    gate = wf(shell, "start Gate --id e2")
    engine.run_worker()
    assert engine.instance("g2").status()["output"] == "hello bob smith (3)"
    assert gate.status()["status"] == "waiting"
    wf(shell, 'event e2 go {"ok": true, "n": [1, 2]}')
    engine.run_worker()
    assert gate.status() == {"status": "complete", "output": {"got": {"ok": True, "n": [1, 2]}}}


def test_split_line_like_a_shell_but_json_whole() -> None:
    assert split_line("""start G --params '{"a": 1}'""") == ["start", "G", "--params", '{"a": 1}']
    assert split_line('start G --params {"a": [1, 2]}') == [
        "start",
        "G",
        "--params",
        '{"a": [1, 2]}',
    ]
    assert split_line('output g1 "charge card"') == ["output", "g1", "charge card"]
    assert split_line(r"output g1 charge\ card") == ["output", "g1", "charge card"]
    assert split_line("event g1 go [1,2] ") == ["event", "g1", "go", "[1,2]"]
    with pytest.raises(ValueError, match="closing quotation"):
        split_line("start G --id 'x")


def test_pause_resume_terminate_change_status(shell: InteractiveShell) -> None:
    inst = wf(shell, "start Gate --id p1")  # no worker: it stays queued
    assert wf(shell, "pause p1") == inst
    assert inst.status()["status"] == "paused"
    wf(shell, "resume p1")
    assert inst.status()["status"] == "queued"
    wf(shell, "terminate p1")
    assert inst.status()["status"] == "terminated"
    with pytest.raises(UsageError, match="cannot pause instance 'p1': it is terminated"):
        wf(shell, "pause p1")


def test_events_pause_and_resume_with_worker(shell: InteractiveShell) -> None:
    inst = wf(shell, "start Gate --id e1")
    wf(shell, "worker start")
    poll(lambda: inst.status()["status"] == "waiting", what="e1 waiting for its event")
    wf(shell, "pause e1")
    assert inst.status()["status"] == "paused"
    wf(shell, "resume e1")
    assert inst.status()["status"] != "paused"
    wf(shell, """event e1 go '{"approved": true}'""")
    assert wf(shell, "wait e1 --timeout 10") == {
        "status": "complete",
        "output": {"got": {"approved": True}},
    }


def test_restart_from_a_step_reruns_it_and_later_steps(
    shell: InteractiveShell, engine: Engine
) -> None:
    wf(shell, "start Counted --id r1")
    engine.run_worker()
    assert calls(shell) == {"a": 1, "b": 1, "c": 1}
    restarted = wf(shell, "restart r1 --from b")
    assert restarted.status()["status"] in ("queued", "running")
    engine.run_worker()
    assert wf(shell, "status r1") == {"status": "complete", "output": ["a", "b", "c"]}
    assert calls(shell) == {"a": 1, "b": 2, "c": 2}
    wf(shell, "restart r1")
    engine.run_worker()
    assert calls(shell) == {"a": 2, "b": 3, "c": 3}


def test_redefining_a_class_reregisters_it(shell: InteractiveShell, engine: Engine) -> None:
    shell.run_cell(
        "class Versioned(WorkflowEntrypoint):\n"
        "    def run(self, event, step):\n"
        "        return step.do('v', lambda: 'v1')\n"
    ).raise_error()
    wf(shell, "start Versioned --id v1")
    engine.run_worker()
    assert wf(shell, "status v1")["output"] == "v1"

    shell.run_cell(
        "class Versioned(WorkflowEntrypoint):\n"
        "    def run(self, event, step):\n"
        "        return step.do('v', lambda: 'v2')\n"
    ).raise_error()
    wf(shell, "start Versioned --id v2")
    engine.run_worker()
    assert wf(shell, "status v2")["output"] == "v2"
    # A restart also runs the definition the notebook has now.
    wf(shell, "restart v1")
    engine.run_worker()
    assert wf(shell, "status v1")["output"] == "v2"


def test_dashboard_subcommand(shell: InteractiveShell) -> None:
    first = wf(shell, "dashboard")
    assert isinstance(first, Dashboard)
    second = wf(shell, "dashboard --refresh 0.5")
    assert second.refresh_interval == 0.5
    assert first.comm is None  # the previous one was closed with its thread
    assert not first.running


def test_help_lists_every_form(shell: InteractiveShell) -> None:
    text = repr(wf(shell, "help"))
    for form in USAGE.values():
        assert form in text


def test_magics_work_while_an_event_loop_runs(shell: InteractiveShell) -> None:
    """A kernel's own asyncio loop runs while cells execute; nothing may need another."""

    async def cell() -> Any:
        wf(shell, """start Greet --id a1 --params '{"name": "loop"}'""")
        wf(shell, "worker start")
        return wf(shell, "wait a1 --timeout 10")

    assert asyncio.run(cell()) == {"status": "complete", "output": "hello loop (3)"}


def test_use_engine_and_default_engine(
    monkeypatch: pytest.MonkeyPatch, engine: Engine, redis_url: str
) -> None:
    use_engine(engine)
    assert get_engine() is engine
    with pytest.raises(TypeError, match="nbflow.Engine"):
        use_engine("redis://localhost")  # type: ignore[arg-type]
    use_engine(None)
    monkeypatch.setenv("NBFLOW_REDIS_URL", redis_url)
    default = get_engine()
    assert default is not engine and default.prefix == "workflow"
    assert get_engine() is default
    use_engine(None)


# -- wrong usage -----------------------------------------------------------------------

OVERVIEW = "%wf start|list|status"

USAGE_CASES: list[tuple[str, str, list[str]]] = [
    ("", OVERVIEW, ["needs a subcommand"]),
    ("bogus", OVERVIEW, ["unknown subcommand 'bogus'"]),
    ("strat Greet", OVERVIEW, ["did you mean 'start'?"]),
    ("start", USAGE["start"], ["required: NAME"]),
    ("start Nope", USAGE["start"], ["unknown workflow 'Nope'"]),
    ("start Plain", USAGE["start"], ["'Plain' in this notebook is a class", "WorkflowEntrypoint"]),
    ("start number", USAGE["start"], ["is a int, not a WorkflowEntrypoint"]),
    ("start Greet --params {bad", USAGE["start"], ["--params is not valid JSON"]),
    ("""start Greet --params '{"a": 1'""", USAGE["start"], ["not valid JSON"]),
    ("start Greet --params nojson", USAGE["start"], ["not valid JSON"]),
    ("start Greet --id 'bad id'", USAGE["start"], ["invalid instance id 'bad id'"]),
    ("start Greet --id done1", USAGE["start"], ["'done1' already exists"]),
    ("start Greet --bogus 1", USAGE["start"], ["unrecognized arguments: --bogus 1"]),
    ("start Greet --id 'x", USAGE["start"], ["no closing quotation"]),
    ("list --status nope", USAGE["list"], ["unknown status 'nope'"]),
    ("list --limit -1", USAGE["list"], ["must be >= 0"]),
    ("list extra", USAGE["list"], ["unrecognized arguments: extra"]),
    ("status", USAGE["status"], ["required: ID"]),
    ("status nope", USAGE["status"], ["unknown instance 'nope'"]),
    ("status 'bad id'", USAGE["status"], ["invalid instance id"]),
    ("status -x", USAGE["status"], ["required: ID"]),
    ("pause done1", USAGE["pause"], ["cannot pause instance 'done1': it is complete"]),
    ("resume done1", USAGE["resume"], ["cannot resume instance 'done1': it is complete"]),
    ("terminate done1", USAGE["terminate"], ["cannot terminate instance 'done1'"]),
    ("terminate", USAGE["terminate"], ["required: ID"]),
    ("restart nope", USAGE["restart"], ["unknown instance 'nope'"]),
    (
        "restart done1 --from nope",
        USAGE["restart"],
        ["no step 'nope'", "its steps, in run order: load, greet"],
    ),
    ("restart done1 --from", USAGE["restart"], ["expected at least one argument"]),
    ("event done1", USAGE["event"], ["required: TYPE"]),
    ("event done1 go", USAGE["event"], ["cannot send an event to instance 'done1'"]),
    ("event q1 bad/type", USAGE["event"], ["invalid event type 'bad/type'"]),
    ("event q1 go {bad", USAGE["event"], ["the payload is not valid JSON"]),
    ("event q1 go 1 2", USAGE["event"], ["unrecognized arguments: 2"]),
    ("steps", USAGE["steps"], ["required: ID"]),
    ("steps nope", USAGE["steps"], ["unknown instance 'nope'"]),
    ("output done1", USAGE["output"], ["required: STEP"]),
    ("output done1 nope", USAGE["output"], ["no step 'nope'", "its steps: load, greet"]),
    ("output q1 load", USAGE["output"], ["no step 'load'", "none yet"]),
    ("wait", USAGE["wait"], ["required: ID"]),
    ("wait q1 --timeout x", USAGE["wait"], ["'x' is not a number of seconds"]),
    ("wait q1 --timeout -1", USAGE["wait"], ["must be a number of seconds >= 0"]),
    ("wait q1 --timeout 0.05", USAGE["wait"], ["still queued", "%wf worker start"]),
    ("worker", USAGE["worker"], ["required"]),
    ("worker go", USAGE["worker"], ["invalid choice: 'go'"]),
    ("dashboard --refresh soon", USAGE["dashboard"], ["not a number"]),
    ("help me", USAGE["help"], ["unrecognized arguments: me"]),
    ("status g1 -h", USAGE["status"], ["unrecognized arguments: -h"]),
]


@pytest.fixture(scope="module")
def usage_shell(bare_shell: InteractiveShell, redis_url: str) -> Iterator[InteractiveShell]:
    """One engine for all wrong-usage cases (they only read): ``done1`` complete, ``q1`` queued."""
    tag = uuid.uuid4().hex[:10]
    engine = Engine(redis_url, prefix=f"t{tag}", queue=f"q{tag}")
    use_engine(engine)
    bare_shell.user_ns["CALLS"] = Counter()
    bare_shell.run_cell(CELL).raise_error()
    wf(bare_shell, 'start Greet --id done1 --params \'{"name": "x"}\'')
    engine.run_worker()
    wf(bare_shell, "start Gate --id q1")  # stays queued: no worker runs for these cases
    yield bare_shell
    use_engine(None)
    bare_shell.reset(new_session=False)
    cleanup_prefix(engine.redis, engine.prefix, engine.queue_name)


@pytest.mark.parametrize(
    ("line", "form", "fragments"), USAGE_CASES, ids=[c[0] or "<empty>" for c in USAGE_CASES]
)
def test_wrong_usage_is_one_line_usage_error(
    usage_shell: InteractiveShell,
    capsys: pytest.CaptureFixture[str],
    line: str,
    form: str,
    fragments: list[str],
) -> None:
    capsys.readouterr()
    with pytest.raises(UsageError) as info:
        wf(usage_shell, line)
    message = str(info.value)
    assert "\n" not in message
    assert form in message
    for fragment in fragments:
        assert fragment in message
    assert capsys.readouterr() == ("", ""), "argparse or the magic printed something"
    assert usage_shell.run_line_magic("wf", "status q1") == {"status": "queued"}


def test_a_cell_shows_the_usage_error_without_traceback(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    result = shell.run_cell("%wf status nope")
    assert isinstance(result.error_in_exec, UsageError)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("UsageError: unknown instance 'nope'")
    assert err.count("\n") == 1 and "Traceback" not in err
