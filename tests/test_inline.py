"""Sync callbacks run inline (no thread hand-off) where a SIGALRM timer can bound them:
in the main thread of `engine.run_worker()` / `nbflow worker`. These tests prove the
timeout still interrupts a blocking callback there, and that parallel branches still
run side by side (they go to the thread pool when more than one step is in flight)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from nbflow import Engine, WorkflowEntrypoint, callbacks

INTERRUPTED: list[str] = []


def _nap(instance_id: str) -> str:
    try:
        time.sleep(30)
    except BaseException:  # the step's timeout cut the sleep short
        INTERRUPTED.append(instance_id)
        raise
    return "woke"


class Sleepy(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> str:
        def nap() -> str:
            return _nap(event.instance_id)

        try:
            return await step.do("nap", {"timeout": "0.3 seconds", "retries": {"limit": 0}}, nap)
        except Exception as exc:
            return type(exc).__name__


class SyncSleepy(WorkflowEntrypoint):
    def run(self, event: Any, step: Any) -> str:
        def nap() -> str:
            return _nap(event.instance_id)

        try:
            return step.do("nap", {"timeout": "0.3 seconds", "retries": {"limit": 0}}, nap)
        except Exception as exc:
            return type(exc).__name__


def test_main_thread_worker_interrupts_a_blocking_callback_at_its_timeout(engine: Engine) -> None:
    inst = engine.register(Sleepy).create(id="sleepy-async")
    sync_inst = engine.register(SyncSleepy).create(id="sleepy-sync")
    assert threading.current_thread() is threading.main_thread()
    engine.run_worker(burst=True)  # in this (main) thread: callbacks run inline
    assert inst.status() == {"status": "complete", "output": "StepTimeoutError"}
    assert sync_inst.status() == {"status": "complete", "output": "StepTimeoutError"}
    # the 30 s sleeps were interrupted, not left running on a thread and discarded
    assert "sleepy-async" in INTERRUPTED and "sleepy-sync" in INTERRUPTED


class Handshake(WorkflowEntrypoint):
    async def run(self, event: Any, step: Any) -> list[str]:
        a_started, b_started = threading.Event(), threading.Event()

        def a() -> str:
            a_started.set()
            return "a" if b_started.wait(10) else "a alone"

        def b() -> str:
            b_started.set()
            return "b" if a_started.wait(10) else "b alone"

        return list(await asyncio.gather(step.do("a", a), step.do("b", b)))


def test_parallel_sync_steps_run_side_by_side_in_a_main_thread_worker(engine: Engine) -> None:
    inst = engine.register(Handshake).create(id="handshake")
    engine.run_worker(burst=True)
    # each callback waited for the other to start: only possible if both ran at once
    assert inst.status() == {"status": "complete", "output": ["a", "b"]}


class Where(WorkflowEntrypoint):
    """Records which thread ran its step, and how many such steps ran at once."""

    lock = threading.Lock()
    running = 0
    most = 0
    threads: list[str] = []

    async def run(self, event: Any, step: Any) -> str:
        def body() -> str:
            cls = Where
            with cls.lock:
                cls.running += 1
                cls.most = max(cls.most, cls.running)
                cls.threads.append(threading.current_thread().name)
            time.sleep(event.payload["nap"])
            with cls.lock:
                cls.running -= 1
            return "ok"

        return await step.do(event.payload["step"], body)


def _reset_where() -> None:
    Where.running = Where.most = 0
    Where.threads = []


def test_quick_sync_steps_of_a_batch_run_inline_in_the_main_thread(engine: Engine) -> None:
    _reset_where()
    flow = engine.register(Where)
    made = flow.create_batch([{"params": {"nap": 0, "step": "quick"}} for _ in range(30)])
    engine.run_worker(burst=True)
    assert all(inst.status()["status"] == "complete" for inst in made)
    assert Where.threads == ["MainThread"] * 30  # no thread hand-off for any of them


def test_a_slow_sync_step_of_a_batch_moves_to_the_pool_and_overlaps(engine: Engine) -> None:
    """The first calls run inline and are seen to be slow, SLOW_RUNS times in a row; the
    other instances' calls of that step then run on the pool, side by side instead of
    one after another."""
    _reset_where()
    flow = engine.register(Where)
    made = flow.create_batch([{"params": {"nap": 0.1, "step": "slow"}} for _ in range(14)])
    engine.run_worker(burst=True)
    assert all(inst.status()["status"] == "complete" for inst in made)
    inline = callbacks.SLOW_RUNS
    assert Where.threads[:inline] == ["MainThread"] * inline, Where.threads
    assert all(name.startswith("nbflow-step") for name in Where.threads[inline:]), Where.threads
    assert Where.most >= 4, Where.most  # they overlapped


def test_one_long_run_of_a_quick_step_keeps_it_inline(engine: Engine) -> None:
    """A quick step that once took long (a garbage collection, the CPU taken away) stays
    inline: only SLOW_RUNS slow runs in a row send a step to the pool."""
    _reset_where()
    flow = engine.register(Where)
    naps = [0.05, 0, 0, 0.05, 0.05, 0, 0, 0, 0, 0]  # never SLOW_RUNS slow ones in a row
    made = flow.create_batch([{"params": {"nap": n, "step": "hiccup"}} for n in naps])
    engine.run_worker(burst=True)
    assert all(inst.status()["status"] == "complete" for inst in made)
    assert Where.threads == ["MainThread"] * len(naps), Where.threads
