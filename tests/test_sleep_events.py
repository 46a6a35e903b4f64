"""Sleeps and events (SPEC 2.4, 2.5), against a real Redis and real RQ workers.

Callbacks run in worker threads of this process, so module-level counters see
every real execution.  Waiting is done by polling with deadlines; no test asserts
that something happened *fast*, only that it happened and (where the spec says
so) not *before* a moment.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from support import poll

from nbflow import (
    Engine,
    EventTimeoutError,
    InstanceNotFoundError,
    InvalidStateError,
    WorkflowEntrypoint,
    WorkflowTimeoutError,
)

CALLS: Counter[str] = Counter()
_CALLS_LOCK = threading.Lock()
RECEIVED: list[Any] = []


def bump(key: str) -> int:
    with _CALLS_LOCK:
        CALLS[key] += 1
        return CALLS[key]


@pytest.fixture(autouse=True)
def _reset_module_state() -> Iterator[None]:
    CALLS.clear()
    RECEIVED.clear()
    yield
    CALLS.clear()
    RECEIVED.clear()


def wait_for_status(inst: Any, status: str, timeout: float = 5.0) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def check() -> bool:
        seen.append(inst.status())
        return seen[-1]["status"] == status

    poll(check, timeout, what=f"status {status!r} of {inst.id} (saw {seen[-1:]})")
    return seen[-1]


def keys_of(engine: Engine) -> dict[str, Any]:
    """Every key under the engine's prefix with its full content (to prove nothing was written)."""
    r = engine.redis
    out: dict[str, Any] = {}
    for key in sorted(r.scan_iter(match=f"{engine.prefix}:*", count=1000)):
        kind = r.type(key)
        if kind == b"hash":
            out[key.decode()] = r.hgetall(key)
        elif kind == b"list":
            out[key.decode()] = r.lrange(key, 0, -1)
        elif kind == b"zset":
            out[key.decode()] = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            out[key.decode()] = r.smembers(key)
        else:
            out[key.decode()] = r.dump(key)
    return out


def step_row(inst: Any, name: str) -> dict[str, Any]:
    df = inst.steps()
    rows = df[df["step"] == name]
    assert len(rows) == 1, f"expected one step row named {name!r}, got:\n{df}"
    row: dict[str, Any] = rows.iloc[0].to_dict()
    return row


# -- workflows -----------------------------------------------------------------------


