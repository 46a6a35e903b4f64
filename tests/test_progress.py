"""Progress (SPEC 8.4): ``ctx.progress(done, total, message)`` from a running callback,
throttled and never blocking it, shown by ``steps()``, ``info()`` and status cards; an
instance also shows its steps done out of its workflow's last completed run."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from support import poll

from nbflow import Engine, StepContext, WorkflowEntrypoint
from nbflow.notebook import display
from nbflow.progress import FLUSH_INTERVAL

GATE = threading.Event()


class Counting(WorkflowEntrypoint):
    """Reports progress, then holds its step open until the test opens ``GATE``."""

    def run(self, event: Any, step: Any) -> int:
        def work(ctx: StepContext) -> int:
            ctx.progress(2, 5, "two of five")
            GATE.wait(20)
            ctx.progress(5, 5, "all five")
            return 5

        step.do("warm up", lambda: 0)
        n = step.do("work", work)
        return int(step.do("after", lambda: n))


@pytest.fixture(autouse=True)
def _closed_gate() -> Any:
    GATE.clear()
    yield
    GATE.set()


def progress_of(inst: Any, name: str) -> tuple[Any, Any] | None:
    """(progress, message) of step ``name``; None while the step has not started."""
    steps = inst.steps().set_index("step")
    if name not in steps.index:
        return None
    row = steps.loc[name]
    return row["progress"], row["message"]


def test_progress_of_a_running_step_shows_in_steps_and_its_last_value_stays(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(Counting).create(id="counting")
    # written by the flusher while the callback still runs (no step write happens)
    poll(lambda: progress_of(inst, "work") == (0.4, "two of five"), what="progress 0.4")
    assert inst.status()["status"] == "running"
    steps = inst.steps()
    assert list(steps.columns[-2:]) == ["progress", "message"]
    assert progress_of(inst, "warm up") == (None, None)  # reported nothing
    GATE.set()
    assert inst.wait(timeout=20) == {"status": "complete", "output": 5}
    # the value reported last before the step ended is stored with it
    assert progress_of(inst, "work") == (1.0, "all five")


def test_a_tight_loop_of_reports_is_throttled_to_a_few_writes(
    worker_engine: Engine, redis_url: str
) -> None:
    reports = 20000

    class Tight(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            def work(ctx: StepContext) -> None:
                for i in range(reports):
                    ctx.progress(i + 1, reports, f"item {i + 1}")
                GATE.wait(20)

            step.do("tight", work)

    seen: list[Any] = []
    client = redis.Redis.from_url(redis_url)
    sha = worker_engine.backend.scripts.progress.sha
    stop = threading.Event()

    def watch() -> None:
        with client.monitor() as monitor:
            ready.set()
            while not stop.is_set():
                command = monitor.next_command()["command"]
                if sha in command and "tight-1" in command:
                    seen.append(command)

    ready = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(5)
    try:
        inst = worker_engine.register(Tight).create(id="tight-1")
        # the value the loop ended on arrives while the step still runs
        poll(lambda: progress_of(inst, "tight") == (1.0, f"item {reports}"), what="last report")
        GATE.set()
        assert inst.wait(timeout=20)["status"] == "complete"
    finally:
        stop.set()
        client.ping()  # wakes the monitor so the thread sees stop
        watcher.join(5)
    # 20,000 reports, a handful of writes: one per FLUSH_INTERVAL (0.1 s) at most
    assert FLUSH_INTERVAL == 0.1
    assert 1 <= len(seen) < reports / 100


@pytest.mark.parametrize(
    ("args", "error", "text"),
    [
        ((-1,), ValueError, "done must be >= 0"),
        ((1.5,), ValueError, "without total must be a fraction between 0 and 1"),
        ((6, 5), ValueError, "done=6 is more than total=5"),
        ((1, 0), ValueError, "total must be > 0"),
        ((1, -3), ValueError, "total must be > 0"),
        ((float("nan"),), ValueError, "must be a finite number"),
        ((1, float("inf")), ValueError, "must be a finite number"),
        (("3",), TypeError, "done must be a number"),
        ((None,), TypeError, "done must be a number"),
        ((True,), TypeError, "done must be a number"),
        ((1, "10"), TypeError, "total must be a number"),
        ((1, 10, 7), TypeError, "message must be a str or None"),
    ],
)
def test_bad_progress_values_raise_at_the_call(
    args: tuple[Any, ...], error: type[Exception], text: str
) -> None:
    ctx = StepContext(name="s", count=1, attempt=1, config={})
    with pytest.raises(error, match=text.replace("(", r"\(")):
        ctx.progress(*args)


def test_a_bad_value_fails_inside_the_callback_where_it_can_be_caught(engine: Engine) -> None:
    class Bad(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> str:
            def work(ctx: StepContext) -> str:
                try:
                    ctx.progress(11, 10)
                except ValueError as exc:
                    return str(exc)
                return "no error"

            return str(step.do("bad", work))

    inst = engine.register(Bad).create(id="bad")
    engine.run_worker()
    out = inst.status()
    assert out["status"] == "complete"
    assert "done=11 is more than total=10" in out["output"]
    assert progress_of(inst, "bad") == (None, None)


def test_long_messages_are_cut_and_fractions_work_without_total(engine: Engine) -> None:
    class Frac(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            step.do("frac", lambda ctx: ctx.progress(0.25, message="m" * 500))

    inst = engine.register(Frac).create(id="frac")
    engine.run_worker()
    fraction, message = progress_of(inst, "frac")
    assert fraction == 0.25
    assert len(message) == 200 and message.endswith("…")


def test_reports_after_the_step_finished_are_ignored(engine: Engine) -> None:
    kept: list[StepContext] = []

    class Late(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            def first(ctx: StepContext) -> None:
                kept.append(ctx)
                ctx.progress(1, 1, "finished")

            step.do("first", first)
            step.do("second", lambda: kept[0].progress(0, 1, "too late"))

    inst = engine.register(Late).create(id="late")
    engine.run_worker()
    assert inst.status()["status"] == "complete"
    assert progress_of(inst, "first") == (1.0, "finished")
    assert progress_of(inst, "second") == (None, None)


def test_restart_from_a_step_drops_its_progress(engine: Engine) -> None:
    class Two(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            step.do("a", lambda ctx: ctx.progress(1, 2))
            step.do("b", lambda ctx: ctx.progress(2, 2) if event.payload["report"] else None)

    flow = engine.register(Two)
    inst = flow.create(id="two", params={"report": True})
    engine.run_worker()
    assert progress_of(inst, "b") == (1.0, None)
    engine.redis.hset(engine.keys.metadata(inst.id), "payload", '{"report": false}')
    inst.restart(from_step="b")
    engine.run_worker()
    assert progress_of(inst, "a") == (0.5, None)
    assert progress_of(inst, "b") == (None, None)


def test_cards_and_info_show_progress_and_steps_out_of_the_last_completed_run(
    worker_engine: Engine,
) -> None:
    flow = worker_engine.register(Counting)
    first = flow.create(id="first")
    poll(lambda: first.info()["progress"] == 0.4, what="first's progress")
    info = first.info()
    assert info["steps_expected"] is None  # no instance of Counting completed yet
    assert (info["current_step"], info["progress_message"]) == ("work", "two of five")
    card = display.instance_html(first)
    assert ">progress<" in card and "40% two of five" in card and "width:40.0%" in card
    assert ">1<" in card  # steps done, nothing to compare with yet
    GATE.set()
    assert first.wait(timeout=20)["status"] == "complete"
    assert first.info()["steps_expected"] == 3
    assert first.info()["progress"] is None  # finished: no bar
    assert ">progress<" not in display.instance_html(first)

    GATE.clear()
    second = flow.create(id="second")
    poll(lambda: second.info()["progress"] == 0.4, what="second's progress")
    info = second.info()
    assert (info["steps_done"], info["steps_expected"]) == (1, 3)
    card = display.instance_html(second)
    assert "1/3 steps" in card
    text = display.instance_text(second)
    assert text == "WorkflowInstance(id='second', workflow='Counting', status='running')"
    GATE.set()
    assert second.wait(timeout=20)["status"] == "complete"


def test_the_dashboard_step_view_draws_a_bar(engine: Engine) -> None:
    from nbflow.notebook.views import steps_table_html

    class Half(WorkflowEntrypoint):
        def run(self, event: Any, step: Any) -> None:
            step.do("half <done>", lambda ctx: ctx.progress(1, 2, "half & half"))

    inst = engine.register(Half).create(id="half")
    engine.run_worker()
    drawn = steps_table_html(inst.id, inst.steps(), None)
    assert "width:50.0%" in drawn and "50% half &amp; half" in drawn
    assert "half &lt;done&gt;" in drawn  # other cells still escaped
