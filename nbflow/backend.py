"""What runs and workers need from an engine, and nothing a user calls.

An ``Engine`` (``nbflow.engine``) is the public facade a user holds; underneath it is
one ``Backend``: the Redis client, the scripts, the key names, the RQ queue, the
registered classes, ``env``/``ctx``, the limits and the runs this process is
advancing.  Runners and workers are handed the backend, so neither knows the engine
and nothing reaches into an object's private members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from nbflow.definition import WorkflowEntrypoint
from nbflow.store import Keys, Scripts

#: The function every nbflow RQ job names.  nbflow workers read it from the job and
#: run the job themselves (``nbflow.worker``); nothing else may run it.
JOB_FUNCTION = "nbflow.runner.run_job"
#: A job hash nobody took within this long expires (seconds).  Workers delete the hash
#: as they take the job; this is the backstop for one popped by a worker killed before
#: it could (its instances come back through the orphan sweep, ``nbflow.worker``).
JOB_TTL = 24 * 3600


class Backend:
    """The shared state of one engine (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        queue: str,
        env: Any,
        ctx: Any,
        max_step_bytes: int,
        retention: float | None,
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.queue_name = queue
        self.env = env
        self.ctx = ctx
        self.max_step_bytes = max_step_bytes
        self.retention = retention
        self.keys = Keys(prefix)
        self.scripts = Scripts(client)
        self.queue = Queue(queue, connection=client, serializer=JSONSerializer, default_timeout=-1)
        #: workflow name -> class, as registered in this process
        self.classes: dict[str, type[WorkflowEntrypoint[Any, Any]]] = {}
        #: instance id -> token of the run this process is advancing (lease heartbeats)
        self.runs: dict[str, str] = {}

    def enqueue(self, ids: Sequence[str], at_front: bool = False, pipe: Any = None) -> None:
        """One RQ job that advances ``ids``; inside ``pipe`` when given (atomic with it)."""
        self.queue.enqueue_call(
            JOB_FUNCTION,
            args=(self.prefix, list(ids)),
            timeout=-1,
            ttl=JOB_TTL,
            result_ttl=0,
            failure_ttl=24 * 3600,
            description=f"nbflow {self.prefix} {ids[0]}"
            + (f" +{len(ids) - 1}" if len(ids) > 1 else ""),
            at_front=at_front,
            pipeline=pipe,
        )
