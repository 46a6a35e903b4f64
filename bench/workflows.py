"""Workflows the benchmarks run (importable by `nbflow worker --import workflows`)."""

from __future__ import annotations

import asyncio
from typing import Any

from nbflow import SyncWorkflowStep, WorkflowEntrypoint, WorkflowEvent, WorkflowStep

P = dict[str, Any]


class ThreeSteps(WorkflowEntrypoint[Any, P]):
    """Three trivial steps: the unit of the latency and throughput benchmarks."""

    async def run(self, event: WorkflowEvent[P], step: WorkflowStep) -> int:
        a = await step.do("one", lambda: 1)
        b = await step.do("two", lambda: a + 1)
        return await step.do("three", lambda: b + 1)


class ManySteps(WorkflowEntrypoint[Any, P]):
    """``payload["n"]`` trivial steps in a row: per-step overhead."""

    async def run(self, event: WorkflowEvent[P], step: WorkflowStep) -> int:
        total = 0
        for i in range(event.payload["n"]):
            total += await step.do("s", lambda i=i: i)
        return total


class SyncManySteps(WorkflowEntrypoint[Any, P]):
    """``ManySteps`` as a plain ``def run``."""

    def run(self, event: WorkflowEvent[P], step: SyncWorkflowStep) -> int:
        total = 0
        for i in range(event.payload["n"]):
            total += step.do("s", lambda i=i: i)
        return total


class ManyStepsThenWait(WorkflowEntrypoint[Any, P]):
    """``payload["n"]`` steps, then an event wait: replay cost once the event arrives."""

    async def run(self, event: WorkflowEvent[P], step: WorkflowStep) -> int:
        total = 0
        for i in range(event.payload["n"]):
            total += await step.do("s", lambda i=i: i)
        await step.wait_for_event("go", "go", timeout="1 hour")
        return total


class Leaf(WorkflowEntrypoint[Any, P]):
    """One trivial step: the child of the fan-out benchmark (``children.py``)."""

    async def run(self, event: WorkflowEvent[P], step: WorkflowStep) -> int:
        x = int(event.payload["x"])
        return await step.do("leaf", lambda: x * 2)


class FanOut(WorkflowEntrypoint[Any, P]):
    """``payload["n"]`` children (``Leaf``) started at once, their outputs gathered."""

    async def run(self, event: WorkflowEvent[P], step: WorkflowStep) -> int:
        calls = (step.run_workflow("leaf", "Leaf", {"x": i}) for i in range(event.payload["n"]))
        return sum(await asyncio.gather(*calls))
