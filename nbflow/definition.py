"""What a user writes against: ``WorkflowEntrypoint``, the ``WorkflowEvent`` a run
receives, the ``StepContext`` a step callback may take, and the ``RollbackContext`` a
rollback callback receives.

These are plain data holders with no Redis in them, so a workflow module can be
imported (by a CLI worker, a notebook, mypy) without touching the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from nbflow.validate import check_progress

Env = TypeVar("Env")
Params = TypeVar("Params")


class WorkflowEntrypoint(Generic[Env, Params]):
    """Base class of a workflow: subclass it and define ``run(self, event, step)``.

    Annotate ``step`` as ``nbflow.WorkflowStep`` in an ``async def run`` and as
    ``nbflow.SyncWorkflowStep`` in a plain ``def run``.

    ``run`` may be ``async def`` (steps are awaited; ``asyncio.gather`` runs steps in
    parallel) or a plain ``def`` (step methods return their values directly).
    ``self.env`` and ``self.ctx`` are what the engine was given
    (``Engine(env=..., ctx=...)``), so a workflow reaches clients and settings
    without globals.  ``run`` is replayed from the top after every suspension:
    completed steps return their stored results, so code outside steps must be
    deterministic and cheap.
    """

    env: Env
    ctx: Any

    def __init__(self, ctx: Any = None, env: Any = None) -> None:
        self.ctx = ctx
        self.env = env

    def run(self, event: WorkflowEvent[Params], step: Any) -> Any:
        """The workflow body; override it."""
        raise NotImplementedError(f"{type(self).__name__} must define run(self, event, step)")


_MAPPING_KEYS = ("payload", "timestamp", "instanceId", "workflowName")


class WorkflowEvent(Mapping[str, Any], Generic[Params]):
    """The event that started an instance: its params (``payload``), creation time,
    id and workflow name.

    Attribute access (``event.payload``) is the Python way; mapping access with
    Cloudflare's names (``event["instanceId"]``) works too, so code ported from
    TypeScript reads the same.  ``payload`` is a copy: changing it cannot change
    what a replay sees.
    """

    __slots__ = ("_payload", "timestamp", "instance_id", "workflow_name")

    def __init__(
        self, payload: Params, timestamp: datetime, instance_id: str, workflow_name: str
    ) -> None:
        self._payload = payload
        self.timestamp = timestamp
        self.instance_id = instance_id
        self.workflow_name = workflow_name

    @property
    def payload(self) -> Params:
        """A fresh copy of the params the instance was created with."""
        return copy.deepcopy(self._payload)

    def __getitem__(self, key: str) -> Any:
        if key == "payload":
            return self.payload
        if key == "timestamp":
            return self.timestamp
        if key == "instanceId":
            return self.instance_id
        if key == "workflowName":
            return self.workflow_name
        raise KeyError(f"{key!r}: a WorkflowEvent has {', '.join(_MAPPING_KEYS)}")

    def __iter__(self) -> Iterator[str]:
        return iter(_MAPPING_KEYS)

    def __len__(self) -> int:
        return len(_MAPPING_KEYS)

    def __repr__(self) -> str:
        return (
            f"WorkflowEvent(workflow_name={self.workflow_name!r}, "
            f"instance_id={self.instance_id!r}, payload={self._payload!r})"
        )


@dataclass(frozen=True)
class StepContext:
    """Passed to a step callback that takes one argument.

    ``count`` is the occurrence of this name in the run (1 for the first
    ``step.do("x", ...)``, 2 for the second), ``attempt`` is 1-based, and
    ``config`` is the resolved config (defaults merged in), so a callback can
    log or adapt to its retry situation.  ``progress`` reports how far it got.
    """

    name: str
    count: int
    attempt: int
    config: dict[str, Any]
    #: the run the step belongs to (what ``progress`` reports to) and the step's key
    _run: Any = field(default=None, repr=False, compare=False)
    _key: str = field(default="", repr=False, compare=False)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report how far the step got: ``progress(3, 10)`` (counts), ``progress(0.3)``
        (a fraction, without ``total``), optionally with a short ``message``.

        Shown by ``steps()`` (columns ``progress``, 0-1, and ``message``), status cards
        and the dashboard.  It never waits for Redis: the latest value is kept and
        written at most about ten times a second (and always once more with the step's
        result), so calling it in a tight loop is fine.  Bad values raise at the call:
        ``TypeError`` for non-numbers, ``ValueError`` for negative ones, ``done`` above
        ``total`` (or above 1 without it) and ``total <= 0`` (see
        ``nbflow.validate.check_progress``).  Reports after the step finished are ignored.
        """
        fraction, text = check_progress(done, total, message)
        if self._run is not None:
            self._run.report_progress(self._key, fraction, text)


@dataclass(frozen=True)
class RollbackContext:
    """Passed to a ``rollback=`` callback of ``step.do`` when the instance failed.

    ``output`` is what the step returned (its stored result), ``error`` the exception
    that failed the instance, and ``step`` the step's own ``StepContext`` (its name,
    occurrence, the attempt that succeeded and its config), so one undo function can
    serve several steps.
    """

    output: Any
    error: BaseException
    step: StepContext
