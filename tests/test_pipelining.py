"""Pipelined step writes and the stop handshake (spec 3.3, 5).

Steps no longer wait a round trip each: a step's record is on its way to Redis
before the next callback runs, and ``pause()`` / ``terminate()`` / ``restart()``
ask the worker holding the instance to start no new step before they return.
These tests fire those calls into runs of thousands of fast steps, in an
in-process worker thread and in ``nbflow worker`` processes, and count the side
effects each step start makes in Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers_procs import Procs, load_module, write_module
from support import poll, wait_status

from nbflow import Engine

COUNTING_SOURCE = '''
import redis

from nbflow import WorkflowEntrypoint

_clients = {}


def _client(url):
    """One Redis client per URL and process, for the steps' side-effect counter."""
    c = _clients.get(url)
    if c is None:
        c = _clients[url] = redis.Redis.from_url(url)
    return c


class Counting(WorkflowEntrypoint):
    """n fast steps; each start adds 1 to a counter in Redis (its side effect)."""

    async def run(self, event, step):
        p = event.payload
        c = _client(p["url"])
        total = 0
        for i in range(p["n"]):
            total += await step.do("s", lambda i=i: c.incr(p["k"]) and i)
        return total


class TwoBranches(WorkflowEntrypoint):
    """Two parallel branches (asyncio.gather) of n/2 fast counted steps each."""

    async def run(self, event, step):
        import asyncio

        p = event.payload
        c = _client(p["url"])

        async def branch(name):
            total = 0
            for i in range(p["n"] // 2):
                total += await step.do(name, lambda i=i: c.incr(p["k"]) and i)
            return total

        return sum(await asyncio.gather(branch("left"), branch("right")))


class SyncCounting(WorkflowEntrypoint):
    """The same as a plain ``def run``."""

    def run(self, event, step):
        p = event.payload
        c = _client(p["url"])
        total = 0
        for i in range(p["n"]):
            total += step.do("s", lambda i=i: c.incr(p["k"]) and i)
        return total
'''


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture(
    params=[("thread", "async"), ("process", "async"), ("thread", "sync"), ("process", "sync")],
    ids=lambda p: "-".join(p),
)
def setup(
    request: Any, engine: Engine, redis_url: str, tmp_path: Path, procs: Procs
) -> tuple[Engine, Any, str]:
    """A registered Counting workflow (``async def run`` or plain ``def run``) and a
    worker of the given kind running it."""
    where, kind = request.param
    module = write_module(tmp_path, f"nbf_count_{engine.prefix}", COUNTING_SOURCE)
    loaded = load_module(tmp_path, module)
    flow = engine.register(loaded.Counting if kind == "async" else loaded.SyncCounting)
    if where == "thread":
        engine.start_worker()
    else:
        procs.worker("w", redis_url, engine.prefix, engine.queue_name, module)
    return engine, flow, redis_url


def _count(engine: Engine, k: str) -> int:
    return int(engine.redis.get(k) or 0)


def _stored(inst: Any) -> int:
    steps = inst.steps()
    return int((steps["status"] == "complete").sum()) if len(steps) else 0


N = 4000


def _pause_and_resume(engine: Engine, inst: Any, k: str, cycles: int, late: int) -> None:
    """Pauses the running instance ``cycles`` times: after each ``pause()`` at most
    ``late`` steps (those already running) start, and every step that ran is stored
    (none runs again on resume); then resumes it."""
    for cycle in range(cycles):
        seen = _count(engine, k)
        poll(lambda seen=seen: _count(engine, k) >= seen + 50, 30, "steps to run")
        inst.pause()
        at_return = _count(engine, k)
        wait_status(inst, "paused", 10)
        after = _count(engine, k)
        assert after - at_return <= late, (cycle, at_return, after)
        assert _stored(inst) == after, (cycle, _stored(inst), after)
        inst.resume()


def test_no_step_starts_after_pause_returns_and_every_step_that_ran_is_stored(
    setup: tuple[Engine, Any, str],
) -> None:
    engine, flow, url = setup
    k = f"{engine.prefix}:count"
    inst = flow.create(params={"url": url, "k": k, "n": N})
    # the one step already running may make its start count just after the return
    _pause_and_resume(engine, inst, k, cycles=4, late=1)
    assert inst.wait(timeout=60) == {"status": "complete", "output": sum(range(N))}
    assert _count(engine, k) == N  # each of the N steps ran exactly once


def test_no_branch_of_a_parallel_run_starts_a_step_after_pause_returns(
    engine: Engine, redis_url: str, tmp_path: Path
) -> None:
    module = write_module(tmp_path, f"nbf_branches_{engine.prefix}", COUNTING_SOURCE)
    flow = engine.register(load_module(tmp_path, module).TwoBranches)
    engine.start_worker()
    k = f"{engine.prefix}:count"
    inst = flow.create(params={"url": redis_url, "k": k, "n": N})
    _pause_and_resume(engine, inst, k, cycles=3, late=2)  # one per branch at most
    half = sum(range(N // 2))
    assert inst.wait(timeout=60) == {"status": "complete", "output": 2 * half}
    assert _count(engine, k) == N


def test_nothing_runs_after_terminate_returns(setup: tuple[Engine, Any, str]) -> None:
    engine, flow, url = setup
    k = f"{engine.prefix}:count"
    inst = flow.create(params={"url": url, "k": k, "n": N})
    poll(lambda: _count(engine, k) >= 100, 30, "steps to run")
    inst.terminate()
    at_return = _count(engine, k)
    assert inst.status() == {"status": "terminated"}
    poll(lambda: not engine.redis.zscore(engine.keys.leases, inst.id), 10, "the run to stop")
    assert _count(engine, k) - at_return <= 1
    assert inst.status() == {"status": "terminated"}


def test_restart_mid_run_stops_the_old_run_and_the_new_one_runs_every_step_once(
    setup: tuple[Engine, Any, str],
) -> None:
    engine, flow, url = setup
    k = f"{engine.prefix}:count"
    inst = flow.create(params={"url": url, "k": k, "n": N})
    poll(lambda: _count(engine, k) >= 100, 30, "steps to run")
    before = _count(engine, k)
    inst.restart()
    at_return = _count(engine, k)  # may include the new run's first steps already
    assert inst.wait(timeout=60) == {"status": "complete", "output": sum(range(N))}
    # the old run started at most one more step after the return; the new run ran all
    # N steps once (none was taken from the old run's results)
    assert before + N <= _count(engine, k) <= at_return + N + 1
    assert _stored(inst) == N


def test_a_pause_no_worker_hears_is_applied_by_the_next_step_write(engine: Engine) -> None:
    """A run whose worker cannot be told (no stop listener behind its token, or its
    listener away): the pause still holds, enforced by the scripts (``hardStop``)."""
    from nbflow import WorkflowEntrypoint

    class X(WorkflowEntrypoint[Any, Any]):
        async def run(self, event: Any, step: Any) -> None:
            return None

    flow = engine.register(X)
    prefix, iid, token = engine.prefix, "unheard", "no-listener-token"
    engine.redis.hset(engine.keys.state(iid), mapping={"status": "queued"})
    engine.redis.hset(engine.keys.metadata(iid), mapping={"workflowName": "X", "payload": "1"})
    sc = engine.backend.scripts
    claim = sc.claim(args=[prefix, iid, token, "1.0", "2026-01-01T00:00:00.000Z", "9e9"])
    assert claim[0] == b"ok"
    flow.get(iid).pause()  # returns at once: nobody listens on a channel for this token
    assert flow.get(iid).status() == {"status": "waitingForPause"}
    own = [iid, token, "2.0", "2026-01-01T00:00:01.000Z"]
    start = [*own, "a#1", '{"s":"running","i":0,"t0":0.0}', "a", '"step":"a#1"']
    assert sc.step_start(args=[prefix, *start]) == b"paused"  # refused: the step never runs
    assert flow.get(iid).status() == {"status": "paused"}
    assert engine.redis.hget(engine.keys.steps(iid), "a#1") is None


def test_redis_losing_its_scripts_mid_run_loses_no_step(worker_engine: Engine) -> None:
    """SCRIPT FLUSH while steps stream out: the calls that met an empty script cache are
    sent again, in order, and every step is stored once."""
    from nbflow import WorkflowEntrypoint

    counts: dict[int, int] = {}
    flushed: list[bool] = []

    class Flushing(WorkflowEntrypoint[Any, Any]):
        async def run(self, event: Any, step: Any) -> int:
            total = 0
            for i in range(600):

                def body(i: int = i) -> int:
                    counts[i] = counts.get(i, 0) + 1
                    if i == 300 and not flushed:
                        flushed.append(True)
                        redis.Redis(
                            connection_pool=worker_engine.redis.connection_pool
                        ).script_flush()
                    return i

                total += await step.do("s", body)
            return total

    inst = worker_engine.register(Flushing).create()
    assert inst.wait(timeout=60) == {"status": "complete", "output": sum(range(600))}
    assert flushed and set(counts.values()) == {1} and len(counts) == 600
    assert _stored(inst) == 600
