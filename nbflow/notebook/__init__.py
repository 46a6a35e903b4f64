"""The Jupyter layer of nbflow: ``%wf`` magics, the live ``Dashboard`` and rich displays.

Everything here goes through the public engine API (``Engine``, ``Workflow``,
``WorkflowInstance``) and never reads Redis itself, so the notebook layer cannot
drift from what the engine guarantees.

The magics need *one* engine without the user passing it around in every
command; ``use_engine`` chooses it, and ``get_engine`` builds a default
``Engine()`` the first time a command needs one (so ``%load_ext nbflow`` alone
is enough on a machine with ``$NBFLOW_REDIS_URL`` or a ``redis-server``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from nbflow.definition import WorkflowEntrypoint
from nbflow.engine import Engine, WorkflowInstance

__all__ = ["find_workflow_class", "get_engine", "reregister", "use_engine"]

_lock = threading.Lock()
_engine: Engine | None = None


def use_engine(engine: Engine | None) -> None:
    """Make the ``%wf`` magics use ``engine``; ``None`` forgets it (the next use builds a default).

    Call it before or after ``%load_ext nbflow``: the magics look the engine up on
    every command, never at load time.
    """
    global _engine
    if engine is not None and not isinstance(engine, Engine):
        raise TypeError(f"use_engine() takes an nbflow.Engine or None, not {engine!r}")
    with _lock:
        _engine = engine


def get_engine() -> Engine:
    """The engine set by ``use_engine``, else a default ``Engine()`` built now and kept.

    The default is built lazily because connecting may start the embedded Redis
    server; loading the extension alone should never do that.
    """
    global _engine
    with _lock:
        if _engine is None:
            _engine = Engine()
        return _engine


def find_workflow_class(namespace: Mapping[str, Any], name: str) -> type[Any] | None:
    """The ``WorkflowEntrypoint`` subclass bound to ``name`` in a notebook namespace, else None.

    The magics and the dashboard call it before anything that makes an instance
    run, so the class a user just redefined in a cell is the one that runs.
    """
    value = namespace.get(name)
    if (
        isinstance(value, type)
        and issubclass(value, WorkflowEntrypoint)
        and value is not WorkflowEntrypoint
    ):
        return value
    return None


def reregister(engine: Engine, namespace: Mapping[str, Any], inst: WorkflowInstance) -> None:
    """Before a call that makes ``inst`` run again, register its class from the notebook.

    So fixing a workflow's cell and then resuming, restarting or re-running it (from
    ``%wf`` or the dashboard) runs the fix.  Nothing happens when the notebook has no
    class of that name: the one registered on the engine runs.
    """
    cls = find_workflow_class(namespace, inst.workflow)
    if cls is not None:
        engine.register(cls, name=inst.workflow)
