"""``WorkflowInstance.fork``: a new instance that starts with copies of another's results.

A fork is a create (validated the same way, one MULTI/EXEC with its RQ job) whose
``steps`` hash is filled, in the same ``fork`` script (``nbflow.store``), with copies of
the original's completed step entries that started before a given step.  Its run then
replays those and runs everything after them, with the code registered now (the
determinism check of ``nbflow.step`` still applies: the copied steps must be asked for
again in their order).  The original is only read: any status, even running.
"""

from __future__ import annotations

import uuid
from typing import Any

from nbflow import codec
from nbflow.backend import Backend
from nbflow.errors import InstanceExistsError, InstanceNotFoundError
from nbflow.fingerprint import class_version
from nbflow.records import decode_entry, make_key, split_key, step_key, text
from nbflow.store import clock
from nbflow.validate import check_instance_id


def _payload(backend: Backend, new_id: str, params: Any) -> str:
    """The new instance's params as stored ('' = the original's)."""
    if params is None:
        return ""
    try:
        payload = codec.encode(params)
    except TypeError as exc:
        raise TypeError(f"params of instance {new_id!r}: {exc}") from None
    if len(payload.encode()) > backend.max_step_bytes:
        raise ValueError(
            f"params of instance {new_id!r} are larger than max_step_bytes={backend.max_step_bytes}"
        )
    return payload


def step_keys(backend: Backend, iid: str) -> list[str]:
    """The keys (``name#count``) of an instance's stored steps, in run order."""
    raw = backend.redis.hgetall(backend.keys.steps(iid))
    entries = sorted(
        ((text(k), decode_entry(k, v, 0.0)) for k, v in raw.items()), key=lambda kv: int(kv[1]["i"])
    )
    return [make_key(*split_key(k)) for k, _ in entries]


def fork(
    backend: Backend,
    source: str,
    workflow: str,
    from_step: str | None = None,
    new_id: str | None = None,
    params: Any = None,
) -> str:
    """Creates the fork of instance ``source`` (of ``workflow``) and returns its id.

    ``from_step`` (``"name"`` or ``"name#3"``): copy the results of the completed steps
    that started before it (None: every completed step).  ``new_id``: a fresh uuid4 hex
    unless given.  ``params``: the original's unless given.  Everything is checked
    before anything is written; the copy, the create and the RQ job are one MULTI/EXEC.
    Raises ``InstanceNotFoundError`` (no such original), ``InstanceExistsError`` (the new
    id is taken), ``ValueError`` (a bad id, or a step the original does not have: the
    message lists its step keys).
    """
    iid = uuid.uuid4().hex if new_id is None else check_instance_id(new_id)
    from_key = "" if from_step is None else step_key(from_step)
    payload = _payload(backend, iid, params)
    cls = backend.classes.get(workflow)
    version = "" if cls is None else class_version(cls)
    retention = "" if backend.retention is None else f"{backend.retention:.6f}"
    now, now_iso = clock()

    def job(pipe: Any) -> None:
        backend.enqueue([iid], workflow, pipe=pipe)

    args = [backend.prefix, source, iid, f"{now:.6f}", now_iso, from_key, payload, retention]
    # a resent transaction (a lost reply) answers as the first one: one fork, one job
    once = backend.keys.request()
    res = backend.scripts.execute([("fork", [*args, version])], job, once=once)[0]
    tag = text(res[0])
    if tag == "ok":
        return iid
    # nothing was written but the RQ job, which finds no instance it may claim
    if tag == "exists":
        raise InstanceExistsError(f"an instance with id {iid!r} already exists")
    if tag == "nostep":
        known = step_keys(backend, source)
        raise ValueError(
            f"instance {source!r} has no step {from_step!r} to fork from "
            f"(its steps, in run order: {', '.join(known) or 'none'})"
        )
    raise InstanceNotFoundError(f"no instance {source!r} under prefix {backend.prefix!r}")


__all__ = ["fork", "step_keys"]
