"""Races (spec 3.3, 5): pause, resume, terminate, restart and send_event fired at random from
threads and from another process, while workers (two processes and a thread) complete steps
and timers wake instances up; and a hypothesis state machine over the lifecycle calls checked
against a model of spec 3.3.

What "matches a serial order" means here: every lifecycle call and every sent event is one
script run in Redis, and each appends to the instance's history list
(``{prefix}:{id}:history``, documented in ``nbflow.store``) in the order Redis ran them.  The
test replays that list through the spec's state machine and checks that each transition was
allowed, that each successful call appears exactly once, that a rejected call named a status
in which that call is indeed not allowed, and that the final status is the one the serial
order ends in.  Side effects are counted per step start in Redis.
"""

from __future__ import annotations

import json
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers_procs import SLOW, Procs, load_module, slow_marks, write_module
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from nbflow import Engine, InvalidStateError, WorkflowEntrypoint

RACE_SOURCE = '''
import time

import redis

from nbflow import WorkflowEntrypoint

_clients = {}


def fx(url):
    c = _clients.get(url)
    if c is None:
        c = _clients[url] = redis.Redis.from_url(url)
    return c


class Race(WorkflowEntrypoint):
    """Tiny steps, a short sleep (timers come due all the time), an event wait, a last step.
    Each step callback returns its start count; the run notes each event it received."""

    async def run(self, event, step):
        p = event.payload
        iid = event.instance_id
        r = fx(p["fx"])
        k = p["k"]

        def cb(name):
            def go():
                n = r.hincrby(k, iid + ":" + name, 1)
                time.sleep(p["dt"])
                return n
            return go

        out = []
        for i in range(p["n"]):
            out.append(await step.do("s%d" % i, cb("s%d" % i)))
            if i == 1:
                await step.sleep("nap", p["nap"])
        got = await step.wait_for_event("w", "go", timeout="1 hour")
        r.sadd(k + ":seen", got["payload"])
        out.append(await step.do("last", cb("last")))
        return out
'''

# A chaos actor in another process: random lifecycle calls on the given ids for `seconds`,
# one JSON line per call (op, id, token, t0, t1, outcome) into `log`.
ACTOR_SOURCE = r"""
import json, random, sys, time
from nbflow import Engine, InvalidStateError

url, prefix, queue, seconds, seed, log = sys.argv[1:7]
ids = sys.argv[7:]
engine = Engine(url, prefix=prefix, queue=queue)
sys.path.insert(0, ".")
from test_races_ops import act
rng = random.Random(int(seed))
with open(log, "w") as f:
    end = time.monotonic() + float(seconds)
    n = 0
    while time.monotonic() < end:
        rec = act(engine, rng, rng.choice(ids), "p%s-%d" % (seed, n))
        f.write(json.dumps(rec) + "\n")
        n += 1
"""

# Shared by the test's threads and the actor process (written next to the actor).
OPS_SOURCE = r"""
import random, time
from nbflow import InvalidStateError

OPS = ["pause"] * 5 + ["resume"] * 5 + ["send"] * 5 + ["restart", "restart_from", "terminate"]


def act(engine, rng, iid, token):
    op = rng.choice(OPS)
    inst = engine.instance(iid)
    t0 = time.time()
    try:
        if op == "pause":
            inst.pause()
        elif op == "resume":
            inst.resume()
        elif op == "terminate":
            inst.terminate()
        elif op == "restart":
            inst.restart()
        elif op == "restart_from":
            inst.restart(from_step="s2")
        else:
            inst.send_event("go", token)
        outcome = "ok"
    except InvalidStateError as exc:
        outcome = "invalid: " + str(exc)
    except ValueError as exc:
        outcome = "value: " + str(exc)
    except Exception as exc:  # anything else is a failure of the test
        outcome = "UNEXPECTED %s: %s" % (type(exc).__name__, exc)
    t1 = time.time()
    time.sleep(rng.uniform(0, 0.004))
    return {"op": op, "id": iid, "token": token, "t0": t0, "t1": t1, "outcome": outcome}
"""

