"""``step.do`` (SPEC 2.1): its call forms, callbacks, replay, step names, results,
``steps()`` / ``step_output()``, params and the event (SPEC 2, 3.2, 3.3).

Every test runs real instances on a real Redis through the in-process worker.
Callbacks count their real runs in module-level ``Counter``s keyed by instance
id (the worker is a thread of this process), so "ran exactly once" is observed,
not assumed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest
from conftest import cleanup_prefix
from pandas.testing import assert_frame_equal, assert_series_equal
from support import wait_status

from nbflow import Engine, StepContext, WorkflowEntrypoint, WorkflowInstance

RUNS: Counter[tuple[str, str]] = Counter()
SEEN: dict[str, Any] = {}

STEP_COLUMNS = [
    "step",
    "kind",
    "count",
    "status",
    "attempts",
    "started_at",
    "finished_at",
    "duration_s",
    "output",
    "error",
    "stale",
    "progress",  # SPEC 8.4
    "message",
]


def ran(event: Any, name: str) -> None:
    RUNS[(event.instance_id, name)] += 1


def runs(inst: WorkflowInstance, name: str) -> int:
    return RUNS[(inst.id, name)]


def send_when_waiting(inst: WorkflowInstance, event_type: str, payload: Any = None) -> None:
    """Send an event only once the first run has parked, so the next run is a replay."""
    wait_status(inst, "waiting")
    inst.send_event(event_type, payload)


@pytest.fixture
def make_engine(redis_url: str, names: tuple[str, str]) -> Iterator[Any]:
    """Builds an Engine with extra options on the test's own prefix and queue."""
    prefix, queue = names
    made: list[Engine] = []

    def make(**options: Any) -> Engine:
        eng = Engine(redis_url, prefix=prefix, queue=queue, **options)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.stop_worker()
    if made:
        cleanup_prefix(made[0].redis, prefix, queue)


# --------------------------------------------------------------------------- forms


class AllForms(WorkflowEntrypoint):
    async def run(self, event, step):
        quick = {"retries": {"limit": 0}}
        a = await step.do("two args", lambda: 1)
        b = await step.do("config then callback", quick, lambda: 2)
        c = await step.do("callback then config=", lambda: 3, config=quick)

        @step.do("named decorator")
        def named():
            return 4

        @step.do()
        def empty_parens():
            return 5

        @step.do(config=quick)
        async def config_only():
            return 6

        d = await named()
        e = await empty_parens()
        f = await config_only()
        return [a, b, c, d, e, f]


def test_every_step_do_form_runs_its_callback_and_stores_its_result(worker_engine):
    inst = worker_engine.register(AllForms).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": [1, 2, 3, 4, 5, 6]}
    df = inst.steps()
    assert list(df["step"]) == [
        "two args",
        "config then callback",
        "callback then config=",
        "named decorator",
        "empty_parens",
        "config_only",
    ]
    assert list(df["output"]) == [1, 2, 3, 4, 5, 6]
    assert inst.step_output("empty_parens") == 5
    assert inst.step_output("config_only") == 6


class BareDecorator(WorkflowEntrypoint):
    async def run(self, event, step):
        @step.do
        def bare():
            ran(event, "bare")
            return 7

        return await bare()


def test_bare_decorator_without_parentheses_names_the_step_after_the_function(worker_engine):
    inst = worker_engine.register(BareDecorator).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": 7}
    assert list(inst.steps()["step"]) == ["bare"]
    assert runs(inst, "bare") == 1


class DecoratedNotCalled(WorkflowEntrypoint):
    async def run(self, event, step):
        @step.do("declared")
        def declared():
            ran(event, "declared")
            return 1

        @step.do("called")
        def called():
            ran(event, "called")
            return 2

        return await called()


def test_decorating_only_declares_a_step_calling_it_runs_it(worker_engine):
    inst = worker_engine.register(DecoratedNotCalled).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": 2}
    assert runs(inst, "declared") == 0
    assert runs(inst, "called") == 1
    assert list(inst.steps()["step"]) == ["called"]


