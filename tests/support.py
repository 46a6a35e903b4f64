"""Helpers shared by the test modules (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def poll(
    fn: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.005
) -> Any:
    """Calls ``fn`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def wait_status(inst: Any, status: str, timeout: float = 5.0) -> None:
    """Polls until the instance has ``status``; fails at once if it ended otherwise."""

    def reached() -> bool:
        now = inst.status()
        assert now["status"] not in ("complete", "errored", "terminated") or (
            now["status"] == status
        ), now
        return bool(now["status"] == status)

    poll(reached, timeout, what=f"status {status!r} of {inst.id}")
