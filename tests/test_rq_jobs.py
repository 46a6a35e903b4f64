"""RQ job hashes never outlive their jobs: a worker deletes a job's hash as it takes the
job, so a SIGKILLed worker leaves none behind (it used to leave every job it was running,
``rq:job:*`` with no TTL), and a hash whose job nobody took expires (``JOB_TTL``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import cleanup_prefix
from helpers_procs import Procs, poll, wait_workers
from rq.job import Job
from rq.serializers import JSONSerializer
from test_faults import Harness, procs  # noqa: F401  (the worker-process fixture)

from nbflow import Engine, WorkflowEntrypoint
from nbflow.backend import JOB_FUNCTION, JOB_TTL


def job_hashes(client: redis.Redis, queue: str) -> dict[str, int]:
    """The RQ job hashes of ``queue``'s workflow queues (their ``origin``) and their TTLs
    (-1: none)."""
    found = {}
    for key in client.scan_iter(match="rq:job:*", count=1000):
        origin = client.hget(key, "origin") if client.type(key) == b"hash" else None
        if origin is not None and origin.decode().startswith(f"{queue}:"):
            found[key.decode()] = int(client.ttl(key))
    return found


def test_workers_sigkilled_mid_job_leave_no_rq_job_hash(
    engine: Engine,
    redis_url: str,
    procs: Procs,  # noqa: F811
    tmp_path: Path,
) -> None:
    h = Harness(engine, redis_url, procs, tmp_path)
    h.fx.set(h.k + ":hold", 1)
    kills = 0
    for round_ in range(2):  # each round: a batch job and a single job, their worker killed
        worker = h.worker(f"w-{round_}")
        wait_workers(engine.redis, engine.queue_name, 1)
        if round_ == 0:  # one job for the three; the blocked step holds the others
            h.create_batch([[["do", "one"], ["block", "two"]] for _ in range(3)])
        else:
            h.create([["block", "two"]])

        def started(pid: int = worker.pid) -> bool:  # (this worker: round 0's come back too)
            return any(h.fx.get(f"{h.k}:in:{i}") == str(pid).encode() for i in h.plans)

        poll(started, 20, "a blocking step to start")
        procs.kill(worker)
        kills += 1
        h.force_expiry()  # stand-in for the 30 s leases
    h.fx.delete(h.k + ":hold")
    rescue = h.worker("w-rescue")
    status = h.wait_all(timeout=30, workers=[rescue])
    assert set(status.values()) == {"complete"}, h.bad(status)
    assert kills == 2
    assert job_hashes(engine.redis, engine.queue_name) == {}


def test_a_job_hash_nobody_takes_expires_and_its_instances_still_run(
    engine: Engine,
    redis_url: str,
    procs: Procs,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A job popped from the queue by a worker killed before it read the job (the moment
    between BLPOP and the read): the hash has a TTL, and the orphan sweep runs the
    instance again."""
    h = Harness(engine, redis_url, procs, tmp_path)
    inst = h.create([["do", "one"]])
    lost_pop = engine.redis.lpop(engine.backend.queue_for(inst.workflow).key)
    assert lost_pop is not None  # the lost pop
    ttls = list(job_hashes(engine.redis, engine.queue_name).values())
    assert len(ttls) == 1 and 0 < ttls[0] <= JOB_TTL
    h.force_expiry()
    h.worker("w")
    assert inst.wait(timeout=30)["status"] == "complete", procs.logs()


# -- jobs written from a template (nbflow.rqjobs) ------------------------------------


def rq_commands(engine: Engine, ids: list[str], workflow: str, at_front: bool) -> list[list]:
    """What RQ itself emits for the job ``Backend.enqueue`` writes, made comparable."""
    b = engine.backend
    more = f" +{len(ids) - 1}" if len(ids) > 1 else ""
    pipe = engine.redis.pipeline(transaction=False)
    b.queue_for(workflow).enqueue_call(
        JOB_FUNCTION,
        args=(b.prefix, ids),
        timeout=-1,
        ttl=JOB_TTL,
        result_ttl=0,
        failure_ttl=24 * 3600,
        description=f"nbflow {b.prefix} {workflow} {ids[0]}{more}",
        meta={"nbflow": b.prefix, "ids": ids},
        job_id="the-job",
        at_front=at_front,
        pipeline=pipe,
    )
    out = [list(args) for args, _ in pipe.command_stack]
    pipe.reset()
    return out


