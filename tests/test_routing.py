"""Routing (spec 8.1): a worker takes only instances of the workflows it has registered;
an instance nobody can run waits ``queued`` and says what for, and the first worker that
has its workflow takes it (a restarted kernel, another notebook, ``nbflow worker``).

"Kernels" here are real processes (``KERNEL_SOURCE``) that define their workflow classes
in their own ``__main__``, as a notebook cell does, register them and start the
in-process worker.  Callbacks count their runs in Redis (``{k}`` hash: ``{iid}:{step}``
per return, ``{iid}:{step}:start`` per start) and return the pid that ran them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers_procs import Procs, poll, write_module
from rq import Worker

from nbflow import Engine, WorkflowEntrypoint
from nbflow.backend import JOB_FUNCTION

# The workflows, as source: the test process and every kernel define them anew from it.
FLOWS_SOURCE = '''
import os
import time

import redis

from nbflow import WorkflowEntrypoint

_fx = {}


def fx(p):
    if p["fx"] not in _fx:
        _fx[p["fx"]] = redis.Redis.from_url(p["fx"])
    return _fx[p["fx"]]


def counted(p, iid, name):
    """A step callback that counts itself; `hold` makes it wait while {k}:hold exists."""

    def cb():
        r, k = fx(p), p["k"]
        r.hincrby(k, iid + ":" + name + ":start", 1)
        if name in p.get("hold", ()):
            end = time.monotonic() + 60
            while r.exists(k + ":hold") and time.monotonic() < end:
                time.sleep(0.02)
        r.hincrby(k, iid + ":" + name, 1)
        return name + "@" + str(os.getpid())

    return cb


class Alpha(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("a", counted(event.payload, event.instance_id, "a"))


class Beta(WorkflowEntrypoint):
    def run(self, event, step):
        return step.do("b", counted(event.payload, event.instance_id, "b"))


class Story(WorkflowEntrypoint):
    """Four steps; the ones named in payload["hold"] wait while {k}:hold exists."""

    def run(self, event, step):
        p, iid = event.payload, event.instance_id
        return [step.do(name, counted(p, iid, name)) for name in ("s1", "s2", "s3", "s4")]
'''

# A notebook kernel: defines the classes named in $NBF_CLASSES from FLOWS_SOURCE in its own
# __main__, registers them, starts the in-process worker and waits.  SIGTERM makes it exit
# normally (as a kernel shut down or restarted from Jupyter does: atexit handlers run).
KERNEL_SOURCE = """
import os
import signal
import sys
import time

from nbflow import Engine

src = open(os.environ["NBF_FLOWS"]).read()
ns = {"__name__": "__main__"}
exec(compile(src, "<cell>", "exec"), ns)
engine = Engine(os.environ["NBF_URL"], prefix=os.environ["NBF_PREFIX"],
                queue=os.environ["NBF_QUEUE"])
for name in os.environ["NBF_CLASSES"].split(","):
    engine.register(ns[name])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
engine.start_worker()
print("kernel ready", os.getpid(), flush=True)
while True:
    time.sleep(0.1)
"""


def define_flows() -> dict[str, Any]:
    """The workflow classes, defined afresh in this process (a notebook cell run)."""
    ns: dict[str, Any] = {"__name__": "test_routing_cell"}
    exec(compile(FLOWS_SOURCE, "<cell>", "exec"), ns)
    return ns


class Kernels:
    """Kernel processes on the test's Redis, prefix and queue, and the counters."""

    def __init__(self, engine: Engine, redis_url: str, procs: Procs, tmp_path: Path) -> None:
        self.engine = engine
        self.url = redis_url
        self.procs = procs
        self.flows = tmp_path / "flows_cell.py"
        self.flows.write_text(FLOWS_SOURCE)
        (tmp_path / "kernel.py").write_text(KERNEL_SOURCE)
        self.k = f"{engine.prefix}:fx"
        self.fx = redis.Redis.from_url(redis_url)

    def start(self, name: str, *classes: str) -> Any:
        env = {
            "NBF_FLOWS": str(self.flows),
            "NBF_URL": self.url,
            "NBF_PREFIX": self.engine.prefix,
            "NBF_QUEUE": self.engine.queue_name,
            "NBF_CLASSES": ",".join(classes),
        }
        proc = self.procs.spawn(name, [sys.executable, "kernel.py"], env=env)
        poll(lambda: "kernel ready" in self.procs.log(name), 30, f"kernel {name} up")
        return proc

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"fx": self.url, "k": self.k, **extra}

    def count(self, iid: str, step: str, what: str = "") -> int:
        return int(self.fx.hget(self.k, f"{iid}:{step}{what}") or 0)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture
