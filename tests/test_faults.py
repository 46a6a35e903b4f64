"""Faults against real processes and a real Redis (spec 2.4, 5): workers SIGKILLed in the
middle of a step, while idle, while timers come due and while events arrive; Redis
restarted (append-only, ``appendfsync always``) under running, sleeping and waiting
instances; many worker processes on one queue.

Side effects are counted with HINCRBY in the test's Redis (``helpers_procs.FLOW_SOURCE``):
``{iid}:{step}:start`` per callback start and ``{iid}:{step}`` per callback return.  A dead
worker's lease is forced to expire (``ZADD {prefix}:leases 0 <id>``) and a lost dispatch
made old (``ZADD {prefix}:ready:{workflow} 0 <id>``) in the default versions; the slow ones
(``NBFLOW_SLOW=1``) wait for the real 30 s lease and the real orphan sweep.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers_procs import (
    FLOW_SOURCE,
    SLOW,
    Procs,
    RedisServer,
    hist_events,
    load_module,
    poll,
    slow_marks,
    slow_only,
    wait_workers,
    worker_count,
    write_module,
)

from nbflow import Engine

FINAL = ("complete", "errored", "terminated")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


class Harness:
    """One test's workflow module, engine, side-effect counters and worker processes."""

    def __init__(
        self, engine: Engine, fx_url: str, procs: Procs, tmp_path: Path, module: str = ""
    ) -> None:
        self.engine = engine
        self.fx_url = fx_url
        self.fx = redis.Redis.from_url(fx_url)
        self.k = f"{engine.prefix}:fx"
        self.procs = procs
        self.tmp_path = tmp_path
        if not module:
            module = write_module(tmp_path, f"nbf_plan_{engine.prefix}", FLOW_SOURCE)
            load_module(tmp_path, module)
        self.module = module
        import sys

        self.flow = engine.register(sys.modules[module].Plan)
        self.plans: dict[str, list[Any]] = {}

    def on(self, engine: Engine) -> Harness:
        """The same module, counters and processes, for instances in another Redis."""
        return Harness(engine, self.fx_url, self.procs, self.tmp_path, self.module)

    def create(self, plan: list[Any], **extra: Any) -> Any:
        inst = self.flow.create(params={"fx": self.fx_url, "k": self.k, "plan": plan, **extra})
        self.plans[inst.id] = plan
        return inst

    def create_batch(self, plans: list[list[Any]]) -> list[Any]:
        items = [{"params": {"fx": self.fx_url, "k": self.k, "plan": plan}} for plan in plans]
        made = self.flow.create_batch(items)
        for inst, plan in zip(made, plans, strict=True):
            self.plans[inst.id] = plan
        return made

    def worker(self, name: str, redis_url: str | None = None, **kw: Any) -> Any:
        e = self.engine
        url = redis_url or self.fx_url
        return self.procs.worker(name, url, e.prefix, e.queue_name, self.module, **kw)

    def effects(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.fx.hgetall(self.k).items()}

    def force_expiry(self) -> None:
        """Stand-in for time passing: every lease has run out, every queued dispatch is old."""
        r, keys = self.engine.redis, self.engine.keys
        for iid in r.zrange(keys.leases, 0, -1):
            r.zadd(keys.leases, {iid: 0})
        for iid in r.zrange(keys.ready(self.flow.name), 0, -1):
            r.zadd(keys.ready(self.flow.name), {iid: 0})

    def wait_all(self, timeout: float, workers: list[Any] | None = None) -> dict[str, str]:
        """Waits for every instance to finish; fails at once if one of ``workers`` exits."""
        deadline = time.monotonic() + timeout
        status: dict[str, str] = {}
        for iid in self.plans:
            inst = self.flow.get(iid)
            while True:
                status[iid] = inst.status()["status"]
                if status[iid] in FINAL or time.monotonic() >= deadline:
                    break
                dead = [p.returncode for p in workers or () if p.poll() is not None]
                assert not dead, f"worker process(es) exited {dead}:\n" + self.procs.logs()
                time.sleep(0.02)
        return status

    def bad(self, status: dict[str, str]) -> str:
        """What went wrong with the instances that did not complete (for assertion messages)."""
        lines = [
            f"{iid}: {self.flow.get(iid).status()} plan={self.plans[iid]}"
            for iid, st in status.items()
            if st != "complete"
        ]
        return "\n".join(lines) + "\n" + self.procs.logs()

    def check_once(self, reruns: int = 0) -> int:
        """Every instance complete, its output made of its stored step results; every step's
        side effect counted once; a step started again only where a worker died in it (at
        most one per instance, ``reruns`` in all); every stored result comes from the one
        execution that completed (a late duplicate never overwrote it)."""
        fx = self.effects()
        total = 0
        for iid, plan in self.plans.items():
            inst = self.flow.get(iid)
            status = inst.status()
            assert status["status"] == "complete", (iid, status)
            rows = {f"{r.step}#{r.count}": r for r in inst.steps().itertuples()}
            again = 0
            for pos, item in enumerate(plan):
                kind, name = item[0], item[1]
                row = rows[f"{name}#1"]
                assert row.status == "complete", (iid, name, row)
                if kind not in ("do", "slow", "block", "retry"):
                    continue
                assert status["output"][pos] == row.output, (iid, name)
                n = fx[f"{iid}:{name}:start"]
                planned = item[2] + 1 if kind == "retry" else 1
                assert n in (planned, planned + 1), (iid, name, n)
                # a run cut short may have done its side effect just before it died
                effects = (1,) if n == planned else (1, 2)
                assert fx.get(f"{iid}:{name}") in effects, (iid, name, fx.get(f"{iid}:{name}"))
                again += n - planned
                assert row.output.endswith(f"-{n}"), f"{iid} {name}: {row.output} but {n} runs"
            assert again <= 1, f"{iid}: more than the interrupted step ran again"
            total += again
        assert total <= reruns, total
        return total


