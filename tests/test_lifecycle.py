"""Pause, resume, terminate, restart and get (SPEC 3.2, 3.3, 5), against a real Redis and RQ.

Step callbacks run in this process (the worker is a thread), so module-level
counters count real executions and ``threading.Event`` gates hold a step open
while the test acts on the instance.  A worker-crash test runs a real worker in a
subprocess and SIGKILLs it mid-step.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import poll

from nbflow import (
    Engine,
    InstanceExistsError,
    InstanceNotFoundError,
    InvalidStateError,
    WorkflowEntrypoint,
)
from nbflow.worker import Housekeeper

CALLS: Counter[Any] = Counter()
_CALLS_LOCK = threading.Lock()
STARTED = threading.Event()  # set by a gated step when it begins
GATE = threading.Event()  # a gated step blocks until the test sets this


def bump(key: Any) -> int:
    with _CALLS_LOCK:
        CALLS[key] += 1
        return CALLS[key]


def gated(key: str) -> Callable[[], str]:
    def callback() -> str:
        bump(key)
        STARTED.set()
        GATE.wait(10)  # bounded, so a failing test cannot wedge the worker
        return f"{key} done"

    return callback


@pytest.fixture(autouse=True)
def _reset_module_state(engine: Engine) -> Iterator[None]:
    """Resets counters and gates; torn down before ``engine`` (it depends on it), so a
    gated step is released before the engine's worker is stopped."""
    CALLS.clear()
    STARTED.clear()
    GATE.clear()
    yield
    GATE.set()  # never leave a step blocked behind
    CALLS.clear()


def wait_for_status(inst: Any, *statuses: str, timeout: float = 5.0) -> str:
    seen: list[str] = []

    def check() -> bool:
        seen.append(inst.status()["status"])
        return seen[-1] in statuses

    poll(check, timeout, what=f"status in {statuses} of {inst.id} (saw {seen[-1:]})")
    return seen[-1]


def step_statuses(inst: Any) -> dict[str, str]:
    df = inst.steps()
    return {f"{r.step}#{r.count}": r.status for r in df.itertuples()}


# -- workflows -------------------------------------------------------------------------


class AB(WorkflowEntrypoint):
    """Step "a" is gated (held open by the test), then "b"."""

    async def run(self, event, step):
        a = await step.do("a", gated("a"))
        b = await step.do("b", lambda: bump("b") and "b done")
        return [a, b]


class ABC(WorkflowEntrypoint):
    """Each step returns how many times it has run so far."""

    async def run(self, event, step):
        a = await step.do("a", lambda: bump("a"))
        b = await step.do("b", lambda: bump("b"))
        c = await step.do("c", lambda: bump("c"))
        return [a, b, c]


class Repeated(WorkflowEntrypoint):
    async def run(self, event, step):
        out = [await step.do("a", lambda: bump("a"))]
        for n in (1, 2):
            out.append(await step.do("b", lambda n=n: bump(f"b{n}")))
        out.append(await step.do("c", lambda: bump("c")))
        return out