def kernels(engine: Engine, redis_url: str, procs: Procs, tmp_path: Path) -> Iterator[Kernels]:
    kn = Kernels(engine, redis_url, procs, tmp_path)
    yield kn
    kn.fx.delete(kn.k, f"{kn.k}:hold")


def ran_by(output: Any) -> int:
    """The pid in a step result ``name@pid``."""
    return int(str(output).rsplit("@", 1)[1])


def test_two_kernels_with_different_workflows_never_take_each_others_instances(
    engine: Engine, kernels: Kernels
) -> None:
    flows = define_flows()
    alpha, beta = engine.register(flows["Alpha"]), engine.register(flows["Beta"])
    ka = kernels.start("kernel-a", "Alpha")
    kb = kernels.start("kernel-b", "Beta")
    a_insts = alpha.create_batch([{"params": kernels.params()} for _ in range(6)])
    b_insts = beta.create_batch([{"params": kernels.params()} for _ in range(6)])
    for inst in a_insts:
        assert inst.wait(timeout=30)["status"] == "complete"
        assert ran_by(inst.status()["output"]) == ka.pid
    for inst in b_insts:
        assert inst.wait(timeout=30)["status"] == "complete"
        assert ran_by(inst.status()["output"]) == kb.pid
    # kernel B shuts down: Beta's new instances wait for a worker that has Beta, queued
    # (never errored, never taken by kernel A), and say so
    kb.send_signal(signal.SIGTERM)
    kb.wait(20)
    waiting = beta.create_batch([{"params": kernels.params()} for _ in range(3)])
    done = alpha.create(params=kernels.params())  # kernel A still runs Alpha meanwhile
    assert done.wait(timeout=30)["status"] == "complete"
    for inst in waiting:
        info = inst.info()
        assert info["status"] == "queued", info
        assert info["waiting_for"] == "a worker with workflow 'Beta'"
        assert kernels.count(inst.id, "b", ":start") == 0
    assert a_insts[0].info()["waiting_for"] is None
    kb2 = kernels.start("kernel-b2", "Beta")
    for inst in waiting:
        assert inst.wait(timeout=30)["status"] == "complete"
        assert ran_by(inst.status()["output"]) == kb2.pid


def _story_until_s3(engine: Engine, kernels: Kernels) -> tuple[Any, Any]:
    """Kernel A creates a Story instance and runs it until s3 is running (held)."""
    flows = define_flows()
    story = engine.register(flows["Story"])
    kernels.fx.set(f"{kernels.k}:hold", 1)
    ka = kernels.start("kernel-a", "Story")
    inst = story.create(id="story-1", params=kernels.params(hold=["s3"]))
    poll(lambda: kernels.count(inst.id, "s3", ":start") == 1, 30, "s3 running in kernel A")
    return ka, inst


def _story_finished_without_rerunning_completed_steps(kernels: Kernels, inst: Any, kb: Any) -> None:
    status = inst.wait(timeout=30)
    assert status["status"] == "complete", status
    out = status["output"]
    assert [o.split("@")[0] for o in out] == ["s1", "s2", "s3", "s4"]
    assert ran_by(out[2]) == kb.pid and ran_by(out[3]) == kb.pid
    # the steps that had completed in kernel A did not run again
    assert kernels.count(inst.id, "s1", ":start") == 1
    assert kernels.count(inst.id, "s2", ":start") == 1
    assert kernels.count(inst.id, "s3", ":start") == 2  # the interrupted one ran again
    assert kernels.count(inst.id, "s4", ":start") == 1