def ours(engine: Engine, ids: list[str], workflow: str, at_front: bool) -> list[list]:
    pipe = engine.redis.pipeline(transaction=False)
    engine.backend.enqueue(ids, workflow, at_front=at_front, pipe=pipe)
    out = [list(args) for args, _ in pipe.command_stack]
    pipe.reset()
    job_id = out[-1][-1]  # the push's value
    return [[a.replace(job_id, "the-job") if named(a, job_id) else a for a in c] for c in out]


def named(arg: object, job_id: str) -> bool:
    return isinstance(arg, str) and job_id in arg


def without_stamps(commands: list[list]) -> list[list]:
    out = []
    for cmd in commands:
        cmd = list(cmd)
        for n in range(2, len(cmd) - 1, 2):
            if cmd[0] == "HSET" and cmd[n] in ("created_at", "enqueued_at"):
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", cmd[n + 1])
                cmd[n + 1] = "<stamp>"
        out.append(cmd)
    return out


@pytest.mark.parametrize("at_front", [False, True])
@pytest.mark.parametrize("ids", [["one"], ["a", "b", "c"]])
def test_jobs_are_written_with_the_very_commands_rq_emits(
    engine: Engine, ids: list[str], at_front: bool
) -> None:
    for _ in range(2):  # the template's first use, then a later one
        assert without_stamps(ours(engine, ids, "Flow", at_front)) == without_stamps(
            rq_commands(engine, ids, "Flow", at_front)
        )


def test_a_job_from_the_template_reads_back_in_rq_like_any_job(engine: Engine) -> None:
    pipe = engine.redis.pipeline(transaction=False)
    engine.backend.enqueue(["x1", "x2"], "Flow", pipe=pipe)
    engine.backend.enqueue(["y1"], "Flow", pipe=pipe)
    pipe.execute()
    queue = engine.backend.queue_for("Flow")
    jobs = [Job.fetch(j, connection=engine.redis, serializer=JSONSerializer) for j in queue.job_ids]
    assert len(set(queue.job_ids)) == 2  # a fresh id per job
    assert [job.args for job in jobs] == [[engine.prefix, ["x1", "x2"]], [engine.prefix, ["y1"]]]
    assert [job.meta["ids"] for job in jobs] == [["x1", "x2"], ["y1"]]
    assert all(job.func_name == JOB_FUNCTION and job.get_status() == "queued" for job in jobs)
    assert all(0 < engine.redis.ttl(job.key) <= JOB_TTL for job in jobs)
    assert queue.count == 2


# -- jobs the claim_job script does not know (runner.take_job) -----------------------


class Two(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        return [await step.do("a", lambda: 1), await step.do("b", lambda: 2)]


def test_a_job_without_nbflows_meta_is_still_run(engine: Engine) -> None:
    """A job as nbflow wrote it before its ids went in the meta (or pushed by hand)."""
    flow = engine.register(Two)
    inst = flow.create(id="old")
    queue = engine.backend.queue_for("Two")
    queue.empty()
    queue.enqueue_call(JOB_FUNCTION, args=(engine.prefix, ["old"]), timeout=-1, result_ttl=0)
    assert engine.run_worker() >= 1
    assert inst.status() == {"status": "complete", "output": [1, 2]}


def test_a_foreign_job_with_a_meta_of_its_own_is_dropped_and_the_worker_goes_on(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    flow = engine.register(Two)
    queue = engine.backend.queue_for("Two")
    foreign = queue.enqueue_call("builtins.print", args=("hi",), meta={"owner": "someone"})
    inst = flow.create(id="after")
    with caplog.at_level(logging.ERROR, logger="nbflow"):
        engine.run_worker()
    assert f"job {foreign.id} calls builtins.print, not an nbflow job; dropped" in caplog.text
    assert not engine.redis.exists(foreign.key)
    assert inst.status() == {"status": "complete", "output": [1, 2]}


def test_a_job_of_another_prefix_is_refused_and_its_instance_stays_queued(
    engine: Engine, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = Engine(redis_url, prefix=f"{engine.prefix}-other", queue=engine.queue_name)
    try:
        theirs = other.register(Two).create(id="theirs")
        engine.register(Two)
        with caplog.at_level(logging.ERROR, logger="nbflow"):
            engine.run_worker()
        assert f"job for prefix '{other.prefix}' reached a worker for prefix" in caplog.text
        assert theirs.status() == {"status": "queued"}  # not run, not errored by the wrong worker
    finally:
        cleanup_prefix(other.redis, other.prefix, other.queue_name)