class DecoratorConfigReachesContext(WorkflowEntrypoint):
    async def run(self, event, step):
        @step.do(config={"retries": {"limit": 2, "delay": "10 milliseconds"}})
        def with_ctx(ctx):
            return [ctx.name, ctx.config["retries"]["limit"]]

        return await with_ctx()


def test_decorator_config_is_applied_and_name_defaults_to_function_name(worker_engine):
    inst = worker_engine.register(DecoratorConfigReachesContext).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": ["with_ctx", 2]}


# --------------------------------------------------------------------------- callbacks


async def _async_callback():
    await asyncio.sleep(0.01)
    return "async"


class SyncAndAsyncCallbacks(WorkflowEntrypoint):
    async def run(self, event, step):
        s = await step.do("sync", lambda: "sync")
        a = await step.do("async", _async_callback)
        # a sync callable that returns an awaitable: the awaitable is awaited
        w = await step.do("returns awaitable", lambda: _async_callback())
        return [s, a, w]


def test_sync_async_and_awaitable_returning_callbacks_all_give_their_value(worker_engine):
    inst = worker_engine.register(SyncAndAsyncCallbacks).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": ["sync", "async", "async"]}


class ContextCallbacks(WorkflowEntrypoint):
    async def run(self, event, step):
        cfg = {"retries": {"limit": 3, "delay": "10 milliseconds"}}

        def describe(ctx: StepContext):
            assert isinstance(ctx, StepContext)
            return {
                "name": ctx.name,
                "count": ctx.count,
                "attempt": ctx.attempt,
                "limit": ctx.config["retries"]["limit"],
            }

        async def describe_async(ctx):
            return describe(ctx)

        first = await step.do("ctx", cfg, describe)
        second = await step.do("ctx", cfg, describe_async)
        default = await step.do("default config", describe)
        return [first, second, default]


def test_callback_taking_one_argument_receives_a_step_context(worker_engine):
    inst = worker_engine.register(ContextCallbacks).create()
    out = inst.wait(timeout=10)
    assert out["status"] == "complete", out
    first, second, default = out["output"]
    assert first == {"name": "ctx", "count": 1, "attempt": 1, "limit": 3}
    assert second == {"name": "ctx", "count": 2, "attempt": 1, "limit": 3}
    # no config: the resolved default (5 retries) is what the callback sees
    assert default == {"name": "default config", "count": 1, "attempt": 1, "limit": 5}