def test_kernel_killed_mid_run_a_fresh_kernel_defining_the_class_again_finishes_it(
    engine: Engine, kernels: Kernels
) -> None:
    ka, inst = _story_until_s3(engine, kernels)
    ka.kill()  # SIGKILL: nothing of kernel A runs any more
    ka.wait(10)
    # stand-in for the 30 s lease running out (the real one is tested in test_faults)
    engine.redis.zadd(engine.keys.leases, {inst.id: 0})
    kernels.fx.delete(f"{kernels.k}:hold")
    kb = kernels.start("kernel-b", "Story")
    _story_finished_without_rerunning_completed_steps(kernels, inst, kb)


def test_kernel_that_exits_normally_hands_back_what_it_holds_at_once(
    engine: Engine, kernels: Kernels
) -> None:
    ka, inst = _story_until_s3(engine, kernels)
    ka.send_signal(signal.SIGTERM)  # exits normally, its step still running
    # handed back by the exiting kernel, not by its lease (30 s): queued, with its job
    queue = engine.backend.queue_for("Story")
    poll(lambda: queue.count == 1, 20, "instance handed back: its job on its queue")
    assert inst.status() == {"status": "queued"}
    poll(lambda: inst.info()["waiting_for"] is not None, 20, "kernel A no longer serving")
    kernels.fx.delete(f"{kernels.k}:hold")  # kernel A's abandoned callback ends too
    ka.wait(30)
    kb = kernels.start("kernel-b", "Story")
    _story_finished_without_rerunning_completed_steps(kernels, inst, kb)


class Lonely(WorkflowEntrypoint[Any, Any]):
    def run(self, event: Any, step: Any) -> str:
        return str(step.do("only", lambda: f"only@{os.getpid()}"))


class Other(WorkflowEntrypoint[Any, Any]):
    def run(self, event: Any, step: Any) -> str:
        return "other"


def test_instance_nobody_can_run_waits_queued_then_an_in_thread_worker_takes_it(
    engine: Engine, redis_url: str
) -> None:
    inst = engine.register(Lonely).create()  # this engine starts no worker
    other = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    other.register(Other)
    other.start_worker()  # a second notebook with another workflow
    try:
        assert other.workflow("Other").create().wait(timeout=30)["status"] == "complete"
        info = inst.info()
        assert info["status"] == "queued", info
        assert info["waiting_for"] == "a worker with workflow 'Lonely'"
        late = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
        late.register(Lonely)
        late.start_worker()
        try:
            assert inst.wait(timeout=30) == {"status": "complete", "output": f"only@{os.getpid()}"}
            assert inst.info()["waiting_for"] is None
        finally:
            late.stop_worker()
    finally:
        other.stop_worker()


def test_instance_nobody_can_run_is_taken_by_nbflow_worker_importing_its_module(
    engine: Engine, redis_url: str, procs: Procs, tmp_path: Path
) -> None:
    module = write_module(tmp_path, f"nbf_routing_{engine.prefix}", FLOWS_SOURCE)
    flows = define_flows()
    inst = engine.register(flows["Alpha"]).create(params={"fx": redis_url, "k": "unused"})
    assert inst.info()["waiting_for"] == "a worker with workflow 'Alpha'"
    w = procs.worker("w", redis_url, engine.prefix, engine.queue_name, module)
    try:
        status = inst.wait(timeout=30)
        assert status["status"] == "complete", status
        assert ran_by(status["output"]) == w.pid
        # the worker says which queues it listens to
        assert f"{engine.queue_name}:Alpha" in procs.log("w")
    finally:
        engine.redis.delete("unused")


def test_registering_a_class_after_the_worker_started_makes_it_take_its_instances(
    engine: Engine, redis_url: str
) -> None:
    creator = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    inst = creator.register(Lonely).create()
    engine.start_worker()  # nothing registered yet: it takes nothing
    assert inst.info()["waiting_for"] == "a worker with workflow 'Lonely'"
    engine.register(Lonely)  # a later cell
    assert inst.wait(timeout=30)["status"] == "complete"
    # `rq info` lists the worker on the workflow's queue too
    assert len(Worker.all(queue=engine.backend.queue_for("Lonely"))) == 1