# Which statuses each call is allowed from (spec 3.3); send_event is refused when final.
ALLOWED = {
    "pause": {"queued", "running", "waiting"},
    "resume": {"paused", "waitingForPause"},
    "terminate": {"queued", "running", "waiting", "waitingForPause", "paused"},
    "send": {"queued", "running", "waiting", "waitingForPause", "paused"},
}
ALL_STATUSES = {
    "queued",
    "running",
    "waiting",
    "waitingForPause",
    "paused",
    "complete",
    "errored",
    "terminated",
}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def _replay_history(iid: str, hist: list[dict[str, Any]]) -> tuple[str, Counter[str]]:
    """Walks the raw history through the lifecycle state machine of spec 3.3.

    Coarse states: A (queued/running/waiting, or complete: completion is not stored in the
    list), WP (waitingForPause), P (paused), T (terminated).  Returns the state the serial
    order ends in and how many successful calls of each kind it contains.
    """
    state = "A"
    calls: Counter[str] = Counter()
    for n, h in enumerate(hist):
        ev = h.get("ev")
        where = f"{iid} event {n} {ev!r} in state {state}: {hist[max(0, n - 4) : n + 1]}"
        if ev == "pause.requested":
            assert state == "A", where
            state, calls["pause"] = "WP", calls["pause"] + 1
        elif ev == "paused":
            assert state in ("A", "WP"), where
            if state == "A":
                calls["pause"] += 1  # pause() of a queued or waiting instance
            state = "P"
        elif ev == "resumed":
            assert state in ("P", "WP"), where
            state, calls["resume"] = "A", calls["resume"] + 1
        elif ev == "terminated":
            assert state in ("A", "WP", "P"), where
            state, calls["terminate"] = "T", calls["terminate"] + 1
        elif ev == "restarted":
            state = "A"
            calls["restart_from" if h.get("from") else "restart"] += 1
        elif ev == "event.sent":
            assert state != "T", where
            calls["send"] += 1
        elif ev in ("waiting", "woke"):
            assert state == "A", where  # a run parks / a timer fires only while active
        elif ev in ("recovered",):
            raise AssertionError(f"a lease expired during the race (stuck run?): {where}")
        elif ev == "errored":
            raise AssertionError(f"errored during the race: {where}")
    return state, calls


