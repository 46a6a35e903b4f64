"""``inst.fork`` (SPEC 8.5) and the ``%wf fork`` / ``%wf rerun --stale`` magics, against
real Redis with the in-process worker.

Callbacks count their real runs in ``RUNS`` keyed by instance id, so "the fork reused
the results before the step" is observed, not assumed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from support import wait_status
from traitlets.config import Config

from nbflow import (
    Engine,
    InstanceExistsError,
    InstanceNotFoundError,
    WorkflowEntrypoint,
    WorkflowInstance,
)
from nbflow.notebook import use_engine

RUNS: Counter[tuple[str, str]] = Counter()


class Pipeline(WorkflowEntrypoint[Any, Any]):
    async def run(self, event: Any, step: Any) -> dict[str, Any]:
        iid, factor = event.instance_id, (event.payload or {}).get("factor", 1)

        def work(name: str, value: Any) -> Any:
            RUNS[(iid, name)] += 1
            return value

        raw = await step.do("load", lambda: work("load", [1, 2, 3]))
        total = await step.do("sum", lambda: work("sum", sum(raw)))
        await step.wait_for_event("approve", "approve", timeout="1 hour")
        scaled = await step.do("scale", lambda: work("scale", total * factor))
        return {"total": total, "scaled": scaled}


def ran(inst: WorkflowInstance) -> dict[str, int]:
    return {name: RUNS[(inst.id, name)] for name in ("load", "sum", "scale")}


@pytest.fixture
def done(worker_engine: Engine) -> WorkflowInstance:
    """A complete instance of ``Pipeline`` (factor 2)."""
    inst = worker_engine.register(Pipeline).create(id="orig", params={"factor": 2})
    wait_status(inst, "waiting", timeout=10)
    inst.send_event("approve")
    assert inst.wait(timeout=10) == {"status": "complete", "output": {"total": 6, "scaled": 12}}
    return inst


def test_fork_from_a_step_reuses_the_results_before_it(done: WorkflowInstance) -> None:
    before = done.steps()
    child = done.fork("sum", id="child")
    assert child.id == "child" and child.workflow == "Pipeline"
    assert child.info()["status"] in ("queued", "running", "waiting")
    wait_status(child, "waiting", timeout=10)
    child.send_event("approve")
    assert child.wait(timeout=10) == {"status": "complete", "output": {"total": 6, "scaled": 12}}
    assert ran(child) == {"load": 0, "sum": 1, "scale": 1}  # "load" was copied
    # the copied step keeps its result and the time it really ran
    assert child.step_output("load") == [1, 2, 3]
    row = child.steps().iloc[0]
    assert row["step"] == "load"
    assert abs((row["started_at"] - before.iloc[0]["started_at"]).total_seconds()) < 0.01
    # the original is untouched
    assert done.status() == {"status": "complete", "output": {"total": 6, "scaled": 12}}
    assert ran(done) == {"load": 1, "sum": 1, "scale": 1}
    assert done.steps()[["step", "status", "output"]].equals(before[["step", "status", "output"]])


def test_fork_without_a_step_copies_every_completed_step_and_takes_new_params(
    done: WorkflowInstance,
) -> None:
    child = done.fork(params={"factor": 10})
    assert len(child.id) == 32  # a fresh uuid4 hex
    # every completed step was copied, the event too: only nothing is left to run
    assert child.wait(timeout=10) == {"status": "complete", "output": {"total": 6, "scaled": 12}}
    assert ran(child) == {"load": 0, "sum": 0, "scale": 0}
    again = done.fork("scale", params={"factor": 10})
    assert again.wait(timeout=10) == {"status": "complete", "output": {"total": 6, "scaled": 60}}
    assert ran(again) == {"load": 0, "sum": 0, "scale": 1}


def test_fork_of_a_waiting_instance_leaves_it_waiting(worker_engine: Engine) -> None:
    inst = worker_engine.register(Pipeline).create(id="w")
    wait_status(inst, "waiting", timeout=10)
    child = inst.fork(id="w-fork")
    wait_status(child, "waiting", timeout=10)
    assert inst.status() == {"status": "waiting"}
    assert ran(child) == {"load": 0, "sum": 0, "scale": 0}
    assert child.info()["steps_done"] == 2
    child.send_event("approve")
    assert child.wait(timeout=10)["status"] == "complete"
    assert inst.status() == {"status": "waiting"}  # its event was not the fork's


def test_fork_errors_as_create(done: WorkflowInstance, worker_engine: Engine) -> None:
    with pytest.raises(InstanceExistsError, match="'orig'"):
        done.fork(id="orig")
    with pytest.raises(ValueError, match="instance id"):
        done.fork(id="has space")
    with pytest.raises(ValueError, match=r"no step 'nope'.*load#1, sum#1, approve#1, scale#1"):
        done.fork("nope")
    ghost = WorkflowInstance(worker_engine, "ghost", "Pipeline")
    with pytest.raises(InstanceNotFoundError, match="ghost"):
        ghost.fork()
    # nothing was written for the refused forks
    assert sorted(worker_engine.instances()["id"]) == ["orig"]


# -- magics ------------------------------------------------------------------------------

CELL = """
from nbflow import WorkflowEntrypoint

