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
          +-- WorkflowNotRegisteredError    an instance names a workflow nobody registered
          +-- RedisUnavailableError         (also a ConnectionError) no Redis server answered

Bad arguments are plain ``ValueError`` / ``TypeError`` with a message that says
what was wrong and what is allowed.
"""

from __future__ import annotations


class WorkflowError(Exception):
    """Base class of every error nbflow raises on purpose."""


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
    """An instance names a workflow class this engine or worker does not know."""


class RedisUnavailableError(WorkflowError, ConnectionError):
    """No Redis server answered where nbflow looked; the message lists what was tried."""


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
    "RedisUnavailableError",
]