class PartialConfigMerges(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("c", {"retries": {"limit": 1}}, lambda ctx: ctx.config)


def test_context_config_is_the_partial_config_merged_over_the_defaults(worker_engine):
    inst = worker_engine.register(PartialConfigMerges).create()
    out = inst.wait(timeout=10)
    assert out["status"] == "complete", out
    cfg = out["output"]
    assert cfg["retries"]["limit"] == 1
    assert cfg["retries"]["backoff"] == "exponential"
    assert cfg["retries"]["delay"] in (10, 10.0, "10 seconds")
    assert cfg["timeout"] in (600, 600.0, "10 minutes")


# --------------------------------------------------------------------------- run flavours


class SyncRun(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("a", lambda: event.payload["x"] + 1)

        @step.do("b")
        def b():
            return a * 10

        value = b()
        assert not asyncio.iscoroutine(value)
        return {"a": a, "b": value, "type": type(value).__name__}


def test_sync_run_gets_step_values_directly(worker_engine):
    inst = worker_engine.register(SyncRun).create(params={"x": 1})
    assert inst.wait(timeout=10) == {
        "status": "complete",
        "output": {"a": 2, "b": 20, "type": "int"},
    }


class SyncRunAsyncCallback(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("async cb", _async_callback)


def test_sync_run_awaits_an_async_callback(worker_engine):
    inst = worker_engine.register(SyncRunAsyncCallback).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": "async"}


class Parallel(WorkflowEntrypoint):
    async def run(self, event, step):
        left_started, right_started = asyncio.Event(), asyncio.Event()

        async def side(mine, other, value):
            mine.set()
            # only returns if the other step runs at the same time
            await asyncio.wait_for(other.wait(), 2)
            return value

        once = {"retries": {"limit": 0}}
        return await asyncio.gather(
            step.do("left", once, lambda: side(left_started, right_started, "L")),
            step.do("right", once, lambda: side(right_started, left_started, "R")),
        )


def test_gathered_steps_run_in_parallel_and_are_both_stored(worker_engine):
    inst = worker_engine.register(Parallel).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": ["L", "R"]}
    df = inst.steps().set_index("step")
    assert set(df.index) == {"left", "right"}
    assert list(df.loc[["left", "right"], "status"]) == ["complete", "complete"]
    assert inst.step_output("left") == "L"
    assert inst.step_output("right") == "R"


class Nested(WorkflowEntrypoint):
    async def run(self, event, step):
        async def outer():
            ran(event, "outer")
            inner = await step.do("inner", lambda: ran(event, "inner") or 5)
            return inner + 1

        result = await step.do("outer", outer)
        await step.wait_for_event("go", "go")
        return result


def test_nested_step_inside_a_step_callback_is_stored_and_not_rerun(worker_engine):
    inst = worker_engine.register(Nested).create()
    send_when_waiting(inst, "go")
    assert inst.wait(timeout=10) == {"status": "complete", "output": 6}
    assert inst.step_output("inner") == 5
    assert inst.step_output("outer") == 6
    assert (runs(inst, "outer"), runs(inst, "inner")) == (1, 1)


class NestedSync(WorkflowEntrypoint):
    def run(self, event, step):
        def outer():
            return step.do("inner", lambda: 5) + 1

        return step.do("outer", outer)


def test_nested_step_works_in_a_sync_run(worker_engine):
    inst = worker_engine.register(NestedSync).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": 6}
    assert inst.step_output("inner") == 5


# --------------------------------------------------------------------------- replay


class StepThenEvent(WorkflowEntrypoint):
    async def run(self, event, step):
        def a():
            ran(event, "a")
            return event.payload["x"] * 2

        doubled = await step.do("a", a)
        got = await step.wait_for_event("approval", "approved")
        return {"a": doubled, "event": got["payload"]}


def test_completed_step_is_not_run_again_when_the_run_replays(worker_engine):
    inst = worker_engine.register(StepThenEvent).create(params={"x": 21})
    send_when_waiting(inst, "approved", {"ok": True})
    assert inst.wait(timeout=10) == {
        "status": "complete",
        "output": {"a": 42, "event": {"ok": True}},
    }
    assert runs(inst, "a") == 1


class SyncStepThenEvent(WorkflowEntrypoint):
    def run(self, event, step):
        doubled = step.do("a", lambda: ran(event, "a") or event.payload["x"] * 2)
        step.wait_for_event("approval", "approved")
        return doubled


def test_sync_run_replays_completed_steps_without_rerunning_them(worker_engine):
    inst = worker_engine.register(SyncStepThenEvent).create(params={"x": 4})
    send_when_waiting(inst, "approved")
    assert inst.wait(timeout=10) == {"status": "complete", "output": 8}
    assert runs(inst, "a") == 1


class Loop(WorkflowEntrypoint):
    async def run(self, event, step):
        out = []
        for i in range(3):
            out.append(await step.do("item", lambda i=i: ran(event, f"item{i}") or i * 10))
        await step.wait_for_event("go", "go")
        return out


def test_same_name_in_a_loop_makes_separate_numbered_steps(worker_engine):
    inst = worker_engine.register(Loop).create()
    send_when_waiting(inst, "go")
    assert inst.wait(timeout=10) == {"status": "complete", "output": [0, 10, 20]}
    df = inst.steps()
    items = df[df["step"] == "item"]
    assert list(items["count"]) == [1, 2, 3]
    assert list(items["output"]) == [0, 10, 20]
    assert inst.step_output("item") == 0
    assert inst.step_output("item#2") == 10
    assert inst.step_output("item#3") == 20
    assert [runs(inst, f"item{i}") for i in range(3)] == [1, 1, 1]


# --------------------------------------------------------------------------- steps()


class Mixed(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("b first", lambda: "b")
        await step.do("a second", lambda: {"k": [1, 2]})
        await step.sleep("nap", 0)
        got = await step.wait_for_event("evt", "ping")
        await step.do("b first", lambda: "b again")
        return got["payload"]


def test_steps_dataframe_has_the_spec_columns_one_row_per_step_in_start_order(worker_engine):
    inst = worker_engine.register(Mixed).create()
    send_when_waiting(inst, "ping", 7)
    assert inst.wait(timeout=10) == {"status": "complete", "output": 7}
    df = inst.steps()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == STEP_COLUMNS
    assert list(df["step"]) == ["b first", "a second", "nap", "evt", "b first"]
    assert list(df["kind"]) == ["do", "do", "sleep", "event", "do"]
    assert list(df["count"]) == [1, 1, 1, 1, 2]
    assert list(df["status"]) == ["complete"] * 5
    assert list(df["attempts"]) == [1, 1, 1, 1, 1]
    assert df["output"][0] == "b"
    assert df["output"][1] == {"k": [1, 2]}
    assert df["output"][4] == "b again"
    assert df["error"].isna().all()
    for started, finished, duration in zip(
        df["started_at"], df["finished_at"], df["duration_s"], strict=True
    ):
        assert started <= finished
        assert duration >= 0
    starts = list(df["started_at"])
    assert starts == sorted(starts)


def test_steps_of_an_instance_that_ran_nothing_is_an_empty_frame_with_the_columns(engine):
    inst = engine.register(Mixed).create()  # no worker: nothing ran
    df = inst.steps()
    assert list(df.columns) == STEP_COLUMNS
    assert len(df) == 0


def test_step_output_of_an_unknown_step_raises_lookup_error(worker_engine):
    inst = worker_engine.register(Loop).create()
    send_when_waiting(inst, "go")
    inst.wait(timeout=10)
    with pytest.raises(LookupError):
        inst.step_output("no such step")
    with pytest.raises(LookupError):
        inst.step_output("item#4")


# --------------------------------------------------------------------------- results


def make_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "n": pd.array([1, 2, 3], dtype="int64"),
            "x": [0.5, float("nan"), 2.5],
            "s": ["a", "b", "c"],
            "when": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"], utc=True),
            "flag": [True, False, True],
        },
        index=pd.Index(["r1", "r2", "r3"], name="row"),
    )


def make_frame2() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cat": pd.Categorical(["a", "b", "a"]),
            "maybe": pd.array([1, None, 3], dtype="Int64"),
            "td": pd.to_timedelta([1, 2, 3], unit="s"),
        },
        index=pd.date_range("2024-01-01", periods=3, tz="UTC", name="day"),
    )


