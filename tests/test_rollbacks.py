"""Saga rollbacks (spec 10.4): ``rollback=`` / ``rollback_config=`` on ``step.do`` in every
form; when the instance fails, the rollbacks of its completed steps run newest step first,
each a durable step of kind ``rollback`` with its own retries; ``status()`` reports them.
A worker process SIGKILLed in the middle of a rollback: it resumes, and a finished
rollback never runs again."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import Procs, load_module, poll, wait_workers, write_module

from nbflow import Engine, NonRetryableError, RollbackContext, StepContext, WorkflowEntrypoint

SEEN: list[Any] = []


def _undo(rc: RollbackContext) -> str:
    SEEN.append(rc)
    return f"undid {rc.step.name}"


@pytest.fixture(autouse=True)
def _reset() -> None:
    SEEN.clear()


class Saga(WorkflowEntrypoint):
    """Steps in every form with rollbacks; ``fail`` decides whether the last step fails."""

    async def run(self, event: Any, step: Any) -> Any:
        await step.do("reserve", lambda: {"seat": 7}, rollback=_undo)
        await step.do("charge", {"retries": {"limit": 2, "delay": 0}}, lambda: 12.5, rollback=_undo)
        await step.do("note", lambda: "no rollback")
        await step.do("email", lambda: "sent", config={"timeout": "5 seconds"}, rollback=_undo)

        @step.do("ship", rollback=_undo, rollback_config={"retries": {"limit": 0}})
        async def ship() -> str:
            return "shipped"

        await ship()

        @step.do(rollback=_undo)
        def label() -> str:
            return "labelled"

        await label()
        if event.payload.get("fail"):

            def broken() -> None:
                raise NonRetryableError("warehouse on fire")

            await step.do("deliver", broken, rollback=_undo)
        return "done"


class SyncSaga(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> Any:
        step.do("a", lambda: 1, rollback=_undo)
        step.do("a", lambda: 2, rollback=_undo)  # a#2: its own step, its own rollback
        raise ValueError("run failed after a#2")


class Stubborn(WorkflowEntrypoint):
    """b's rollback fails every attempt; a's and c's still run."""

    async def run(self, event: Any, step: Any) -> Any:
        def undo_b(rc: RollbackContext) -> None:
            SEEN.append(("b", rc.step.attempt))
            raise RuntimeError("cannot undo b")

        quick = {"retries": {"limit": 2, "delay": 0, "backoff": "constant"}}
        await step.do("a", lambda: "a", rollback=lambda: SEEN.append("a"))
        await step.do("b", lambda: "b", rollback=undo_b, rollback_config=quick)
        await step.do("c", lambda: "c", rollback=lambda: SEEN.append("c"))
        raise LookupError("boom")


class SlowUndo(WorkflowEntrypoint):
    """A rollback whose retry waits long enough to park the instance mid-rollback."""

    async def run(self, event: Any, step: Any) -> Any:
        def undo(rc: RollbackContext) -> str:
            SEEN.append(rc.step.name)
            if SEEN.count("b") == 1 and rc.step.name == "b":
                raise RuntimeError("not yet")
            return "ok"

        cfg = {"retries": {"limit": 1, "delay": "1.5 seconds", "backoff": "constant"}}
        await step.do("a", lambda: 1, rollback=undo)
        await step.do("b", lambda: 2, rollback=undo, rollback_config=cfg)
        await step.do("c", lambda: 3, rollback=undo)
        raise RuntimeError("failed")


