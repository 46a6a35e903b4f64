"""Creating, batching, listing, waiting for and retaining instances (SPEC 3.1, 3.2, 3.3, 4),
against a real Redis and real RQ workers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import pytest
from support import poll

from nbflow import Engine, InstanceNotFoundError, WorkflowEntrypoint
from nbflow.store import STATUSES
from nbflow.worker import Housekeeper

COLUMNS = [
    "id",
    "workflow",
    "status",
    "created_at",
    "updated_at",
    "current_step",
    "steps_done",
    "error",
]


def prefix_keys(engine: Engine) -> list[str]:
    return sorted(k.decode() for k in engine.redis.scan_iter(match=f"{engine.prefix}:*"))


def queue_length(engine: Engine) -> int:
    """Jobs waiting on the queues of the registered workflows."""
    return sum(engine.backend.queue_for(name).count for name in engine.workflows)


class Echo(WorkflowEntrypoint):
    def run(self, event, step):
        return event.payload


class TwoSteps(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("first", lambda: 1)
        b = await step.do("second", lambda: 2)
        return a + b


class Other(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("only", lambda: "other")


class Boom(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("fine", lambda: "ok")
        raise RuntimeError("boom")


class Rich(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("frame", lambda: pd.DataFrame({"x": [1, 2]}, index=["a", "b"]))
        await step.do("blob", lambda: b"\x00\xffbytes")
        await step.do("plain", lambda: {"k": [1, 2.5, None, True, "s"]})
        await step.sleep("nap", 0)
        return {"done": True}


GATE = threading.Event()
GATE_STARTED = threading.Event()


class Gated(WorkflowEntrypoint):
    async def run(self, event, step):
        def held() -> str:
            GATE_STARTED.set()
            GATE.wait(10)
            return "released"

        return await step.do("held open", held)


class PrepThenWait(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.do("prepare", lambda: "ready")
        if event.payload == "sleep":
            await step.sleep("wait in sleep", "1 hour")
        else:
            await step.wait_for_event("wait in event", "go", timeout="1 hour")


class WaitForever(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.wait_for_event("never", "never", timeout="1 hour")


# -- create and create_batch -------------------------------------------------------------


def test_create_without_id_uses_a_fresh_uuid4_hex(engine: Engine) -> None:
    wf = engine.register(Echo)
    a, b = wf.create(), wf.create()
    assert a.id != b.id
    for inst in (a, b):
        assert len(inst.id) == 32
        assert uuid.UUID(hex=inst.id).version == 4
        assert inst.status() == {"status": "queued"}


def test_create_batch_returns_instances_in_input_order(engine: Engine) -> None:
    wf = engine.register(Echo)
    items: list[dict[str, Any]] = [
        {"id": "c", "params": 3},
        {"params": "no id"},
        {"id": "a", "params": 1},
        {},
        {"id": "b", "params": 2},
    ]
    created = wf.create_batch(items)
    assert len(created) == 5
    assert [created[0].id, created[2].id, created[4].id] == ["c", "a", "b"]
    assert len({i.id for i in created}) == 5
    engine.run_worker(burst=True)
    outputs = [i.wait(timeout=5)["output"] for i in created]
    assert outputs == [3, "no id", 1, None, 2]


def test_create_batch_with_duplicate_ids_raises_value_error_and_writes_nothing(
    engine: Engine,
) -> None:
    wf = engine.register(Echo)
    items = [{"id": f"i{n}"} for n in range(600)] + [{"id": "i3"}]  # duplicate past a chunk
    with pytest.raises(ValueError, match="i3"):
        wf.create_batch(items)
    assert prefix_keys(engine) == []
    assert queue_length(engine) == 0
    with pytest.raises(InstanceNotFoundError):
        wf.get("i0")


@pytest.mark.parametrize(
    "bad_item",
    [{"id": "-bad"}, {"params": {1, 2}}, {"idd": "x"}, "x"],
    ids=["bad-id", "unstorable-params", "unknown-key", "not-a-dict"],
)
def test_create_batch_with_an_invalid_item_raises_and_writes_nothing(
    engine: Engine, bad_item: Any
) -> None:
    wf = engine.register(Echo)
    with pytest.raises((ValueError, TypeError)):
        wf.create_batch([{"id": "ok1"}, bad_item, {"id": "ok2"}])
    assert prefix_keys(engine) == []
    assert queue_length(engine) == 0


def test_create_batch_skips_existing_ids_and_leaves_them_out(engine: Engine) -> None:
    wf = engine.register(Echo)
    wf.create(id="x", params="original")
    meta_before = engine.redis.hgetall(engine.keys.metadata("x"))
    created = wf.create_batch(
        [{"id": "w", "params": "w"}, {"id": "x", "params": "replaced?"}, {"id": "y", "params": "y"}]
    )
    assert [i.id for i in created] == ["w", "y"]
    assert engine.redis.hgetall(engine.keys.metadata("x")) == meta_before
    engine.run_worker(burst=True)
    assert wf.get("x").wait(timeout=5) == {"status": "complete", "output": "original"}
    assert created[0].wait(timeout=5) == {"status": "complete", "output": "w"}
    assert created[1].wait(timeout=5) == {"status": "complete", "output": "y"}


def test_create_batch_of_1200_instances_all_complete(engine: Engine) -> None:
    wf = engine.register(Echo)
    items = [{"id": f"n{n:04d}", "params": n} for n in range(1200)]
    created = wf.create_batch(items)
    assert [i.id for i in created] == [it["id"] for it in items]
    assert len(engine.instances(status="queued", limit=5000)) == 1200
    engine.run_worker(burst=True)
    done = engine.instances(status="complete", limit=5000)
    assert len(done) == 1200
    assert set(done["id"]) == {it["id"] for it in items}
    for n in (0, 499, 500, 999, 1000, 1199):
        assert created[n].status() == {"status": "complete", "output": n}


# -- listing -------------------------------------------------------------------------------


def test_instances_lists_every_column_newest_first(engine: Engine) -> None:
    first = engine.register(TwoSteps).create(id="first")
    time.sleep(0.01)
    second = engine.register(Boom).create(id="second")
    time.sleep(0.01)
    third = engine.register(TwoSteps).create(id="third")
    engine.run_worker(burst=True)
    for inst in (first, second, third):
        inst.wait(timeout=5)

    df = engine.instances()
    assert isinstance(df, pd.DataFrame)
    assert set(COLUMNS) <= set(df.columns)
    assert list(df["id"]) == ["third", "second", "first"]
    rows = df.set_index("id")
    assert rows.loc["first", "workflow"] == "TwoSteps"
    assert rows.loc["second", "workflow"] == "Boom"
    assert rows.loc["first", "status"] == "complete"
    assert rows.loc["second", "status"] == "errored"
    assert rows.loc["first", "steps_done"] == 2
    assert rows.loc["second", "steps_done"] == 1
    assert rows.loc["second", "error"] == {"name": "RuntimeError", "message": "boom"}
    assert rows.loc["first", "error"] is None or pd.isna(rows.loc["first", "error"])
    for iid in ("first", "second", "third"):
        created = pd.Timestamp(rows.loc[iid, "created_at"])
        updated = pd.Timestamp(rows.loc[iid, "updated_at"])
        assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
        assert updated >= created


def test_instances_shows_the_current_step_of_a_running_instance(worker_engine: Engine) -> None:
    GATE.clear()
    GATE_STARTED.clear()
    inst = worker_engine.register(Gated).create(id="g")
    try:
        assert GATE_STARTED.wait(5)
        row = worker_engine.instances().set_index("id").loc["g"]
        assert row["status"] == "running"
        assert row["current_step"] == "held open"
    finally:
        GATE.set()
    assert inst.wait(timeout=5)["status"] == "complete"
    row = worker_engine.instances().set_index("id").loc["g"]
    assert row["current_step"] is None or row["current_step"] == ""


@pytest.mark.parametrize("kind", ["event", "sleep"])
def test_instances_shows_the_step_a_waiting_instance_waits_in(engine: Engine, kind: str) -> None:
    inst = engine.register(PrepThenWait).create(id="w", params=kind)
    engine.run_worker(burst=True)
    assert inst.status() == {"status": "waiting"}
    row = engine.instances().set_index("id").loc["w"]
    assert row["status"] == "waiting"
    assert row["current_step"] == f"wait in {kind}"


def test_instances_filters_by_status_and_workflow_and_honours_limit(engine: Engine) -> None:
    two = engine.register(TwoSteps)
    other = engine.register(Other)
    for iid in ("q1", "q2"):
        two.create(id=iid)
        time.sleep(0.01)
    other.create(id="o1")
    time.sleep(0.01)
    engine.run_worker(burst=True)
    two.create(id="q3")  # stays queued: no worker runs after this

    def ids(**kw: Any) -> list[str]:
        return list(engine.instances(**kw)["id"])

    assert ids() == ["q3", "o1", "q2", "q1"]
    assert ids(status="queued") == ["q3"]
    assert ids(status="complete") == ["o1", "q2", "q1"]
    assert ids(status="errored") == []
    assert ids(workflow="TwoSteps") == ["q3", "q2", "q1"]
    assert ids(workflow="Other") == ["o1"]
    assert ids(workflow="Nobody") == []
    assert ids(workflow="TwoSteps", status="complete") == ["q2", "q1"]
    assert ids(limit=2) == ["q3", "o1"]
    assert ids(status="complete", limit=1) == ["o1"]
    assert ids(workflow="TwoSteps", limit=1) == ["q3"]
    empty = engine.instances(status="paused")
    assert list(empty["id"]) == [] and set(COLUMNS) <= set(empty.columns)


@pytest.mark.parametrize("status", ["done", "Complete", "finished", ""])
def test_instances_with_an_unknown_status_raises_value_error(engine: Engine, status: str) -> None:
    with pytest.raises(ValueError):
        engine.instances(status=status)


def test_instances_accepts_every_documented_status(engine: Engine) -> None:
    for status in (
        "queued",
        "running",
        "waiting",
        "waitingForPause",
        "paused",
        "complete",
        "errored",
        "terminated",
    ):
        assert status in STATUSES
        assert engine.instances(status=status).empty


# -- retention ------------------------------------------------------------------------------


def test_retention_deletes_finished_instances_and_keeps_unfinished_ones(
    engine: Engine, redis_url: str
) -> None:
    short = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name, retention="1 second")
    done = short.register(TwoSteps).create(id="done")
    failed = short.register(Boom).create(id="failed")
    killed = short.register(WaitForever).create(id="killed")
    held = short.workflow("WaitForever").create(id="held")
    held.pause()
    short.run_worker(burst=True)
    killed.terminate()
    assert done.status()["status"] == "complete"
    assert failed.status()["status"] == "errored"
    assert killed.status()["status"] == "terminated"
    assert held.status() == {"status": "paused"}
    finished_at = time.time()

    keeper = Housekeeper(short.backend, threading.Event())
    keeper.sweep(0)  # too early: everything is still there
    assert done.status()["status"] == "complete"

    def all_gone() -> bool:
        keeper.sweep(0)
        return all(i.status() == {"status": "unknown"} for i in (done, failed, killed))

    poll(all_gone, timeout=5, what="retention to delete the finished instances")
    assert time.time() - finished_at >= 1.0 - 0.05
    for iid in ("done", "failed", "killed"):
        assert list(short.redis.scan_iter(match=f"{short.prefix}:{iid}:*")) == []
        with pytest.raises(InstanceNotFoundError):
            short.workflow("TwoSteps").get(iid)
    assert list(short.instances()["id"]) == ["held"]
    assert list(short.instances(workflow="TwoSteps")["id"]) == []
    assert list(short.instances(status="complete")["id"]) == []
    # Every remaining key under the prefix belongs to the unfinished instance or an index.
    for key in prefix_keys(short):
        for iid in ("done", "failed", "killed"):
            assert f":{iid}:" not in key
        if short.redis.type(key) == b"zset":
            members = {m.decode() for m in short.redis.zrange(key, 0, -1)}
            assert not members & {"done", "failed", "killed"}, key
    assert held.status() == {"status": "paused"}


def test_restart_of_a_finished_instance_cancels_its_pending_deletion(
    engine: Engine, redis_url: str
) -> None:
    short = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name, retention="1 second")
    inst = short.register(TwoSteps).create()
    short.run_worker(burst=True)
    assert inst.status()["status"] == "complete"
    inst.restart()  # no worker runs it: it stays queued
    time.sleep(1.2)
    Housekeeper(short.backend, threading.Event()).sweep(0)
    assert inst.status() == {"status": "queued"}
    short.run_worker(burst=True)
    assert inst.status() == {"status": "complete", "output": 3}


def test_no_retention_keeps_finished_instances(engine: Engine) -> None:
    inst = engine.register(TwoSteps).create()
    engine.run_worker(burst=True)
    assert inst.status() == {"status": "complete", "output": 3}
    Housekeeper(engine.backend, threading.Event()).sweep(0)
    assert inst.status() == {"status": "complete", "output": 3}
    assert list(engine.instances()["id"]) == [inst.id]


# -- wait --------------------------------------------------------------------------------


def test_wait_with_a_timeout_on_an_instance_that_never_finishes_raises_timeout_error(
    engine: Engine,
) -> None:
    inst = engine.register(Echo).create()  # no worker: it stays queued
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        inst.wait(timeout=0.2)
    assert time.monotonic() - t0 >= 0.2 - 0.01
    assert inst.status() == {"status": "queued"}


def test_wait_returns_the_status_dict_of_a_finished_instance(worker_engine: Engine) -> None:
    ok = worker_engine.register(TwoSteps).create()
    bad = worker_engine.register(Boom).create()
    assert ok.wait(timeout=5) == {"status": "complete", "output": 3}
    assert bad.wait(timeout=5) == {
        "status": "errored",
        "error": {"name": "RuntimeError", "message": "boom"},
    }


class Replies(WorkflowEntrypoint):
    """Waits for an event, then returns what the event asks for (or fails)."""

    async def run(self, event: Any, step: Any) -> Any:
        ev = await step.wait_for_event("go", "go", timeout="1 minute")
        kind = ev["payload"]
        if kind == "fail":
            raise ValueError("asked to fail")
        if kind == "big":
            return "x" * 10_000  # more than the done message carries
        if kind == "frame":
            return await step.do("frame", lambda: pd.DataFrame({"a": [1, 2]}))
        return {"kind": kind}


@pytest.mark.parametrize("kind", ["small", "big", "frame", "fail", "terminate"])
def test_wait_wakes_with_the_final_status_when_the_instance_ends_meanwhile(
    worker_engine: Engine, kind: str
) -> None:
    inst = worker_engine.register(Replies).create()
    poll(lambda: inst.status()["status"] == "waiting", 10, "the event wait")

    def end_it() -> None:
        time.sleep(0.2)  # wait() is listening by now
        if kind == "terminate":
            inst.terminate()
        else:
            inst.send_event("go", kind)

    threading.Thread(target=end_it).start()
    got = inst.wait(timeout=10)
    if kind != "frame":
        assert got == inst.status()  # the same dict status() reads from the state
    if kind == "small":
        assert got == {"status": "complete", "output": {"kind": "small"}}
    elif kind == "big":
        assert got == {"status": "complete", "output": "x" * 10_000}
    elif kind == "frame":
        assert isinstance(got["output"], pd.DataFrame)
        assert got["output"]["a"].tolist() == [1, 2]
    elif kind == "fail":
        assert got["status"] == "errored"
        assert got["error"]["name"] == "ValueError"
        assert got["error"]["message"] == "asked to fail"
    else:
        assert got == {"status": "terminated"}


# -- state layout (spec 4) ---------------------------------------------------------------------


def _iso_utc(value: bytes) -> datetime:
    moment = datetime.fromisoformat(value.decode())
    assert moment.utcoffset() == timedelta(0), value
    return moment


def test_state_layout_in_redis_follows_the_spec_and_is_json_readable(engine: Engine) -> None:
    inst = engine.register(Rich).create(id="laid-out", params={"user": 7, "tags": ["a"]})
    failed = engine.register(Boom).create(id="failed")
    engine.run_worker(burst=True)
    assert inst.wait(timeout=5)["status"] == "complete"
    assert failed.wait(timeout=5)["status"] == "errored"
    r, p = engine.redis, engine.prefix

    assert r.type(f"{p}:laid-out:state") == b"hash"
    state = r.hgetall(f"{p}:laid-out:state")
    assert state[b"status"] == b"complete"
    assert _iso_utc(state[b"updatedAt"]) >= _iso_utc(state[b"createdAt"])
    assert json.loads(state[b"output"]) == {"done": True}
    error = json.loads(r.hget(f"{p}:failed:state", "error"))
    assert {"name": error["name"], "message": error["message"]} == {
        "name": "RuntimeError",
        "message": "boom",
    }

    assert r.type(f"{p}:laid-out:metadata") == b"hash"
    meta = r.hgetall(f"{p}:laid-out:metadata")
    assert meta[b"workflowName"] == b"Rich"
    assert json.loads(meta[b"payload"]) == {"user": 7, "tags": ["a"]}
    assert b"currentStep" in meta

    assert r.type(f"{p}:laid-out:steps") == b"hash"
    steps = r.hgetall(f"{p}:laid-out:steps")
    assert len(steps) == 4
    decoded = [json.loads(v) for v in steps.values()]  # every value is plain JSON
    text = b" ".join(steps.values())
    assert b"$nbflow" in text  # DataFrame and bytes use the tagged envelope ...
    assert b"pickle" not in text.lower()  # ... never pickle
    assert all(isinstance(d, dict) for d in decoded)

    # Every other key nbflow wrote for it lives under the prefix, and its values are JSON too.
    for raw in r.lrange(f"{p}:laid-out:history", 0, -1):
        json.loads(raw)
    assert all(k.startswith(f"{p}:") for k in prefix_keys(engine))