class Simple(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("one", lambda: bump("one") and event.payload)


class Other(WorkflowEntrypoint):
    async def run(self, event, step):
        return "other"


class Boom(WorkflowEntrypoint):
    async def run(self, event, step):
        raise RuntimeError("boom")


class NapThenStep(WorkflowEntrypoint):
    async def run(self, event, step):
        await step.sleep("nap", event.payload.get("seconds", 0.5))
        return await step.do("after", lambda: bump("after"))


class WaitThenStep(WorkflowEntrypoint):
    async def run(self, event, step):
        got = await step.wait_for_event("wait", "go", timeout="1 hour")
        await step.do("after", lambda: bump("after"))
        return got["payload"]


STEPS_IN_RACE = 20


class ManySteps(WorkflowEntrypoint):
    """Many tiny steps; each counts its executions per (instance, step)."""

    async def run(self, event, step):
        iid = event.instance_id
        total = 0
        for n in range(STEPS_IN_RACE):
            total += await step.do(f"s{n}", lambda n=n: bump((iid, n)) and 1)
        return total


# -- pause and resume ------------------------------------------------------------------


def test_pause_from_queued_then_resume_runs_it_to_completion(engine: Engine) -> None:
    inst = engine.register(Simple).create(params="p")
    assert inst.status() == {"status": "queued"}
    inst.pause()
    assert inst.status() == {"status": "paused"}
    engine.run_worker(burst=True)  # a worker comes by: a paused instance does not run
    assert inst.status() == {"status": "paused"}
    assert CALLS["one"] == 0
    inst.resume()
    assert inst.status()["status"] in ("queued", "running")
    engine.run_worker(burst=True)
    assert inst.wait(timeout=5) == {"status": "complete", "output": "p"}
    assert CALLS["one"] == 1


def test_pause_while_a_step_runs_lets_it_finish_and_starts_no_next_step(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(AB).create()
    assert STARTED.wait(5), "step 'a' never started"
    inst.pause()
    assert inst.status()["status"] in ("waitingForPause", "paused")
    GATE.set()
    wait_for_status(inst, "paused")
    assert step_statuses(inst) == {"a#1": "complete"}
    assert inst.step_output("a") == "a done"
    time.sleep(0.3)  # give a wrongly started step "b" the time to show up
    assert inst.status() == {"status": "paused"}
    assert CALLS["b"] == 0
    assert "b#1" not in step_statuses(inst)
    inst.resume()
    # (a worker may already have run it again: the new output below is the proof)
    assert inst.status()["status"] in ("queued", "running", "complete")
    assert inst.wait(timeout=5) == {"status": "complete", "output": ["a done", "b done"]}
    assert CALLS["a"] == 1
    assert CALLS["b"] == 1


def test_pause_from_waitingforpause_then_resume_goes_on_running(worker_engine: Engine) -> None:
    inst = worker_engine.register(AB).create()
    assert STARTED.wait(5)
    inst.pause()
    assert inst.status() == {"status": "waitingForPause"}
    inst.resume()
    assert inst.status()["status"] in ("queued", "running")
    GATE.set()
    assert inst.wait(timeout=5) == {"status": "complete", "output": ["a done", "b done"]}
    assert CALLS["a"] == 1
    assert CALLS["b"] == 1


def test_pause_a_sleeping_instance_keeps_it_asleep_past_its_deadline_until_resume(
    worker_engine: Engine,
) -> None:
    timers = worker_engine.keys.timers
    inst = worker_engine.register(NapThenStep).create(params={"seconds": 0.4})
    wait_for_status(inst, "waiting")
    inst.pause()
    assert inst.status() == {"status": "paused"}
    assert worker_engine.redis.zscore(timers, inst.id) is None
    time.sleep(0.8)  # well past the sleep's deadline
    assert inst.status() == {"status": "paused"}
    assert CALLS["after"] == 0
    inst.resume()
    assert inst.status()["status"] in ("queued", "running")
    assert inst.wait(timeout=5) == {"status": "complete", "output": 1}
    assert CALLS["after"] == 1


# -- terminate -------------------------------------------------------------------------


def _to_state(engine: Engine, state: str) -> Any:
    """An instance of NapThenStep/AB in ``state``; starts the worker where needed."""
    if state == "queued":
        inst = engine.register(AB).create()
    elif state == "paused":
        inst = engine.register(AB).create()
        inst.pause()
    elif state == "running":
        inst = engine.register(AB).create()
        engine.start_worker()
        assert STARTED.wait(5)
    elif state == "waiting":
        inst = engine.register(NapThenStep).create(params={"seconds": 0.4})
        engine.start_worker()
        wait_for_status(inst, "waiting")
        assert engine.redis.zscore(engine.keys.timers, inst.id) is not None
    else:
        raise AssertionError(state)
    assert inst.status()["status"] == state
    return inst


@pytest.mark.parametrize("state", ["queued", "running", "waiting", "paused"])
def test_terminate_stops_the_instance_for_good(engine: Engine, state: str) -> None:
    inst = _to_state(engine, state)
    inst.terminate()
    assert inst.status() == {"status": "terminated"}
    assert engine.redis.zscore(engine.keys.timers, inst.id) is None
    GATE.set()  # a step that was running finishes, but nothing after it may run
    engine.start_worker()  # a worker is there to run anything wrongly left queued
    time.sleep(0.8)  # past the sleep's deadline
    assert inst.wait(timeout=1) == {"status": "terminated"}
    assert CALLS["b"] == 0
    assert CALLS["after"] == 0
    assert engine.redis.zscore(engine.keys.timers, inst.id) is None
    assert "b#1" not in step_statuses(inst)
    with pytest.raises(InvalidStateError, match="terminated"):
        inst.resume()


def test_terminate_a_waiting_for_event_instance_drops_its_wait_and_buffered_events(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(WaitThenStep).create()
    wait_for_status(inst, "waiting")
    inst.send_event("other", "buffered")
    assert worker_engine.redis.exists(f"{worker_engine.prefix}:{inst.id}:events:other")
    inst.terminate()
    assert inst.status() == {"status": "terminated"}
    assert not worker_engine.redis.exists(f"{worker_engine.prefix}:{inst.id}:events:other")
    with pytest.raises(InvalidStateError, match="terminated"):
        inst.send_event("go", "too late")
    time.sleep(0.2)
    assert inst.status() == {"status": "terminated"}
    assert CALLS["after"] == 0


# -- restart ---------------------------------------------------------------------------


def test_restart_without_from_step_runs_every_step_again_and_wait_sees_the_new_run(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(ABC).create()
    assert inst.wait(timeout=5) == {"status": "complete", "output": [1, 1, 1]}
    inst.restart()
    # (a worker may already have run it again: the new output below is the proof)
    assert inst.status()["status"] in ("queued", "running", "complete")
    assert inst.wait(timeout=5) == {"status": "complete", "output": [2, 2, 2]}
    assert CALLS == Counter({"a": 2, "b": 2, "c": 2})


def test_restart_from_a_step_keeps_earlier_results_and_reruns_it_and_later_ones(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(ABC).create()
    assert inst.wait(timeout=5) == {"status": "complete", "output": [1, 1, 1]}
    inst.restart(from_step="b")
    # (a worker may already have run it again: the new output below is the proof)
    assert inst.status()["status"] in ("queued", "running", "complete")
    assert inst.wait(timeout=5) == {"status": "complete", "output": [1, 2, 2]}
    assert CALLS == Counter({"a": 1, "b": 2, "c": 2})


def test_restart_from_the_second_occurrence_of_a_repeated_step(worker_engine: Engine) -> None:
    inst = worker_engine.register(Repeated).create()
    assert inst.wait(timeout=5) == {"status": "complete", "output": [1, 1, 1, 1]}
    inst.restart(from_step="b#2")
    assert inst.wait(timeout=5) == {"status": "complete", "output": [1, 1, 2, 2]}
    assert CALLS == Counter({"a": 1, "b1": 1, "b2": 2, "c": 2})


@pytest.mark.parametrize("from_step", ["nope", "b#3", "a#2"])
def test_restart_from_a_step_that_does_not_exist_raises_value_error_and_changes_nothing(
    worker_engine: Engine, from_step: str
) -> None:
    inst = worker_engine.register(Repeated).create()
    assert inst.wait(timeout=5)["status"] == "complete"
    before = (inst.status(), step_statuses(inst))
    with pytest.raises(ValueError):
        inst.restart(from_step=from_step)
    time.sleep(0.2)
    assert (inst.status(), step_statuses(inst)) == before
    assert CALLS == Counter({"a": 1, "b1": 1, "b2": 1, "c": 1})


def test_restart_of_an_errored_instance_runs_it_again(engine: Engine) -> None:
    inst = engine.register(Boom).create()
    engine.run_worker(burst=True)
    assert inst.status()["status"] == "errored"
    inst.restart()
    status = inst.status()
    assert status["status"] in ("queued", "running")
    assert "error" not in status
    engine.run_worker(burst=True)
    assert inst.wait(timeout=5)["status"] == "errored"


def test_restart_while_a_step_runs_discards_the_old_runs_late_result(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(AB).create()
    assert STARTED.wait(5)
    inst.restart()
    assert inst.status()["status"] in ("queued", "running")
    GATE.set()  # the old run's step "a" finishes now, after the restart
    assert inst.wait(timeout=10) == {"status": "complete", "output": ["a done", "b done"]}
    assert CALLS["a"] == 2, "the restarted run must run step 'a' itself"
    assert CALLS["b"] == 1
    steps = inst.steps().set_index("step")
    assert steps.loc["a", "attempts"] == 1


# -- lifecycle calls in the wrong state ---------------------------------------------------


def _instance_in(engine: Engine, state: str) -> Any:
    if state in ("queued", "paused", "running", "waiting"):
        return _to_state(engine, state)
    if state == "waitingForPause":
        inst = _to_state(engine, "running")
        inst.pause()
        assert inst.status()["status"] == "waitingForPause"
        return inst
    if state == "complete":
        inst = engine.register(Simple).create()
        engine.run_worker(burst=True)
    elif state == "errored":
        inst = engine.register(Boom).create()
        engine.run_worker(burst=True)
    elif state == "terminated":
        inst = engine.register(Simple).create()
        inst.terminate()
    else:
        raise AssertionError(state)
    assert inst.status()["status"] == state
    return inst


WRONG_STATE_CALLS = [
    ("queued", "resume"),
    ("running", "resume"),
    ("waiting", "resume"),
    ("paused", "pause"),
    ("waitingForPause", "pause"),
    ("complete", "pause"),
    ("complete", "resume"),
    ("complete", "terminate"),
    ("errored", "pause"),
    ("errored", "resume"),
    ("errored", "terminate"),
    ("terminated", "pause"),
    ("terminated", "resume"),
    ("terminated", "terminate"),
]


@pytest.mark.parametrize(("state", "call"), WRONG_STATE_CALLS)
def test_lifecycle_call_in_a_wrong_state_raises_invalid_state_naming_the_status(
    engine: Engine, state: str, call: str
) -> None:
    inst = _instance_in(engine, state)
    with pytest.raises(InvalidStateError) as info:
        getattr(inst, call)()
    assert re.search(rf"\b{state}\b", str(info.value)), str(info.value)
    assert inst.status()["status"] == state


# -- get and create --------------------------------------------------------------------


def test_get_of_an_unknown_id_raises_instance_not_found(engine: Engine) -> None:
    wf = engine.register(Simple)
    with pytest.raises(InstanceNotFoundError) as info:
        wf.get("no-such-instance")
    assert isinstance(info.value, LookupError)
    with pytest.raises(LookupError):
        wf.get("no-such-instance")


def test_get_of_an_id_created_by_another_workflow_raises_instance_not_found(
    engine: Engine,
) -> None:
    other = engine.register(Other).create(id="theirs")
    with pytest.raises(InstanceNotFoundError):
        engine.register(Simple).get(other.id)
    assert engine.workflow("Other").get("theirs").id == "theirs"


@pytest.mark.parametrize(
    "bad",
    ["", "-a", "a/b", "a" * 101, "a:b", "a b", "a\n"],
    ids=["empty", "leading-dash", "slash", "101-chars", "colon", "space", "newline"],
)
def test_get_of_an_invalid_id_raises_value_error(engine: Engine, bad: str) -> None:
    with pytest.raises(ValueError):
        engine.register(Simple).get(bad)


def test_create_with_an_existing_id_raises_instance_exists_and_keeps_the_first(
    engine: Engine,
) -> None:
    wf = engine.register(Simple)
    first = wf.create(id="order-42", params={"n": 1})
    before = engine.redis.hgetall(engine.keys.metadata(first.id))
    with pytest.raises(InstanceExistsError) as info:
        wf.create(id="order-42", params={"n": 2})
    assert isinstance(info.value, ValueError)
    assert engine.redis.hgetall(engine.keys.metadata(first.id)) == before
    engine.run_worker(burst=True)
    assert first.wait(timeout=5) == {"status": "complete", "output": {"n": 1}}
    assert CALLS["one"] == 1


# -- races -------------------------------------------------------------------------------


def _calibrate(engine: Engine) -> float:
    """How long a ManySteps run takes from create() to its last step, so a random moment
    can fall inside a run (the fastest of three runs, timed from the stored steps)."""
    spans = []
    for _ in range(3):
        t0 = time.time()
        inst = engine.workflow("ManySteps").create()
        assert inst.wait(timeout=10)["status"] == "complete"
        spans.append(inst.steps()["finished_at"].max().timestamp() - t0)
    return max(min(spans), 0.005)


def test_pause_racing_step_completion_never_loses_either(worker_engine: Engine) -> None:
    worker_engine.register(ManySteps)
    span = _calibrate(worker_engine)
    rng = random.Random(1234)
    outcomes: Counter[str] = Counter()
    for _ in range(50):
        inst = worker_engine.workflow("ManySteps").create()
        time.sleep(rng.uniform(0, span))
        try:
            inst.pause()
        except InvalidStateError as exc:  # it finished first
            assert "complete" in str(exc)
            outcomes["finished first"] += 1
        else:
            right_after = inst.status()["status"]
            assert right_after in ("waitingForPause", "paused"), right_after
            wait_for_status(inst, "paused", "complete")
            assert inst.status() == {"status": "paused"}, "a pause was lost"
            steps = step_statuses(inst)
            assert set(steps.values()) <= {"complete"}, f"a step stuck mid-way: {steps}"
            done = len(steps)
            outcomes[f"paused ({'mid-run' if 0 < done < STEPS_IN_RACE else done})"] += 1
            inst.resume()
            # queued or running; or, on a busy machine, already complete again (a new
            # completion: the instance was paused, not complete, before resume())
            assert inst.status()["status"] in ("queued", "running", "complete")
        assert inst.wait(timeout=10) == {"status": "complete", "output": STEPS_IN_RACE}
        runs = [CALLS[(inst.id, n)] for n in range(STEPS_IN_RACE)]
        assert runs == [1] * STEPS_IN_RACE, f"steps did not run exactly once: {runs}"
    assert sum(outcomes.values()) == 50, outcomes
    # The race must really have been run: some pauses landed between two steps.
    assert outcomes["paused (mid-run)"] >= 1, outcomes


def test_terminate_racing_step_completion_never_loses_either(worker_engine: Engine) -> None:
    worker_engine.register(ManySteps)
    span = _calibrate(worker_engine)
    rng = random.Random(4321)
    frozen: list[tuple[Any, dict[bytes, bytes], int]] = []
    for _ in range(50):
        inst = worker_engine.workflow("ManySteps").create()
        time.sleep(rng.uniform(0, span))
        try:
            inst.terminate()
        except InvalidStateError as exc:  # it finished first
            assert "complete" in str(exc)
            assert inst.wait(timeout=5) == {"status": "complete", "output": STEPS_IN_RACE}
            continue
        assert inst.status() == {"status": "terminated"}
        steps_hash = worker_engine.redis.hgetall(worker_engine.keys.steps(inst.id))
        started = sum(CALLS[(inst.id, n)] for n in range(STEPS_IN_RACE))
        frozen.append((inst, steps_hash, started))
    mid_run = [f for f in frozen if 0 < len(f[1]) < STEPS_IN_RACE]
    assert mid_run, "no terminate landed between two steps: the race was not exercised"
    time.sleep(0.3)  # anything wrongly still running has had time to show
    for inst, steps_hash, started in frozen:
        assert inst.status() == {"status": "terminated"}
        # No step started or was stored after terminate() returned ...
        assert worker_engine.redis.hgetall(worker_engine.keys.steps(inst.id)) == steps_hash
        # ... only a step already in its callback may have finished running.
        assert sum(CALLS[(inst.id, n)] for n in range(STEPS_IN_RACE)) <= started + 1
        runs = [CALLS[(inst.id, n)] for n in range(STEPS_IN_RACE)]
        assert max(runs) <= 1, runs


# -- worker crash recovery -----------------------------------------------------------------

CRASH_MODULE = '''
import time

import redis

from nbflow import WorkflowEntrypoint


class CrashFlow(WorkflowEntrypoint):
    """Step "two" blocks for 30 s when the Redis key <prefix>:test:mode is "block"."""

    async def run(self, event, step):
        p = event.payload
        r = redis.Redis.from_url(p["url"])
        k = p["prefix"] + ":test:"

        def one():
            r.incr(k + "one")
            return "first"

        def two():
            n = r.incr(k + "two")
            if r.get(k + "mode") == b"block":
                r.set(k + "marker", n)
                time.sleep(30)
            return "second-%d" % n

        a = await step.do("one", one)
        b = await step.do("two", two)
        return [a, b]
'''

WORKER_SCRIPT = """
import sys
from nbflow import Engine
from nbflow.worker import serve
import {module}
engine = Engine(sys.argv[1], prefix=sys.argv[2], queue=sys.argv[3])
engine.register({module}.CrashFlow)
serve(engine.backend)
"""


def _crash_setup(tmp_path: Path, engine: Engine, redis_url: str) -> tuple[Any, Any, str]:
    """Starts CrashFlow on a subprocess worker and SIGKILLs it inside step "two"."""
    module = f"crashwf_{engine.prefix}"
    (tmp_path / f"{module}.py").write_text(CRASH_MODULE)
    spec = importlib.util.spec_from_file_location(module, tmp_path / f"{module}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    engine.register(mod.CrashFlow)

    r = engine.redis
    k = f"{engine.prefix}:test:"
    r.set(k + "mode", "block")
    inst = engine.workflow("CrashFlow").create(params={"url": redis_url, "prefix": engine.prefix})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER_SCRIPT.format(module=module),
                redis_url,
                engine.prefix,
                engine.queue_name,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            poll(
                lambda: r.exists(k + "marker") or proc.poll() is not None,
                timeout=30,
                what="the subprocess worker to reach step 'two'",
            )
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert inst.status() == {"status": "running"}
    step_one = r.hget(engine.keys.steps(inst.id), "one#1")
    assert step_one is not None
    r.delete(k + "mode")  # the retried step now returns at once
    return inst, step_one, k


def _check_recovered(engine: Engine, inst: Any, step_one: bytes, k: str) -> None:
    r = engine.redis
    assert inst.status() == {"status": "complete", "output": ["first", "second-2"]}
    assert r.get(k + "one") == b"1", "step 'one' ran again"
    assert r.get(k + "two") == b"2", "step 'two' should run twice (interrupted + retried)"
    assert r.hget(engine.keys.steps(inst.id), "one#1") == step_one, "step one was rewritten"
    steps = inst.steps().set_index("step")
    assert steps.loc["two", "status"] == "complete"
    assert steps.loc["two", "attempts"] == 2


def test_worker_killed_mid_step_is_recovered_and_only_that_step_runs_again(
    engine: Engine, redis_url: str, tmp_path: Path
) -> None:
    inst, step_one, k = _crash_setup(tmp_path, engine, redis_url)
    # Stand-in for 30 s passing: the dead worker's lease has run out.
    assert engine.redis.zscore(engine.keys.leases, inst.id) is not None
    engine.redis.zadd(engine.keys.leases, {inst.id: 0})
    Housekeeper(engine.backend, threading.Event()).sweep(0)
    assert inst.status()["status"] in ("queued", "running")
    engine.run_worker(burst=True)
    _check_recovered(engine, inst, step_one, k)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("NBFLOW_SLOW") != "1", reason="waits the real 30 s lease; set NBFLOW_SLOW=1"
)
def test_worker_killed_mid_step_is_recovered_after_the_real_lease_runs_out(
    engine: Engine, redis_url: str, tmp_path: Path
) -> None:
    inst, step_one, k = _crash_setup(tmp_path, engine, redis_url)
    engine.start_worker()
    assert inst.wait(timeout=60)["status"] == "complete"  # spec: resumed within 60 s
    _check_recovered(engine, inst, step_one, k)
