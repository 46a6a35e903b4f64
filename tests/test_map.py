"""``step.map`` (spec 10.1): one cached step per item (``name#1`` ... ``name#n``), at most
``concurrency`` at once, results in input order, and on replay only the items without a
stored result run.  Bad ``concurrency`` values fail the run with a ``ValueError``."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from nbflow import Engine, WorkflowEntrypoint

CALLS: Counter[Any] = Counter()
LOCK = threading.Lock()
STATE = {"now": 0, "max": 0}


def _track(item: int) -> int:
    """Counts an item's call and how many calls run at once."""
    with LOCK:
        CALLS[item] += 1
        STATE["now"] += 1
        STATE["max"] = max(STATE["max"], STATE["now"])
    time.sleep(0.02)
    with LOCK:
        STATE["now"] -= 1
    return item * item


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    STATE.update(now=0, max=0)


class Squares(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        p = event.payload
        return await step.map("sq", p["items"], _track, concurrency=p.get("concurrency", 8))


class SyncSquares(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> Any:
        return step.map("sq", event.payload["items"], _track, concurrency=3)


class AsyncItems(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        async def shout(word: str) -> str:
            return word.upper()

        return await step.map("shout", ["a", "b", "c"], shout)


class Together(WorkflowEntrypoint):
    """Items that can only finish if ``concurrency`` of them run at the same moment."""

    async def run(self, event: Any, step: Any) -> Any:
        n = event.payload["n"]
        barrier = threading.Barrier(n, timeout=10)

        def meet(item: int) -> int:
            barrier.wait()
            return item

        return await step.map("meet", range(n), meet, concurrency=n)


class FlakyItem(WorkflowEntrypoint):
    """Item 3 fails its first attempt; the retry waits long enough to park the instance."""

    async def run(self, event: Any, step: Any) -> Any:
        def work(item: int) -> int:
            CALLS[item] += 1
            if item == 3 and CALLS[item] == 1:
                raise RuntimeError("first try fails")
            return item + 100

        cfg = {"retries": {"limit": 1, "delay": "1.5 seconds", "backoff": "constant"}}
        out = await step.map("work", range(6), work, concurrency=2, config=cfg)
        await step.do("after", lambda: "done")
        return out


class FailingItem(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        def work(item: int) -> int:
            CALLS[item] += 1
            if item == 1:
                raise KeyError(f"item {item}")
            time.sleep(0.05)
            return item

        return await step.map(
            "work", range(10), work, concurrency=1, config={"retries": {"limit": 0}}
        )


class BadConcurrency(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> Any:
        return await step.map("x", [1, 2], _track, concurrency=event.payload["c"])


@pytest.fixture
def eng(worker_engine: Engine) -> Engine:
    for cls in (Squares, SyncSquares, AsyncItems, Together, FlakyItem, FailingItem, BadConcurrency):
        worker_engine.register(cls)
    return worker_engine


def test_map_returns_results_in_input_order_each_item_its_own_step(eng: Engine) -> None:
    items = [5, 3, 9, 1, 7]
    inst = eng.workflow("Squares").create(params={"items": items, "concurrency": 2})
    assert inst.wait(timeout=15) == {"status": "complete", "output": [25, 9, 81, 1, 49]}
    steps = inst.steps().sort_values("count")
    assert list(steps["step"]) == ["sq"] * 5
    assert list(steps["count"]) == [1, 2, 3, 4, 5]
    assert list(steps["kind"]) == ["do"] * 5
    assert list(steps["output"]) == [25, 9, 81, 1, 49]  # sq#n is the n-th item's step
    assert inst.step_output("sq#3") == 81


def test_map_runs_at_most_concurrency_items_at_once(eng: Engine) -> None:
    inst = eng.workflow("Squares").create(params={"items": list(range(12)), "concurrency": 3})
    assert inst.wait(timeout=15)["status"] == "complete"
    assert 1 <= STATE["max"] <= 3
    assert CALLS == Counter({i: 1 for i in range(12)})


def test_map_runs_items_side_by_side_up_to_concurrency(eng: Engine) -> None:
    inst = eng.workflow("Together").create(params={"n": 4})
    assert inst.wait(timeout=20) == {"status": "complete", "output": [0, 1, 2, 3]}


def test_map_takes_async_callbacks(eng: Engine) -> None:
    inst = eng.workflow("AsyncItems").create()
    assert inst.wait(timeout=10) == {"status": "complete", "output": ["A", "B", "C"]}


def test_map_in_a_plain_def_run_runs_items_one_after_another(eng: Engine) -> None:
    inst = eng.workflow("SyncSquares").create(params={"items": [1, 2, 3, 4]})
    assert inst.wait(timeout=10) == {"status": "complete", "output": [1, 4, 9, 16]}
    assert STATE["max"] == 1
    assert list(inst.steps()["step"]) == ["sq"] * 4


def test_on_replay_only_items_without_a_stored_result_run(eng: Engine) -> None:
    inst = eng.workflow("FlakyItem").create()
    assert inst.wait(timeout=20) == {
        "status": "complete",
        "output": [100, 101, 102, 103, 104, 105],
    }
    # item 3's retry parked the instance; the replay ran item 3 again and the items that
    # had not started, never an item already stored
    assert CALLS == Counter({0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1})
    row = inst.steps().set_index(["step", "count"]).loc[("work", 4)]
    assert (row.status, row.attempts) == ("complete", 2)
    assert "waiting" in [e["ev"] for e in inst.history()]


def test_a_failing_item_raises_its_error_and_items_not_started_do_not_run(eng: Engine) -> None:
    status = eng.workflow("FailingItem").create().wait(timeout=15)
    assert status["status"] == "errored"
    assert status["error"] == {"name": "KeyError", "message": "'item 1'"}
    assert CALLS == Counter({0: 1, 1: 1})


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8", None])
def test_bad_concurrency_is_a_value_error_naming_it(eng: Engine, value: Any) -> None:
    inst = eng.workflow("BadConcurrency").create(params={"c": value})
    status = inst.wait(timeout=10)
    assert status["status"] == "errored"
    assert status["error"]["name"] == "ValueError"
    assert "concurrency must be a positive int" in status["error"]["message"]
    assert repr(value) in status["error"]["message"]
    assert inst.steps().empty
    assert not CALLS
