"""Code versions, callback fingerprints, stale steps and the determinism check of a
replay (SPEC 8.2), against real Redis with the in-process worker.

Workflows whose steps call a helper live in a module built for the test (source
``exec``'d into a fresh module registered in ``sys.modules``), the way a notebook's
``__main__`` holds them: redefining ``clean`` there is what re-running a notebook cell
that defines ``clean`` does.
"""

from __future__ import annotations

import functools
import json
import sys
import types
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from support import wait_status

import nbflow
from nbflow import Engine, NonDeterminismError, WorkflowEntrypoint, WorkflowError
from nbflow.fingerprint import (
    callback_fingerprint,
    class_version,
    is_user_module,
    stale_steps,
)

RUNS: Counter[tuple[str, str]] = Counter()

SOURCE = """
from nbflow import WorkflowEntrypoint

RUNS = globals().get("RUNS")  # the test's counter, set after the first exec


def helper(x):
    return x * 2


def clean(x):
    return helper(x) + 1


class Cleaning(WorkflowEntrypoint):
    async def run(self, event, step):
        iid = event.instance_id
        raw = await step.do("load", lambda: RUNS.update([(iid, "load")]) or 10)
        cleaned = await step.do("clean", lambda: RUNS.update([(iid, "clean")]) or clean(raw))
        await step.wait_for_event("go", "go", timeout="1 hour")
        return await step.do("report", lambda: RUNS.update([(iid, "report")]) or cleaned + 1)
"""


@pytest.fixture
def user_module() -> Iterator[types.ModuleType]:
    """A fresh module holding ``SOURCE``, as a notebook's namespace would."""
    name = f"nbf_user_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(SOURCE, f"<{name}>", "exec"), module.__dict__)
    module.RUNS = RUNS
    yield module
    del sys.modules[name]


def stale_of(inst: nbflow.WorkflowInstance) -> dict[str, bool]:
    df = inst.steps()
    return dict(zip(df["step"], df["stale"], strict=True))


# -- versions ------------------------------------------------------------------------


class Versioned(WorkflowEntrypoint[Any, Any]):
    version = "2024-06-v3"

    async def run(self, event: Any, step: Any) -> int:
        return int(await step.do("one", lambda: 1))


class Unversioned(WorkflowEntrypoint[Any, Any]):
    async def run(self, event: Any, step: Any) -> int:
        return int(await step.do("one", lambda: 1))


def test_instance_records_the_class_version_in_info_and_listing(worker_engine: Engine) -> None:
    inst = worker_engine.register(Versioned).create(id="v1")
    other = worker_engine.register(Unversioned).create(id="u1")
    assert inst.wait(timeout=10)["status"] == "complete"
    assert other.wait(timeout=10)["status"] == "complete"
    assert inst.info()["version"] == "2024-06-v3"
    source_hash = other.info()["version"]
    assert isinstance(source_hash, str) and len(source_hash) == 12
    assert source_hash == class_version(Unversioned)
    df = worker_engine.instances()
    assert "version" in df.columns
    assert dict(zip(df["id"], df["version"], strict=True)) == {
        "v1": "2024-06-v3",
        "u1": source_hash,
    }


def test_a_bad_version_attribute_is_refused_at_register(engine: Engine) -> None:
    class Bad(WorkflowEntrypoint[Any, Any]):
        version = 1.5

        def run(self, event: Any, step: Any) -> None:
            return None

    with pytest.raises(TypeError, match="version must be a str"):
        engine.register(Bad)


def test_class_version_follows_the_source_or_the_method_code() -> None:
    space: dict[str, Any] = {"WorkflowEntrypoint": WorkflowEntrypoint, "__name__": "x_exec"}
    exec("class A(WorkflowEntrypoint):\n    def run(self, e, s):\n        return 1\n", space)
    first = class_version(space["A"])
    exec("class A(WorkflowEntrypoint):\n    def run(self, e, s):\n        return 1\n", space)
    assert class_version(space["A"]) == first  # same code, same version (no source here)
    exec("class A(WorkflowEntrypoint):\n    def run(self, e, s):\n        return 2\n", space)
    assert class_version(space["A"]) != first


