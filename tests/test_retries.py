"""Retries, backoff, per-attempt timeouts and step configs (SPEC 2.2, 2.3).

Callbacks record each real attempt (its ``StepContext.attempt`` and
``time.monotonic()``) in module-level dicts keyed by instance id: the in-process
worker is a thread of this process, so what the engine really did is observed.
Timing asserts are lower bounds only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from support import wait_status

from nbflow import (
    NonRetryableError,
    StepTimeoutError,
    WorkflowEntrypoint,
    WorkflowInstance,
    WorkflowTimeoutError,
)

ATTEMPTS: defaultdict[str, list[int]] = defaultdict(list)
TIMES: defaultdict[str, list[float]] = defaultdict(list)

#: Set at the end of each test so blocked sync callbacks (which cannot be killed) return.
RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _release_blocked_callbacks() -> Iterator[None]:
    RELEASE.clear()
    yield
    RELEASE.set()


class FlakyError(Exception):
    """A user's own exception type (module level, so it can be found again on replay)."""


class PermanentError(NonRetryableError):
    """A subclass of NonRetryableError also stops retries."""


def attempt_log(inst: WorkflowInstance) -> list[int]:
    return ATTEMPTS[inst.id]


def fast(limit: int, backoff: str = "constant", **extra: Any) -> dict[str, Any]:
    return {"retries": {"limit": limit, "delay": "10 milliseconds", "backoff": backoff}, **extra}


# --------------------------------------------------------------------------- retries


