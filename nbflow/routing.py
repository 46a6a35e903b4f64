"""Routing: which worker runs what (spec 8.1).

Every workflow has its own RQ queue, ``{queue}:{workflow}`` (``Backend.queue_for``), and
a worker listens only to the queues of the workflows registered in its process (plus
the engine's queue itself, which nothing is enqueued on any more).  So a worker never
takes an instance it cannot run, and an instance nobody can run waits ``queued``,
its job on its queue, until a worker that has its workflow starts: that worker's
first BLPOP takes it.  Routing costs no polling and no scan: enqueueing names the
queue, and a worker's list of queues is rebuilt only when a class is registered.

A worker also says what it runs: for each of its workflows it keeps its name in the
zset ``{p}:serving:{workflow}`` with an expiry (renewed with the lease heartbeat,
removed when it stops), which is how ``info()["waiting_for"]`` knows that nobody runs
a queued instance's workflow.

Should a run still get an instance whose class is not registered in its process (a job
put on the engine's queue by hand or by an older nbflow), it hands the instance back
(``hand_back``): queued again, on its workflow's queue, never errored.  A process that
stops cleanly hands back the instances it holds the same way, so another worker takes
them at once instead of after their lease runs out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import redis
from rq import Queue

from nbflow.backend import Backend
from nbflow.store import LEASE_SECONDS, clock

log = logging.getLogger("nbflow")

#: How long a worker's claim to serve a workflow holds without renewal (its heartbeat
#: renews it every third of that): a killed worker stops counting after this.
SERVING_SECONDS = LEASE_SECONDS

#: How often a worker reads again which ``go`` lists and priority queues are in use.
EXTRAS_INTERVAL = 1.0


def waiting_for(workflow: str) -> str:
    """What a queued instance waits for when no live worker has its workflow."""
    return f"a worker with workflow {workflow!r}"


class Routes:
    """The queues one worker listens to, and its ``serving`` entries.

    ``refresh()`` is called before every BLPOP; it costs a ``len()`` unless a workflow
    was registered since the last call or ``EXTRAS_INTERVAL`` has passed, and then
    rebuilds the list (the worker then registers on the new queues and advertises).

    Per workflow a worker BLPOPs its queue of priority 5 and, once they are in use
    (``Keys.listen()``, read again every ``EXTRAS_INTERVAL``), its ``go`` list and its
    other priority queues: Redis spends time on every key a BLPOP names (eleven keys
    for each of seven workflows: 47.6 us a BLPOP in the slowlog, against 7 us for one
    key), and most workflows use neither.  The first instance ever given a priority other than 5 (or
    admitted to a workflow whose limits a worker did not know yet) can so wait up to
    ``EXTRAS_INTERVAL`` longer before a busy worker sees it; an idle one looks at
    every BLPOP timeout.
    """

    def __init__(self, backend: Backend, worker_name: str) -> None:
        self.backend = backend
        self.worker_name = worker_name
        self.workflows: list[str] = []
        self.queues: list[Queue] = [backend.base_queue]
        self.keys: list[str] = [backend.base_queue.key]
        self.order: list[str] = []  # the workflows, in the order BLPOP serves them
        #: per workflow, its keys in the order BLPOP serves them (``Backend.queue_keys``:
        #: admitted held instances, then priorities 0 to 9, those in use)
        self.groups: dict[str, list[str]] = {}
        self._owner: dict[str, str] = {}  # key -> its workflow
        self.go_keys: set[str] = set()
        self._known = -1
        self.in_use: frozenset[str] = frozenset()  # members of Keys.listen()
        self._next_look = 0.0  # time.monotonic() when Keys.listen() is read again
        self.closed = False  # withdrawn: the worker takes nothing more

    def refresh(self) -> bool:
        """Follows the registered classes and the keys in use; True when the list of
        queues changed."""
        classes = self.backend.classes
        now = time.monotonic()
        if len(classes) == self._known and now < self._next_look:
            return False
        self._known = len(classes)
        names = sorted(classes)
        in_use = self.in_use
        if names and now >= self._next_look:
            self._next_look = now + EXTRAS_INTERVAL
            try:
                listen = self.backend.redis.smembers(self.backend.keys.listen())
            except redis.RedisError:  # Redis away: the worker's loop finds out and waits
                listen = None
            if listen is not None:
                in_use = frozenset(m.decode() if isinstance(m, bytes) else m for m in listen)
        if names == self.workflows and in_use == self.in_use:
            return False
        self.in_use = in_use
        if names != self.workflows:
            self.workflows = names
            self.queues = [*(self.backend.queue_for(wf) for wf in names), self.backend.base_queue]
            kept = [wf for wf in self.order if wf in classes]
            self.order = kept + [wf for wf in names if wf not in kept]
        self.groups = {wf: self.backend.queue_keys(wf, in_use) for wf in names}
        self._owner = {k: wf for wf, group in self.groups.items() for k in group}
        self.go_keys = {self.backend.keys.go(wf) for wf in names} & self._owner.keys()
        self._flatten()
        return True

    def _flatten(self) -> None:
        self.keys = [k for wf in self.order for k in self.groups[wf]]
        self.keys.append(self.backend.base_queue.key)

    def rotate(self, key: Any) -> None:
        """Puts the workflow a job just came from last, so that a busy workflow does not
        starve the others (BLPOP serves the first non-empty key it is given); its own
        keys keep their priority order."""
        if len(self.order) < 2:
            return
        wf = self._owner.get(key.decode() if isinstance(key, bytes) else str(key))
        if wf is not None and wf != self.order[-1]:
            self.order.remove(wf)
            self.order.append(wf)
            self._flatten()

    def describe(self) -> str:
        return ", ".join(q.name for q in self.queues)

    def advertise(self) -> None:
        """Says (again) that this worker runs its workflows, until ``SERVING_SECONDS``
        from now; expired entries of dead workers are dropped on the way."""
        if not self.workflows or self.closed:
            return
        now = time.time()
        keys = self.backend.keys
        pipe = self.backend.redis.pipeline(transaction=False)
        for wf in self.workflows:
            pipe.zadd(keys.serving(wf), {self.worker_name: now + SERVING_SECONDS})
            pipe.zremrangebyscore(keys.serving(wf), "-inf", now)
        pipe.execute()

    def withdraw(self) -> None:
        """This worker stops: it runs none of its workflows any more (from the moment
        it takes no new job, not once its last run has ended)."""
        self.closed = True
        if not self.workflows:
            return
        keys = self.backend.keys
        pipe = self.backend.redis.pipeline(transaction=False)
        for wf in self.workflows:
            pipe.zrem(keys.serving(wf), self.worker_name)
        pipe.execute()


def hand_back(backend: Backend, runs: Mapping[str, str], at_front: bool = True) -> int:
    """Gives back the instances that the runs ``runs`` (id -> token) still own: queued
    again and enqueued on their workflows' queues, in two round trips.  A run handed
    back this way can write nothing more (its token no longer owns the instance).
    Returns how many were given back."""
    if not runs:
        return 0
    now, now_iso = clock()
    args = [backend.prefix, f"{now:.6f}", now_iso]
    for iid, token in runs.items():
        args += [iid, token]
    given = backend.scripts.hand_back(args=args)
    for iid in (x.decode() for x in given[::2]):
        backend.runs.pop(iid, None)
    return backend.enqueue_routed(given, at_front=at_front)


__all__ = ["SERVING_SECONDS", "Routes", "hand_back", "waiting_for"]