def test_a_class_redefined_while_its_instance_waits_keeps_the_recorded_version(
    worker_engine: Engine, user_module: types.ModuleType
) -> None:
    flow = worker_engine.register(user_module.Cleaning)
    inst = flow.create(id="redef")
    wait_status(inst, "waiting", timeout=10)
    recorded = inst.info()["version"]
    # the notebook cell is run again with a changed class: new runs use it
    exec(SOURCE.replace("cleaned + 1", "cleaned + 100"), user_module.__dict__)
    worker_engine.register(user_module.Cleaning)
    assert class_version(user_module.Cleaning) != recorded
    inst.send_event("go")
    assert inst.wait(timeout=10) == {"status": "complete", "output": 121}
    assert inst.info()["version"] == recorded  # the version it was created with


# -- stale steps ---------------------------------------------------------------------


def test_fresh_steps_are_not_stale(worker_engine: Engine, user_module: types.ModuleType) -> None:
    inst = worker_engine.register(user_module.Cleaning).create(id="fresh")
    wait_status(inst, "waiting", timeout=10)
    assert stale_of(inst) == {"load": False, "clean": False, "go": False}


def test_redefining_a_function_a_step_calls_makes_that_step_stale(
    worker_engine: Engine, user_module: types.ModuleType
) -> None:
    inst = worker_engine.register(user_module.Cleaning).create(id="st1")
    wait_status(inst, "waiting", timeout=10)
    # a cell redefines `helper`, which `clean` calls: followed transitively
    exec("def helper(x):\n    return x * 3\n", user_module.__dict__)
    assert stale_of(inst) == {"load": False, "clean": True, "go": False}
    exec("def helper(x):\n    return x * 2\n", user_module.__dict__)  # back as it was
    assert stale_of(inst) == {"load": False, "clean": False, "go": False}


def test_rerun_stale_restarts_from_the_first_stale_step_keeping_earlier_results(
    worker_engine: Engine, user_module: types.ModuleType
) -> None:
    inst = worker_engine.register(user_module.Cleaning).create(id="st2")
    wait_status(inst, "waiting", timeout=10)
    inst.send_event("go")
    assert inst.wait(timeout=10) == {"status": "complete", "output": 22}
    exec("def clean(x):\n    return x + 1000\n", user_module.__dict__)
    assert stale_of(inst)["clean"] is True
    inst.rerun_stale()
    wait_status(inst, "waiting", timeout=10)
    inst.send_event("go")
    assert inst.wait(timeout=10) == {"status": "complete", "output": 1011}
    assert RUNS[("st2", "load")] == 1  # kept
    assert RUNS[("st2", "clean")] == 2
    assert not any(stale_of(inst).values())
    with pytest.raises(ValueError, match="'st2' has no stale step"):
        inst.rerun_stale()


def test_rerun_stale_of_an_unknown_instance_raises_not_found(
    engine: Engine, user_module: types.ModuleType
) -> None:
    engine.register(user_module.Cleaning)
    ghost = nbflow.WorkflowInstance(engine, "ghost", "Cleaning")
    with pytest.raises(nbflow.InstanceNotFoundError, match="ghost"):
        ghost.rerun_stale()


PARTIAL_SOURCE = """
import functools
from nbflow import WorkflowEntrypoint


def scale(factor, x=1):
    return factor * x


class Partial(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("scaled", functools.partial(scale, 3))
        await step.wait_for_event("go", "go", timeout="1 hour")
        return await step.do("after", lambda: a + 1)
"""


def test_a_step_not_found_by_name_is_stale_once_a_run_passed_it_with_new_code(
    worker_engine: Engine,
) -> None:
    name = f"nbf_partial_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(PARTIAL_SOURCE, name, "exec"), module.__dict__)
        inst = worker_engine.register(module.Partial).create(id="p1")
        wait_status(inst, "waiting", timeout=10)
        exec("def scale(factor, x=1):\n    return factor * x * 10\n", module.__dict__)
        assert stale_of(inst)["scaled"] is False  # a partial: not known yet
        inst.send_event("go")  # the replay passes "scaled" with the new `scale`
        assert inst.wait(timeout=10) == {"status": "complete", "output": 4}  # stored kept
        assert stale_of(inst) == {"scaled": True, "go": False, "after": False}
    finally:
        del sys.modules[name]


# -- determinism -------------------------------------------------------------------------