class BadRollback(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        kind = event.payload["kind"]
        if kind == "not callable":
            return await step.do("x", lambda: 1, rollback="undo")
        if kind == "bad config":
            return await step.do("x", lambda: 1, rollback=_undo, rollback_config={"nope": 1})
        return await step.do("x", lambda: 1, rollback=_undo, rollback_config="fast")


@pytest.fixture
def eng(worker_engine: Engine) -> Engine:
    for cls in (Saga, SyncSaga, Stubborn, SlowUndo, BadRollback):
        worker_engine.register(cls)
    return worker_engine


def test_rollbacks_run_in_reverse_step_order_with_their_context(eng: Engine) -> None:
    inst = eng.workflow("Saga").create(id="s1", params={"fail": True})
    status = inst.wait(timeout=15)
    assert status["status"] == "errored"
    assert status["error"] == {"name": "NonRetryableError", "message": "warehouse on fire"}
    order = ["label#1", "ship#1", "email#1", "charge#1", "reserve#1"]
    assert status["rollback"] == {"status": "complete", "steps": order}
    assert [rc.step.name for rc in SEEN] == ["label", "ship", "email", "charge", "reserve"]
    by_name = {rc.step.name: rc for rc in SEEN}
    assert by_name["reserve"].output == {"seat": 7}
    assert by_name["charge"].output == 12.5
    assert isinstance(by_name["charge"].step, StepContext)
    assert by_name["charge"].step.count == 1 and by_name["charge"].step.attempt == 1
    assert by_name["charge"].step.config["retries"]["limit"] == 2
    assert by_name["email"].step.config["timeout"] == 5.0
    for rc in SEEN:
        assert type(rc.error) is NonRetryableError and str(rc.error) == "warehouse on fire"
    steps = inst.steps()
    rows = steps[steps["kind"] == "rollback"]
    assert list(rows["step"]) == [f"rollback:{k.split('#')[0]}" for k in order]
    assert list(rows["status"]) == ["complete"] * 5
    assert list(rows["output"]) == [f"undid {k.split('#')[0]}" for k in order]
    assert inst.step_output("rollback:charge#1") == "undid charge"
    # the failing step itself and the step without a rollback have none
    assert "rollback:deliver" not in set(steps["step"])
    assert "rollback:note" not in set(steps["step"])
    assert inst.status() == status


def test_an_instance_that_completes_runs_no_rollback(eng: Engine) -> None:
    inst = eng.workflow("Saga").create(params={"fail": False})
    assert inst.wait(timeout=15) == {"status": "complete", "output": "done"}
    assert SEEN == []
    assert "rollback" not in set(inst.steps()["kind"])


def test_rollbacks_in_a_plain_def_run(eng: Engine) -> None:
    inst = eng.workflow("SyncSaga").create()
    status = inst.wait(timeout=15)
    assert status["error"] == {"name": "ValueError", "message": "run failed after a#2"}
    assert status["rollback"] == {"status": "complete", "steps": ["a#2", "a#1"]}
    assert [(rc.step.name, rc.step.count, rc.output) for rc in SEEN] == [("a", 2, 2), ("a", 1, 1)]
    assert type(SEEN[0].error) is ValueError


def test_a_rollback_failing_after_its_retries_is_recorded_and_the_others_still_run(
    eng: Engine,
) -> None:
    inst = eng.workflow("Stubborn").create()
    status = inst.wait(timeout=15)
    assert status["error"] == {"name": "LookupError", "message": "boom"}
    assert status["rollback"] == {"status": "errored", "steps": ["c#1", "b#1", "a#1"]}
    assert SEEN == ["c", ("b", 1), ("b", 1), ("b", 1), "a"]  # 3 attempts of b's rollback
    row = inst.steps().set_index("step").loc["rollback:b"]
    assert (row.kind, row.status, row.attempts) == ("rollback", "errored", 3)
    assert row.error == {"name": "RuntimeError", "message": "cannot undo b"}


def test_a_long_rollback_retry_parks_the_instance_and_resumes_the_rollback(eng: Engine) -> None:
    inst = eng.workflow("SlowUndo").create()
    poll(lambda: inst.status()["status"] == "waiting", 10, "the rollback's retry to park")
    status = inst.wait(timeout=20)
    assert status["status"] == "errored"
    assert status["rollback"] == {"status": "complete", "steps": ["c#1", "b#1", "a#1"]}
    assert SEEN == ["c", "b", "b", "a"]  # c's finished rollback did not run again


def test_restart_drops_the_rollback_report(eng: Engine) -> None:
    inst = eng.workflow("Saga").create(params={"fail": True})
    assert "rollback" in inst.wait(timeout=15)
    inst.restart()
    status = inst.wait(timeout=15)
    assert status["rollback"]["status"] == "complete"
    assert len(SEEN) == 10  # the new run failed and rolled back once more
    assert sum(inst.steps()["kind"] == "rollback") == 5


@pytest.mark.parametrize(
    ("kind", "name", "words"),
    [
        ("not callable", "TypeError", "rollback must be callable"),
        ("bad config", "ValueError", "nope"),
        ("config not a dict", "TypeError", "rollback_config must be a dict"),
    ],
)
def test_bad_rollback_arguments_fail_at_the_call(
    eng: Engine, kind: str, name: str, words: str
) -> None:
    inst = eng.workflow("BadRollback").create(params={"kind": kind})
    status = inst.wait(timeout=10)
    assert status["error"]["name"] == name
    assert words in status["error"]["message"]
    assert inst.steps().empty


# -- a worker process SIGKILLed in the middle of a rollback ----------------------------------

SAGA = """
import os
import time

import redis

from nbflow import WorkflowEntrypoint


class Trip(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        r = redis.Redis.from_url(p["url"])

        def undo(rc):
            r.hincrby(p["fx"], rc.step.name, 1)
            if rc.step.name == "hotel":
                r.set(p["fx"] + ":in", os.getpid())
                end = time.monotonic() + 60
                while r.exists(p["fx"] + ":hold") and time.monotonic() < end:
                    time.sleep(0.02)
            return "undone " + rc.step.name

        await step.do("flight", lambda: "F1", rollback=undo)
        await step.do("hotel", lambda: "H1", rollback=undo)
        await step.do("car", lambda: "C1", rollback=undo)

        def pay():
            raise ValueError("card declined")

        await step.do("pay", {"retries": {"limit": 0}}, pay)
"""


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def test_worker_killed_mid_rollback_resumes_it_and_runs_no_rollback_twice(
    engine: Engine, redis_url: str, procs: Procs, tmp_path: Path
) -> None:
    module = write_module(tmp_path, f"nbf_saga_{engine.prefix}", SAGA)
    load_module(tmp_path, module)
    trip = engine.register(sys.modules[module].Trip)
    fx = f"{engine.prefix}:fx"
    r = engine.redis
    r.set(fx + ":hold", 1)
    a = procs.worker("w-a", redis_url, engine.prefix, engine.queue_name, module)
    wait_workers(r, engine.queue_name, 1)
    inst = trip.create(id="trip", params={"url": redis_url, "fx": fx})
    pid = int(poll(lambda: r.get(fx + ":in"), 30, f"the hotel rollback\n{procs.logs()}"))
    assert pid == a.pid
    assert inst.status() == {"status": "running"}  # not final while rolling back
    procs.kill(a)
    r.delete(fx + ":hold")
    r.zadd(engine.keys.leases, {"trip": 0}, xx=True)  # stand-in for the 30 s lease running out
    procs.worker("w-b", redis_url, engine.prefix, engine.queue_name, module)
    status = inst.wait(timeout=60)
    assert status == {
        "status": "errored",
        "error": {"name": "ValueError", "message": "card declined"},
        "rollback": {"status": "complete", "steps": ["car#1", "hotel#1", "flight#1"]},
    }, procs.logs()
    runs = {k.decode(): int(v) for k, v in r.hgetall(fx).items()}
    # car's rollback had finished before the crash: not run again; hotel's was cut short
    assert runs == {"car": 1, "hotel": 2, "flight": 1}
    rows = inst.steps().set_index("step")
    assert rows.loc["rollback:hotel", "attempts"] == 2
    assert rows.loc["rollback:car", "attempts"] == 1
    assert list(inst.steps()["kind"]) == ["do"] * 4 + ["rollback"] * 3