class FailsTwice(WorkflowEntrypoint):
    async def run(self, event, step):
        def flaky(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            if ctx.attempt <= 2:
                raise FlakyError(f"boom {ctx.attempt}")
            return f"ok on {ctx.attempt}"

        return await step.do("flaky", fast(event.payload["limit"]), flaky)


def test_step_failing_twice_then_succeeding_with_limit_2_completes_after_3_attempts(
    worker_engine,
):
    inst = worker_engine.register(FailsTwice).create(params={"limit": 2})
    assert inst.wait(timeout=10) == {"status": "complete", "output": "ok on 3"}
    assert attempt_log(inst) == [1, 2, 3]
    row = inst.steps().iloc[0]
    assert (row["step"], row["status"], row["attempts"]) == ("flaky", "complete", 3)
    assert inst.step_output("flaky") == "ok on 3"


def test_retries_running_out_errors_the_instance_with_the_last_error(worker_engine):
    inst = worker_engine.register(FailsTwice).create(params={"limit": 1})
    assert inst.wait(timeout=10) == {
        "status": "errored",
        "error": {"name": "FlakyError", "message": "boom 2"},
    }
    assert attempt_log(inst) == [1, 2]
    row = inst.steps().iloc[0]
    assert (row["status"], row["attempts"]) == ("errored", 2)
    assert row["error"] == {"name": "FlakyError", "message": "boom 2"}


def test_limit_0_means_exactly_one_attempt(worker_engine):
    inst = worker_engine.register(FailsTwice).create(params={"limit": 0})
    assert inst.wait(timeout=10) == {
        "status": "errored",
        "error": {"name": "FlakyError", "message": "boom 1"},
    }
    assert attempt_log(inst) == [1]


class SyncFailsTwice(WorkflowEntrypoint):
    def run(self, event, step):
        def flaky(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            if ctx.attempt <= 2:
                raise FlakyError(f"boom {ctx.attempt}")
            return ctx.attempt

        return step.do("flaky", flaky, config=fast(event.payload["limit"]))


@pytest.mark.parametrize("limit,expected", [(2, "complete"), (1, "errored")])
def test_sync_run_retries_the_same_way(worker_engine, limit, expected):
    inst = worker_engine.register(SyncFailsTwice).create(params={"limit": limit})
    out = inst.wait(timeout=10)
    assert out["status"] == expected, out
    assert attempt_log(inst) == list(range(1, limit + 2))
    if expected == "errored":
        assert out["error"] == {"name": "FlakyError", "message": "boom 2"}
    else:
        assert out["output"] == 3


class NonRetryable(WorkflowEntrypoint):
    async def run(self, event, step):
        cls = PermanentError if event.payload["subclass"] else NonRetryableError

        def fail(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            raise cls("card declined")

        return await step.do("charge", fast(5), fail)


@pytest.mark.parametrize("subclass,name", [(False, "NonRetryableError"), (True, "PermanentError")])
def test_non_retryable_error_stops_at_the_first_attempt(worker_engine, subclass, name):
    inst = worker_engine.register(NonRetryable).create(params={"subclass": subclass})
    assert inst.wait(timeout=10) == {
        "status": "errored",
        "error": {"name": name, "message": "card declined"},
    }
    assert attempt_log(inst) == [1]
    assert inst.steps().iloc[0]["attempts"] == 1


class CaughtFailureThenEvent(WorkflowEntrypoint):
    async def run(self, event, step):
        def flaky(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            raise FlakyError(f"boom {ctx.attempt}")

        try:
            await step.do("flaky", fast(2), flaky)
            caught = None
        except FlakyError as exc:
            caught = [type(exc).__name__, str(exc)]
        await step.wait_for_event("go", "go")
        after = await step.do("after", lambda: "after")
        return {"caught": caught, "after": after}


def test_a_finally_failed_step_raises_the_same_error_again_on_replay(worker_engine):
    inst = worker_engine.register(CaughtFailureThenEvent).create()
    wait_status(inst, "waiting")
    assert attempt_log(inst) == [1, 2, 3]
    inst.send_event("go")
    # the output comes from the replay run: the stored error was raised again there
    assert inst.wait(timeout=10) == {
        "status": "complete",
        "output": {"caught": ["FlakyError", "boom 3"], "after": "after"},
    }
    assert attempt_log(inst) == [1, 2, 3]  # limit + 1 in total, none on replay


class CaughtBuiltinThenEvent(WorkflowEntrypoint):
    async def run(self, event, step):
        def lookup():
            ATTEMPTS[event.instance_id].append(1)
            return {}["missing"]

        try:
            await step.do("lookup", {"retries": {"limit": 0}}, lookup)
        except KeyError as exc:
            caught = [type(exc).__name__, str(exc)]
        live = str(KeyError("missing"))
        await step.wait_for_event("go", "go")
        return {"caught": caught, "live": live}


def test_a_replayed_key_error_keeps_its_message(worker_engine):
    inst = worker_engine.register(CaughtBuiltinThenEvent).create()
    wait_status(inst, "waiting")
    inst.send_event("go")
    out = inst.wait(timeout=10)
    assert out["status"] == "complete", out
    assert out["output"]["caught"] == ["KeyError", out["output"]["live"]]
    assert attempt_log(inst) == [1]


class HttpError(Exception):
    """A user exception whose constructor takes more than a message."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status


class CaughtHttpErrorThenEvent(WorkflowEntrypoint):
    async def run(self, event, step):
        def call():
            ATTEMPTS[event.instance_id].append(1)
            raise HttpError(503, "unavailable")

        try:
            await step.do("call", {"retries": {"limit": 0}}, call)
        except HttpError as exc:
            caught = [type(exc).__name__, str(exc)]
        await step.wait_for_event("go", "go")
        return caught


def test_a_replayed_error_keeps_its_type_when_its_class_takes_several_arguments(worker_engine):
    inst = worker_engine.register(CaughtHttpErrorThenEvent).create()
    wait_status(inst, "waiting")
    inst.send_event("go")
    assert inst.wait(timeout=10) == {
        "status": "complete",
        "output": ["HttpError", "HTTP 503: unavailable"],
    }
    assert attempt_log(inst) == [1]


# --------------------------------------------------------------------------- backoff


class Backoff(WorkflowEntrypoint):
    async def run(self, event, step):
        cfg = {
            "retries": {"limit": 3, "delay": "50 milliseconds", "backoff": event.payload["b"]},
        }

        def flaky(ctx):
            TIMES[event.instance_id].append(time.monotonic())
            if ctx.attempt <= 3:
                raise FlakyError(f"boom {ctx.attempt}")
            return ctx.attempt

        return await step.do("flaky", cfg, flaky)


class SyncBackoff(WorkflowEntrypoint):
    def run(self, event, step):
        cfg = {
            "retries": {"limit": 3, "delay": "50 milliseconds", "backoff": event.payload["b"]},
        }

        def flaky(ctx):
            TIMES[event.instance_id].append(time.monotonic())
            if ctx.attempt <= 3:
                raise FlakyError(f"boom {ctx.attempt}")
            return ctx.attempt

        return step.do("flaky", cfg, flaky)


@pytest.mark.parametrize("cls", [Backoff, SyncBackoff], ids=["async-run", "sync-run"])
@pytest.mark.parametrize(
    "backoff,waits",
    [
        ("constant", [0.05, 0.05, 0.05]),
        ("linear", [0.05, 0.10, 0.15]),
        ("exponential", [0.05, 0.10, 0.20]),
    ],
)
def test_wait_before_each_retry_follows_the_backoff(worker_engine, cls, backoff, waits):
    inst = worker_engine.register(cls).create(params={"b": backoff})
    assert inst.wait(timeout=10) == {"status": "complete", "output": 4}
    times = TIMES[inst.id]
    assert len(times) == 4
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for n, (gap, wait) in enumerate(zip(gaps, waits, strict=True), start=1):
        assert gap >= wait - 0.001, f"retry {n}: waited {gap:.3f}s, spec says {wait}s"


# --------------------------------------------------------------------------- timeouts


class SlowAsync(WorkflowEntrypoint):
    async def run(self, event, step):
        async def slow(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            await asyncio.sleep(5)
            return "too late"

        return await step.do("slow", {**fast(0), "timeout": "0.2 seconds"}, slow)


class SlowSync(WorkflowEntrypoint):
    async def run(self, event, step):
        def slow(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            RELEASE.wait(5)  # blocks like time.sleep(5) until the test ends
            return "too late"

        return await step.do("slow", {**fast(0), "timeout": "0.2 seconds"}, slow)


class SlowSyncInSyncRun(WorkflowEntrypoint):
    def run(self, event, step):
        def slow(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            RELEASE.wait(5)
            return "too late"

        return step.do("slow", {**fast(0), "timeout": "0.2 seconds"}, slow)


@pytest.mark.parametrize(
    "cls", [SlowAsync, SlowSync, SlowSyncInSyncRun], ids=["async-cb", "sync-cb", "sync-run"]
)
def test_an_attempt_running_over_its_timeout_fails_with_step_timeout_error(worker_engine, cls):
    inst = worker_engine.register(cls).create()
    out = inst.wait(timeout=4)  # well before the 5 s callback would return
    assert out["status"] == "errored", out
    assert out["error"]["name"] == "StepTimeoutError"
    assert "slow" in out["error"]["message"]
    assert attempt_log(inst) == [1]
    assert inst.steps().iloc[0]["status"] == "errored"


class TimeoutThenSuccess(WorkflowEntrypoint):
    async def run(self, event, step):
        async def slow_once(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            if ctx.attempt == 1:
                await asyncio.sleep(5)
            return f"done on {ctx.attempt}"

        return await step.do("slow once", {**fast(1), "timeout": "0.2 seconds"}, slow_once)


def test_a_timed_out_attempt_counts_as_a_failed_attempt_and_is_retried(worker_engine):
    inst = worker_engine.register(TimeoutThenSuccess).create()
    assert inst.wait(timeout=5) == {"status": "complete", "output": "done on 2"}
    assert attempt_log(inst) == [1, 2]
    assert inst.steps().iloc[0]["attempts"] == 2


class TimeoutCaught(WorkflowEntrypoint):
    async def run(self, event, step):
        async def slow(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            await asyncio.sleep(5)

        try:
            await step.do("slow", {**fast(1), "timeout": "0.2 seconds"}, slow)
        except WorkflowTimeoutError as exc:
            return [type(exc).__name__, isinstance(exc, StepTimeoutError)]
        return "no timeout"


def test_step_timeout_error_is_a_workflow_timeout_error_run_can_catch(worker_engine):
    inst = worker_engine.register(TimeoutCaught).create()
    assert inst.wait(timeout=5) == {"status": "complete", "output": ["StepTimeoutError", True]}
    assert attempt_log(inst) == [1, 2]


# --------------------------------------------------------------------------- long retry waits


class LongRetryWait(WorkflowEntrypoint):
    async def run(self, event, step):
        def flaky(ctx):
            ATTEMPTS[event.instance_id].append(ctx.attempt)
            TIMES[event.instance_id].append(time.monotonic())
            if ctx.attempt == 1:
                raise FlakyError("first try fails")
            return "second try works"

        cfg = {"retries": {"limit": 1, "delay": "2 seconds", "backoff": "constant"}}
        return await step.do("flaky", cfg, flaky)


class Quick(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("quick", lambda: "quick")


def test_a_long_retry_wait_parks_the_instance_and_frees_the_worker(worker_engine):
    inst = worker_engine.register(LongRetryWait).create()
    wait_status(inst, "waiting", timeout=3)
    assert attempt_log(inst) == [1]
    # the only worker is free meanwhile: another instance runs to completion
    other = worker_engine.register(Quick).create()
    assert other.wait(timeout=1.5) == {"status": "complete", "output": "quick"}
    assert inst.status()["status"] == "waiting"
    assert inst.wait(timeout=5) == {"status": "complete", "output": "second try works"}
    assert attempt_log(inst) == [1, 2]
    first, second = TIMES[inst.id]
    assert second - first >= 2.0 - 0.001
    assert inst.steps().iloc[0]["attempts"] == 2


# --------------------------------------------------------------------------- bad configs


class BadConfig(WorkflowEntrypoint):
    async def run(self, event, step):
        def cb():
            ATTEMPTS[event.instance_id].append(1)
            return "ran"

        return await step.do("configured", event.payload["config"], cb)


@pytest.mark.parametrize(
    "config",
    [
        {"retry": {"limit": 1}},
        {"retries": {"limit": 1, "tries": 3}},
        {"retries": {"limit": -1}},
        {"retries": {"backoff": "fibonacci"}},
        {"timeout": "0 seconds"},
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": "5 parsecs"},
        {"retries": {"delay": "5 parsecs"}},
        {"retries": {"delay": "soon"}},
    ],
    ids=[
        "unknown-top-key",
        "unknown-retries-key",
        "negative-limit",
        "bad-backoff",
        "zero-timeout-text",
        "zero-timeout-number",
        "negative-timeout",
        "bad-timeout-unit",
        "bad-delay-unit",
        "bad-delay-text",
    ],
)
def test_bad_step_config_fails_the_instance_with_value_error(worker_engine, config):
    inst = worker_engine.register(BadConfig).create(params={"config": config})
    out = inst.wait(timeout=10)
    assert out["status"] == "errored", out
    assert out["error"]["name"] == "ValueError"
    assert attempt_log(inst) == []  # refused at the call: the callback never ran


class BadConfigCaught(WorkflowEntrypoint):
    async def run(self, event, step):
        try:
            await step.do("configured", {"retries": {"limit": -1}}, lambda: "ran")
        except ValueError:
            pass
        else:
            return "accepted"
        return await step.do("next", lambda: "went on")


def test_bad_step_config_raises_value_error_at_the_call_which_run_can_catch(worker_engine):
    inst = worker_engine.register(BadConfigCaught).create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": "went on"}
    assert list(inst.steps()["step"]) == ["next"]


class DurationForms(WorkflowEntrypoint):
    async def run(self, event, step):
        from datetime import timedelta

        forms = [
            {"retries": {"delay": 0.01}, "timeout": 30},
            {"retries": {"delay": timedelta(milliseconds=10)}, "timeout": timedelta(minutes=1)},
            {"retries": {"delay": "1 second"}, "timeout": "2 minutes"},
        ]
        out = []
        for n, cfg in enumerate(forms):
            out.append(await step.do(f"form {n}", cfg, lambda ctx: ctx.config["timeout"]))
        return out


def test_config_durations_accept_numbers_timedeltas_and_strings(worker_engine):
    inst = worker_engine.register(DurationForms).create()
    out = inst.wait(timeout=10)
    assert out["status"] == "complete", out
    assert out["output"] in ([30, 60, 120], [30.0, 60.0, 120.0])