class Renamed(WorkflowEntrypoint[Any, Any]):
    """Registered under the name of ``Original`` to stand for its changed code."""

    async def run(self, event: Any, step: Any) -> int:
        a = await step.do("fetch", lambda: RUNS.update([(event.instance_id, "fetch")]) or 1)
        b = await step.do("transform v2", lambda: RUNS.update([(event.instance_id, "v2")]) or 2)
        await step.wait_for_event("go", "go", timeout="1 hour")
        return int(a + b)


class Original(WorkflowEntrypoint[Any, Any]):
    async def run(self, event: Any, step: Any) -> int:
        a = await step.do("fetch", lambda: 1)
        b = await step.do("transform", lambda: 2)
        await step.wait_for_event("go", "go", timeout="1 hour")
        return int(a + b)


class SleepInstead(WorkflowEntrypoint[Any, Any]):
    async def run(self, event: Any, step: Any) -> int:
        await step.do("fetch", lambda: 1)
        await step.sleep("transform", 0)
        await step.wait_for_event("go", "go", timeout="1 hour")
        return 0


class Swapped(WorkflowEntrypoint[Any, Any]):
    async def run(self, event: Any, step: Any) -> int:
        b = await step.do("transform", lambda: 20)
        a = await step.do("fetch", lambda: 10)
        await step.wait_for_event("go", "go", timeout="1 hour")
        return int(a + b)


@pytest.mark.parametrize(
    ("changed", "asked"),
    [
        (Renamed, "do step 'transform v2'"),
        (SleepInstead, "sleep step 'transform'"),
    ],
)
def test_a_replay_asking_for_another_step_ends_errored_with_nondeterminism(
    worker_engine: Engine, changed: type, asked: str
) -> None:
    inst = worker_engine.register(Original).create(id="nd")
    wait_status(inst, "waiting", timeout=10)
    worker_engine.register(changed, name="Original")
    inst.send_event("go")
    status = inst.wait(timeout=10)
    assert status["status"] == "errored"
    assert status["error"]["name"] == "NonDeterminismError"
    message = status["error"]["message"]
    assert "position 1" in message
    assert asked in message and "do step 'transform' was recorded" in message
    assert RUNS[("nd", "v2")] == 0  # nothing ran in place of the recorded step
    assert inst.step_output("transform") == 2  # the stored result is kept


def test_a_replay_asking_for_recorded_steps_in_another_order_is_nondeterministic(
    worker_engine: Engine,
) -> None:
    inst = worker_engine.register(Original).create(id="swap")
    wait_status(inst, "waiting", timeout=10)
    worker_engine.register(Swapped, name="Original")
    inst.send_event("go")
    status = inst.wait(timeout=10)
    assert status["error"]["name"] == "NonDeterminismError"
    assert "position 0" in status["error"]["message"]
    assert "'fetch'" in status["error"]["message"]


def test_nondeterminism_error_is_a_public_workflow_error() -> None:
    assert issubclass(NonDeterminismError, WorkflowError)
    assert "NonDeterminismError" in nbflow.__all__


class SyncOriginal(WorkflowEntrypoint[Any, Any]):
    def run(self, event: Any, step: Any) -> int:
        a = step.do("fetch", lambda: 1)
        step.wait_for_event("go", "go", timeout="1 hour")
        return int(a)


class SyncRenamed(WorkflowEntrypoint[Any, Any]):
    def run(self, event: Any, step: Any) -> int:
        a = step.do("fetch again", lambda: 1)
        step.wait_for_event("go", "go", timeout="1 hour")
        return int(a)


def test_a_plain_def_run_gets_the_determinism_check_too(worker_engine: Engine) -> None:
    inst = worker_engine.register(SyncOriginal).create(id="sy")
    wait_status(inst, "waiting", timeout=10)
    worker_engine.register(SyncRenamed, name="SyncOriginal")
    inst.send_event("go")
    status = inst.wait(timeout=10)
    assert status["error"]["name"] == "NonDeterminismError"
    assert "'fetch again'" in status["error"]["message"]