def make_series() -> pd.Series:
    return pd.Series([1.5, 2.5], index=pd.Index([10, 20], name="k"), name="vals")


class Frames(WorkflowEntrypoint):
    async def run(self, event, step):
        frame = await step.do("frame", make_frame)
        series = await step.do("series", make_series)
        await step.do("frame2", make_frame2)
        await step.wait_for_event("go", "go")

        # after the replay, the next step sees the stored frame (a DataFrame again)
        def use():
            SEEN[event.instance_id] = (frame, series)
            return int(frame["n"].sum())

        return await step.do("use", use)


def test_dataframe_and_series_results_come_back_as_pandas_objects(worker_engine):
    inst = worker_engine.register(Frames).create()
    send_when_waiting(inst, "go")
    assert inst.wait(timeout=10) == {"status": "complete", "output": 6}
    out = inst.step_output("frame")
    assert isinstance(out, pd.DataFrame)
    assert_frame_equal(out, make_frame())
    assert_series_equal(inst.step_output("series"), make_series())
    assert_frame_equal(inst.step_output("frame2"), make_frame2())
    frame, series = SEEN.pop(inst.id)
    assert isinstance(frame, pd.DataFrame)
    assert_frame_equal(frame, make_frame())
    assert_series_equal(series, make_series())


AWARE = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
NAIVE = datetime(2024, 5, 1, 12, 30, 15)
BLOB = bytes(range(256))


class Scalars(WorkflowEntrypoint):
    async def run(self, event, step):
        fresh = await step.do(
            "values",
            lambda: {"bytes": BLOB, "aware": AWARE, "naive": NAIVE, "tuple": (1, (2, "x"))},
        )
        t = await step.do("tuple", lambda: (1, 2))
        await step.wait_for_event("go", "go")
        replayed = await step.do("values again", lambda: fresh)
        SEEN[event.instance_id] = {"fresh": fresh, "tuple": t, "replayed": replayed}
        return fresh