def clean(x):
    return x + 1

class Cells(WorkflowEntrypoint):
    def run(self, event, step):
        a = step.do("first", lambda: CALLS.update(["first"]) or 1)
        b = step.do("cleaned", lambda: CALLS.update(["cleaned"]) or clean(a))
        return step.do("last", lambda: CALLS.update(["last"]) or b * 10)
"""


@pytest.fixture
def shell(engine: Engine) -> Iterator[InteractiveShell]:
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=config)
    sh.run_line_magic("load_ext", "nbflow")
    use_engine(engine)
    sh.user_ns["CALLS"] = Counter()
    sh.run_cell(CELL).raise_error()
    yield sh
    sh.run_line_magic("wf", "worker stop")
    use_engine(None)
    sh.reset(new_session=False)


def test_wf_rerun_stale_after_redefining_a_function_in_a_cell(shell: InteractiveShell) -> None:
    wf = shell.run_line_magic
    inst = wf("wf", "start Cells --id c1")
    wf("wf", "worker start")
    assert wf("wf", "wait c1 --timeout 10") == {"status": "complete", "output": 20}
    assert not wf("wf", "steps c1")["stale"].any()
    with pytest.raises(UsageError, match="no stale step"):
        wf("wf", "rerun c1 --stale")
    shell.run_cell("def clean(x):\n    return x + 4\n").raise_error()
    stale = wf("wf", "steps c1")
    assert dict(zip(stale["step"], stale["stale"], strict=True)) == {
        "first": False,
        "cleaned": True,
        "last": False,
    }
    assert wf("wf", "rerun c1 --stale") == inst
    assert wf("wf", "wait c1 --timeout 10") == {"status": "complete", "output": 50}
    assert shell.user_ns["CALLS"] == Counter({"first": 1, "cleaned": 2, "last": 2})
    with pytest.raises(UsageError, match="either --stale or --from"):
        wf("wf", "rerun c1")
    with pytest.raises(UsageError, match="unknown instance 'nope'"):
        wf("wf", "rerun nope --stale")


def test_wf_fork_from_a_step_with_a_new_id(shell: InteractiveShell) -> None:
    wf = shell.run_line_magic
    wf("wf", "start Cells --id c2")
    wf("wf", "worker start")
    assert wf("wf", "wait c2 --timeout 10")["status"] == "complete"
    child = wf("wf", "fork c2 --from last --id c2-b")
    assert isinstance(child, WorkflowInstance) and child.id == "c2-b"
    assert wf("wf", "wait c2-b --timeout 10") == {"status": "complete", "output": 20}
    assert shell.user_ns["CALLS"] == Counter({"first": 1, "cleaned": 1, "last": 2})
    with pytest.raises(UsageError, match="no step 'nope'.*first#1, cleaned#1, last#1"):
        wf("wf", "fork c2 --from nope")
    with pytest.raises(UsageError, match="already exists"):
        wf("wf", "fork c2 --id c2-b")
    with pytest.raises(UsageError, match="unknown instance 'ghost'"):
        wf("wf", "fork ghost")