class Gathered(WorkflowEntrypoint[Any, Any]):
    """Parallel branches whose steps finish in an order that depends on timing."""

    async def run(self, event: Any, step: Any) -> list[int]:
        async def branch(name: str, delay: float) -> int:
            import time

            first = await step.do(f"{name} 1", lambda: time.sleep(delay) or 1)
            second = await step.do(f"{name} 2", lambda: first + 1)
            await step.sleep(f"{name} nap", 0)
            return int(second)

        results = await asyncio_gather(branch("a", 0.05), branch("b", 0.0), branch("c", 0.02))
        await step.wait_for_event("go", "go", timeout="1 hour")
        after = await step.do("after", lambda: sum(results))
        return [*results, after]


async def asyncio_gather(*aws: Any) -> list[Any]:
    import asyncio

    return list(await asyncio.gather(*aws))


def test_parallel_branches_replay_without_a_false_nondeterminism(worker_engine: Engine) -> None:
    flow = worker_engine.register(Gathered)
    insts = [flow.create(id=f"g{n}") for n in range(3)]
    for inst in insts:
        wait_status(inst, "waiting", timeout=10)
        inst.send_event("go")
    for inst in insts:
        assert inst.wait(timeout=10) == {"status": "complete", "output": [2, 2, 2, 6]}
        inst.restart(from_step="after")  # one more replay of every branch and the event
    for inst in insts:
        assert inst.wait(timeout=10) == {"status": "complete", "output": [2, 2, 2, 6]}


# -- fingerprints of any callable (pure) ---------------------------------------------


def test_fingerprints_of_closures_partials_builtins_and_loop_lambdas() -> None:
    def user(x: int) -> int:
        return x + 1

    def make(fn: Any) -> Any:
        return lambda: fn(1)

    class Callable_:
        __hash__ = None  # type: ignore[assignment]  # unhashable on purpose

        def __call__(self) -> int:
            return 1

    loop = [lambda i=i: i for i in range(3)]
    assert len({callback_fingerprint(f) for f in loop}) == 1  # one code object
    assert callback_fingerprint(len) != callback_fingerprint(abs)
    assert callback_fingerprint(functools.partial(user, 1)) != callback_fingerprint(user)
    assert callback_fingerprint(Callable_()) == callback_fingerprint(Callable_())
    assert callback_fingerprint(json.dumps)  # library code, by name
    with_user = callback_fingerprint(make(user))
    assert with_user.startswith("c")  # a user function found in the closure
    assert callback_fingerprint(make(len)) != with_user
    assert callback_fingerprint(42)  # not callable: still a fingerprint, never an error


def test_library_code_is_not_followed_but_user_code_is() -> None:
    assert not is_user_module("json")
    assert not is_user_module("pandas")
    assert not is_user_module("nbflow.engine")
    assert is_user_module("__main__")
    assert is_user_module(__name__)


def test_mutually_recursive_user_functions_fingerprint_without_looping() -> None:
    space: dict[str, Any] = {"__name__": f"nbf_cycle_{uuid.uuid4().hex[:6]}"}
    exec("def even(n):\n    return n == 0 or odd(n - 1)\n", space)
    exec("def odd(n):\n    return n != 0 and even(n - 1)\n", space)
    first = callback_fingerprint(space["even"])
    exec("def odd(n):\n    return n != 0 and not even(n - 1)\n", space)
    assert callback_fingerprint(space["even"]) != first


def test_stale_steps_without_a_fingerprint_or_a_class_are_not_stale() -> None:
    entries = [("a#1", {"s": "complete", "i": 0}), ("b#1", {"s": "complete", "i": 1, "f": "x"})]
    assert stale_steps(None, entries) == [False, False]
    assert stale_steps(None, entries, {"b#1": "y"}) == [False, True]


class NestedThenWait(WorkflowEntrypoint[Any, Any]):
    """A step called inside another step's callback, then a wait: on the replay the
    outer step returns its stored result and the inner one is never asked for."""

    def run(self, event: Any, step: Any) -> int:
        outer = step.do("outer", lambda: step.do("inner", lambda: 5) + 1)
        step.wait_for_event("go", "go", timeout="1 hour")
        return int(step.do("after", lambda: outer * 10))


def test_nested_steps_do_not_upset_the_replay_order(worker_engine: Engine) -> None:
    inst = worker_engine.register(NestedThenWait).create(id="nest")
    wait_status(inst, "waiting", timeout=10)
    inst.send_event("go")
    assert inst.wait(timeout=10) == {"status": "complete", "output": 60}
