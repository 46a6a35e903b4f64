"""The live ``Dashboard`` (SPEC 6, 9), driven from code as a test would drive a browser.

Every control is exercised through its widget (``button.click()``, a click on a
table row or count, ``table.click("row:ID")``, setting a selector's value) or the
documented helpers (``select``, ``select_step``, ``filter``, ``refresh``).  Runs
happen either in a burst worker in the test's thread (``engine.run_worker()``,
deterministic) or in the in-process worker when a
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

from nbflow import Engine, InstanceNotFoundError, NonRetryableError, WorkflowEntrypoint
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
        "progress",
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
    assert 'data-nbflow-click="row:t1"' in dash.table.value  # each row is clickable
    assert dash.counts_by_status == {"queued": 1, "waiting": 2}
    assert "all 3" in dash.counts.value
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

    # What a browser does: a click on a table row selects; a click on a step row too.
    dash.table.click("row:s2")
    assert dash.selected == "s2"
    assert "s2" in dash.steps_html.value and dash.selected_step is None
    assert "background:#e7f1ff" in dash.table.value.split("row:s2")[1].split("</tr>")[0]
    dash.steps_html.click("step:load")
    assert dash.selected_step == "load"
    assert "shape (2, 2)" in dash.output_html.value
    dash.step_select.value = "a"
    assert dash.output == {"a": 1}

    # A refresh keeps the selection.
    dash.refresh()
    assert dash.selected == "s2" and dash.selected_step == "a"
    dash.table.click("row:nope")  # a row that went away meanwhile: said, not raised
    assert "nope" in dash.message.value and dash.selected == "s2"
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
    with pytest.raises(ValueError, match="rows"):
        Dashboard(engine, rows=0)


class Sized(WorkflowEntrypoint):
    """Three quick steps; the middle one reports progress and prints."""

    def run(self, event: Any, step: Any) -> Any:
        step.do("one", lambda: 1)

        def two(ctx: Any) -> int:
            progress = getattr(ctx, "progress", None)
            if progress is not None:
                progress(1, 2, "half")
            print("two says hi")
            return 2

        step.do("two", two)
        if (event.payload or {}).get("fail"):

            def boom() -> None:
                raise NonRetryableError("no luck")

            step.do("three", boom)
        return step.do("three", lambda: pd.DataFrame({"n": range(25)}))


def test_timeline_output_head_and_error_of_the_selected_instance(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    sized = engine.register(Sized)
    sized.create(id="ok")
    sized.create(id="bad", params={"fail": True})
    engine.run_worker()
    dash = make_dashboard()
    dash.select("ok")
    timeline = dash.timeline.value
    assert timeline.count("<rect") == 3  # one bar per step
    assert "#198754" in timeline  # complete steps are green
    for label in ("one", "two", "three"):
        assert f'data-nbflow-click="step:{label}"' in timeline
    dash.timeline.click("step:three")  # a click on a bar selects that step
    assert dash.selected_step == "three"
    assert "DataFrame, shape (25, 1); first 10 rows" in dash.output_html.value
    assert "<td>9</td>" in dash.output_html.value and "<td>10</td>" not in dash.output_html.value
    assert dash.error_html.value == ""

    dash.select("bad")
    assert "NonRetryableError: no luck" in dash.error_html.value
    assert "#dc3545" in dash.timeline.value  # the errored step is red


def test_logs_and_step_progress_of_the_selected_instance(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    probe = engine.register(Sized).create(id="lg")
    if not hasattr(probe, "logs"):
        pytest.skip("this engine has no inst.logs() yet (SPEC 8.3)")
    engine.run_worker()
    dash = make_dashboard()
    dash.select("lg")
    assert "two says hi" in dash.logs_html.value
    dash.select_step("one")
    assert "two says hi" not in dash.logs_html.value  # a selected step shows its own lines
    steps = dash.steps
    assert steps is not None and "progress" in steps.columns


def test_filters_and_counts_choose_what_the_table_and_bulk_buttons_cover(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    gate = engine.register(Gate)
    counted = engine.register(Counted)
    for n in range(3):
        gate.create(id=f"g{n}")
    counted.create(id="c1")
    engine.run_worker()  # gates wait for their event; c1 completes
    gate.create(id="g3")  # queued
    dash = make_dashboard()
    dash.refresh()
    assert dash.counts_by_status == {"queued": 1, "waiting": 3, "complete": 1}

    dash.filter(status="waiting")
    assert sorted(dash.instances["id"]) == ["g0", "g1", "g2"]
    assert dash.status_filter.value == "waiting"
    dash.filter(workflow="Counted")
    assert list(dash.instances["id"]) == ["c1"] and dash.filters["status"] is None
    assert dash.counts_by_status == {"complete": 1}
    dash.counts.click("status:")  # "all": the status filter goes, the workflow one stays
    assert list(dash.instances["id"]) == ["c1"]
    dash.filter()
    dash.counts.click("status:queued")  # a click on a count filters by that status
    assert list(dash.instances["id"]) == ["g3"]
    dash.status_filter.value = ""  # "all": what a browser does with the dropdown
    assert len(dash.instances) == 5
    with pytest.raises(ValueError, match="unknown status 'nope'"):
        dash.filter(status="nope")

    dash.filter(workflow="Gate")
    dash.bulk_terminate_button.click()
    assert dash.message.value == "terminated 4 of 4 instances the filters match"
    assert {status_of(engine, i) for i in ("g0", "g1", "g2", "g3")} == {"terminated"}
    assert status_of(engine, "c1") == "complete"  # not matched by the filter
    assert dash.counts_by_status == {"terminated": 4}  # the table shows it at once

    dash.bulk_resume_button.click()
    assert dash.message.value == "resumed 0 of 4 instances the filters match (4 not paused)"
    dash.bulk_restart_button.click()
    assert dash.message.value == "restarted 4 of 4 instances the filters match"
    assert {status_of(engine, i) for i in ("g0", "g1", "g2", "g3")} == {"queued"}
    engine.run_worker()
    dash.refresh()
    dash.filter(status="waiting")
    for iid in ("g0", "g1"):
        engine.instance(iid).pause()
    dash.refresh()
    dash.filter(status="paused")
    dash.bulk_resume_button.click()
    assert dash.message.value == "resumed 2 of 2 instances the filters match"


def test_fork_and_rerun_stale_buttons(
    engine: Engine, make_dashboard: Callable[..., Dashboard]
) -> None:
    engine.register(Counted).create(id="f1")
    engine.run_worker()
    dash = make_dashboard()
    dash.select("f1")
    dash.rerun_stale_button.click()
    assert "has no stale step" in dash.message.value

    dash.select_step("c")
    dash.fork_button.click()
    assert dash.message.value.startswith("forked 'f1' from step 'c' as '")
    fork_id = dash.selected
    assert fork_id is not None and fork_id != "f1"  # the fork is selected
    engine.run_worker()
    assert engine.instance(fork_id).wait(10)["output"] == ["a", "b", "c"]
    assert CALLS == {"a": 1, "b": 1, "c": 2}  # only the forked-from step ran again
    assert status_of(engine, "f1") == "complete"

    dash.select("f1")
    dash.fork_id.value = "f1-copy"
    dash.fork_button.click()  # no step selected: every completed step is copied
    assert dash.message.value == "forked 'f1' with all its completed steps as 'f1-copy'"
    assert dash.selected == "f1-copy"
    dash.fork_button.click()
    assert "f1-copy" in dash.message.value and "exists" in dash.message.value


def test_close_leaves_the_static_html_in_place_of_each_view(
    engine: Engine,
    make_dashboard: Callable[..., Dashboard],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Recorded:
        def __init__(self, bundle: dict[str, Any]) -> None:
            self.bundles = [bundle]

        def update(self, bundle: dict[str, Any]) -> None:
            self.bundles.append(bundle)

    shown: list[Recorded] = []

    def show(bundle: dict[str, Any]) -> Recorded:
        shown.append(Recorded(bundle))
        return shown[-1]

    engine.register(Gate).create(id="x1")
    monkeypatch.setattr(widgets_module, "widgets_available", lambda: True)
    monkeypatch.setattr(widgets_module, "show", show)
    monkeypatch.setattr(widgets_module, "route_beside_cells", lambda widget: False)
    dash = make_dashboard(refresh_interval=0.05)
    dash.display_in_kernel()
    dash.display_in_kernel()  # shown twice: both views leave their HTML
    assert len(shown) == 2 and "application/vnd.jupyter.widget-view+json" in shown[0].bundles[0]
    assert dash.running
    dash.close()
    assert not dash.running
    for output in shown:
        last = output.bundles[-1]
        assert set(last) == {"text/plain", "text/html"}  # no widget view any more
        assert "x1" in last["text/html"] and "queued" in last["text/html"]
        assert last["text/plain"] == f"Dashboard(engine prefix {engine.prefix!r})"