class Chaos:
    def __init__(self, engine: Engine, fx_url: str, procs: Procs, tmp_path: Path) -> None:
        self.engine = engine
        self.fx_url = fx_url
        self.fx = redis.Redis.from_url(fx_url)
        self.k = f"{engine.prefix}:fx"
        self.procs = procs
        self.tmp = tmp_path
        self.module = write_module(tmp_path, f"nbf_race_{engine.prefix}", RACE_SOURCE)
        write_module(tmp_path, "test_races_ops", OPS_SOURCE)
        self.flow = engine.register(load_module(tmp_path, self.module).Race)
        self.ops = load_module(tmp_path, "test_races_ops")
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def run(self, n_instances: int, seconds: float, threads: int, seed: int) -> list[str]:
        e = self.engine
        workers = [
            self.procs.worker(f"w{i}", self.fx_url, e.prefix, e.queue_name, self.module)
            for i in range(2)
        ]
        e.start_worker()  # and a worker thread in this process
        params = {"fx": self.fx_url, "k": self.k, "n": 4, "dt": 0.002, "nap": 0.03}
        ids = [i.id for i in self.flow.create_batch([{"params": params}] * n_instances)]
        actor = self.procs.spawn(
            "actor",
            [
                sys.executable,
                "-c",
                ACTOR_SOURCE,
                self.fx_url,
                e.prefix,
                e.queue_name,
                str(seconds),
                str(seed),
                str(self.tmp / "actor.jsonl"),
                *ids,
            ],
        )

        def chaos(tid: int) -> None:
            rng = random.Random(seed * 100 + tid)
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                rec = self.ops.act(e, rng, rng.choice(ids), f"t{tid}-{n}")
                with self.lock:
                    self.log.append(rec)
                n += 1

        ts = [threading.Thread(target=chaos, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(seconds + 30)
        actor.wait(seconds + 30)
        assert actor.returncode == 0, self.procs.log("actor")
        self.log += [json.loads(x) for x in (self.tmp / "actor.jsonl").read_text().splitlines()]
        assert all(p.poll() is None for p in workers), self.procs.logs()
        return ids

    def quiesce(self, ids: list[str], timeout: float) -> dict[str, str]:
        """Lets every instance finish (resume the paused, feed the waiting) without forcing any
        lease: an instance stuck ``running`` with nobody running it would not get through
        within the 30 s lease."""
        deadline = time.monotonic() + timeout
        final: dict[str, str] = {}
        n = 0
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            for iid in list(pending):
                inst = self.engine.instance(iid)
                s = inst.status()["status"]
                if s in ("complete", "terminated", "errored"):
                    final[iid] = s
                    pending.remove(iid)
                    continue
                op = {"paused": "resume", "waitingForPause": "resume", "waiting": "send"}.get(s)
                if op is None:
                    continue
                t0 = time.time()
                try:
                    if op == "resume":
                        inst.resume()
                    else:
                        inst.send_event("go", f"q-{n}")
                    outcome = "ok"
                except InvalidStateError as exc:
                    outcome = "invalid: " + str(exc)
                self.log.append(
                    {
                        "op": op,
                        "id": iid,
                        "token": f"q-{n}",
                        "t0": t0,
                        "t1": time.time(),
                        "outcome": outcome,
                    }
                )
                n += 1
            time.sleep(0.05)
        assert not pending, {i: self.engine.instance(i).status() for i in pending}
        return final

    def check(self, ids: list[str], final: dict[str, str]) -> Counter[str]:
        unexpected = [r for r in self.log if r["outcome"].startswith("UNEXPECTED")]
        assert not unexpected, unexpected[:5]
        r = self.engine.redis
        seen = {x.decode() for x in self.fx.smembers(self.k + ":seen")}
        fx = {k.decode(): int(v) for k, v in self.fx.hgetall(self.k).items()}
        by_id: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        for rec in self.log:
            by_id[rec["id"]].append(rec)
        summary: Counter[str] = Counter()
        for iid in ids:
            hist = [json.loads(x) for x in r.lrange(self.engine.keys.history(iid), 0, -1)]
            state, calls = _replay_history(iid, hist)
            recs = by_id[iid]
            ok = Counter(rec["op"] for rec in recs if rec["outcome"] == "ok")
            for op in ("pause", "resume", "terminate", "restart", "restart_from", "send"):
                assert ok[op] == calls[op], (iid, op, ok[op], calls[op], recs, hist)
            for rec in recs:  # a refused call named a status where it is indeed refused
                if rec["outcome"].startswith("invalid: ") and rec["op"] in ALLOWED:
                    named = re.search(r"it is (\w+)", rec["outcome"])
                    assert named and named.group(1) in ALL_STATUSES - ALLOWED[rec["op"]], rec
                elif rec["outcome"].startswith("value: "):
                    assert rec["op"] == "restart_from", rec  # no step s2 to restart from yet
            assert final[iid] == {"T": "terminated", "A": "complete"}[state], (iid, state, hist)
            # no event lost: each one sent was received, is still buffered, or was dropped
            # by a terminate that came after it
            buffered = {
                json.loads(x)["payload"]
                for x in r.lrange(f"{self.engine.prefix}:{iid}:events:go", 0, -1)
            }
            terminated_at = [
                rec["t1"] for rec in recs if rec["op"] == "terminate" and rec["outcome"] == "ok"
            ]
            for rec in recs:
                if rec["op"] == "send" and rec["outcome"] == "ok":
                    tok = rec["token"]
                    assert (
                        tok in seen or tok in buffered or any(t >= rec["t0"] for t in terminated_at)
                    ), (iid, tok, hist)
            # steps: each start of a step is one run of it; a step runs again only after a
            # restart dropped it, and a stored result is the last run's (never overwritten
            # by a late one)
            restarts = calls["restart"] + calls["restart_from"]
            rows = {row.step: row for row in self.engine.instance(iid).steps().itertuples()}
            for name in ("s0", "s1", "s2", "s3", "last"):
                runs = fx.get(f"{iid}:{name}", 0)
                assert runs <= 1 + restarts, (iid, name, runs, restarts)
                row = rows.get(name)
                if row is not None and row.status == "complete":
                    assert row.output == runs, (iid, name, row.output, runs)
            if final[iid] == "complete":
                out = self.engine.instance(iid).status()["output"]
                assert out[:4] == [fx[f"{iid}:s{i}"] for i in range(4)], (iid, out)
            summary[final[iid]] += 1
            summary.update({f"ok {op}": n for op, n in ok.items()})
        summary["calls"] = len(self.log)
        summary["refused"] = sum(1 for rec in self.log if rec["outcome"] != "ok")
        return summary


@pytest.mark.parametrize(
    ("n", "seconds", "threads"),
    [
        pytest.param(16, 5.0, 3, id="short"),
        pytest.param(60, 60.0, 6, id="long", marks=slow_marks("thousands of racing calls")),
    ],
)
def test_lifecycle_calls_racing_steps_timers_and_each_other_match_a_serial_order(
    engine: Engine,
    redis_url: str,
    procs: Procs,
    tmp_path: Path,
    n: int,
    seconds: float,
    threads: int,
) -> None:
    chaos = Chaos(engine, redis_url, procs, tmp_path)
    ids = chaos.run(n, seconds, threads, seed=n)
    final = chaos.quiesce(ids, timeout=25)
    summary = chaos.check(ids, final)
    print(dict(summary))
    assert summary["calls"] >= (1000 if seconds > 30 else 100), summary
    # the races really happened: calls were accepted and refused, instances finished both ways
    assert summary["ok pause"] and summary["ok resume"] and summary["ok send"], summary
    assert summary["refused"], summary


# -- a hypothesis state machine over the lifecycle calls ------------------------------------------

CALLS: Counter[tuple[str, str]] = Counter()


class Life(WorkflowEntrypoint):
    """a, an event wait, then b; an event whose payload is "fail" makes b fail for good."""

    async def run(self, event, step):
        iid = event.instance_id

        def bump(name: str) -> Any:
            def go() -> int:
                CALLS[(iid, name)] += 1
                return CALLS[(iid, name)]

            return go

        def fail() -> None:
            CALLS[(iid, "b")] += 1
            from nbflow import NonRetryableError

            raise NonRetryableError("told to fail")

        a = await step.do("a", bump("a"))
        got = await step.wait_for_event("e", "go", timeout="1 hour")
        if got["payload"] == "fail":
            await step.do("b", fail)
        b = await step.do("b", bump("b"))
        return [a, got["payload"], b]


class Model:
    """One instance as spec 3.3 says it must be (runs happen only in ``work``)."""

    def __init__(self) -> None:
        self.status = "queued"
        self.steps: dict[str, str] = {}  # step -> complete/errored
        self.reached: set[str] = set()  # steps with an entry (final or pending)
        self.buffer: list[str] = []
        self.runs = Counter[str]()

    def work(self) -> None:
        if self.status != "queued":
            return
        if "a" not in self.steps:
            self.runs["a"] += 1
            self.steps["a"] = "complete"
        self.reached |= {"a", "e"}
        if "e" not in self.steps:
            if not self.buffer:
                self.status = "waiting"
                return
            self.steps["e"] = self.buffer.pop(0)
        self.reached.add("b")
        if self.steps["e"] == "fail":
            if "b" not in self.steps:
                self.runs["b"] += 1
                self.steps["b"] = "errored"
            self.status = "errored"
            return
        if "b" not in self.steps:
            self.runs["b"] += 1
            self.steps["b"] = "complete"
        self.status = "complete"


class LifecycleMachine(RuleBasedStateMachine):
    instances = Bundle("instances")

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, Model] = {}

    @initialize()
    def setup(self) -> None:
        self.engine: Engine = MACHINE_ENGINE["engine"]
        self.flow = self.engine.register(Life)
        CALLS.clear()

    def _inst(self, iid: str) -> Any:
        return self.flow.get(iid)

    @rule(target=instances)
    def create(self) -> Any:
        iid = self.flow.create().id
        self.models[iid] = Model()
        return iid

    @rule()
    def work(self) -> None:
        self.engine.run_worker(burst=True)
        for m in self.models.values():
            m.work()

    def _call(self, iid: str, op: str, allowed: set[str], apply: Any, *args: Any) -> None:
        m = self.models[iid]
        before = m.status
        try:
            getattr(self._inst(iid), op)(*args)
        except InvalidStateError as exc:
            assert before not in allowed, f"{op} refused from {before}: {exc}"
            assert before in str(exc), (before, str(exc))
        else:
            assert before in allowed, f"{op} accepted from {before}"
            apply(m)
        # lifecycle calls change the status before they return
        assert self._inst(iid).status()["status"] == m.status, (op, before, m.status)

    @rule(iid=instances)
    def pause(self, iid: str) -> None:
        def apply(m: Model) -> None:
            m.status = "paused"  # from queued or waiting (nothing is running here)

        self._call(iid, "pause", {"queued", "running", "waiting"}, apply)

    @rule(iid=instances)
    def resume(self, iid: str) -> None:
        def apply(m: Model) -> None:
            m.status = "queued"

        self._call(iid, "resume", {"paused", "waitingForPause"}, apply)

    @rule(iid=instances)
    def terminate(self, iid: str) -> None:
        def apply(m: Model) -> None:
            m.status = "terminated"
            m.buffer.clear()

        self._call(iid, "terminate", ALLOWED["terminate"], apply)

    @rule(iid=instances)
    def restart(self, iid: str) -> None:
        def apply(m: Model) -> None:
            m.status = "queued"
            m.steps.clear()
            m.reached.clear()

        self._call(iid, "restart", ALL_STATUSES, apply)

    @rule(iid=instances)
    def restart_from_event(self, iid: str) -> None:
        m = self.models[iid]
        if "e" not in m.reached:
            try:
                self._inst(iid).restart(from_step="e")
            except ValueError as exc:
                assert "no step" in str(exc)
            else:
                raise AssertionError("restart from a step that never ran was accepted")
            return

        def apply(m: Model) -> None:
            m.status = "queued"
            m.steps = {"a": m.steps["a"]}  # kept: the step before "e"
            m.reached = {"a"}

        self._call(iid, "restart", ALL_STATUSES, apply, "e")

    @rule(iid=instances, payload=st.sampled_from(["ok", "ok", "fail"]))
    def send_event(self, iid: str, payload: str) -> None:
        def apply(m: Model) -> None:
            m.buffer.append(payload)
            if m.status == "waiting":
                m.status = "queued"

        self._call(iid, "send_event", ALLOWED["send"], apply, "go", payload)

    @invariant()
    def matches_the_model(self) -> None:
        r = self.engine.redis
        for iid, m in self.models.items():
            status = self._inst(iid).status()
            assert status["status"] == m.status, (iid, status, m.status)
            buffered = [
                json.loads(x)["payload"]
                for x in r.lrange(f"{self.engine.prefix}:{iid}:events:go", 0, -1)
            ]
            assert buffered == m.buffer, (iid, buffered, m.buffer)
            assert {n: CALLS[(iid, n)] for n in ("a", "b")} == {n: m.runs[n] for n in ("a", "b")}, (
                iid
            )
            rows = {r.step: r.status for r in self._inst(iid).steps().itertuples()}
            done = {k: ("complete" if k == "e" else v) for k, v in m.steps.items()}
            assert {k: v for k, v in rows.items() if v in ("complete", "errored")} == done, (
                iid,
                rows,
                m.steps,
            )
            if m.status == "complete":
                assert status["output"] == [CALLS[(iid, "a")], m.steps["e"], CALLS[(iid, "b")]]


MACHINE_ENGINE: dict[str, Engine] = {}


def test_lifecycle_state_machine_against_the_spec_model(engine: Engine) -> None:
    MACHINE_ENGINE["engine"] = engine
    examples, steps = (300, 50) if SLOW else (20, 25)
    LifecycleMachine.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        derandomize=not SLOW,
        database=None,
    )
    try:
        LifecycleMachine.TestCase().runTest()
    finally:
        MACHINE_ENGINE.clear()
