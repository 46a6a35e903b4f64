"""One corrupt instance harms no other (spec 12): a field that holds what nbflow never
writes ends that instance ``errored`` with a message naming the field (or is repaired,
for fields the engine rewrites anyway), and never delays or fails the instances that
share its RQ job, its listing page or its queue.

Every field a script reads is corrupted here (``nbflow/store.py`` lists which script
reads what), before the claim and in the middle of a run, for ``async def run`` and
plain ``def run``; each case shows the healthy batch-mates of the corrupt instance
complete within a few seconds, far below the 30 s lease that used to free them.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from support import poll

from nbflow import Engine, WorkflowEntrypoint
from nbflow.widgets import Dashboard
from nbflow.worker import Housekeeper

MATES = 6  # healthy instances created with the corrupt one (one RQ job for all)
QUICK = 5.0  # seconds the healthy ones get: a lease (30 s) would show as a timeout

Corruption = tuple[str, str, Any]  # (key: state|metadata|steps, field, value; None deletes)


class Hooks:
    """What step callbacks do to their own instance's keys (set by each test)."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, str], Callable[[], None]] = {}

    def fire(self, iid: str, stage: str) -> None:
        hook = self.at.pop((iid, stage), None)
        if hook is not None:
            hook()


class AsyncFlow(WorkflowEntrypoint):
    async def run(self, event, step):
        iid = event.instance_id
        a = await step.do("a", lambda: self.env.fire(iid, "a") or 1)
        b = await step.do("b", lambda: 2)
        return {"n": event.payload, "sum": a + b}


class SyncFlow(WorkflowEntrypoint):
    def run(self, event, step):
        iid = event.instance_id
        a = step.do("a", lambda: self.env.fire(iid, "a") or 1)
        b = step.do("b", lambda: 2)
        return {"n": event.payload, "sum": a + b}


class Waits(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: 1)
        got = await step.wait_for_event("w", "go", timeout="1 hour")
        return {"n": event.payload, "got": got["payload"], "a": a}