def test_bytes_and_datetimes_round_trip_and_tuples_come_back_as_lists(worker_engine):
    inst = worker_engine.register(Scalars).create()
    send_when_waiting(inst, "go")
    out = inst.wait(timeout=10)
    assert out["status"] == "complete", out
    expected = {"bytes": BLOB, "aware": AWARE, "naive": NAIVE, "tuple": [1, [2, "x"]]}
    assert out["output"] == expected
    stored = inst.step_output("values")
    assert stored == expected
    assert stored["aware"].tzinfo is not None
    assert stored["aware"].utcoffset() == timedelta(0)
    assert stored["naive"].tzinfo is None
    assert isinstance(stored["bytes"], bytes)
    assert inst.step_output("tuple") == [1, 2]
    seen = SEEN.pop(inst.id)
    # the replayed value (after the event) is what was stored
    assert seen["fresh"] == expected and seen["replayed"] == expected
    assert seen["tuple"] == [1, 2] and isinstance(seen["tuple"], list)


class TupleFirstRun(WorkflowEntrypoint):
    async def run(self, event, step):
        t = await step.do("t", lambda: (1, 2))
        return type(t).__name__


def test_a_tuple_result_is_a_list_even_on_the_run_that_computed_it(worker_engine):
    inst = worker_engine.register(TupleFirstRun).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": "list"}


# --------------------------------------------------------------------------- step names


