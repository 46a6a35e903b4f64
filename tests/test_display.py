"""Rich display (SPEC 3.3, 6): status cards, status tables, and stable plain text.

Outputs are produced the way a notebook produces them, through IPython's
``DisplayFormatter``.  The plain-text forms must be byte-for-byte stable across
runs (nbval compares stored outputs), so they are checked for anything that
changes by itself: memory addresses, widget model ids, uuids and clock times.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pytest
from IPython.core.formatters import DisplayFormatter
from support import poll

from nbflow import Engine, NonRetryableError, WorkflowEntrypoint, WorkflowInstance
from nbflow.notebook import display
from nbflow.notebook.display import (
    instance_widget,
    live_card_count,
    status_html,
    stop_live_cards,
    value_summary,
)
from nbflow.records import InstanceStatus
from nbflow.widgets import Dashboard

WIDGET = "application/vnd.jupyter.widget-view+json"
UNSTABLE = [
    re.compile(r"0x[0-9a-fA-F]{4,}"),  # memory addresses
    re.compile(r"[0-9a-f]{32}"),  # uuid4 hex: generated ids, widget model ids
    re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-"),  # dashed uuids
    re.compile(r"\d{1,2}:\d{2}"),  # clock times
    re.compile(r"\d{4}-\d{2}-\d{2}"),  # dates
]


class Checkout(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> Any:
        step.do("fetch user", lambda: {"user": event.payload["user"]})
        return step.do("bill", lambda: pd.DataFrame({"amount": [1.5, 2.5, 3.0]}))


class Declined(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> Any:
        def charge() -> None:
            raise NonRetryableError("card declined")

        return step.do("charge", charge)


class Approval(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> Any:
        step.do("prepare", lambda: 1)
        return step.wait_for_event("approval", "go", timeout="1 hour")["payload"]


@pytest.fixture
def fmt() -> Callable[[Any], dict[str, Any]]:
    formatter = DisplayFormatter()

    def format(obj: Any) -> dict[str, Any]:
        data, _ = formatter.format(obj)
        return dict(data)

    return format


@pytest.fixture(autouse=True)
def _no_live_cards_left() -> Iterator[None]:
    yield
    stop_live_cards()
    assert live_card_count() == 0


def assert_stable(text: str) -> None:
    for pattern in UNSTABLE:
        assert not pattern.search(text), f"{pattern.pattern!r} found in {text!r}"


def test_instance_card_queued_then_complete(
    engine: Engine, fmt: Callable[[Any], dict[str, Any]]
) -> None:
    inst = engine.register(Checkout).create(id="order-42", params={"user": 7})
    data = fmt(inst)
    assert set(data) == {"text/plain", "text/html"}  # no kernel here: no widget view
    assert data["text/plain"] == (
        "WorkflowInstance(id='order-42', workflow='Checkout', status='queued')"
    )
    assert "order-42" in data["text/html"] and "Checkout" in data["text/html"]
    assert ">queued</span>" in data["text/html"]
    assert fmt(inst) == data  # same state, same output

    engine.run_worker()
    data = fmt(inst)
    assert data["text/plain"] == (
        "WorkflowInstance(id='order-42', workflow='Checkout', status='complete')"
    )
    card = data["text/html"]
    assert ">complete</span>" in card
    assert "<th" in card and "steps done" in card and "<td" in card and ">2<" in card
    assert "DataFrame: 3 rows × 1 column" in card
    assert inst._repr_html_() == card
    assert_stable(data["text/plain"])


def test_errored_card_shows_the_error(engine: Engine, fmt: Callable[[Any], dict[str, Any]]) -> None:
    inst = engine.register(Declined).create(id="d1")
    engine.run_worker()
    data = fmt(inst)
    assert data["text/plain"] == "WorkflowInstance(id='d1', workflow='Declined', status='errored')"
    assert ">errored</span>" in data["text/html"]
    assert "NonRetryableError: card declined" in data["text/html"]


def test_waiting_card_names_the_current_step(
    engine: Engine, fmt: Callable[[Any], dict[str, Any]]
) -> None:
    inst = engine.register(Approval).create(id="a1")
    engine.run_worker()
    summary = display.summarize(inst)
    assert (summary.status, summary.current_step, summary.steps_done) == ("waiting", "approval", 1)
    assert ">approval<" in fmt(inst)["text/html"]


def test_generated_ids_and_missing_instances_stay_stable(
    engine: Engine, fmt: Callable[[Any], dict[str, Any]]
) -> None:
    inst = engine.register(Checkout).create(params={"user": 1})
    text = fmt(inst)["text/plain"]
    assert text == "WorkflowInstance(id=<generated>, workflow='Checkout', status='queued')"
    assert inst.id in fmt(inst)["text/html"]  # people reading the card still see it

    ghost = WorkflowInstance(engine, "ghost", "Checkout")
    assert fmt(ghost)["text/plain"] == (
        "WorkflowInstance(id='ghost', workflow='Checkout', status='unknown')"
    )


def test_status_dict_displays_as_a_table(fmt: Callable[[Any], dict[str, Any]]) -> None:
    status = InstanceStatus({"status": "complete", "output": pd.DataFrame({"n": [1, 2]})})
    assert isinstance(status, dict)
    data = fmt(status)
    assert "text/plain" in data
    assert "nbflow-status" in data["text/html"] and ">complete</span>" in data["text/html"]
    assert "<table" in data["text/html"].split("nbflow-status", 1)[1]  # the DataFrame, as a table
    errored = status_html({"status": "errored", "error": {"name": "KeyError", "message": "'x'"}})
    assert "KeyError: &#x27;x&#x27;" in errored


def test_value_summary() -> None:
    assert value_summary(pd.DataFrame({"a": [1], "b": [2]})) == "DataFrame: 1 row × 2 columns"
    assert value_summary(pd.Series([1, 2])) == "Series: 2 values"
    assert value_summary(b"abc") == "3 bytes"
    assert value_summary({"k": "v"}) == "{'k': 'v'}"
    assert value_summary("x" * 500, width=10) == "'" + "x" * 8 + "…"


def test_dashboard_plain_text_is_stable(
    engine: Engine,
    fmt: Callable[[Any], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine.register(Checkout).create(id="one", params={"user": 1})
    dash = Dashboard(engine)
    try:
        data = fmt(dash)
        expected = f"Dashboard(engine prefix {engine.prefix!r})"
        assert data["text/plain"] == expected == repr(dash)
        assert "one" in data["text/html"] and ">queued</span>" in data["text/html"]
        assert_stable(data["text/plain"])
        assert_stable(data["text/html"])  # the static table has no ages or times
        engine.register(Checkout).create(id="two", params={"user": 2})
        dash.refresh()
        assert fmt(dash)["text/plain"] == expected  # counts changed, the text did not

        monkeypatch.setattr("nbflow.notebook.widgets.widgets_available", lambda: True)
        live = fmt(dash)
        assert live[WIDGET]["model_id"] == dash.model_id
        assert live["text/plain"] == expected
        assert "text/html" in live
        assert dash.running
    finally:
        dash.close()
    assert not dash.running


class RecordedOutput:
    """What ``nbflow.notebook.outputs.show`` returns, recording each update."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.bundles = [bundle]

    def update(self, bundle: dict[str, Any]) -> None:
        if bundle != self.bundles[-1]:
            self.bundles.append(bundle)

    @property
    def html(self) -> str:
        return str(self.bundles[-1]["text/html"])