def test_clean_stop_of_the_thread_worker_hands_back_the_instance_it_holds(
    engine: Engine, redis_url: str
) -> None:
    gate = threading.Event()
    runs: dict[str, int] = {}

    class Gated(WorkflowEntrypoint[Any, Any]):
        def run(self, event: Any, step: Any) -> list[str]:
            out = []
            for name in ("one", "two", "three"):

                def cb(name: str = name) -> str:
                    runs[name] = runs.get(name, 0) + 1
                    if name == "two":
                        gate.wait(20)
                    return name

                out.append(step.do(name, cb))
            return out

    flow = engine.register(Gated)
    engine.start_worker()
    inst = flow.create()
    poll(lambda: runs.get("two") == 1, 30, "step two running")
    engine.stop_worker(timeout=0.2)  # step two is still running
    gate.set()  # it finishes; the run stores it and hands the instance back
    queue = engine.backend.queue_for("Gated")
    poll(lambda: queue.count == 1, 20, "instance handed back: its job on its queue")
    assert inst.status() == {"status": "queued"}
    assert inst.info()["waiting_for"] == "a worker with workflow 'Gated'"
    again = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    again.register(Gated)
    again.start_worker()
    try:
        assert inst.wait(timeout=30) == {"status": "complete", "output": ["one", "two", "three"]}
    finally:
        again.stop_worker()
    assert runs == {"one": 1, "two": 1, "three": 1}


def test_a_job_reaching_a_worker_without_its_workflow_is_handed_back_not_errored(
    engine: Engine, redis_url: str
) -> None:
    creator = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    inst = creator.register(Lonely).create()
    # a job on the engine's own queue (an older nbflow, or enqueued by hand) reaches a
    # worker that has no Lonely
    engine.register(Other)
    engine.backend.base_queue.enqueue_call(JOB_FUNCTION, args=(engine.prefix, [inst.id]))
    engine.run_worker(burst=True)
    assert inst.status() == {"status": "queued"}
    assert [e["ev"] for e in inst.history()][-1] == "handed.back"
    creator.run_worker(burst=True)  # a worker that has it
    assert inst.wait(timeout=10)["status"] == "complete"


def test_waiting_for_is_none_while_a_worker_with_the_workflow_is_busy(engine: Engine) -> None:
    gate = threading.Event()

    class Busy(WorkflowEntrypoint[Any, Any]):
        def run(self, event: Any, step: Any) -> str:
            return str(step.do("hold", lambda: gate.wait(20)))

    flow = engine.register(Busy)
    engine.start_worker()
    first = flow.create()
    poll(lambda: first.status()["status"] == "running", 30, "first instance running")
    second = flow.create()  # queued behind it: a worker has Busy, so it waits for nothing
    info = second.info()
    assert (info["status"], info["waiting_for"]) == ("queued", None)
    gate.set()
    assert second.wait(timeout=30)["status"] == "complete"
    assert set(first.info()) >= {"waiting_for"}  # always present


def test_a_lost_job_is_dispatched_again_only_by_a_process_that_has_the_workflow(
    engine: Engine, redis_url: str
) -> None:
    creator = Engine(redis_url, prefix=engine.prefix, queue=engine.queue_name)
    inst = creator.register(Lonely).create()
    queue = creator.backend.queue_for("Lonely")
    engine.redis.delete(queue.key)  # its RQ job is lost
    engine.redis.zadd(engine.keys.ready("Lonely"), {inst.id: 0})  # stand-in: long ago
    engine.register(Other)
    engine.run_worker(burst=True)  # sweeps lost dispatches of Other only
    assert (inst.status(), queue.count) == ({"status": "queued"}, 0)
    creator.run_worker(burst=True)  # has Lonely: dispatches it again and runs it
    assert inst.wait(timeout=10)["status"] == "complete"