@pytest.fixture
def h(engine: Engine, redis_url: str, procs: Procs, tmp_path: Path) -> Harness:
    return Harness(engine, redis_url, procs, tmp_path)


def _wait_status(h: Harness, ids: list[str], status: str, timeout: float = 20) -> None:
    def all_there() -> bool:
        return all(h.flow.get(i).status()["status"] == status for i in ids)

    poll(all_there, timeout, what=f"all {len(ids)} instances {status}\n{h.procs.logs()}")


# -- SIGKILL in the middle of a step ----------------------------------------------------------


def _kill_mid_step(h: Harness) -> tuple[Any, int, Any, bytes]:
    """Two worker processes; the one running the blocking step is SIGKILLed inside it."""
    a, b = h.worker("w-a"), h.worker("w-b")
    h.fx.set(h.k + ":hold", 1)
    plan = [["do", "one"], ["block", "two"], ["do", "three"]]
    inst = h.create(plan)
    pid = int(poll(lambda: h.fx.get(f"{h.k}:in:{inst.id}"), 20, "the blocking step to start"))
    victim, survivor = (a, b) if pid == a.pid else (b, a)
    assert victim.pid == pid
    one = h.engine.redis.hget(h.engine.keys.steps(inst.id), "one#1")
    assert one is not None
    h.procs.kill(victim)
    h.fx.delete(h.k + ":hold")  # the re-run of step "two" returns at once
    assert inst.status() == {"status": "running"}
    return inst, pid, survivor, one


def _check_mid_step(h: Harness, inst: Any, survivor: Any, one: bytes) -> None:
    assert inst.status()["status"] == "complete", h.procs.logs()
    assert survivor.poll() is None, "the surviving worker died"
    fx = h.effects()
    assert fx[f"{inst.id}:one:start"] == 1 and fx[f"{inst.id}:three:start"] == 1
    assert fx[f"{inst.id}:two:start"] == 2, "only the interrupted step runs again, once"
    h.check_once(reruns=1)
    assert h.engine.redis.hget(h.engine.keys.steps(inst.id), "one#1") == one
    steps = inst.steps().set_index("step")
    assert steps.loc["two", "attempts"] == 2
    assert [e["ev"] for e in hist_events(h.engine.redis, h.engine.prefix, inst.id)].count(
        "recovered"
    ) == 1


def test_sigkill_mid_step_another_worker_process_finishes_it(h: Harness) -> None:
    inst, _, survivor, one = _kill_mid_step(h)
    h.force_expiry()  # stand-in for the 30 s lease running out
    # the survivor's housekeeper sweeps every 5 s: it takes the instance back on its own
    assert inst.wait(timeout=20)["status"] == "complete", h.procs.logs()
    _check_mid_step(h, inst, survivor, one)


@slow_only("waits the real 30 s lease")
def test_sigkill_mid_step_recovered_within_60s_by_the_real_lease(h: Harness) -> None:
    inst, _, survivor, one = _kill_mid_step(h)
    t0 = time.monotonic()
    assert inst.wait(timeout=60)["status"] == "complete", h.procs.logs()
    assert time.monotonic() - t0 < 60
    _check_mid_step(h, inst, survivor, one)


