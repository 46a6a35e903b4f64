"""Limits, priorities and delayed starts (spec 10.2), against real Redis and real
``nbflow worker`` processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nbflow import Engine, WorkflowEntrypoint
from tests.helpers_procs import Procs, load_module, wait_workers, write_module
from tests.support import poll

# A workflow whose one step records, in Redis, how many instances are inside it at once
# (overall and per key), the order they started in, and which process ran them; it
# holds its step while the gate key exists.
FLOW = '''
import os, time
import redis
from nbflow import WorkflowEntrypoint

ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
local k = redis.call('INCR', KEYS[3])
if k > tonumber(redis.call('GET', KEYS[4]) or '0') then redis.call('SET', KEYS[4], k) end
redis.call('RPUSH', KEYS[5], ARGV[1])
redis.call('RPUSH', KEYS[6], ARGV[2])
return n
"""

_clients = {}


def client(url):
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


class Limited(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        fx, tag = p["fx"], p.get("key", "-")

        def work():
            r = client(p["url"])
            r.eval(ENTER, 6, fx + ":cur", fx + ":max", fx + ":cur:" + tag, fx + ":max:" + tag,
                   fx + ":order", fx + ":times", p["name"], repr(time.time()))
            r.hset(fx + ":pid", p["name"], os.getpid())
            deadline = time.time() + 60
            while r.exists(fx + ":gate:" + p["name"]) or (
                    p.get("hold") and time.time() < deadline and r.exists(fx + ":gate")):
                time.sleep(0.01)
            time.sleep(p.get("sleep", 0))
            r.decr(fx + ":cur")
            r.decr(fx + ":cur:" + tag)
            return p["name"]

        return await step.do("work", work)


class Quick(WorkflowEntrypoint):
    async def run(self, event, step):
        p = event.payload
        return await step.do("q", lambda: client(p["url"]).rpush(p["fx"] + ":quick", p["name"]))
'''


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture
def flow(tmp_path: Path, engine: Engine) -> Any:
    module = write_module(tmp_path, f"nbf_limits_{engine.prefix}", FLOW)
    return load_module(tmp_path, module)


@pytest.fixture
def two_workers(worker_engine: Engine, redis_url: str) -> Iterator[Engine]:
    """The engine with two in-process workers (a second engine on the same prefix runs
    the other), so one can take jobs while the other's run holds a slot."""
    other = Engine(redis_url, prefix=worker_engine.prefix, queue=worker_engine.queue_name)
    worker_engine.other = other  # type: ignore[attr-defined]
    yield worker_engine
    other.stop_worker()


def second_worker(engine: Engine, *classes: Any) -> None:
    other = engine.other  # type: ignore[attr-defined]
    for cls in classes:
        other.register(cls)
    other.start_worker()


def params(engine: Engine, url: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"fx": f"{engine.prefix}:fx", "url": url, "name": name, **extra}


def fxget(engine: Engine, what: str) -> Any:
    return engine.redis.get(f"{engine.prefix}:fx:{what}")


def order(engine: Engine) -> list[str]:
    return [x.decode() for x in engine.redis.lrange(f"{engine.prefix}:fx:order", 0, -1)]


def final(insts: list[Any], timeout: float = 60) -> list[str]:
    return [i.wait(timeout)["status"] for i in insts]


# -- concurrency ---------------------------------------------------------------------


def test_concurrency_limit_is_never_exceeded_across_two_worker_processes(
    engine: Engine, redis_url: str, procs: Procs, flow: Any
) -> None:
    wf = engine.register(flow.Limited, concurrency=3)
    # the workers register the class without limits: the stored ones bind them
    for name in ("w-a", "w-b"):
        procs.worker(name, redis_url, engine.prefix, engine.queue_name, flow.__name__)
    wait_workers(engine.redis, engine.queue_name, 2)
    insts = wf.create_batch(
        [{"params": params(engine, redis_url, f"i{n}", sleep=0.05)} for n in range(30)]
    )
    assert final(insts) == ["complete"] * 30, procs.logs()
    assert int(fxget(engine, "max")) == 3  # reached, never exceeded
    pids = set(engine.redis.hvals(f"{engine.prefix}:fx:pid"))
    assert len(pids) == 2, "both worker processes ran instances"


def test_instances_over_the_limit_stay_queued_and_start_in_order_when_a_slot_frees(
    two_workers: Engine, redis_url: str, flow: Any
) -> None:
    engine = two_workers
    wf = engine.register(flow.Limited, concurrency=1)
    second_worker(engine, flow.Limited)
    r = engine.redis
    r.set(f"{engine.prefix}:fx:gate:first", 1)
    first = wf.create("first", params(engine, redis_url, "first"))
    poll(lambda: order(engine) == ["first"], 20, "first running")
    rest = [wf.create(f"n{n}", params(engine, redis_url, f"n{n}")) for n in range(3)]
    late = wf.create("urgent", params(engine, redis_url, "urgent"), priority=0)
    low = wf.create("low", params(engine, redis_url, "low"), priority=9)
    # every claim of them found the slot taken: queued, none started
    poll(lambda: r.zcard(f"{engine.prefix}:held:{wf.name}") == 5, 20, "all five held")
    assert [i.status()["status"] for i in [*rest, late, low]] == ["queued"] * 5
    assert first.status()["status"] == "running"
    r.delete(f"{engine.prefix}:fx:gate:first")
    assert final([first, *rest, late, low]) == ["complete"] * 6
    assert order(engine) == ["first", "urgent", "n0", "n1", "n2", "low"]
    assert int(fxget(engine, "max")) == 1


def test_per_key_limits_count_each_key_on_its_own(
    worker_engine: Engine, redis_url: str, flow: Any
) -> None:
    engine = worker_engine
    wf = engine.register(flow.Limited, concurrency=1)
    items = [
        {
            "id": f"{key}{n}",
            "params": params(engine, redis_url, f"{key}{n}", key=key, sleep=0.1),
            "concurrency_key": f"tenant-{key}",
        }
        for n in range(3)
        for key in "ab"
    ]
    insts = wf.create_batch(items)
    assert final(insts) == ["complete"] * 6
    assert int(fxget(engine, "max:a")) == 1
    assert int(fxget(engine, "max:b")) == 1
    assert int(fxget(engine, "max")) == 2  # one of each key at once


def test_a_worker_is_not_held_by_a_workflow_at_its_limit(
    engine: Engine, redis_url: str, procs: Procs, flow: Any
) -> None:
    wf = engine.register(flow.Limited, concurrency=1)
    quick = engine.register(flow.Quick)
    for name in ("w-a", "w-b"):
        procs.worker(name, redis_url, engine.prefix, engine.queue_name, flow.__name__)
    wait_workers(engine.redis, engine.queue_name, 2)
    r = engine.redis
    r.set(f"{engine.prefix}:fx:gate:blocker", 1)
    blocker = wf.create("blocker", params(engine, redis_url, "blocker"))
    poll(lambda: order(engine) == ["blocker"], 30, f"blocker running\n{procs.logs()}")
    held = [wf.create(f"h{n}", params(engine, redis_url, f"h{n}")) for n in range(5)]
    poll(lambda: r.zcard(f"{engine.prefix}:held:{wf.name}") == 5, 30, "held")
    # the other worker took those jobs, found no slot, and moved on to these
    quicks = [quick.create(f"q{n}", params(engine, redis_url, f"q{n}")) for n in range(5)]
    assert final(quicks, 30) == ["complete"] * 5, procs.logs()
    assert blocker.status()["status"] == "running"
    assert {i.status()["status"] for i in held} == {"queued"}
    r.delete(f"{engine.prefix}:fx:gate:blocker")
    assert final([blocker, *held]) == ["complete"] * 6
    assert int(fxget(engine, "max")) == 1


def test_a_terminated_running_instance_frees_its_slot(
    two_workers: Engine, redis_url: str, flow: Any
) -> None:
    engine = two_workers
    wf = engine.register(flow.Limited, concurrency=1)
    second_worker(engine, flow.Limited)
    r = engine.redis
    r.set(f"{engine.prefix}:fx:gate:a", 1)
    a = wf.create("a", params(engine, redis_url, "a"))
    poll(lambda: order(engine) == ["a"], 20, "a running")
    b = wf.create("b", params(engine, redis_url, "b"))
    poll(lambda: b.info().get("status") == "queued" and r.zcard(f"{engine.prefix}:held:{wf.name}"))
    a.terminate()
    assert b.wait(30)["status"] == "complete"
    r.delete(f"{engine.prefix}:fx:gate:a")


# -- rate limits ---------------------------------------------------------------------


def test_rate_limit_starts_at_most_limit_per_period(
    worker_engine: Engine, redis_url: str, flow: Any
) -> None:
    engine = worker_engine
    wf = engine.register(flow.Limited, rate_limit={"limit": 2, "period": "1 hour"})
    insts = wf.create_batch([{"params": params(engine, redis_url, f"i{n}")} for n in range(5)])
    poll(lambda: len(order(engine)) == 2, 20, "two started")
    poll(lambda: sum(i.status()["status"] == "complete" for i in insts) == 2, 20)
    time.sleep(0.5)  # (the others are not about to start: the window is an hour)
    assert sorted(i.status()["status"] for i in insts) == ["complete"] * 2 + ["queued"] * 3
    # a new limit replaces the stored one and admits what it allows at once
    wf.set_limits(rate_limit={"limit": 4, "period": "1 hour"})
    poll(lambda: sum(i.status()["status"] == "complete" for i in insts) == 4, 20, "4 started")
    assert len(order(engine)) == 4
    wf.set_limits()  # no limits: the last one starts
    assert final(insts) == ["complete"] * 5


def test_rate_limit_window_frees_and_held_instances_start_then(
    worker_engine: Engine, redis_url: str, flow: Any
) -> None:
    engine = worker_engine
    wf = engine.register(flow.Limited, rate_limit={"limit": 2, "period": "1 second"})
    insts = wf.create_batch([{"params": params(engine, redis_url, f"i{n}")} for n in range(6)])
    assert final(insts) == ["complete"] * 6
    times = sorted(float(t) for t in engine.redis.lrange(f"{engine.prefix}:fx:times", 0, -1))
    # no three starts within one period (a little slack: the step starts after the claim)
    assert all(b - a > 0.8 for a, b in zip(times, times[2:], strict=False)), times


# -- stored limits ---------------------------------------------------------------------


def test_limits_are_stored_and_bind_an_engine_that_registers_without_them(
    engine: Engine, redis_url: str, flow: Any
) -> None:
    engine.register(flow.Limited, concurrency=1, rate_limit={"limit": 10, "period": "1 minute"})
    other = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    wf = other.register(flow.Limited)
    assert wf.limits == {"concurrency": 1, "rate_limit": {"limit": 10, "period": 60.0}}
    other.start_worker()
    try:
        insts = wf.create_batch(
            [{"params": params(engine, redis_url, f"i{n}", sleep=0.05)} for n in range(6)]
        )
        assert final(insts) == ["complete"] * 6
        assert int(fxget(engine, "max")) == 1
    finally:
        other.stop_worker()


def test_registering_again_with_other_limits_replaces_them(engine: Engine, flow: Any) -> None:
    wf = engine.register(flow.Limited, concurrency=2)
    assert wf.limits == {"concurrency": 2, "rate_limit": None}
    engine.register(flow.Limited, rate_limit={"limit": 5, "period": "10 seconds"})
    assert wf.limits == {"concurrency": None, "rate_limit": {"limit": 5, "period": 10.0}}
    engine.register(flow.Limited)  # without limits: the stored ones stay
    assert wf.limits == {"concurrency": None, "rate_limit": {"limit": 5, "period": 10.0}}
    wf.set_limits()
    assert wf.limits == {"concurrency": None, "rate_limit": None}


# -- priorities and delays ---------------------------------------------------------------


def test_lower_priorities_start_first(engine: Engine, redis_url: str, flow: Any) -> None:
    wf = engine.register(flow.Limited)
    prios = [9, 5, 0, 5, 9, 0, 3]
    for n, p in enumerate(prios):
        wf.create(f"i{n}-p{p}", params(engine, redis_url, f"i{n}-p{p}"), priority=p)
    engine.start_worker()
    assert final([wf.get(f"i{n}-p{p}") for n, p in enumerate(prios)]) == ["complete"] * 7
    assert order(engine) == ["i2-p0", "i5-p0", "i6-p3", "i1-p5", "i3-p5", "i0-p9", "i4-p9"]


def test_create_batch_items_take_priority_key_and_delay(
    engine: Engine, redis_url: str, flow: Any
) -> None:
    wf = engine.register(flow.Limited)
    insts = wf.create_batch(
        [
            {"id": "late", "params": params(engine, redis_url, "late"), "priority": 9},
            {"id": "soon", "params": params(engine, redis_url, "soon"), "priority": 1},
            {"id": "k", "params": params(engine, redis_url, "k"), "concurrency_key": "t-1"},
            {"id": "later", "params": params(engine, redis_url, "later"), "delay": "1 hour"},
        ]
    )
    assert [i.status()["status"] for i in insts] == ["queued", "queued", "queued", "waiting"]
    engine.start_worker()
    assert final(insts[:3]) == ["complete"] * 3
    assert order(engine) == ["soon", "k", "late"]
    assert insts[3].status()["status"] == "waiting"


def test_woken_instances_come_before_ones_not_started(engine: Engine) -> None:
    key = f"{engine.prefix}:o"

    class Mixed(WorkflowEntrypoint):
        async def run(self, event: Any, step: Any) -> Any:
            if event.payload == "wait":
                await step.wait_for_event("go", type="go", timeout="1 hour")
            return await step.do("rec", lambda: engine.redis.rpush(key, event.payload))

    wf = engine.register(Mixed)
    w = wf.create("w", "wait")
    engine.start_worker()
    poll(lambda: w.status()["status"] == "waiting", 20, "waiting for its event")
    engine.stop_worker()
    fresh = [wf.create(f"n{n}", f"n{n}", priority=p) for n, p in enumerate((5, 5, 9))]
    w.send_event("go")
    engine.start_worker()
    assert final([w, *fresh]) == ["complete"] * 4
    assert [x.decode() for x in engine.redis.lrange(key, 0, -1)] == ["wait", "n0", "n1", "n2"]


def test_delay_and_start_at_keep_the_instance_waiting_then_it_runs(
    worker_engine: Engine, redis_url: str, flow: Any
) -> None:
    engine = worker_engine
    wf = engine.register(flow.Limited)
    t0 = time.time()
    a = wf.create("a", params(engine, redis_url, "a"), delay="1 second")
    at = datetime.now(UTC) + timedelta(seconds=1)
    b = wf.create("b", params(engine, redis_url, "b"), start_at=at)
    c = wf.create("c", params(engine, redis_url, "c"), start_at=time.time() + 1)
    assert [i.status()["status"] for i in (a, b, c)] == ["waiting"] * 3
    assert final([a, b, c]) == ["complete"] * 3
    times = [float(t) for t in engine.redis.lrange(f"{engine.prefix}:fx:times", 0, -1)]
    assert min(times) >= t0 + 1 - 0.01


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"concurrency": 0}, ValueError, "concurrency"),
        ({"concurrency": -3}, ValueError, "positive integer"),
        ({"concurrency": 2.5}, TypeError, "concurrency"),
        ({"concurrency": True}, TypeError, "concurrency"),
        ({"concurrency": "4"}, TypeError, "positive integer"),
        ({"rate_limit": {"limit": 0, "period": "1 minute"}}, ValueError, "limit"),
        ({"rate_limit": {"limit": 5, "period": "soon"}}, ValueError, "period"),
        ({"rate_limit": {"limit": 5, "period": 0}}, ValueError, "period"),
        ({"rate_limit": {"limit": 5}}, ValueError, "period"),
        ({"rate_limit": 5}, TypeError, "rate_limit"),
    ],
)
def test_bad_limits_raise_and_write_nothing(
    engine: Engine, flow: Any, kwargs: dict[str, Any], error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        engine.register(flow.Limited, **kwargs)
    assert list(engine.redis.scan_iter(match=f"{engine.prefix}:*")) == []
    assert "Limited" not in engine.workflows


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"priority": 10}, ValueError, "priority"),
        ({"priority": -1}, ValueError, "0 \\(first\\) to 9"),
        ({"priority": 1.0}, TypeError, "priority"),
        ({"priority": True}, TypeError, "priority"),
        ({"start_at": datetime(2030, 1, 1)}, ValueError, "naive"),
        ({"delay": -5}, ValueError, "negative"),
        ({"delay": "whenever"}, ValueError, "delay"),
        ({"delay": 5, "start_at": 1e10}, ValueError, "not both"),
        ({"concurrency_key": 7}, TypeError, "concurrency_key"),
        ({"concurrency_key": ""}, ValueError, "concurrency_key"),
    ],
)
def test_bad_create_options_raise_and_write_nothing(
    engine: Engine, flow: Any, kwargs: dict[str, Any], error: type, words: str
) -> None:
    wf = engine.register(flow.Limited)
    with pytest.raises(error, match=words):
        wf.create("x", None, **kwargs)
    with pytest.raises(error, match=words):
        wf.create_batch([{"id": "y"}, {"id": "z", **kwargs}])
    assert list(engine.redis.scan_iter(match=f"{engine.prefix}:*")) == []
    assert engine.backend.queue_for(wf.name).count == 0


def test_limits_of_one_workflow_do_not_touch_another(
    worker_engine: Engine, redis_url: str, flow: Any
) -> None:
    engine = worker_engine
    engine.register(flow.Limited, concurrency=1)
    quick = engine.register(flow.Quick)
    insts = quick.create_batch([{"params": params(engine, redis_url, f"q{n}")} for n in range(5)])
    assert final(insts) == ["complete"] * 5
    assert quick.limits == {"concurrency": None, "rate_limit": None}
