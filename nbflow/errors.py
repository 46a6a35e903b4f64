"""The exception hierarchy of nbflow.

::

    Exception
     +-- WorkflowError                      base of everything nbflow raises on purpose
          +-- NonRetryableError             raise it in a step to stop its retries at once
          +-- WorkflowTimeoutError          something waited longer than it was allowed
          |    +-- StepTimeoutError         one step attempt ran over its ``timeout``
          |    +-- EventTimeoutError        ``wait_for_event`` saw no event in time
          +-- InstanceNotFoundError         (also a LookupError) no instance with that id
          +-- InstanceExistsError           (also a ValueError) ``create`` with an id in use
          +-- InvalidStateError             a lifecycle call that the current status forbids
          +-- WorkflowNotRegisteredError    engine.workflow(name) of a name nobody registered
          +-- NonDeterminismError           a replay asked for another step than the recorded one
          +-- RedisUnavailableError         (also a ConnectionError) no Redis server answered
          +-- ArtifactError                 a large result stored outside Redis (an artifact)
                                            could not be written or read back

Bad arguments are plain ``ValueError`` / ``TypeError`` with a message that says
what was wrong and what is allowed.

Internal, never seen by users (``BaseException`` so that a workflow's ``except
Exception`` cannot swallow them)::

    BaseException
     +-- Suspend                            unwinds ``run`` when the instance must stop for now
     +-- FatalRunError                      fails the instance at once (an unstorable result)
    Exception
     +-- StoreUnavailable                   Redis did not take one of the engine's own writes

Errors are stored as ``{name, message, module, args}`` (``error_dict``) and raised
again on replay as the same class with the same message (``rebuild_error``).
"""

from __future__ import annotations

import builtins
import importlib
import sys
from collections.abc import Mapping
from typing import Any

from nbflow import codec


class WorkflowError(Exception):
    """Base class of every error nbflow raises on purpose."""


class ArtifactError(WorkflowError):
    """An artifact (a result too large for Redis, stored as a file: ``nbflow.artifacts``)
    could not be written (a full disk, a location this worker cannot reach, missing
    credentials) or read back (missing, or its sha256 does not match).  The message
    names the step or instance and the artifact's URL.  A write failure fails the step
    attempt, so the step's retries apply; a read failure is never a silent None."""


class NonRetryableError(WorkflowError):
    """Raised by a step callback to fail the step at once, without further retries."""


class WorkflowTimeoutError(WorkflowError):
    """Something waited longer than it was allowed to."""


class StepTimeoutError(WorkflowTimeoutError):
    """One attempt of a step ran longer than the step's ``timeout``; counts as a failed attempt."""


class EventTimeoutError(WorkflowTimeoutError):
    """``step.wait_for_event`` saw no event of its type before its timeout."""


class InstanceNotFoundError(WorkflowError, LookupError):
    """No instance with that id exists (under this engine's prefix)."""


class InstanceExistsError(WorkflowError, ValueError):
    """``Workflow.create`` was given an id that an instance already uses."""


class InvalidStateError(WorkflowError):
    """A lifecycle call (pause, resume, terminate, send_event, ...) the current status forbids."""


class WorkflowNotRegisteredError(WorkflowError):
    """``engine.workflow(name)`` names a workflow this engine has not registered.  (An
    instance of a workflow no running worker has is never errored for it: it waits,
    queued, see ``nbflow.routing``.)"""


class NonDeterminismError(WorkflowError):
    """A replay of ``run`` asked for a different step (name or kind) than the one recorded
    at that position: the code changed under a running instance, or ``run`` depends on
    something other than its params and step results.  The instance ends ``errored``
    with it and no stored result is handed to a different step; restart the instance
    (from that step or earlier) to run the new code."""


class RedisUnavailableError(WorkflowError, ConnectionError):
    """No Redis server answered where nbflow looked; the message lists what was tried."""


class Suspend(BaseException):
    """Unwinds ``run`` when the instance must stop for now: a sleep, an event not yet
    sent, a long retry wait, a pause, a terminate, a lost lease."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FatalRunError(BaseException):
    """Fails the instance at once (an unstorable result): no retries, no catching."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.error = {"name": name, "message": message}


class StoreUnavailable(Exception):
    """Redis did not take one of the engine's own writes (it is down or unreachable).

    The run stops without finishing anything: the instance keeps its lease, and
    when the lease runs out a worker takes it back and only the interrupted step
    runs again.  It must never be mistaken for the workflow's own failure.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Redis unavailable: {cause}")


def error_dict(exc: BaseException) -> dict[str, Any]:
    """The stored form of an error: class name, message, where the class lives, and its
    constructor arguments when they are storable (so it can be raised again as it was)."""
    cls = type(exc)
    err: dict[str, Any] = {"name": cls.__name__, "message": str(exc), "module": cls.__module__}
    try:
        codec.encode(list(exc.args))
        err["args"] = list(exc.args)
    except TypeError:
        pass
    return err


def _error_class(err: Mapping[str, Any]) -> Any:
    name = str(err.get("name", "WorkflowError"))
    module = err.get("module")
    if module:
        mod = sys.modules.get(str(module))
        if mod is None:
            try:
                mod = importlib.import_module(str(module))
            except Exception:
                mod = None
        cls = getattr(mod, name, None) if mod is not None else None
        if cls is not None:
            return cls
    return globals().get(name) or getattr(builtins, name, None)


def rebuild_error(err: Mapping[str, Any]) -> BaseException:
    """The exception a stored error replays as: the same type and message.

    The class is found again by module and name and rebuilt from its stored
    arguments (``KeyError('k')`` stays ``'k'``, a class taking several arguments
    keeps them); when the class cannot be found (a notebook class after a kernel
    restart) a same-named ``WorkflowError`` subclass stands in.
    """
    name = str(err.get("name", "WorkflowError"))
    message = str(err.get("message", ""))
    args = err.get("args")
    args = tuple(args) if isinstance(args, list) else (message,)
    cls = _error_class(err)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        for attempt_args in (args, (message,)):
            try:
                rebuilt: BaseException = cls(*attempt_args)
                return rebuilt
            except Exception:
                pass
        try:
            bare: BaseException = cls.__new__(cls)
            bare.args = args
            return bare
        except Exception:
            pass
    stand_in: type[BaseException] = type(name, (WorkflowError,), {})
    return stand_in(message)


__all__ = [
    "WorkflowError",
    "NonRetryableError",
    "WorkflowTimeoutError",
    "StepTimeoutError",
    "EventTimeoutError",
    "InstanceNotFoundError",
    "InstanceExistsError",
    "InvalidStateError",
    "WorkflowNotRegisteredError",
    "NonDeterminismError",
    "RedisUnavailableError",
]