def test_interrupted_step_without_retries_left_errors_the_instance(h: Harness) -> None:
    """Known limit: an attempt cut short by a dead worker counts as an attempt (so a step
    that kills its worker every time cannot loop for ever); with ``retries.limit: 0`` the
    one crash leaves no attempt and the instance ends ``errored`` saying so."""
    a = h.worker("w-a")
    h.fx.set(h.k + ":hold", 1)
    inst = h.create([["block", "two"]], limit=0)
    poll(lambda: h.fx.get(f"{h.k}:in:{inst.id}"), 20, "the blocking step to start")
    h.procs.kill(a)
    h.fx.delete(h.k + ":hold")
    h.force_expiry()
    h.worker("w-b")
    status = inst.wait(timeout=20)
    assert status["status"] == "errored"
    assert status["error"]["name"] == "WorkflowError"
    assert "interrupted 1 time(s)" in status["error"]["message"]


# -- killed while idle, while timers come due, while events arrive ----------------------------

ROUNDS = 4 if SLOW else 1


def _recover(h: Harness, real_time: bool) -> None:
    if not real_time:
        h.force_expiry()
    h.worker(f"w-rescue-{random.random():.6f}")


@pytest.mark.parametrize("real_time", [False, pytest.param(True, marks=slow_marks("real lease"))])
@pytest.mark.parametrize("moment", ["idle", "timers", "events"])
def test_worker_killed_at_a_moment_loses_nothing_and_runs_nothing_twice(
    h: Harness, moment: str, real_time: bool
) -> None:
    rng = random.Random(f"{moment}-{real_time}")
    n = 12
    for _ in range(ROUNDS):
        up = worker_count(h.engine.redis, h.engine.queue_name)
        a = h.worker(f"w-a-{rng.random():.6f}")
        if moment == "idle":
            wait_workers(h.engine.redis, h.engine.queue_name, up + 1)
            time.sleep(rng.uniform(0, 0.5))
            h.procs.kill(a)
            for i in range(n):
                h.create(
                    [["do", "a"], ["sleep", "s", 0.2], ["do", "b"]]
                    if i % 2
                    else [["do", "a"], ["do", "b"]]
                )
        elif moment == "timers":
            ids = [
                h.create([["do", "a"], ["sleep", "s", 1.0 + i * 0.05], ["do", "b"]]).id
                for i in range(n)
            ]
            _wait_status(h, ids, "waiting")
            time.sleep(rng.uniform(0.4, 1.2))  # the timers are coming due right now
            h.procs.kill(a)
        else:
            ids = [h.create([["do", "a"], ["event", "e", "go"], ["do", "b"]]).id for _ in range(n)]
            _wait_status(h, ids, "waiting")
            order = ids[:]
            rng.shuffle(order)
            sent = threading.Event()

            def send(order: list[str] = order, sent: threading.Event = sent) -> None:
                for iid in order:
                    h.flow.get(iid).send_event("go", {"to": iid})
                    time.sleep(0.01)
                sent.set()

            t = threading.Thread(target=send)
            t.start()
            time.sleep(rng.uniform(0.0, 0.12))  # mid-way through the sends
            h.procs.kill(a)
            t.join(10)
            assert sent.is_set()
        _recover(h, real_time)
        status = h.wait_all(70 if real_time else 25)
        assert set(status.values()) == {"complete"}, h.bad(status)
        h.check_once(reruns=len(h.plans))
        for iid in h.plans:
            assert not h.engine.redis.exists(f"{h.engine.prefix}:{iid}:events:go")
            if moment == "events":
                assert h.flow.get(iid).status()["output"][1] == {"to": iid}
        h.procs.close()


# -- Redis restarted under running, sleeping and waiting instances ----------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis-data").start()
    yield srv
    srv.stop()


def _restart_case(h: Harness, srv: RedisServer, down_for: float, in_flight: bool) -> None:
    """Instances in the restartable Redis ``srv`` (side effects counted in the test Redis):
    sleeping, waiting for an event and, with ``in_flight``, in the middle of a step (held
    until Redis is killed, so the step's result is written while Redis is down)."""
    h2 = h.on(Engine(srv.url, prefix=h.engine.prefix, queue=h.engine.queue_name))
    workers = [h2.worker("w1", srv.url), h2.worker("w2", srv.url)]
    h2.fx.set(h2.k + ":hold", 1)
    sleeping = [h2.create([["do", "a"], ["sleep", "s", 2.5], ["do", "b"]]).id for _ in range(4)]
    waiting = [h2.create([["do", "a"], ["event", "e", "go"], ["do", "b"]]).id for _ in range(4)]
    _wait_status(h2, waiting + sleeping, "waiting")
    time.sleep(0.3)  # the workers are idle, blocked on the queue
    running = []
    if in_flight:  # one per worker
        running = [h2.create([["do", "a"], ["block", "b"], ["do", "c"]]).id for _ in range(2)]
    for iid in running:
        poll(lambda iid=iid: h2.fx.get(f"{h2.k}:in:{iid}"), 20, "the blocking steps to start")
    srv.kill()
    h2.fx.delete(h2.k + ":hold")  # the steps in flight return now, with Redis down
    time.sleep(down_for)
    srv.start()
    # the same Engine goes on working: its client reconnects by itself
    for iid in waiting:
        h2.flow.get(iid).send_event("go", iid)
    if in_flight:
        time.sleep(0.5)
        h2.force_expiry()  # a run that lost its instance may leave a lease to expire
    status = h2.wait_all(40, workers=workers)
    assert set(status.values()) == {"complete"}, h2.bad(status)
    h2.check_once(reruns=len(running))