class NamedStep(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do(event.payload["name"], lambda: ran(event, "cb") or "ran")


@pytest.mark.parametrize(
    "name",
    ["", "x" * 257, "line\nbreak", "tab\there", "nul\x00"],
    ids=["empty", "257-chars", "newline", "tab", "nul"],
)
def test_invalid_step_name_fails_the_instance_with_value_error(worker_engine, name):
    inst = worker_engine.register(NamedStep).create(params={"name": name})
    out = inst.wait(timeout=10)
    assert out["status"] == "errored", out
    assert out["error"]["name"] == "ValueError"
    assert runs(inst, "cb") == 0


@pytest.mark.parametrize(
    "name", ["x", "y" * 256, "charge card #1 (EUR) — ünïcode ✓"], ids=["1", "256", "free-text"]
)
def test_valid_step_names_are_accepted_and_listed_as_given(worker_engine, name):
    inst = worker_engine.register(NamedStep).create(params={"name": name})
    assert inst.wait(timeout=10) == {"status": "complete", "output": "ran"}
    assert list(inst.steps()["step"]) == [name]
    assert inst.step_output(name) == "ran"


class BadNameCaught(WorkflowEntrypoint):
    async def run(self, event, step):
        try:
            await step.do("bad\nname", lambda: ran(event, "cb"))
        except ValueError as exc:
            return ["ValueError", "name" in str(exc)]
        return "no error"


def test_invalid_step_name_raises_value_error_at_the_call(worker_engine):
    inst = worker_engine.register(BadNameCaught).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": ["ValueError", True]}
    assert runs(inst, "cb") == 0


# --------------------------------------------------------------------------- unstorable


class Unstorable(WorkflowEntrypoint):
    async def run(self, event, step):
        kind = event.payload["kind"]

        def produce():
            ran(event, "produce")
            return {"set": {1, 2}, "object": object(), "int-keys": {1: "a"}}[kind]

        try:
            await step.do(
                "bad result", {"retries": {"limit": 3, "delay": "10 milliseconds"}}, produce
            )
        except Exception:  # noqa: BLE001 - must not be able to swallow it
            return "swallowed"
        return "stored"


@pytest.mark.parametrize(
    "kind,type_name", [("set", "set"), ("object", "object"), ("int-keys", "int")]
)
def test_unstorable_result_errors_the_instance_at_once_naming_step_and_type(
    worker_engine, kind, type_name
):
    inst = worker_engine.register(Unstorable).create(params={"kind": kind})
    out = inst.wait(timeout=10)
    assert out["status"] == "errored", out
    message = out["error"]["message"]
    assert "bad result" in message
    assert type_name in message
    assert runs(inst, "produce") == 1  # no retries


class Big(WorkflowEntrypoint):
    async def run(self, event, step):
        def produce():
            ran(event, "produce")
            return "x" * 1000

        small = await step.do("small", lambda: "x" * 10)
        big = await step.do("big", {"retries": {"limit": 3, "delay": "10 milliseconds"}}, produce)
        return [small, big]


def test_result_larger_than_max_step_bytes_errors_the_instance_without_retries(make_engine):
    eng = make_engine(max_step_bytes=200)
    eng.start_worker()
    inst = eng.register(Big).create()
    out = inst.wait(timeout=10)
    assert out["status"] == "errored", out
    assert "big" in out["error"]["message"]
    assert runs(inst, "produce") == 1
    assert inst.step_output("small") == "x" * 10


def test_unstorable_params_raise_type_error_before_anything_is_written(engine):
    wf = engine.register(NamedStep)
    with pytest.raises(TypeError):
        wf.create(id="bad-params", params={"s": {1, 2}})
    with pytest.raises(TypeError):
        wf.create(params=object())
    assert list(engine.redis.scan_iter(match=f"{engine.prefix}:*")) == []
    assert engine.backend.queue_for(wf.name).count == 0
    assert len(engine.instances()) == 0
    with pytest.raises(LookupError):
        wf.get("bad-params")


# --------------------------------------------------------------------------- event, env, ctx


class EventView(WorkflowEntrypoint):
    async def run(self, event, step):
        ts = event["timestamp"]
        return {
            "instanceId": [event["instanceId"], event.instance_id],
            "workflowName": [event["workflowName"], event.workflow_name],
            "payload": [event["payload"], event.payload],
            "timestamp": ts,
            "same_ts": ts == event.timestamp,
            "offset": ts.utcoffset().total_seconds() if ts.tzinfo else None,
        }


def test_event_has_mapping_and_attribute_access_with_aware_utc_timestamp(worker_engine):
    wf = worker_engine.register(EventView, name="event-view")
    before = datetime.now(UTC)
    inst = wf.create(id="ev-1", params={"user": 7, "tags": ["a"]})
    after = datetime.now(UTC)
    out = inst.wait(timeout=10)
    assert out["status"] == "complete", out
    o = out["output"]
    assert o["instanceId"] == ["ev-1", "ev-1"]
    assert o["workflowName"] == ["event-view", "event-view"]
    assert o["payload"] == [{"user": 7, "tags": ["a"]}] * 2
    assert o["same_ts"] is True
    assert o["offset"] == 0.0
    assert before - timedelta(seconds=1) <= o["timestamp"] <= after + timedelta(seconds=1)


class MutatePayload(WorkflowEntrypoint):
    async def run(self, event, step):
        event.payload["x"] = 99
        event["payload"]["x"] = 98
        seen = await step.do("seen", lambda: event.payload["x"])
        await step.wait_for_event("go", "go")
        mine = event.payload
        mine["x"] = 97
        return {"seen": seen, "after replay": event.payload["x"], "mine": mine["x"]}


def test_mutating_event_payload_in_run_changes_neither_later_reads_nor_a_replay(worker_engine):
    inst = worker_engine.register(MutatePayload).create(params={"x": 1})
    send_when_waiting(inst, "go")
    assert inst.wait(timeout=10) == {
        "status": "complete",
        "output": {"seen": 1, "after replay": 1, "mine": 97},
    }


class EnvCtx(WorkflowEntrypoint):
    async def run(self, event, step):
        SEEN[event.instance_id] = (self.env, self.ctx)
        return await step.do("read env", lambda: self.env["greeting"])


def test_self_env_and_self_ctx_are_what_the_engine_was_given(make_engine):
    env = {"greeting": "hello"}
    ctx = object()
    eng = make_engine(env=env, ctx=ctx)
    eng.start_worker()
    inst = eng.register(EnvCtx).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": "hello"}
    seen_env, seen_ctx = SEEN.pop(inst.id)
    assert seen_env is env
    assert seen_ctx is ctx
