"""Lost replies (SPEC 12): a state-changing call whose reply is lost after Redis ran it,
and that redis-py therefore sends again, answers what the first attempt would have
answered, and its effect happens once.

Each test puts ``tests/lostreply.py``'s proxy between an engine and the test Redis and
has it cut the connection right after Redis ran one chosen script (inside ``MULTI``:
after the ``EXEC``), before the reply reaches the engine.  ``proxy.cuts == 1`` shows
the fault really happened; the checks go through a direct connection (the ``engine``
fixture): one instance, one event, one history record, one RQ job, one run per step.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from helpers_procs import RedisServer
from lostreply import LostReplyProxy
from rq.job import Job
from rq.serializers import JSONSerializer

from nbflow import Engine, WorkflowEntrypoint
from nbflow.worker import Housekeeper

RUNS: Counter[str] = Counter()
_LOCK = threading.Lock()


def ran(key: str) -> str:
    with _LOCK:
        RUNS[key] += 1
    return key


class Three(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        a = await step.do("a", lambda: ran("a"))
        b = await step.do("b", lambda: ran("b"))
        c = await step.do("c", lambda: ran("c"))
        return [a, b, c]


class TwoEvents(WorkflowEntrypoint):
    """Takes one event of type ``go``, then waits for a second one."""

    async def run(self, event: Any, step: Any) -> Any:
        first = await step.wait_for_event("first", type="go", timeout="1 hour")
        second = await step.wait_for_event("second", type="go", timeout="1 hour")
        return [first["payload"], second["payload"]]


@pytest.fixture
def proxy(redis_url: str) -> Iterator[LostReplyProxy]:
    url = urlparse(redis_url)
    if url.scheme != "redis" or url.path not in ("", "/", "/0"):
        pytest.skip("the proxy forwards TCP to a Redis URL redis://host:port[/0]")
    p = LostReplyProxy((url.hostname or "127.0.0.1", url.port or 6379))
    yield p
    p.close()


@pytest.fixture
def lossy(proxy: LostReplyProxy, engine: Engine) -> Iterator[Engine]:
    """An engine on the same prefix and queue as ``engine``, talking through the proxy."""
    eng = Engine(proxy.url, prefix=engine.prefix, queue=engine.queue_name)
    eng.register(Three)
    eng.register(TwoEvents)
    RUNS.clear()
    yield eng
    eng.redis.close()


def sha(eng: Engine, script: str) -> str:
    return str(getattr(eng.backend.scripts, script).sha)


def jobs(engine: Engine) -> list[list[str]]:
    """The instance ids of every RQ job on the engine's queues, one per workflow (as
    RQ reads them)."""
    ids = [
        jid
        for wf in ("Three", "TwoEvents")
        for jid in engine.redis.lrange(f"rq:queue:{engine.queue_name}:{wf}", 0, -1)
    ]
    out = []
    for jid in ids:
        job = Job.fetch(jid.decode(), connection=engine.redis, serializer=JSONSerializer)
        out.append(list(job.args[1]))
    return out


def events(engine: Engine, iid: str, ev: str) -> int:
    return sum(1 for item in engine.instance(iid).history() if item["ev"] == ev)


# -- the engine's calls ----------------------------------------------------------------


def test_create_whose_reply_is_lost_returns_the_instance_and_creates_it_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    proxy.cut_on_script(sha(lossy, "create"))
    inst = lossy.workflow("Three").create(id="once", params={"x": 1})
    assert proxy.cuts == 1
    assert inst.id == "once" and inst.status() == {"status": "queued"}
    assert jobs(engine) == [["once"]]  # one RQ job, not one per attempt
    assert engine.instances()["id"].tolist() == ["once"]
    assert engine.redis.zcard(engine.keys.ready("Three")) == 1


def test_create_batch_whose_reply_is_lost_returns_every_instance_with_one_job_each(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    proxy.cut_on_script(sha(lossy, "create"))
    items = [{"id": f"b{n:02d}"} for n in range(60)]
    made = lossy.workflow("Three").create_batch(items)
    assert proxy.cuts == 1
    assert [i.id for i in made] == [item["id"] for item in items]
    pushed = jobs(engine)
    assert sorted(i for ids in pushed for i in ids) == [item["id"] for item in items]
    assert len(pushed) == 2  # 60 instances: two jobs of 30, pushed once


def test_send_event_whose_reply_is_lost_buffers_the_event_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(TwoEvents).create(id="ev")
    proxy.cut_on_script(sha(lossy, "send_event"))
    assert lossy.instance("ev").send_event("go", 1) is None
    assert proxy.cuts == 1
    assert engine.redis.llen(engine.keys.events("ev", "go")) == 1
    engine.run_worker()
    # the one event was taken by the first wait; the second still waits
    assert inst.status() == {"status": "waiting"}
    assert engine.redis.llen(engine.keys.events("ev", "go")) == 0
    assert events(engine, "ev", "event.sent") == 1
    assert events(engine, "ev", "event.received") == 1


def test_send_event_that_wakes_an_instance_and_whose_reply_is_lost_pushes_one_job(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(TwoEvents).create(id="wk")
    engine.run_worker()
    assert inst.status() == {"status": "waiting"}
    proxy.cut_on_script(sha(lossy, "send_event"))
    proxy.cut_on_script(sha(lossy, "jobs_once"))  # and the job's push after it
    lossy.instance("wk").send_event("go", 1)
    assert proxy.cuts == 2
    assert inst.status() == {"status": "queued"}
    assert jobs(engine) == [["wk"]]
    engine.run_worker()
    assert inst.status() == {"status": "waiting"}  # for the second event: none came
    assert events(engine, "wk", "event.sent") == 1
    assert events(engine, "wk", "event.received") == 1


def test_pause_whose_reply_is_lost_returns_and_pauses_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="p")
    proxy.cut_on_script(sha(lossy, "pause"))
    assert lossy.instance("p").pause() is None  # not InvalidStateError "it is paused"
    assert proxy.cuts == 1
    assert inst.status() == {"status": "paused"}
    assert events(engine, "p", "paused") == 1


def test_resume_whose_reply_is_lost_returns_and_pushes_one_job(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="r")
    inst.pause()
    engine.redis.delete(f"rq:queue:{engine.queue_name}:Three")  # the create's job
    proxy.cut_on_script(sha(lossy, "resume"))
    assert lossy.instance("r").resume() is None  # not InvalidStateError "it is queued"
    assert proxy.cuts == 1
    assert inst.status() == {"status": "queued"}
    assert jobs(engine) == [["r"]]
    assert events(engine, "r", "resumed") == 1
    engine.run_worker()
    assert inst.status()["status"] == "complete"
    assert RUNS == {"a": 1, "b": 1, "c": 1}


def test_terminate_whose_reply_is_lost_returns_and_terminates_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="t")
    proxy.cut_on_script(sha(lossy, "terminate"))
    assert lossy.instance("t").terminate() is None  # not "it is terminated"
    assert proxy.cuts == 1
    assert inst.status() == {"status": "terminated"}
    assert events(engine, "t", "terminated") == 1


def test_restart_whose_reply_is_lost_restarts_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="rs")
    engine.run_worker()
    assert inst.status()["status"] == "complete"
    gen = engine.redis.hget(engine.keys.state("rs"), "gen")
    proxy.cut_on_script(sha(lossy, "restart"))
    assert lossy.instance("rs").restart(from_step="b") is None
    assert proxy.cuts == 1
    assert events(engine, "rs", "restarted") == 1
    assert engine.redis.hget(engine.keys.state("rs"), "gen") == b"1" and gen is None
    assert jobs(engine) == [["rs"]]
    engine.run_worker()
    assert inst.status() == {"status": "complete", "output": ["a", "b", "c"]}
    assert RUNS == {"a": 1, "b": 2, "c": 2}  # b and c again, once each


def test_fork_whose_reply_is_lost_returns_the_new_instance_and_forks_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="orig")
    engine.run_worker()
    assert inst.status()["status"] == "complete"
    proxy.cut_on_script(sha(lossy, "fork"))
    copy = lossy.instance("orig").fork(from_step="b", id="copy")  # not InstanceExistsError
    assert proxy.cuts == 1
    assert copy.id == "copy" and copy.status() == {"status": "queued"}
    assert jobs(engine) == [["copy"]]  # one RQ job, not one per attempt
    RUNS.clear()
    engine.run_worker()
    assert copy.status() == {"status": "complete", "output": ["a", "b", "c"]}
    assert RUNS == {"b": 1, "c": 1}  # a was copied; b and c ran once


@pytest.mark.parametrize("cached", ["none", "create", "jobs_once"])
def test_create_whose_reply_is_lost_while_redis_lacks_scripts_pushes_one_job(
    tmp_path: Any, cached: str
) -> None:
    """The same, on a Redis that lost its script cache (a restart) or part of it: the
    NOSCRIPT answers make the transaction go again, and still one job goes out."""
    server = RedisServer(tmp_path).start()
    proxy = LostReplyProxy(("127.0.0.1", server.port))
    try:
        eng = Engine(proxy.url, prefix="p", queue="q")
        flow = eng.register(Three)
        direct = server.client()
        if cached != "none":
            direct.script_load(eng.backend.scripts._scripts[cached].script)
        proxy.cut_on_script(sha(eng, "create"))
        flow.create(id="cold")
        assert proxy.cuts == 1
        assert len(direct.lrange("rq:queue:q:Three", 0, -1)) == 1
        assert direct.hget("p:cold:state", "status") == b"queued"
        eng.redis.close()
        direct.close()
    finally:
        proxy.close()
        server.stop()


# -- the worker's calls ------------------------------------------------------------------


def test_claim_whose_reply_is_lost_runs_the_instance_at_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="c")
    (job_id,) = engine.redis.lrange(f"rq:queue:{engine.queue_name}:Three", 0, -1)
    # a job's first instance is claimed by the script that takes the job
    proxy.cut_on_script(sha(lossy, "claim_job"))
    lossy.run_worker()
    assert proxy.cuts == 1
    # the resent claim knew itself by its token: the run went ahead, no lease to wait out
    assert inst.status() == {"status": "complete", "output": ["a", "b", "c"]}
    assert RUNS == {"a": 1, "b": 1, "c": 1}
    assert engine.redis.hget(engine.keys.state("c"), "stepsDone") == b"3"
    assert not engine.redis.exists(f"rq:job:{job_id.decode()}")  # the job was taken


def test_claim_of_a_jobs_second_instance_whose_reply_is_lost_runs_both_at_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    flow = engine.register(Three)
    first, second = flow.create_batch([{"id": "c1"}, {"id": "c2"}])
    proxy.cut_on_script(sha(lossy, "claim"))  # the second instance's own claim
    lossy.run_worker()
    assert proxy.cuts == 1
    for inst in (first, second):
        assert inst.status() == {"status": "complete", "output": ["a", "b", "c"]}
    assert RUNS == {"a": 2, "b": 2, "c": 2}


def test_step_write_whose_reply_is_lost_is_not_applied_twice(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="s")
    # step_next carries a's result and b's start; its connection is cut after it ran
    proxy.cut_on_script(sha(lossy, "step_next"))
    lossy.run_worker()
    assert proxy.cuts == 1
    assert engine.redis.hget(engine.keys.steps("s"), "a#1") is not None
    finish(engine)
    assert inst.status() == {"status": "complete", "output": ["a", "b", "c"]}
    # a's result reached Redis once and a never runs again; b and c, whose results
    # may have gone out on the dead connection (or after it), may run once more
    assert RUNS["a"] == 1 and RUNS["b"] <= 2 and RUNS["c"] <= 2
    assert engine.redis.hget(engine.keys.state("s"), "stepsDone") == b"3"
    assert [s["step"] for s in inst.steps().to_dict("records")] == ["a", "b", "c"]


def test_finish_whose_reply_is_lost_completes_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(Three).create(id="f")
    proxy.cut_on_script(sha(lossy, "step_finish_then_finish"))
    lossy.run_worker()
    assert proxy.cuts == 1
    assert inst.status() == {"status": "complete", "output": ["a", "b", "c"]}
    finish(engine)
    assert RUNS == {"a": 1, "b": 1, "c": 1}
    assert engine.redis.hget(engine.keys.state("f"), "stepsDone") == b"3"
    assert engine.redis.zcard(engine.keys.leases) == 0


def test_timer_wake_whose_reply_is_lost_dispatches_the_instance_once(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    inst = engine.register(TwoEvents).create(id="w")
    engine.run_worker()
    engine.redis.zadd(engine.keys.timers, {"w": 1})  # its event timeout is due
    proxy.cut_on_script(sha(lossy, "wake_due"))
    assert Housekeeper(lossy.backend, threading.Event()).wake_due() == 1
    assert proxy.cuts == 1
    assert inst.status() == {"status": "queued"}
    assert jobs(engine) == [["w"]]
    assert events(engine, "w", "woke") == 1


def finish(engine: Engine) -> None:
    """Stand-in for the 30 s lease running out, then a worker burst."""
    for iid in engine.redis.zrange(engine.keys.leases, 0, -1):
        engine.redis.zadd(engine.keys.leases, {iid: 0})
    engine.register(Three)
    engine.run_worker()


def test_schedule_trigger_whose_reply_is_lost_makes_one_instance(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    engine.register(Three)
    sched = lossy.schedule("Three", "0 2 * * *", name="nightly")
    proxy.cut_on_script(sha(lossy, "schedule_trigger"))
    made = sched.trigger()  # not a second instance under "-2"
    assert proxy.cuts == 1
    assert engine.instances()["id"].tolist() == [made.id]
    assert jobs(engine) == [[made.id]]
    assert lossy.schedules().set_index("name").loc["nightly", "triggered"] == 1


def test_schedule_delete_whose_reply_is_lost_returns_instead_of_lookup_error(
    engine: Engine, lossy: Engine, proxy: LostReplyProxy
) -> None:
    sched = lossy.schedule("Three", "0 2 * * *", name="gone")
    proxy.cut_on_script(sha(lossy, "schedule_delete"))
    sched.delete()  # the resend finds it deleted: the first answer comes back
    assert proxy.cuts == 1
    assert lossy.schedules().empty