def test_redis_restart_short_outage_every_instance_completes(
    h: Harness, own_redis: RedisServer
) -> None:
    """Down 0.5 s, within the client's own reconnect retries: nobody notices."""
    _restart_case(h, own_redis, down_for=0.5, in_flight=True)


def test_redis_restart_long_outage_workers_and_engine_reconnect(
    h: Harness, own_redis: RedisServer
) -> None:
    """Down 6 s, longer than the client's retries (about 3.5 s), while instances sleep (their
    timers come due during the outage) and wait for events: workers live on and reconnect.

    Was BUG 1 (docs/RELIABILITY.md): ``nbflow worker`` exited for good, NbflowWorker.work()
    had no handler for ConnectionError around blpop/heartbeat."""
    _restart_case(h, own_redis, down_for=6.0, in_flight=False)


def test_redis_restart_long_outage_with_a_step_in_flight_completes(
    h: Harness, own_redis: RedisServer
) -> None:
    """Was BUG 2: the instances ended errored with ConnectionError (the run took the engine's
    own failed write for the workflow's failure)."""
    _restart_case(h, own_redis, down_for=5.0, in_flight=True)


# -- many worker processes on one queue ---------------------------------------------------------

MIX = [
    [["do", "a"], ["do", "b"], ["do", "c"]],
    [["do", "a"], ["sleep", "s", 0.3], ["do", "b"]],
    [["do", "a"], ["event", "e", "go"], ["do", "b"]],
    [["event", "e", "go"], ["sleep", "s", 0.1], ["do", "b"]],
    [["retry", "r", 2, 0.05], ["do", "b"]],  # retried inline
    [["do", "a"], ["retry", "r", 1, 1.5]],  # a retry wait long enough to park in Redis
    [["do", "a"], ["slow", "w", 0.05], ["do", "b"]],  # keeps workers busy mid-step
]


@pytest.mark.parametrize(
    ("n", "kill_one"),
    [
        pytest.param(60, False, id="60-instances"),
        pytest.param(1000, True, id="1000-instances", marks=slow_marks("a 1,000-instance soak")),
    ],
)
def test_many_worker_processes_on_one_queue_run_every_instance_once(
    h: Harness, n: int, kill_one: bool
) -> None:
    rng = random.Random(n)
    workers = [h.worker(f"w{i}") for i in range(4)]
    plans = [MIX[i % len(MIX)] for i in range(n)]
    rng.shuffle(plans)
    made: list[Any] = []
    for start in range(0, n, 100):
        made += h.create_batch(plans[start : start + 100])
    waiters = [i for i in made if ["event", "e", "go"] in h.plans[i.id]]
    rng.shuffle(waiters)
    for i, inst in enumerate(waiters):  # some before the wait (buffered), some after
        if i % 2:
            time.sleep(0.002)
        inst.send_event("go", inst.id)
    if kill_one:  # SIGKILL a busy worker half-way through; the real lease brings its work back
        done = h.engine.keys.by_status("complete")
        poll(lambda: h.engine.redis.zcard(done) >= n // 2, 60, "half of the instances done")
        h.procs.kill(workers[0])
        workers[0] = h.worker("w0-replacement")
    status = h.wait_all(150 if n > 100 else 40, workers=workers)
    assert set(status.values()) == {"complete"}, h.bad(status)
    # a killed worker may have held a whole job of claimed instances, each cut short once
    h.check_once(reruns=50 if kill_one else 0)
    for inst in waiters:
        out = inst.status()["output"]
        assert inst.id in out, out
    keys = h.engine.keys
    r = h.engine.redis
    assert r.zcard(keys.leases) == 0 and r.zcard(keys.timers) == 0
    assert r.zcard(keys.ready(h.flow.name)) == 0
