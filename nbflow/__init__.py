"""nbflow: durable Cloudflare-style workflows on Redis and RQ, built for Jupyter.

The public surface is what this module exports; everything else is internal.
"""

from __future__ import annotations

import logging
from typing import Any

from nbflow.definition import RollbackContext, StepContext, WorkflowEntrypoint, WorkflowEvent
from nbflow.engine import Engine, Workflow, WorkflowInstance
from nbflow.errors import (
    ArtifactError,
    EventTimeoutError,
    InstanceExistsError,
    InstanceNotFoundError,
    InvalidStateError,
    NonDeterminismError,
    NonRetryableError,
    RedisUnavailableError,
    StepTimeoutError,
    WorkflowError,
    WorkflowNotRegisteredError,
    WorkflowTimeoutError,
)
from nbflow.notebook import display as _display  # noqa: F401  (registers the notebook displays)
from nbflow.notebook import waiting as _waiting  # noqa: F401  (waits keep widget messages flowing)
from nbflow.schedules import Schedule
from nbflow.step import SyncWorkflowStep, WorkflowStep

__version__ = "0.1.0"

# A library adds no handlers of its own; this one keeps logging's last-resort
# handler from printing nbflow's warnings from background threads into whatever
# notebook cell runs at that moment. Configure logging to see them.
logging.getLogger("nbflow").addHandler(logging.NullHandler())


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbflow``: registers the ``%wf`` magics."""
    from nbflow.notebook.magics import load_ipython_extension as load

    load(ipython)


__all__ = [
    "Engine",
    "Workflow",
    "WorkflowInstance",
    "Schedule",
    "WorkflowEntrypoint",
    "WorkflowEvent",
    "WorkflowStep",
    "SyncWorkflowStep",
    "StepContext",
    "RollbackContext",
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
    "ArtifactError",
    "load_ipython_extension",
    "__version__",
]
