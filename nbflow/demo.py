"""The workflow ``nbflow demo`` runs: a small order flow that shows each feature once.

It lives in the package (not in the CLI) so a CLI worker can run it too:
``nbflow worker --import nbflow.demo``.
"""

from __future__ import annotations

from typing import Any

from nbflow.definition import StepContext, WorkflowEntrypoint, WorkflowEvent
from nbflow.step import WorkflowStep


class DemoOrder(WorkflowEntrypoint[Any, dict[str, Any]]):
    """Fetch an order, charge it (failing twice first), cool off, wait for approval, ship."""

    async def run(self, event: WorkflowEvent[dict[str, Any]], step: WorkflowStep) -> dict[str, Any]:
        order_id = event.payload["order_id"]
        order = await step.do("fetch order", lambda: {"order": order_id, "items": 3, "total": 12.5})

        def charge(ctx: StepContext) -> str:
            if ctx.attempt < 3:  # a flaky payment API: the first two attempts fail
                raise ConnectionError(f"payment API timed out (attempt {ctx.attempt})")
            return f"ch_{order_id}"

        charge_id = await step.do(
            "charge card",
            {"retries": {"limit": 3, "delay": "100 milliseconds", "backoff": "exponential"}},
            charge,
        )
        await step.sleep("cool-off", "1 second")
        approval = await step.wait_for_event("manager approval", "approved", timeout="1 minute")

        @step.do("send receipt")
        async def send_receipt() -> str:
            return f"receipt for order {order['order']} ({charge_id}) sent"

        receipt = await send_receipt()
        return {"charge": charge_id, "approved_by": approval["payload"]["by"], "receipt": receipt}
