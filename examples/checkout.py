"""The spec's checkout workflow, typed: `mypy --strict` checks it (tests/test_quality.py).

Run it against the embedded server with `python examples/checkout.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import nbflow
from nbflow import NonRetryableError, WorkflowEntrypoint, WorkflowEvent, WorkflowStep


class Params(TypedDict):
    user_id: int
    amount: float


@dataclass
class Env:
    currency: str


def load_user(user_id: int) -> dict[str, Any]:
    return {"id": user_id, "email": f"user{user_id}@example.com"}


def bill(user: dict[str, Any], amount: float, currency: str) -> str:
    if amount <= 0:
        raise NonRetryableError(f"cannot bill {amount} {currency}")
    return f"ch_{user['id']}_{amount:.2f}{currency}"


class Checkout(WorkflowEntrypoint[Env, Params]):
    async def run(self, event: WorkflowEvent[Params], step: WorkflowStep) -> dict[str, str]:
        user = await step.do("fetch user", lambda: load_user(event.payload["user_id"]))
        charge: str = await step.do(
            "charge card",
            {"retries": {"limit": 3, "delay": "2 seconds", "backoff": "exponential"},
             "timeout": "30 seconds"},
            lambda: bill(user, event.payload["amount"], self.env.currency),
        )
        approval = await step.wait_for_event("manager approval", "approved", timeout="1 hour")
        await step.sleep("cool-off", "1 second")

        @step.do("send receipt")
        async def send_receipt() -> str:
            return f"mailed {user['email']}: {charge}, approved by {approval['payload']}"

        receipt: str = await send_receipt()
        return {"charge": charge, "receipt": receipt}


def main() -> None:
    engine = nbflow.Engine(prefix="example", queue="example", env=Env(currency="EUR"))
    checkout = engine.register(Checkout)
    inst = checkout.create(params={"user_id": 7, "amount": 12.5})
    engine.start_worker()
    try:
        inst.send_event("approved", "ana")
        print(inst.wait(timeout=60))
    finally:
        engine.stop_worker()


if __name__ == "__main__":
    main()
