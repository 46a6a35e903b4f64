"""What runs and workers need from an engine, and nothing a user calls.

An ``Engine`` (``nbflow.engine``) is the public facade a user holds; underneath it is
one ``Backend``: the Redis client, the scripts, the key names, the RQ queues (one
per workflow, ``queue_for``), the registered classes, ``env``/``ctx``, the limits
and the runs this process is advancing.  Runners and workers are handed the
backend, so neither knows the engine and nothing reaches into an object's private
members.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from nbflow.artifacts import ArtifactStore
from nbflow.definition import WorkflowEntrypoint
from nbflow.rqjobs import TEMPLATE_JOB_ID, JobTemplate
from nbflow.store import Keys, Scripts

#: the priority of an instance created without one (0 starts first, 9 last)
DEFAULT_PRIORITY = 5

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
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.queue_name = queue
        self.env = env
        self.ctx = ctx
        self.max_step_bytes = max_step_bytes
        self.retention = retention
        #: where results too large for Redis go (``nbflow.artifacts``)
        self.artifacts = artifacts if artifacts is not None else ArtifactStore(None, prefix=prefix)
        self.keys = Keys(prefix)
        self.scripts = Scripts(client)
        #: the engine's queue itself: nothing is enqueued on it any more, but workers
        #: still listen to it (jobs from before routing, hand-enqueued jobs) and are
        #: registered on it, so ``rq info`` groups them under the engine's queue name
        self.base_queue = self._queue(queue)
        self._queues: dict[str, Queue] = {}
        #: (queue name, at front) -> the commands RQ writes for a job there (rqjobs)
        self._templates: dict[tuple[str, bool], JobTemplate] = {}
        #: workflow name -> class, as registered in this process
        self.classes: dict[str, type[WorkflowEntrypoint[Any, Any]]] = {}
        #: instance id -> token of the run this process is advancing (lease heartbeats)
        self.runs: dict[str, str] = {}

    def _queue(self, name: str) -> Queue:
        return Queue(name, connection=self.redis, serializer=JSONSerializer, default_timeout=-1)

    def queue_for(self, workflow: str, priority: int = DEFAULT_PRIORITY) -> Queue:
        """The RQ queue of ``workflow``'s instances: ``{queue}:{workflow}``.

        One queue per workflow is what routes an instance to a worker that can run
        it: a worker listens only to the queues of the workflows it has registered
        (``nbflow.routing``), so nothing of another workflow ever reaches it, and
        ``rq info`` lists each workflow's backlog.  (Workflow names have no ``:``.)

        ``priority`` (spec 10.2, ``nbflow.limits``): new instances of priority 5 (the
        default) and every woken or re-queued one go on ``{queue}:{workflow}``; new
        ones of another priority on ``{queue}:{workflow}:p{n}``.  Workers BLPOP them in
        priority order (``queue_keys``), and BLPOP serves the first non-empty key.
        """
        name = workflow if priority == DEFAULT_PRIORITY else f"{workflow}:p{priority}"
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = self._queue(f"{self.queue_name}:{name}")
        return q

    def queue_keys(self, workflow: str, in_use: Collection[str] | None = None) -> list[str]:
        """The keys a worker BLPOPs for ``workflow``, first served first: its ``go``
        list (held instances whose slot freed), then its RQ queues by priority.

        With ``in_use`` (the members of ``Keys.listen()``) only the ``go`` list and the
        priority queues that were ever used, and always the queue of priority 5: a
        BLPOP costs Redis time for every key it names, and most workflows use one."""
        if in_use is None:
            return [self.keys.go(workflow), *(self.queue_for(workflow, n).key for n in range(10))]
        keys = [self.keys.go(workflow)] if f"{workflow}:go" in in_use else []
        for n in range(10):
            if n == DEFAULT_PRIORITY or f"{workflow}:p{n}" in in_use:
                keys.append(self.queue_for(workflow, n).key)
        return keys

    def enqueue(
        self,
        ids: Sequence[str],
        workflow: str,
        at_front: bool = False,
        pipe: Any = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        """One RQ job that advances ``ids`` (all of ``workflow``), on that workflow's
        queue; inside ``pipe`` when given (atomic with it).  An instance whose stored
        workflow name is missing (damaged state) goes on the engine's own queue, which
        every worker takes, and is ended there with an error saying so.

        Without ``pipe`` the job is pushed exactly once (``Scripts.push_jobs`` with a
        request key of its own): a resend after a lost reply pushes no second job."""
        if pipe is None:
            self.scripts.push_jobs(
                lambda p: self.enqueue(ids, workflow, at_front=at_front, pipe=p, priority=priority),
                self.keys.request(),
            )
            return
        queue = self.queue_for(workflow, priority) if workflow else self.base_queue
        template = self._templates.get((queue.name, at_front))
        if template is None:
            template = self._templates[queue.name, at_front] = self._template(queue, at_front)
        description = f"nbflow {self.prefix} {workflow} {ids[0]}"
        if len(ids) > 1:
            description += f" +{len(ids) - 1}"
        # the ids also go in the job's meta, plain JSON a script can read: claim_job
        # takes the job in one round trip (``runner.take_job``)
        meta = {"nbflow": self.prefix, "ids": list(ids)}
        for cmd in template.commands(JOB_FUNCTION, (self.prefix, list(ids)), description, meta):
            pipe.execute_command(*cmd)
        if priority != DEFAULT_PRIORITY and workflow:  # (after: RQ's MULTI comes first)
            pipe.sadd(self.keys.listen(), f"{workflow}:p{priority}")  # workers listen to it

    def _template(self, queue: Queue, at_front: bool) -> JobTemplate:
        """The commands RQ itself emits for an nbflow job on ``queue`` (``nbflow.rqjobs``)."""
        pipe = self.redis.pipeline(transaction=False)
        queue.enqueue_call(
            JOB_FUNCTION,
            args=(self.prefix, []),
            timeout=-1,
            ttl=JOB_TTL,
            result_ttl=0,
            failure_ttl=24 * 3600,
            description="",
            meta={"nbflow": self.prefix},
            job_id=TEMPLATE_JOB_ID,
            at_front=at_front,
            pipeline=pipe,
        )
        commands = [args for args, _ in pipe.command_stack]
        pipe.reset()
        return JobTemplate(commands)

    def enqueue_many(self, ids: Sequence[str], at_front: bool = False) -> None:
        """RQ jobs for many instances of any workflows (the children of a fan-out, a
        parent woken by its child): their workflow names read in one round trip, then
        per workflow jobs of 25 to 100 ids, at least two for 50 or more so two workers
        share them (as ``create_batch`` cuts its jobs), sent in one more."""
        read = self.redis.pipeline(transaction=False)
        for iid in ids:
            read.hget(self.keys.metadata(iid), "workflowName")
        by_wf: dict[str, list[str]] = {}
        for iid, wf in zip(ids, read.execute(), strict=True):
            by_wf.setdefault("" if wf is None else wf.decode(), []).append(iid)
        pipe = self.redis.pipeline(transaction=False)
        for wf, group in by_wf.items():
            size = min(100, max(25, -(-len(group) // 2)))
            for start in range(0, len(group), size):
                self.enqueue(group[start : start + size], wf, at_front=at_front, pipe=pipe)
        pipe.execute()

    def enqueue_routed(self, reply: Iterable[Any], at_front: bool = False) -> int:
        """Enqueues what a script returned as ``id, workflow, id, workflow, ...`` (bytes):
        one job per workflow, all in one round trip.  Returns how many ids."""
        flat = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
        by_wf: dict[str, list[str]] = {}
        for iid, wf in zip(flat[::2], flat[1::2], strict=True):
            by_wf.setdefault(wf, []).append(iid)
        if by_wf:
            pipe = self.redis.pipeline(transaction=False)
            for wf, ids in by_wf.items():
                self.enqueue(ids, wf, at_front=at_front, pipe=pipe)
            pipe.execute()
        return len(flat) // 2
