"""RQ job hashes never outlive their jobs: a worker deletes a job's hash as it takes the
job, so a SIGKILLed worker leaves none behind (it used to leave every job it was running,
``rq:job:*`` with no TTL), and a hash whose job nobody took expires (``JOB_TTL``)."""

from __future__ import annotations

from pathlib import Path

import redis
from helpers_procs import Procs, poll, wait_workers
from test_faults import Harness, procs  # noqa: F401  (the worker-process fixture)

from nbflow import Engine
from nbflow.backend import JOB_TTL


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