class Sleeps(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("nap", 0.3)
        return {"n": event.payload}


FLOWS = {"async": AsyncFlow, "sync": SyncFlow}


def case_id(what: Corruption) -> str:
    """``state-stepsDone='abc'``, ``steps-a-1='garbage{'`` (selectable with ``-k``)."""
    return f"{what[0]}-{what[1].replace('#', '-')}={what[2]!r}"


def corrupt(engine: Engine, iid: str, what: Corruption) -> None:
    kind, field, value = what
    key = {"state": engine.keys.state, "metadata": engine.keys.metadata, "steps": engine.keys.steps}
    if value is None:
        engine.redis.hdel(key[kind](iid), field)
    else:
        engine.redis.hset(key[kind](iid), field, value)


def job_ids(engine: Engine) -> set[tuple[str, ...]]:
    """The instance ids of each RQ job queued (a NOSCRIPT retry of ``create`` may queue a
    job twice: its copy finds the instances claimed and does nothing)."""
    found = set()
    queues = [engine.backend.queue_for(wf).key for wf in engine.backend.classes]
    for jid in (j for q in queues for j in engine.redis.lrange(q, 0, -1)):
        data = engine.redis.hget(b"rq:job:" + jid, "data")
        _func, _inst, (_prefix, ids), _kw = json.loads(zlib.decompress(data))
        found.add(tuple(ids))
    return found


def make_batch(engine: Engine, cls: type, target_at: int = 3) -> tuple[Any, list[Any]]:
    """``MATES`` + 1 instances created together (one RQ job); returns the one at
    ``target_at`` and the others."""
    if not isinstance(engine.env, Hooks):
        engine.env = Hooks()
    made = engine.register(cls).create_batch([{"params": i} for i in range(MATES + 1)])
    if not engine.worker_running:  # (a running worker may have taken the job already)
        assert job_ids(engine) == {tuple(m.id for m in made)}  # one RQ job for all
    return made[target_at], [m for i, m in enumerate(made) if i != target_at]


def mates_finish_quickly(mates: list[Any]) -> None:
    """Every healthy instance completes within ``QUICK`` seconds of the worker starting."""
    deadline = time.monotonic() + QUICK
    for m in mates:
        got = m.wait(timeout=max(0.1, deadline - time.monotonic()))
        assert got["status"] == "complete", got


def ends(inst: Any, expect: str | None) -> None:
    """``expect``: the field the error must name (the instance ends errored), or None
    (the field is repaired or not read: the instance completes)."""
    got = inst.wait(timeout=QUICK)
    if expect is None:
        assert got["status"] == "complete", got
        return
    assert got["status"] == "errored", got
    assert got["error"]["name"] == "WorkflowError", got
    assert expect in got["error"]["message"], got
    # nothing left that would run it again or hold it
    r, k = inst.engine.redis, inst.engine.keys
    zsets = [k.leases, k.timers]
    if r.hexists(k.metadata(inst.id), "workflowName"):  # (it names the ready set)
        zsets.append(k.ready(inst.workflow))
    for zset in zsets:
        assert r.zscore(zset, inst.id) is None, zset


# Read by the claim (Lua: status; Python: workflowName, payload, createdAt, step entries),
# by step_finish / step_next (stepsDone), by finish (retention); the rest are rewritten or
# not read by a run at all.  Corrupted while the instance is queued, before any worker runs.
BEFORE_CLAIM: list[tuple[Corruption, str | None]] = [
    (("state", "status", "bogus"), "field status"),
    (("state", "createdAt", "yesterday"), "field createdAt"),
    (("state", "createdAt", None), "field createdAt"),
    (("state", "stepsDone", "abc"), "field stepsDone"),
    (("state", "stepsDone", "1.5"), "field stepsDone"),
    (("state", "retention", "abc"), "field retention"),
    (("state", "retention", "-5"), "field retention"),
    (("state", "retention", "nan"), "field retention"),
    (("state", "updatedAt", "junk"), None),
    (("state", "gen", "x"), None),
    (("state", "finishedAt", "x"), None),
    (("state", "owner", "x"), None),
    (("state", "hardStop", "x"), None),
    (("state", "waitType", "x"), None),
    (("state", "error", "{nope"), None),
    (("state", "output", "{nope"), None),
    (("metadata", "workflowName", None), "field workflowName"),
    (("metadata", "payload", "{nope"), "field payload"),
    (("metadata", "payload", None), "field payload"),
    (("metadata", "currentStep", b"\xff\xfe"), None),
    (("steps", "a#1", "garbage{"), "a#1"),
    (("steps", "a#1", '{"x":1}'), "a#1"),
    (("steps", "a#1", '{"s":"complete","i":"x"}'), "a#1"),
]


@pytest.mark.parametrize("kind", list(FLOWS))
@pytest.mark.parametrize(
    ("what", "expect"), BEFORE_CLAIM, ids=[case_id(w) for w, _ in BEFORE_CLAIM]
)
def test_a_field_corrupt_before_the_claim_ends_only_its_instance(
    engine: Engine, kind: str, what: Corruption, expect: str | None
) -> None:
    target, mates = make_batch(engine, FLOWS[kind])
    corrupt(engine, target.id, what)
    engine.start_worker()
    mates_finish_quickly(mates)
    ends(target, expect)


# Corrupted inside step a's callback: the next write (a's result with b's start, one
# step_next call) or the run's end (finish) reads them.
MID_RUN: list[tuple[Corruption, str | None]] = [
    (("state", "stepsDone", "abc"), "field stepsDone"),
    (("state", "retention", "abc"), "field retention"),
    (("state", "status", "bogus"), "field status"),
    (("state", "updatedAt", "junk"), None),
    (("state", "createdAt", "junk"), None),  # read only by the claim
    (("state", "gen", "x"), None),
    (("state", "finishedAt", "x"), None),
    (("state", "hardStop", "x"), None),
    (("metadata", "payload", "{nope"), None),  # read only by the claim
    (("metadata", "currentStep", b"\xff"), None),
]


@pytest.mark.parametrize("kind", list(FLOWS))
@pytest.mark.parametrize(("what", "expect"), MID_RUN, ids=[case_id(w) for w, _ in MID_RUN])
def test_a_field_corrupt_in_the_middle_of_a_run_ends_only_its_instance(
    engine: Engine, kind: str, what: Corruption, expect: str | None
) -> None:
    hooks = engine.env = Hooks()
    target, mates = make_batch(engine, FLOWS[kind])
    hooks.at[(target.id, "a")] = lambda: corrupt(engine, target.id, what)
    engine.start_worker()
    mates_finish_quickly(mates)
    ends(target, expect)


@pytest.mark.parametrize("kind", list(FLOWS))
def test_a_foreign_owner_stops_only_its_run_and_the_lease_hands_it_back(
    engine: Engine, kind: str
) -> None:
    """``owner`` is rewritten by every claim: a run that finds someone else's token stops
    (as when its lease was taken over), and the instance runs again once the lease is
    taken back; its batch-mates never wait for that."""
    hooks = engine.env = Hooks()
    target, mates = make_batch(engine, FLOWS[kind])
    hooks.at[(target.id, "a")] = lambda: corrupt(engine, target.id, ("state", "owner", "x"))
    engine.start_worker()
    mates_finish_quickly(mates)
    poll(lambda: engine.redis.zscore(engine.keys.leases, target.id) is not None, QUICK)
    engine.redis.zadd(engine.keys.leases, {target.id: 0})  # stand-in for the 30 s lease
    Housekeeper(engine.backend, threading.Event()).sweep(0)
    ends(target, None)


@pytest.mark.parametrize("kind", list(FLOWS))
def test_a_state_key_of_the_wrong_type_fails_no_batch_mate(engine: Engine, kind: str) -> None:
    """Every script of that instance fails (WRONGTYPE), even the one that would mark it
    errored; the others of the job complete all the same, and listings still list it."""
    hooks = engine.env = Hooks()
    target, mates = make_batch(engine, FLOWS[kind])

    def clobber() -> None:
        engine.redis.delete(engine.keys.state(target.id))
        engine.redis.set(engine.keys.state(target.id), "x")

    hooks.at[(target.id, "a")] = clobber
    engine.start_worker()
    mates_finish_quickly(mates)
    listed = engine.instances().set_index("id")
    assert len(listed) == MATES + 1
    assert pd.isna(listed.loc[target.id, "status"])
    assert (listed.drop(target.id)["status"] == "complete").all()


def test_a_steps_key_of_the_wrong_type_ends_only_its_instance(engine: Engine) -> None:
    target, mates = make_batch(engine, AsyncFlow)
    engine.redis.set(engine.keys.steps(target.id), "x")
    engine.start_worker()
    mates_finish_quickly(mates)
    got = target.wait(timeout=QUICK)
    assert got["status"] == "errored" and "WRONGTYPE" in got["error"]["message"], got


# -- scripts of waiting instances and of the housekeeper -------------------------------


def waiting_batch(engine: Engine, cls: type = Waits) -> tuple[Any, list[Any]]:
    target, mates = make_batch(engine, cls)
    engine.start_worker()
    for m in [target, *mates]:
        poll(lambda m=m: m.status()["status"] == "waiting", QUICK, f"{m.id} waiting")
    return target, mates


def test_take_event_with_a_corrupt_steps_done_ends_only_its_instance(
    worker_engine: Engine,
) -> None:
    """take_event counts the event step in stepsDone (HINCRBY)."""
    target, mates = waiting_batch(worker_engine)
    corrupt(worker_engine, target.id, ("state", "stepsDone", "abc"))
    for inst in [*mates, target]:
        inst.send_event("go", "p")
    mates_finish_quickly(mates)
    ends(target, "field stepsDone")


def test_send_event_with_a_wait_type_nbflow_did_not_write_wakes_it_and_it_completes(
    worker_engine: Engine,
) -> None:
    """waitType is rewritten by every wait: one that cannot be read wakes the instance,
    whose replay waits again if the event is not the one it waits for."""
    target, mates = waiting_batch(worker_engine)
    corrupt(worker_engine, target.id, ("state", "waitType", "garbage"))
    for inst in [*mates, target]:
        inst.send_event("go", "p")
    mates_finish_quickly(mates)
    ends(target, None)
    assert target.status()["output"]["got"] == "p"


def test_a_due_timer_of_an_instance_with_a_corrupt_status_ends_it(engine: Engine) -> None:
    """wake_due reads the status of every instance whose timer is due."""
    target, mates = make_batch(engine, Sleeps)
    engine.run_worker(burst=True)  # everyone asleep (0.3 s)
    corrupt(engine, target.id, ("state", "status", "bogus"))
    engine.start_worker()
    mates_finish_quickly(mates)
    ends(target, "field status")


def test_reaping_an_instance_with_a_corrupt_status_ends_it(engine: Engine) -> None:
    """reap reads the status of every instance whose lease expired."""
    target, mates = make_batch(engine, AsyncFlow)
    corrupt(engine, target.id, ("state", "status", "bogus"))
    engine.redis.zadd(engine.keys.leases, {target.id: 0})
    Housekeeper(engine.backend, threading.Event()).sweep(0)
    ends(target, "field status")
    engine.start_worker()
    mates_finish_quickly(mates)
    # it is listed once, as errored (not also under the status it had before)
    assert engine.instances()["id"].tolist().count(target.id) == 1


# -- lifecycle scripts ------------------------------------------------------------------


def test_restart_repairs_a_corrupt_gen(worker_engine: Engine) -> None:
    """gen (restart's counter, read by nothing else) is set afresh when unreadable."""
    worker_engine.env = Hooks()
    inst = worker_engine.register(AsyncFlow).create(params=1)
    inst.wait(timeout=QUICK)
    corrupt(worker_engine, inst.id, ("state", "gen", "x"))
    inst.restart()
    assert inst.wait(timeout=QUICK)["status"] == "complete"
    assert worker_engine.redis.hget(worker_engine.keys.state(inst.id), "gen") == b"1"


def test_restart_from_an_unreadable_step_says_so_and_drops_other_unreadable_entries(
    worker_engine: Engine,
) -> None:
    worker_engine.env = Hooks()
    inst = worker_engine.register(AsyncFlow).create(params=1)
    inst.wait(timeout=QUICK)
    corrupt(worker_engine, inst.id, ("steps", "a#1", "garbage{"))
    with pytest.raises(ValueError, match="a#1"):
        inst.restart(from_step="a")
    assert inst.status()["status"] == "complete"  # nothing changed
    inst.restart(from_step="b")  # a#1 cannot be kept: it is dropped and runs again
    assert inst.wait(timeout=QUICK) == {"status": "complete", "output": {"n": 1, "sum": 3}}


def test_restart_repairs_a_corrupt_steps_done(worker_engine: Engine) -> None:
    worker_engine.env = Hooks()
    inst = worker_engine.register(AsyncFlow).create(params=1)
    corrupt(worker_engine, inst.id, ("state", "stepsDone", "abc"))
    ends(inst, "field stepsDone")
    inst.restart()
    assert inst.wait(timeout=QUICK)["status"] == "complete"


def test_terminate_with_a_corrupt_retention_terminates(worker_engine: Engine) -> None:
    inst = worker_engine.register(Waits).create()
    poll(lambda: inst.status()["status"] == "waiting", QUICK)
    corrupt(worker_engine, inst.id, ("state", "retention", "abc"))
    inst.terminate()
    assert inst.status() == {"status": "terminated"}


# -- listings -----------------------------------------------------------------------------

LISTING_DAMAGE: list[Corruption] = [
    ("state", "stepsDone", "abc"),
    ("state", "createdAt", "garbage"),
    ("state", "updatedAt", "garbage"),
    ("state", "createdAt", "2024-01-01T00:00:00"),  # no time zone: nbflow writes UTC "Z"
    ("state", "error", "{nope"),
    ("metadata", "workflowName", b"\xff\xfe"),
    ("metadata", "currentStep", b"\xff\xfe"),
]


def test_listings_show_a_corrupt_instance_with_its_unreadable_fields_empty(
    engine: Engine,
) -> None:
    engine.env = Hooks()
    flow = engine.register(AsyncFlow)
    healthy = [flow.create(params=i) for i in range(3)]
    bad = flow.create(params=99)
    for what in LISTING_DAMAGE:
        corrupt(engine, bad.id, what)
    frame = engine.instances()
    assert sorted(frame["id"]) == sorted([*(h.id for h in healthy), bad.id])
    row = frame.set_index("id").loc[bad.id]
    assert pd.isna(row["created_at"]) and pd.isna(row["updated_at"])
    assert pd.isna(row["steps_done"]) and row["error"] is None
    assert pd.isna(row["workflow"]) and pd.isna(row["current_step"])
    good = frame.set_index("id").loc[healthy[0].id]
    assert good["steps_done"] == 0 and good["created_at"].tzinfo is not None
    assert good["workflow"] == "AsyncFlow"
    # the filtered listings read the same rows
    assert bad.id in engine.instances(status="queued")["id"].tolist()
    assert len(engine.instances(status="queued", limit=2)) == 2
    # a status card and the dashboard's table of the same listing
    info = bad.info()
    assert info["steps_done"] is None and pd.isna(info["created_at"])
    dash = Dashboard(engine)
    try:
        dash.refresh()
        assert bad.id in dash.instances["id"].tolist() and bad.id in dash.static_html()
    finally:
        dash.close()


def test_listing_a_corrupt_instance_with_the_cli_works(engine: Engine, capsys: Any) -> None:
    from nbflow import cli

    flow = engine.register(AsyncFlow)
    good = flow.create(params=1)
    bad = flow.create(params=2)
    corrupt(engine, bad.id, ("state", "createdAt", "garbage"))
    corrupt(engine, bad.id, ("state", "stepsDone", "abc"))
    url = engine.redis.get_connection_kwargs()
    redis_url = f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}"
    code = cli.main(["list", "--redis", redis_url, "--prefix", engine.prefix])
    out = capsys.readouterr().out
    assert code == 0 and good.id in out and bad.id in out