def test_a_displayed_card_is_html_that_follows_its_instance(
    engine: Engine,
    fmt: Callable[[Any], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbflow.notebook import outputs

    shown: list[RecordedOutput] = []

    def show(bundle: dict[str, Any]) -> RecordedOutput:
        shown.append(RecordedOutput(bundle))
        return shown[-1]

    monkeypatch.setattr(display, "widgets_available", lambda: True)
    monkeypatch.setattr(outputs, "show", show)
    monkeypatch.setattr(display, "FINAL_EVERY", 1)
    approval = engine.register(Approval)
    inst = approval.create(id="live1")
    engine.run_worker()

    data = fmt(inst)  # no widget view: a saved notebook keeps HTML every front end shows
    assert set(data) == {"text/plain", "text/html"}
    assert (
        data["text/plain"] == "WorkflowInstance(id='live1', workflow='Approval', status='waiting')"
    )
    assert_stable(data["text/plain"])

    display.instance_display(inst)  # what a kernel does with `inst` as a cell's value
    (card,) = shown
    assert ">waiting</span>" in card.html and card.bundles[0]["text/plain"] == data["text/plain"]
    assert live_card_count() == 1

    inst.send_event("go", {"ok": True})
    engine.run_worker()
    poll(lambda: ">complete</span>" in card.html, what="the card to show complete")
    assert card.bundles[-1]["text/plain"].endswith("status='complete')")

    # A finished instance restarted from the dashboard: the card follows it back.
    dash = Dashboard(engine)
    try:
        dash.select("live1")
        dash.restart_button.click()
        poll(lambda: ">queued</span>" in card.html, what="the card to show the restart")
    finally:
        dash.close()
    engine.run_worker()  # and on to its event wait again
    poll(lambda: ">waiting</span>" in card.html, what="the card to show waiting again")


def test_a_live_card_widget_refreshes_until_final(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    approval = engine.register(Approval)
    inst = approval.create(id="live1")
    engine.run_worker()
    card = instance_widget(inst, refresh_interval=0.05)
    assert ">waiting</span>" in card.value
    closed = instance_widget(approval.create(id="live2"), refresh_interval=0.05)
    closed.close()  # a closed card stops being refreshed
    assert live_card_count() >= 2

    inst.send_event("go", {"ok": True})
    engine.run_worker()
    poll(lambda: ">complete</span>" in card.value, what="the live card to show complete")
    poll(lambda: live_card_count() == 0, what="every live card to stop")
    card.close()


def test_the_shared_refresher_logs_failures_and_stops_when_nothing_is_left(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from nbflow.notebook.refresher import Refresher

    ticks: list[int] = []
    reported: list[str] = []

    def tick() -> bool:
        ticks.append(len(ticks))
        if len(ticks) == 2:
            raise RuntimeError("redis went away")
        return len(ticks) < 4  # the 4th tick finds nothing left to refresh

    def on_error(exc: Exception) -> bool:
        reported.append(str(exc))
        return True

    refresher = Refresher(
        "nbflow-test-refresher", tick, 0.01, what="test refresh", on_error=on_error
    )
    with caplog.at_level("WARNING", logger="nbflow"):
        refresher.start()
        refresher.start()  # idempotent: still one thread
        poll(lambda: not refresher.running, what="the refresher to end by itself")
    assert len(ticks) >= 4 and reported == ["redis went away"]
    assert "nbflow: test refresh failed: redis went away" in caplog.text
    names = [t.name for t in threading.enumerate()]
    assert "nbflow-test-refresher" not in names
    refresher.start()  # a new thread after the old one ended
    poll(lambda: not refresher.running, what="the second thread to end")
    refresher.stop()
    assert capsys.readouterr() == ("", ""), "a refresh thread printed something"
