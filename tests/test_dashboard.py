"""The live ``Dashboard`` (SPEC 6), driven from code as a test would drive a browser.

Every control is exercised through its widget (``button.click()``, setting a
selector's value) or the documented helpers (``select``, ``select_step``,
``refresh``).  Runs happen either in a burst worker in the test's thread
(``engine.run_worker()``, deterministic) or in the in-process worker when a
state is only observable while a run is under way.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pytest
from support import poll

from nbflow import Engine, InstanceNotFoundError, WorkflowEntrypoint
from nbflow.notebook import widgets as widgets_module
from nbflow.widgets import Dashboard

CALLS: Counter[str] = Counter()
RELEASE = threading.Event()


class Gate(WorkflowEntrypoint):
    """Two steps, then waits for an event ``go``."""

    def run(self, event: Any, step: Any) -> Any:
        step.do("a", lambda: {"a": 1})
        step.do("load", lambda: pd.DataFrame({"x": [1, 2], "y": ["p", "q"]}))
        got = step.wait_for_event("approval", "go", timeout="1 hour")
        return {"got": got["payload"]}


class Blocking(WorkflowEntrypoint):
    """One step that blocks until the test sets ``RELEASE`` (so ``running`` is observable)."""

    def run(self, event: Any, step: Any) -> Any:
        return step.do("hold", lambda: RELEASE.wait(10))


class Counted(WorkflowEntrypoint):
    """Counts each real execution of its three steps."""

    def run(self, event: Any, step: Any) -> Any:
        out = []
        for name in ("a", "b", "c"):

            def work(name: str = name) -> str:
                CALLS[name] += 1
                return name

            out.append(step.do(name, work))
        return out


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    CALLS.clear()
    RELEASE.clear()
    yield
    RELEASE.set()  # let any blocked step finish so the worker can stop
    CALLS.clear()


@pytest.fixture
def make_dashboard(engine: Engine) -> Iterator[Callable[..., Dashboard]]:
    """Builds dashboards and closes every one of them (and its thread) afterwards."""
    made: list[Dashboard] = []

    def make(**kwargs: Any) -> Dashboard:
        dash = Dashboard(engine, **kwargs)
        made.append(dash)
        return dash

    yield make
    for dash in made:
        dash.close()
        assert not dash.running


def status_of(engine: Engine, iid: str) -> str:
    return str(engine.instance(iid).status()["status"])


def test_table_lists_instances_with_their_status(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    gate = engine.register(Gate)
    gate.create(id="t1")
    gate.create(id="t2")
    engine.run_worker()  # both run up to their event wait
    gate.create(id="t3")
    dash = make_dashboard()
    dash.refresh()

    table = dash.instances
    assert list(table.columns) == [
        "id",
        "workflow",
        "status",
        "current_step",
        "steps_done",
        "age",
    ]
    assert list(table["id"]) == ["t3", "t2", "t1"]  # newest first
    assert dict(zip(table["id"], table["status"], strict=True)) == {
        "t1": "waiting",
        "t2": "waiting",
        "t3": "queued",
    }
    assert dict(zip(table["id"], table["steps_done"], strict=True)) == {"t1": 2, "t2": 2, "t3": 0}
    for text in ("t1", "t2", "t3", "waiting", "queued", "Gate"):
        assert text in dash.table.value
    assert list(dash.instance_select.options) == ["t3", "t2", "t1"]
    assert dash.selected is None  # nothing is selected until someone chooses


def test_selecting_shows_steps_and_a_steps_output(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    gate = engine.register(Gate)
    gate.create(id="s1")
    gate.create(id="s2")
    engine.run_worker()
    dash = make_dashboard()
    dash.refresh()

    dash.select("s1")
    assert dash.selected == "s1"
    steps = dash.steps
    assert steps is not None
    assert list(steps["step"]) == ["a", "load", "approval"]
    assert list(dash.step_select.options) == ["a", "load", "approval"]
    assert "s1" in dash.steps_html.value and "load" in dash.steps_html.value

    dash.select_step("load")
    assert isinstance(dash.output, pd.DataFrame)
    pd.testing.assert_frame_equal(dash.output, pd.DataFrame({"x": [1, 2], "y": ["p", "q"]}))
    assert "<table" in dash.output_html.value and "<td>q</td>" in dash.output_html.value
    dash.select_step("a#1")
    assert dash.selected_step == "a" and dash.output == {"a": 1}
    dash.select_step("approval")
    assert dash.output is None and "no result yet (waiting)" in dash.output_html.value

    with pytest.raises(LookupError, match="has no step 'nope'"):
        dash.select_step("nope")
    with pytest.raises(InstanceNotFoundError):
        dash.select("nope")
    with pytest.raises(ValueError):
        dash.select("bad id")

    # What a browser does: set the selector's value; the steps follow.
    dash.instance_select.value = "s2"
    assert "s2" in dash.steps_html.value and dash.selected_step is None
    dash.step_select.value = "a"
    assert dash.output == {"a": 1}

    # A refresh keeps the selection.
    dash.refresh()
    assert dash.selected == "s2" and dash.selected_step == "a"
    dash.select(None)
    assert dash.steps is None and dash.output_html.value == ""
    with pytest.raises(ValueError, match="select an instance first"):
        dash.select_step("a")


def test_pause_resume_terminate_and_event_buttons(
    worker_engine: Engine,
    make_dashboard: Callable[..., Dashboard],
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine = worker_engine
    gate = engine.register(Gate)
    gate.create(id="w1")
    gate.create(id="w2")
    poll(lambda: status_of(engine, "w1") == "waiting", what="w1 waiting")
    dash = make_dashboard()
    dash.refresh()
    dash.select("w1")

    dash.pause_button.click()
    assert status_of(engine, "w1") == "paused"
    assert dash.message.value.startswith("paused 'w1'")

    dash.pause_button.click()  # wrong state: reported, not raised
    assert "cannot pause instance 'w1': it is paused" in dash.message.value
    assert dash.message.style.text_color is not None

    dash.resume_button.click()
    assert status_of(engine, "w1") != "paused"
    assert dash.message.value == "resumed 'w1'"
    poll(lambda: status_of(engine, "w1") == "waiting", what="w1 waiting again")

    dash.event_type.value = "go"
    dash.event_payload.value = '{"ok": true}'
    dash.send_event_button.click()
    assert dash.message.value == "sent event 'go' to 'w1'"
    assert engine.instance("w1").wait(10) == {"status": "complete", "output": {"got": {"ok": True}}}

    dash.select("w2")
    dash.terminate_button.click()
    assert status_of(engine, "w2") == "terminated"
    dash.terminate_button.click()
    assert "cannot terminate instance 'w2': it is terminated" in dash.message.value
    dash.resume_button.click()
    assert "cannot resume instance 'w2'" in dash.message.value
    dash.send_event_button.click()
    assert "cannot send an event to instance 'w2'" in dash.message.value

    dash.refresh()
    statuses = dict(zip(dash.instances["id"], dash.instances["status"], strict=True))
    assert statuses == {"w1": "complete", "w2": "terminated"}
    assert capsys.readouterr() == ("", ""), "a click printed something"


def test_pause_during_a_running_step_waits_for_it(
    worker_engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    engine = worker_engine
    engine.register(Blocking).create(id="b1")
    poll(lambda: status_of(engine, "b1") == "running", what="b1 running")
    dash = make_dashboard()
    dash.select("b1")
    dash.pause_button.click()
    assert status_of(engine, "b1") == "waitingForPause"
    RELEASE.set()
    poll(lambda: status_of(engine, "b1") == "paused", what="b1 paused after its step")
    dash.resume_button.click()
    assert engine.instance("b1").wait(10) == {"status": "complete", "output": True}
    dash.refresh()
    assert dash.steps is not None and list(dash.steps["status"]) == ["complete"]


def test_restart_and_rerun_from_selected_step(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    engine.register(Counted).create(id="c1")
    engine.run_worker()
    assert CALLS == {"a": 1, "b": 1, "c": 1}
    dash = make_dashboard()
    dash.select("c1")

    dash.rerun_button.click()
    assert dash.message.value == "select a step to re-run from first"

    dash.select_step("b")
    dash.rerun_button.click()
    assert dash.message.value == "re-running 'c1' from step 'b'"
    assert status_of(engine, "c1") == "queued"
    engine.run_worker()
    assert CALLS == {"a": 1, "b": 2, "c": 2}

    dash.restart_button.click()
    assert dash.message.value == "restarted 'c1' from the beginning"
    engine.run_worker()
    assert CALLS == {"a": 2, "b": 3, "c": 3}
    assert status_of(engine, "c1") == "complete"


def test_controls_report_mistakes_in_the_message_area(
    engine: Engine,
    make_dashboard: Callable[..., Dashboard],
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine.register(Gate).create(id="m1")  # queued: no worker
    dash = make_dashboard()
    for button in (
        dash.pause_button,
        dash.resume_button,
        dash.terminate_button,
        dash.restart_button,
        dash.rerun_button,
        dash.send_event_button,
    ):
        button.click()
        assert dash.message.value == "select an instance first"

    dash.select("m1")
    dash.resume_button.click()
    assert "cannot resume instance 'm1': it is queued" in dash.message.value
    dash.send_event_button.click()
    assert dash.message.value == "type an event type first"
    dash.event_type.value = "bad/type"
    dash.send_event_button.click()
    assert "invalid event type 'bad/type'" in dash.message.value
    dash.event_type.value = "go"
    dash.event_payload.value = "{nope"
    dash.send_event_button.click()
    assert "the payload is not valid JSON" in dash.message.value
    assert status_of(engine, "m1") == "queued"

    dash.pause_button.click()  # a good click clears the error look
    assert dash.message.value.startswith("paused 'm1'")
    assert dash.message.style.text_color is None
    assert capsys.readouterr() == ("", "")


def test_background_refresh_follows_redis_until_closed(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    gate = engine.register(Gate)
    dash = make_dashboard(refresh_interval=0.05)
    dash.start()
    dash.start()  # idempotent: still one thread
    assert dash.running
    assert [t.name for t in threading.enumerate()].count("nbflow-dashboard") == 1
    gate.create(id="bg1")
    poll(lambda: "bg1" in list(dash.instances["id"]), what="bg1 in the refreshed table")
    assert "bg1" in dash.table.value
    dash.close()
    assert not dash.running
    assert "nbflow-dashboard" not in [t.name for t in threading.enumerate()]


def test_displaying_in_a_kernel_starts_the_refresh(
    engine: Engine,
    make_dashboard: Callable[..., Dashboard],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from IPython.core.formatters import DisplayFormatter

    formatter = DisplayFormatter()
    engine.register(Gate).create(id="k1")
    quiet = make_dashboard()
    data, _ = formatter.format(quiet)
    assert not quiet.running  # no kernel, no front end: nothing to keep fresh
    assert "k1" in data["text/html"]

    monkeypatch.setattr(widgets_module, "widgets_available", lambda: True)
    live = make_dashboard(refresh_interval=0.05)
    data, _ = formatter.format(live)
    assert "application/vnd.jupyter.widget-view+json" in data
    assert live.running
    live.stop()
    assert not live.running


def test_dashboard_arguments_are_checked(engine: Engine) -> None:
    with pytest.raises(TypeError, match="nbflow.Engine"):
        Dashboard("redis://localhost")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refresh_interval"):
        Dashboard(engine, refresh_interval=0)
    with pytest.raises(ValueError, match="limit"):
        Dashboard(engine, limit=0)
