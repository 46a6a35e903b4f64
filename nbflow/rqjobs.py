"""RQ jobs exactly as RQ writes them, without building an RQ ``Job`` per enqueue.

``Queue.enqueue_call`` builds a ``Job``, serializes it and emits its commands: about
150 us of Python for every ``create()``, more than the Redis work of the create
itself.  From one job to the next of a queue those commands differ only in the job
id, two timestamps and the three fields that name the instances (``data``,
``description``, ``meta``).  So ``Backend.enqueue`` asks RQ once per queue (and end
of it) for the commands of a job with a known id, keeps them as a ``JobTemplate``,
and fills in those values for each job.  The jobs stay RQ's own: ``rq info`` counts
them and ``Job.fetch`` reads them; ``tests/test_rq_jobs.py`` compares the commands
with the ones RQ emits, so an RQ release that writes its jobs differently fails
there rather than in a worker.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rq.utils import utcformat

#: the id of the job RQ writes for a template; any job id RQ accepts would do
TEMPLATE_JOB_ID = "nbflow-template-0000"
#: the job fields whose values change from job to job (all others are the queue's)
PER_JOB_FIELDS = ("created_at", "enqueued_at", "data", "description", "meta")


class JobTemplate:
    """The commands RQ emits to enqueue a job on one queue, with the places where one
    job's commands differ from another's."""

    def __init__(self, commands: Sequence[Sequence[Any]]) -> None:
        self._commands: list[tuple[list[Any], list[int], dict[str, int]]] = []
        for cmd in commands:
            args = list(cmd)
            with_id = [n for n, a in enumerate(args) if isinstance(a, str) and TEMPLATE_JOB_ID in a]
            fields: dict[str, int] = {}
            if str(args[0]).upper() == "HSET":
                for n in range(2, len(args) - 1, 2):
                    if args[n] in PER_JOB_FIELDS:
                        fields[args[n]] = n + 1
            self._commands.append((args, with_id, fields))
        seen = {f for _, _, fields in self._commands for f in fields}
        missing = set(PER_JOB_FIELDS) - seen
        if missing:  # RQ no longer writes a field this depends on: refuse, loudly
            raise RuntimeError(f"RQ's job commands lack the field(s) {sorted(missing)}")

    def commands(
        self, func: str, args: tuple[Any, ...], description: str, meta: dict[str, Any]
    ) -> list[list[Any]]:
        """The commands of a new job (a fresh uuid4 id, as RQ gives) that calls
        ``func(*args)``; what ``Job.to_dict`` would write for the same job (serialized
        as RQ's ``JSONSerializer`` does, the serializer of nbflow's queues)."""
        job_id = str(uuid.uuid4())
        stamp = utcformat(datetime.now(UTC))
        values = {
            "created_at": stamp,
            "enqueued_at": stamp,
            "data": zlib.compress(json.dumps((func, None, args, {})).encode()),
            "description": description,
            "meta": json.dumps(meta).encode(),
        }
        out = []
        for template, with_id, fields in self._commands:
            cmd = template.copy()
            for n in with_id:
                cmd[n] = template[n].replace(TEMPLATE_JOB_ID, job_id)
            for field, n in fields.items():
                cmd[n] = values[field]
            out.append(cmd)
        return out