class Nap(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("nap", event.payload["seconds"])
        return "up"


class Peek(WorkflowEntrypoint):
    """Reports, from inside a step (so while the worker is busy with it), another
    instance's status."""

    async def run(self, event, step):
        p = event.payload

        def look() -> str:
            eng = Engine(p["url"], prefix=p["prefix"], queue=p["queue"])
            return str(eng.instance(p["other"]).status()["status"])

        return await step.do("look", look)


class SleepUntil(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep_until("until", event.payload["when"])
        return "woke"


class SleepUntilThenStep(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep_until("until", event.payload["when"])
        return await step.do("after", lambda: bump("after"))


class SleepUntilNaive(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep_until("until", datetime.now() + timedelta(seconds=1))
        return "should not get here"


class PokeOrNap(WorkflowEntrypoint):
    """An event wait and a sleep side by side: the event wakes the instance early."""

    async def run(self, event, step):
        got, _ = await asyncio.gather(
            step.wait_for_event("poke", "poke", timeout="1 hour"),
            step.sleep("nap", event.payload["seconds"]),
        )
        return got["payload"]


class Approval(WorkflowEntrypoint):
    async def run(self, event, step):
        got = await step.wait_for_event("approval", "approved", timeout="1 hour")
        RECEIVED.append(got)
        return got["payload"]


class StepThenWait(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("prepare", lambda: bump("prepare"))
        got = await step.wait_for_event("wait", "go", timeout="1 hour")
        return got["payload"]


class TwoOfOneType(WorkflowEntrypoint):
    async def run(self, event, step):
        first = await step.wait_for_event("first", "tick", timeout="1 hour")
        second = await step.wait_for_event("second", "tick", timeout="1 hour")
        return [first["payload"], second["payload"]]


class GoThenNope(WorkflowEntrypoint):
    async def run(self, event, step):
        go = await step.wait_for_event("go", "go", timeout="1 hour")
        nope = await step.wait_for_event("nope", "nope", timeout="1 hour")
        return [go["payload"], nope["payload"]]


class CatchTimeout(WorkflowEntrypoint):
    async def run(self, event, step):
        try:
            await step.wait_for_event("never", "never", timeout="0.3 seconds")
        except EventTimeoutError as exc:
            return {
                "caught": type(exc).__name__,
                "is_workflow_timeout": isinstance(exc, WorkflowTimeoutError),
            }
        return "no timeout"


class UncaughtTimeout(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.wait_for_event("never", "never", timeout="0.3 seconds")
        return "no timeout"


class Quick(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("one", lambda: 1)


class Boom(WorkflowEntrypoint):
    async def run(self, event, step):
        raise RuntimeError("boom")


class WaitForever(WorkflowEntrypoint):
    async def run(self, event, step):
        got = await step.wait_for_event("wait", "go", timeout="1 hour")
        return got["payload"]


class BothEvents(WorkflowEntrypoint):
    async def run(self, event, step):
        a, b = await asyncio.gather(
            step.wait_for_event("wait a", "a", timeout="1 hour"),
            step.wait_for_event("wait b", "b", timeout="1 hour"),
        )
        return [a["payload"], b["payload"]]


class LongAndShortWait(WorkflowEntrypoint):
    async def run(self, event, step):
        long_, short = await asyncio.gather(
            step.wait_for_event("long", "long", timeout="1 hour"),
            step.wait_for_event("short", "short", timeout="0.5 seconds"),
            return_exceptions=True,
        )
        return {"long": type(long_).__name__, "short": type(short).__name__}


class WaitBesideStep(WorkflowEntrypoint):
    async def run(self, event, step):
        got, work = await asyncio.gather(
            step.wait_for_event("wait", "go", timeout="1 hour"),
            step.do("work", lambda: bump("work")),
        )
        return [got["payload"], work]


class TwoSleeps(WorkflowEntrypoint):
    async def run(self, event, step):
        await asyncio.gather(step.sleep("short", 0.3), step.sleep("long", 0.6))
        return "rested"


class SyncSleepAndEvent(WorkflowEntrypoint):
    def run(self, event, step):
        step.sleep("nap", "0.3 seconds")
        got = step.wait_for_event("wait", "go", timeout="1 hour")
        return got["payload"]


# -- sleeping --------------------------------------------------------------------------


def test_sleeping_instance_is_waiting_and_does_not_hold_the_single_worker(
    worker_engine: Engine, redis_url: str
) -> None:
    nap = worker_engine.register(Nap).create(params={"seconds": 1.5})
    wait_for_status(nap, "waiting")
    peek = worker_engine.register(Peek).create(
        params={
            "url": redis_url,
            "prefix": worker_engine.prefix,
            "queue": worker_engine.queue_name,
            "other": nap.id,
        }
    )
    # The one worker ran Peek to completion while Nap slept: Nap held no worker.
    assert peek.wait(timeout=5) == {"status": "complete", "output": "waiting"}
    assert nap.wait(timeout=10) == {"status": "complete", "output": "up"}


def test_sleep_is_recorded_as_a_step_of_kind_sleep(worker_engine: Engine) -> None:
    nap = worker_engine.register(Nap).create(params={"seconds": 0.5})
    wait_for_status(nap, "waiting")
    row = step_row(nap, "nap")
    assert row["kind"] == "sleep"
    assert row["status"] != "complete"
    assert nap.wait(timeout=10) == {"status": "complete", "output": "up"}
    row = step_row(nap, "nap")
    assert row["kind"] == "sleep"
    assert row["status"] == "complete"
    assert row["count"] == 1
    assert (row["finished_at"] - row["started_at"]).total_seconds() >= 0.5 - 0.01


@pytest.mark.parametrize(
    "when",
    [
        pytest.param(datetime.now(UTC) - timedelta(hours=1), id="aware-datetime"),
        pytest.param(0, id="epoch-zero"),
        pytest.param(time.time() - 60.0, id="epoch-float"),
    ],
)
def test_sleep_until_a_past_moment_returns_at_once(worker_engine: Engine, when: Any) -> None:
    inst = worker_engine.register(SleepUntilThenStep).create(params={"when": when})
    assert inst.wait(timeout=5) == {"status": "complete", "output": 1}
    events = [h["ev"] for h in inst.history()]
    assert "waiting" not in events, f"a sleep until a past moment parked the instance: {events}"
    assert step_row(inst, "until")["kind"] == "sleep"
    assert step_row(inst, "until")["status"] == "complete"
    assert CALLS["after"] == 1


def test_sleep_until_an_aware_datetime_in_another_zone_wakes_at_that_moment(
    worker_engine: Engine,
) -> None:
    plus5 = timezone(timedelta(hours=5))
    when = datetime.now(plus5) + timedelta(seconds=0.6)
    inst = worker_engine.register(SleepUntil).create(params={"when": when})
    wait_for_status(inst, "waiting")
    assert inst.wait(timeout=10) == {"status": "complete", "output": "woke"}
    row = step_row(inst, "until")
    assert row["kind"] == "sleep"
    assert row["finished_at"] >= when - timedelta(milliseconds=5)


def test_sleep_until_epoch_seconds_wakes_at_that_moment(worker_engine: Engine) -> None:
    when = time.time() + 0.6
    inst = worker_engine.register(SleepUntil).create(params={"when": when})
    wait_for_status(inst, "waiting")
    assert inst.wait(timeout=10) == {"status": "complete", "output": "woke"}
    row = step_row(inst, "until")
    assert row["finished_at"].timestamp() >= when - 0.005


def test_sleep_until_a_naive_datetime_errors_the_instance_with_value_error(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(SleepUntilNaive).create()
    result = inst.wait(timeout=5)
    assert result["status"] == "errored"
    assert result["error"]["name"] == "ValueError"
    assert "naive" in result["error"]["message"]


def test_sleep_replayed_after_worker_downtime_waits_only_the_remainder(
    worker_engine: Engine,
) -> None:
    nap = worker_engine.register(Nap).create(params={"seconds": 1.5})
    wait_for_status(nap, "waiting")
    worker_engine.stop_worker()
    time.sleep(1.0)  # the worker is down for most of the sleep
    assert nap.status() == {"status": "waiting"}
    worker_engine.start_worker()
    assert nap.wait(timeout=10) == {"status": "complete", "output": "up"}
    row = step_row(nap, "nap")
    slept = (row["finished_at"] - row["started_at"]).total_seconds()
    assert slept >= 1.5 - 0.01
    assert slept < 2.4, f"the sleep restarted its clock after the downtime: slept {slept:.2f}s"


def test_event_waking_a_sleeping_instance_does_not_restart_the_sleep_clock(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(PokeOrNap).create(params={"seconds": 1.5})
    wait_for_status(inst, "waiting")
    time.sleep(0.7)  # the event arrives half-way through the sleep
    inst.send_event("poke", "hi")
    assert inst.wait(timeout=10) == {"status": "complete", "output": "hi"}
    row = step_row(inst, "nap")
    slept = (row["finished_at"] - row["started_at"]).total_seconds()
    assert slept >= 1.5 - 0.01
    assert slept < 2.1, f"the replay slept a fresh full duration: slept {slept:.2f}s"


def test_sleep_timer_lives_in_redis_so_a_fresh_engine_finishes_it(
    engine: Engine, redis_url: str
) -> None:
    engine.register(Nap)
    nap = engine.workflow("Nap").create(params={"seconds": 2})
    engine.run_worker(burst=True)  # runs until the sleep, then nothing is due
    assert nap.status() == {"status": "waiting"}

    fresh = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    fresh.register(Nap)
    fresh.start_worker()
    try:
        again = fresh.workflow("Nap").get(nap.id)
        assert again.wait(timeout=10) == {"status": "complete", "output": "up"}
    finally:
        fresh.stop_worker()
    assert step_row(nap, "nap")["status"] == "complete"


def test_sync_run_can_sleep_and_wait_for_an_event(worker_engine: Engine) -> None:
    inst = worker_engine.register(SyncSleepAndEvent).create()
    wait_for_status(inst, "waiting")
    inst.send_event("go", {"n": 1})
    assert inst.wait(timeout=10) == {"status": "complete", "output": {"n": 1}}
    assert step_row(inst, "nap")["kind"] == "sleep"
    assert step_row(inst, "wait")["kind"] == "event"


# -- events ---------------------------------------------------------------------------


def test_wait_for_event_returns_type_payload_and_an_aware_timestamp(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(Approval).create()
    wait_for_status(inst, "waiting")
    before = datetime.now(UTC)
    inst.send_event("approved", {"by": "ann", "ok": True})
    after = datetime.now(UTC)
    assert inst.wait(timeout=5) == {"status": "complete", "output": {"by": "ann", "ok": True}}
    got = RECEIVED[-1]
    assert set(got) == {"type", "payload", "timestamp"}
    assert got["type"] == "approved"
    assert got["payload"] == {"by": "ann", "ok": True}
    ts = got["timestamp"]
    assert isinstance(ts, datetime)
    assert ts.tzinfo is not None and ts.utcoffset() is not None
    assert before - timedelta(seconds=1) <= ts <= after + timedelta(seconds=1)
    row = step_row(inst, "approval")
    assert row["kind"] == "event"
    assert row["status"] == "complete"


def test_event_sent_before_the_wait_is_buffered_and_consumed(engine: Engine) -> None:
    inst = engine.register(StepThenWait).create()
    assert inst.status() == {"status": "queued"}
    inst.send_event("go", [1, 2, 3])  # nobody is waiting yet: no worker has run it
    engine.run_worker(burst=True)
    assert inst.wait(timeout=5) == {"status": "complete", "output": [1, 2, 3]}
    assert CALLS["prepare"] == 1
    assert engine.redis.llen(f"{engine.prefix}:{inst.id}:events:go") == 0


def test_two_events_of_one_type_are_consumed_first_in_first_out(engine: Engine) -> None:
    inst = engine.register(TwoOfOneType).create()
    inst.send_event("tick", "first")
    inst.send_event("tick", "second")
    engine.run_worker(burst=True)
    assert inst.wait(timeout=5) == {"status": "complete", "output": ["first", "second"]}


def test_two_events_of_one_type_sent_while_waiting_are_consumed_in_order(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(TwoOfOneType).create()
    wait_for_status(inst, "waiting")
    inst.send_event("tick", 1)
    inst.send_event("tick", 2)
    assert inst.wait(timeout=5) == {"status": "complete", "output": [1, 2]}


def test_event_of_another_type_does_not_satisfy_the_wait_and_is_kept(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(GoThenNope).create()
    wait_for_status(inst, "waiting")
    inst.send_event("nope", "kept for later")
    time.sleep(0.3)  # give a wrong wake-up the time to happen
    assert inst.status() == {"status": "waiting"}
    assert step_row(inst, "go")["status"] != "complete"
    inst.send_event("go", "go!")
    assert inst.wait(timeout=5) == {"status": "complete", "output": ["go!", "kept for later"]}


def test_event_timeout_raises_event_timeout_error_that_run_can_catch(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(CatchTimeout).create()
    assert inst.wait(timeout=10) == {
        "status": "complete",
        "output": {"caught": "EventTimeoutError", "is_workflow_timeout": True},
    }
    row = step_row(inst, "never")
    assert row["kind"] == "event"
    assert row["status"] == "errored"
    assert row["error"]["name"] == "EventTimeoutError"
    assert (row["finished_at"] - row["started_at"]).total_seconds() >= 0.3 - 0.01


def test_uncaught_event_timeout_errors_the_instance(worker_engine: Engine) -> None:
    inst = worker_engine.register(UncaughtTimeout).create()
    result = inst.wait(timeout=10)
    assert result["status"] == "errored"
    assert result["error"]["name"] == "EventTimeoutError"
    assert "never" in result["error"]["message"]


def _finished(engine: Engine, how: str) -> Any:
    if how == "complete":
        inst = engine.register(Quick).create()
        engine.run_worker(burst=True)
    elif how == "errored":
        inst = engine.register(Boom).create()
        engine.run_worker(burst=True)
    else:
        inst = engine.register(WaitForever).create()
        engine.run_worker(burst=True)
        inst.terminate()
    assert inst.status()["status"] == how
    return inst


@pytest.mark.parametrize("how", ["complete", "errored", "terminated"])
def test_send_event_to_a_finished_instance_raises_invalid_state(engine: Engine, how: str) -> None:
    inst = _finished(engine, how)
    before = keys_of(engine)
    with pytest.raises(InvalidStateError, match=how):
        inst.send_event("go", "late")
    assert keys_of(engine) == before
    assert inst.status()["status"] == how


@pytest.mark.parametrize(
    "bad",
    ["", "-x", "a b", "a" * 101, "a:b", "a\n", 5, None, b"go"],
    ids=["empty", "leading-dash", "space", "101-chars", "colon", "newline", "int", "none", "bytes"],
)
def test_bad_event_type_raises_and_writes_nothing(engine: Engine, bad: Any) -> None:
    inst = engine.register(WaitForever).create()
    before = keys_of(engine)
    with pytest.raises((ValueError, TypeError)):
        inst.send_event(bad, "payload")
    assert keys_of(engine) == before


def test_event_type_of_100_characters_is_accepted(worker_engine: Engine) -> None:
    name = "e" * 100

    class LongType(WorkflowEntrypoint):
        async def run(self, event, step):
            got = await step.wait_for_event("long", name, timeout="1 hour")
            return got["payload"]

    inst = worker_engine.register(LongType).create()
    inst.send_event(name, "ok")
    assert inst.wait(timeout=5) == {"status": "complete", "output": "ok"}


@pytest.mark.parametrize(
    "payload",
    [{1, 2}, object(), {1: "int key"}, lambda: None],
    ids=["set", "object", "int-key-dict", "function"],
)
def test_unstorable_event_payload_raises_type_error_and_writes_nothing(
    engine: Engine, payload: Any
) -> None:
    inst = engine.register(WaitForever).create()
    before = keys_of(engine)
    with pytest.raises(TypeError):
        inst.send_event("go", payload)
    assert keys_of(engine) == before


def test_send_event_to_a_deleted_instance_raises_instance_not_found(engine: Engine) -> None:
    inst = engine.register(WaitForever).create()
    engine.run_worker(burst=True)
    inst.terminate()
    stale = engine.workflow("WaitForever").get(inst.id)
    doomed = list(engine.redis.scan_iter(match=f"{engine.prefix}:{inst.id}:*"))
    assert doomed
    engine.redis.delete(*doomed)
    assert stale.status() == {"status": "unknown"}
    with pytest.raises(InstanceNotFoundError):
        stale.send_event("go", "anyone there?")
    assert list(engine.redis.scan_iter(match=f"{engine.prefix}:{inst.id}:*")) == []


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")], ids=["a-then-b", "b-then-a"])
def test_parallel_waits_for_two_event_types_complete_after_both_arrive(
    worker_engine: Engine, order: tuple[str, str]
) -> None:
    inst = worker_engine.register(BothEvents).create()
    wait_for_status(inst, "waiting")
    first, second = order
    inst.send_event(first, f"payload {first}")
    time.sleep(0.3)  # one event alone must not finish the instance
    assert inst.status()["status"] in ("waiting", "queued", "running")
    inst.send_event(second, f"payload {second}")
    assert inst.wait(timeout=5) == {"status": "complete", "output": ["payload a", "payload b"]}


def test_parallel_event_wait_with_the_shorter_timeout_times_out_on_time(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(LongAndShortWait).create()
    wait_for_status(inst, "waiting")
    # "short" times out after 0.5 s; then the run goes on to wait for "long".
    poll(
        lambda: step_row_status(inst, "short") == "errored",
        timeout=4,
        what="the 0.5 s event wait to time out",
    )
    inst.send_event("long", 1)
    assert inst.wait(timeout=5) == {
        "status": "complete",
        "output": {"long": "dict", "short": "EventTimeoutError"},
    }


def step_row_status(inst: Any, name: str) -> str | None:
    df = inst.steps()
    rows = df[df["step"] == name]
    return None if rows.empty else str(rows.iloc[0]["status"])


def test_event_sent_while_paused_is_kept_and_consumed_after_resume(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(WaitForever).create()
    wait_for_status(inst, "waiting")
    inst.pause()
    assert inst.status() == {"status": "paused"}
    inst.send_event("go", "while paused")
    time.sleep(0.3)  # an event must not wake a paused instance
    assert inst.status() == {"status": "paused"}
    inst.resume()
    assert inst.wait(timeout=5) == {"status": "complete", "output": "while paused"}


def test_step_gathered_beside_an_event_wait_runs_while_the_instance_waits(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(WaitBesideStep).create()
    wait_for_status(inst, "waiting")
    try:
        poll(lambda: CALLS["work"] == 1, timeout=2, what="the parallel step to run")
    finally:
        inst.send_event("go", "went")
    assert inst.wait(timeout=5) == {"status": "complete", "output": ["went", 1]}
    assert CALLS["work"] == 1


def test_two_parallel_sleeps_end_after_the_longer_one(worker_engine: Engine) -> None:
    inst = worker_engine.register(TwoSleeps).create()
    wait_for_status(inst, "waiting")
    assert inst.wait(timeout=10) == {"status": "complete", "output": "rested"}
    short, long_ = step_row(inst, "short"), step_row(inst, "long")
    assert short["kind"] == long_["kind"] == "sleep"
    assert (short["finished_at"] - short["started_at"]).total_seconds() >= 0.3 - 0.01
    assert (long_["finished_at"] - long_["started_at"]).total_seconds() >= 0.6 - 0.01
    # Both sleeps ran side by side: the long one started before the short one ended.
    assert long_["started_at"] <= short["finished_at"]
