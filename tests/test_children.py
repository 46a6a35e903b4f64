"""Child workflows (spec 10.1): ``step.run_workflow`` returns the child's output or raises
its error, the parent waits in Redis without a worker, replays never start a second
child, termination cascades, restarts start a fresh child, ``parent`` is listed; cycles
and unknown workflows are refused.  In-process workers here, and real ``nbflow worker``
processes (one SIGKILLed in the middle of a fan-out) at the end.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from helpers_procs import Procs, load_module, poll, wait_workers, write_module
from support import wait_status

from nbflow import (
    Engine,
    InstanceExistsError,
    InvalidStateError,
    WorkflowEntrypoint,
    WorkflowNotRegisteredError,
)


class PaymentDeclined(Exception):
    """A workflow's own error class: a child raising it fails its parent with it."""


def _bump(event: Any, what: str) -> int:
    """Counts an execution in the test's Redis (``fx`` in the payload names the key)."""
    p = event.payload
    return int(redis.Redis.from_url(p["url"]).hincrby(p["fx"], what, 1))


class Double(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        def work() -> int:
            _bump(event, event.instance_id)
            return int(event.payload["x"]) * 2

        return await step.do("double", work)


class Gated(WorkflowEntrypoint):
    """A child that waits for an event ``go`` before it returns its payload."""

    async def run(self, event: Any, step: Any) -> Any:
        got = await step.wait_for_event("gate", "go", timeout="1 hour")
        return {"got": got["payload"], "x": event.payload.get("x")}


class Declines(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        def charge() -> None:
            raise PaymentDeclined(f"card {event.payload['card']} declined")

        return await step.do("charge", {"retries": {"limit": 0}}, charge)


class Parent(WorkflowEntrypoint):
    """Runs the child workflow the payload names, then (optionally) waits for an event."""

    async def run(self, event: Any, step: Any) -> Any:
        p = event.payload
        out = await step.run_workflow(p.get("step", "kid"), p["child"], p.get("params"))
        if p.get("then_wait"):
            await step.wait_for_event("after", "done", timeout="1 hour")
        return out


class CatchingParent(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        try:
            await step.run_workflow("kid", event.payload["child"], event.payload.get("params"))
        except Exception as exc:
            return {
                "type": type(exc).__name__,
                "cls": type(exc) is PaymentDeclined,
                "msg": str(exc),
            }
        return "no error"


class FanOut(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        n = event.payload["n"]
        calls = (step.run_workflow("part", "Double", {**event.payload, "x": i}) for i in range(n))
        return await asyncio.gather(*calls)


class SyncParent(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> Any:
        a = step.run_workflow("first", "Double", {**event.payload, "x": 5})
        b = step.run_workflow("second", Double, {**event.payload, "x": a})
        return [a, b]


class Tree(WorkflowEntrypoint):
    """A parent of a parent: Tree -> Parent -> Gated."""

    async def run(self, event: Any, step: Any) -> Any:
        return await step.run_workflow("mid", "Parent", {"child": "Gated"})


class Selfish(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        return await step.run_workflow("me", "Selfish", None, id=event.instance_id)


class Loops(WorkflowEntrypoint):
    """Starts a child with the id the payload gives (an ancestor's, for a cycle)."""

    async def run(self, event: Any, step: Any) -> Any:
        p = event.payload
        if p.get("child_id"):
            return await step.run_workflow("down", "Loops", {"child_id": None}, id=p["child_id"])
        return await step.run_workflow("down", "Loops", {"child_id": p["ancestor"]})


class Restartable(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        before = await step.do("before", lambda: _bump(event, "before"))
        kid = await step.run_workflow("kid", "Double", {**event.payload, "x": before})
        await step.do("after", lambda: _bump(event, "after"))
        return kid


ALL = [Double, Gated, Declines, Parent, CatchingParent, FanOut, SyncParent, Tree, Selfish]


@pytest.fixture
def eng(worker_engine: Engine) -> Engine:
    for cls in [*ALL, Loops, Restartable]:
        worker_engine.register(cls)
    return worker_engine


@pytest.fixture
def fx(eng: Engine, redis_url: str) -> dict[str, Any]:
    """Payload keys that make ``_bump`` count in this test's Redis."""
    return {"url": redis_url, "fx": f"{eng.prefix}:fx"}


def _child(eng: Engine, workflow: str, cid: str) -> Any:
    """The child once its parent's run has started it."""
    poll(lambda: eng.redis.exists(eng.keys.state(cid)), 10, f"child {cid}")
    return eng.workflow(workflow).get(cid)


def _counts(eng: Engine) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in eng.redis.hgetall(f"{eng.prefix}:fx").items()}


# -- outputs, waiting, ids ---------------------------------------------------------------


def test_run_workflow_returns_the_child_output_while_the_parent_waits_without_a_worker(
    eng: Engine,
) -> None:
    parent = eng.workflow("Parent").create(id="p1", params={"child": "Gated", "params": {"x": 7}})
    child = _child(eng, "Gated", "p1-kid")  # the default id: {parent id}-{step name}
    wait_status(child, "waiting")
    wait_status(parent, "waiting")
    assert eng.redis.zscore(eng.keys.leases, "p1") is None  # no worker holds the parent
    steps = parent.steps()
    assert list(steps["kind"]) == ["workflow"] and list(steps["status"]) == ["waiting"]
    child.send_event("go", {"ok": True})
    assert parent.wait(timeout=10) == {
        "status": "complete",
        "output": {"got": {"ok": True}, "x": 7},
    }
    row = parent.steps().iloc[0]
    assert (row.step, row.kind, row["count"], row.status) == ("kid", "workflow", 1, "complete")
    assert row.output == {"got": {"ok": True}, "x": 7}
    assert parent.step_output("kid") == {"got": {"ok": True}, "x": 7}
    events = [e["ev"] for e in parent.history()]
    assert events.index("workflow.started") < events.index("workflow.finished")


def test_a_paused_parent_keeps_its_childs_output_for_when_it_resumes(eng: Engine) -> None:
    parent = eng.workflow("Parent").create(id="pp", params={"child": "Gated", "params": {"x": 3}})
    child = _child(eng, "Gated", "pp-kid")
    wait_status(child, "waiting")
    wait_status(parent, "waiting")
    parent.pause()
    child.send_event("go", "late")
    assert child.wait(timeout=10)["status"] == "complete"
    assert parent.status() == {"status": "paused"}
    assert parent.steps().iloc[0]["status"] == "complete"
    parent.resume()
    assert parent.wait(timeout=10) == {"status": "complete", "output": {"got": "late", "x": 3}}


def test_instances_lists_the_parent_of_each_child(eng: Engine, fx: dict[str, Any]) -> None:
    parent = eng.workflow("FanOut").create(id="fan", params={"n": 3, **fx})
    assert parent.wait(timeout=15) == {"status": "complete", "output": [0, 2, 4]}
    frame = eng.instances().set_index("id")
    assert "parent" in frame.columns
    assert pd.isna(frame.loc["fan", "parent"])
    # the n-th call with one name is child {parent}-{name}-{n}
    for cid in ("fan-part", "fan-part-2", "fan-part-3"):
        assert frame.loc[cid, "parent"] == "fan"
        assert frame.loc[cid, "workflow"] == "Double"
    # a child records its workflow's code version as create() does (spec 8.2)
    assert (
        frame.loc["fan-part", "version"] == eng.workflow("Double").get("fan-part").info()["version"]
    )
    assert frame.loc["fan-part", "version"]


def test_wf_list_shows_the_parent_column(eng: Engine, fx: dict[str, Any]) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from nbflow.notebook import use_engine

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "nbflow")
    use_engine(eng)
    try:
        eng.workflow("FanOut").create(id="fan", params={"n": 1, **fx}).wait(timeout=15)
        listed = shell.run_line_magic("wf", "list").set_index("id")
        assert listed.loc["fan-part", "parent"] == "fan"
    finally:
        use_engine(None)


def test_default_child_ids_replace_characters_an_id_cannot_hold(
    eng: Engine, fx: dict[str, Any]
) -> None:
    parent = eng.workflow("Parent").create(
        id="p2",
        params={"child": "Double", "step": "make it double", "params": {"x": 1, **fx}},
    )
    assert parent.wait(timeout=10) == {"status": "complete", "output": 2}
    assert eng.workflow("Double").get("p2-make_it_double").status()["status"] == "complete"


def test_a_plain_def_run_gets_children_outputs_directly(eng: Engine, fx: dict[str, Any]) -> None:
    parent = eng.workflow("SyncParent").create(id="sp", params=fx)
    assert parent.wait(timeout=15) == {"status": "complete", "output": [10, 20]}
    assert list(parent.steps()["kind"]) == ["workflow", "workflow"]


# -- errors ------------------------------------------------------------------------------


def test_an_errored_child_raises_its_error_in_the_parent_same_class_and_message(
    eng: Engine,
) -> None:
    caught = eng.workflow("CatchingParent").create(
        id="cp", params={"child": "Declines", "params": {"card": "4242"}}
    )
    assert caught.wait(timeout=10)["output"] == {
        "type": "PaymentDeclined",
        "cls": True,
        "msg": "card 4242 declined",
    }
    uncaught = eng.workflow("Parent").create(
        id="up", params={"child": "Declines", "params": {"card": "1"}}
    )
    status = uncaught.wait(timeout=10)
    assert status["status"] == "errored"
    assert status["error"] == {"name": "PaymentDeclined", "message": "card 1 declined"}
    row = uncaught.steps().iloc[0]
    assert (row.kind, row.status) == ("workflow", "errored")
    assert row.error == {"name": "PaymentDeclined", "message": "card 1 declined"}


def test_a_terminated_child_raises_invalid_state_error_in_the_parent(eng: Engine) -> None:
    parent = eng.workflow("CatchingParent").create(id="tp", params={"child": "Gated"})
    child = _child(eng, "Gated", "tp-kid")
    wait_status(parent, "waiting")
    child.terminate()
    out = parent.wait(timeout=10)["output"]
    assert out["type"] == "InvalidStateError" and "terminated" in out["msg"]
    assert out["msg"] == "child instance 'tp-kid' was terminated"
    assert issubclass(InvalidStateError, Exception)


def test_an_unknown_workflow_name_fails_the_parent_and_writes_nothing(eng: Engine) -> None:
    parent = eng.workflow("Parent").create(id="uk", params={"child": "NoSuchFlow"})
    status = parent.wait(timeout=10)
    assert status["status"] == "errored"
    assert status["error"]["name"] == WorkflowNotRegisteredError.__name__
    assert "NoSuchFlow" in status["error"]["message"]
    assert "registered:" in status["error"]["message"]
    assert parent.steps().empty
    assert list(eng.instances()["id"]) == ["uk"]


def test_a_workflow_argument_of_the_wrong_type_is_a_type_error(eng: Engine) -> None:
    parent = eng.workflow("Parent").create(id="wt", params={"child": 42})
    status = parent.wait(timeout=10)
    assert status["error"]["name"] == "TypeError"
    assert "workflow must be a Workflow" in status["error"]["message"]


def test_a_workflow_starting_itself_with_its_own_id_is_a_cycle_and_writes_nothing(
    eng: Engine,
) -> None:
    inst = eng.workflow("Selfish").create(id="self1")
    status = inst.wait(timeout=10)
    assert status["status"] == "errored"
    assert status["error"]["name"] == "ValueError"
    assert "cycle" in status["error"]["message"] and "self1" in status["error"]["message"]
    assert inst.steps().empty
    assert list(eng.instances()["id"]) == ["self1"]
    assert not eng.redis.exists(f"{eng.prefix}:self1:children")


def test_a_child_with_an_ancestors_id_is_a_cycle(eng: Engine) -> None:
    top = eng.workflow("Loops").create(id="top", params={"ancestor": "top"})
    status = top.wait(timeout=10)
    # top -> top-down (a Loops asked to start a child with id "top": its grandparent)
    assert status["status"] == "errored"
    assert status["error"]["name"] == "ValueError"
    assert "ancestor" in status["error"]["message"]
    assert sorted(eng.instances()["id"]) == ["top", "top-down"]
    assert eng.workflow("Loops").get("top-down").steps().empty


def test_an_id_of_another_instance_raises_instance_exists_error(
    eng: Engine, fx: dict[str, Any]
) -> None:
    eng.workflow("Double").create(id="taken", params={"x": 1, **fx}).wait(timeout=10)

    class Taker(WorkflowEntrypoint):
        async def run(self, event: Any, step: Any) -> Any:
            return await step.run_workflow("kid", "Double", {"x": 2}, id="taken")

    status = eng.register(Taker).create(id="taker").wait(timeout=10)
    assert status["error"]["name"] == InstanceExistsError.__name__
    assert "taken" in status["error"]["message"]


# -- replays, restarts, termination --------------------------------------------------------


def test_a_replay_returns_the_stored_output_and_never_starts_a_second_child(
    eng: Engine,
    fx: dict[str, Any],
) -> None:
    parent = eng.workflow("Parent").create(
        id="rp", params={"child": "Double", "params": {"x": 4, **fx}, "then_wait": True}
    )
    wait_status(parent, "waiting")
    poll(lambda: parent.steps()["status"].tolist() == ["complete", "waiting"], 10, "child done")
    parent.send_event("done")  # the parent's run replays past the child
    assert parent.wait(timeout=10) == {"status": "complete", "output": 8}
    assert _counts(eng) == {"rp-kid": 1}
    assert sorted(eng.instances()["id"]) == ["rp", "rp-kid"]


def test_terminating_a_parent_terminates_its_children_and_theirs(eng: Engine) -> None:
    top = eng.workflow("Tree").create(id="tree")
    grandchild = _child(eng, "Gated", "tree-mid-kid")
    wait_status(grandchild, "waiting")
    wait_status(top, "waiting")
    top.terminate()
    assert top.status() == {"status": "terminated"}
    assert eng.workflow("Parent").get("tree-mid").status() == {"status": "terminated"}
    assert grandchild.status() == {"status": "terminated"}
    with pytest.raises(InvalidStateError):
        grandchild.send_event("go")


def test_restart_from_a_step_before_the_child_starts_a_fresh_child(
    eng: Engine, fx: dict[str, Any]
) -> None:
    parent = eng.workflow("Restartable").create(id="rs", params=fx)
    assert parent.wait(timeout=10) == {"status": "complete", "output": 2}
    assert _counts(eng) == {"before": 1, "rs-kid": 1, "after": 1}
    parent.restart(from_step="after")  # after the child: its result is kept
    assert parent.wait(timeout=10) == {"status": "complete", "output": 2}
    assert _counts(eng) == {"before": 1, "rs-kid": 1, "after": 2}
    parent.restart(from_step="before")  # before it: the child runs again, same id
    assert parent.wait(timeout=10) == {"status": "complete", "output": 4}
    assert _counts(eng) == {"before": 2, "rs-kid": 2, "after": 3}
    child = eng.workflow("Double").get("rs-kid")
    assert child.status() == {"status": "complete", "output": 4}
    assert len(child.steps()) == 1  # its earlier run's steps were dropped
    assert sorted(eng.instances()["id"]) == ["rs", "rs-kid"]


def test_restarting_a_parent_whose_child_still_runs_terminates_it_and_starts_it_afresh(
    eng: Engine,
) -> None:
    parent = eng.workflow("Parent").create(id="rw", params={"child": "Gated", "params": {"x": 1}})
    child = _child(eng, "Gated", "rw-kid")
    wait_status(child, "waiting")
    wait_status(parent, "waiting")
    parent.restart()
    poll(lambda: child.info()["steps_done"] == 0 and child.status()["status"] == "waiting", 10)
    wait_status(parent, "waiting")
    child.send_event("go", 2)
    assert parent.wait(timeout=10) == {"status": "complete", "output": {"got": 2, "x": 1}}
    events = [e["ev"] for e in child.history()]
    assert events.index("terminated") < events.index("restarted")


# -- real worker processes: one SIGKILLed in the middle of a fan-out ----------------------------

FLEET = """
import asyncio
import os

import redis

from nbflow import WorkflowEntrypoint


class Leaf(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        r = redis.Redis.from_url(p["url"])

        async def work():
            # one transaction: a test that sees the count also sees where it ran
            pipe = r.pipeline()
            pipe.hincrby(p["fx"], event.instance_id, 1)
            pipe.hset(p["fx"] + ":where", event.instance_id, os.getpid())
            pipe.execute()
            while r.exists(p["fx"] + ":hold"):
                await asyncio.sleep(0.02)
            return p["x"] * 10

        return await step.do("work", {"retries": {"limit": 3, "delay": 0.1}}, work)


class Fan(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        calls = [step.run_workflow("leaf", "Leaf", {**p, "x": i}) for i in range(p["n"])]
        return await asyncio.gather(*calls)
"""


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def test_worker_killed_mid_fan_out_every_child_runs_once(
    engine: Engine, redis_url: str, procs: Procs, tmp_path: Path
) -> None:
    module = write_module(tmp_path, f"nbf_fleet_{engine.prefix}", FLEET)
    load_module(tmp_path, module)
    engine.register(sys.modules[module].Leaf)
    fan = engine.register(sys.modules[module].Fan)
    fx = f"{engine.prefix}:fx"
    r = engine.redis
    r.set(fx + ":hold", 1)
    a = procs.worker("w-a", redis_url, engine.prefix, engine.queue_name, module)
    b = procs.worker("w-b", redis_url, engine.prefix, engine.queue_name, module)
    wait_workers(r, engine.queue_name, 2)
    n = 40
    parent = fan.create(id="fan", params={"n": n, "url": redis_url, "fx": fx})
    # every child started its step (held): the two jobs of children run on both workers
    poll(lambda: r.hlen(fx) == n, 30, f"{n} children running\n{procs.logs()}")
    where = {k.decode(): int(v) for k, v in r.hgetall(fx + ":where").items()}
    assert set(where.values()) == {a.pid, b.pid}, where
    assert parent.status() == {"status": "waiting"}
    procs.kill(a)
    r.delete(fx + ":hold")
    for cid, pid in where.items():  # stand-in for the dead worker's 30 s leases running out
        if pid == a.pid:
            r.zadd(engine.keys.leases, {cid: 0}, xx=True)
    status = parent.wait(timeout=60)
    assert status == {"status": "complete", "output": [i * 10 for i in range(n)]}, procs.logs()
    assert b.poll() is None
    runs = {k.decode(): int(v) for k, v in r.hgetall(fx).items()}
    children = engine.instances(workflow="Leaf")
    assert len(children) == n and set(children["parent"]) == {"fan"}
    assert set(runs) == set(children["id"])
    for cid in children["id"]:
        leaf = engine.instance(cid)
        attempts = int(leaf.steps().iloc[0]["attempts"])
        # a child's step ran once per recorded attempt: once, or twice where its worker died
        assert runs[cid] == attempts, (cid, runs[cid], attempts)
        assert attempts == (2 if where[cid] == a.pid else 1), (cid, attempts)
