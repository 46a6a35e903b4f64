"""What nbflow stores, as Python sees it: statuses, step keys, step entries, events and
the status dict, with one reader and one writer for each.

Pure: no Redis, no engine.  The step protocol writes entries through ``entry``; the
runner and the engine read them back through ``decode_entry``; the engine and the
notebook layer turn them into rows with ``step_row``.  The Lua side of the same format
lives in ``nbflow.store`` (whose docstring draws the layout).

A step entry is compact JSON whose first field is fixed so Lua reads it without decoding
the (possibly large) result: ``{"s":status,"k":kind,"i":order,...}``; ``k`` is left out
for ``do`` steps and ``a`` (attempts) when it is 1; ``t0`` is the start time in seconds
since the instance's creation (short numbers keep small hashes in Redis's listpack
encoding), ``d`` the duration, ``u`` the epoch deadline of a wait, ``ty`` the event
type, ``e`` the error ``{name, message, ...}`` and ``v`` the result (codec JSON).
``n`` is the step's position in its run's sequence of step calls (0 for the first
call of ``run``; what the determinism check of a replay compares); a completed ``do``
step also has ``f``, its callback's fingerprint, and ``q``, the name its callback is
found by again (``nbflow.fingerprint``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nbflow import codec, reprs
from nbflow.validate import check_step_name

STATUSES = (
    "queued",
    "running",
    "waiting",
    "waitingForPause",
    "paused",
    "complete",
    "errored",
    "terminated",
)
#: An instance in one of these never runs again unless restarted.
FINAL_STATUSES = ("complete", "errored", "terminated")

INSTANCE_COLUMNS = [
    "id",
    "workflow",
    "status",
    "created_at",
    "updated_at",
    "current_step",
    "steps_done",
    "error",
    "version",
]
STEP_COLUMNS = [
    "step",
    "kind",
    "count",
    "status",
    "attempts",
    "started_at",
    "finished_at",
    "duration_s",
    "output",
    "error",
    "stale",
]


def text(value: Any) -> str:
    """A Redis reply as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_or_none(value: Any) -> str | None:
    """``text`` that keeps a missing field (None) missing."""
    return None if value is None else text(value)


def epoch_datetime(value: Any) -> datetime | None:
    """Epoch seconds as an aware UTC datetime (None stays None)."""
    return None if value is None else datetime.fromtimestamp(float(value), UTC)


# -- step keys -------------------------------------------------------------------------


def make_key(name: Any, count: Any) -> str:
    """The key of the ``count``-th call of step ``name``: ``"name#count"``."""
    return f"{name}#{int(count)}"


def split_key(key: str) -> tuple[str, int]:
    """``"name#count"`` -> (name, count); names may contain ``#`` themselves."""
    name, _, count = key.rpartition("#")
    return name, int(count)


def step_key(step: Any) -> str:
    """A step named by a user (``"load"`` or ``"load#3"``, its 3rd occurrence) as its key."""
    if not isinstance(step, str):
        raise TypeError(f"step must be a name like 'load' or 'load#2', not {step!r}")
    name, sep, count = step.rpartition("#")
    if sep and count.isdigit() and int(count) >= 1 and name:
        return make_key(check_step_name(name), count)
    return make_key(check_step_name(step), 1)


# -- step entries ----------------------------------------------------------------------


def entry(
    status: str,
    kind: str,
    index: int,
    attempts: int,
    t0: float,
    *,
    base: float = 0.0,
    t1: float | None = None,
    u: float | None = None,
    ty: str | None = None,
    err: Mapping[str, Any] | None = None,
    value_json: str | None = None,
    n: int | None = None,
    f: str | None = None,
    q: str | None = None,
) -> str:
    """A step entry as compact JSON; ``s`` stays first (see the module docstring).

    ``t0`` and ``t1`` are epochs; ``t0`` is stored relative to ``base`` (the instance's
    creation) and ``t1`` as the duration ``d``.
    """
    parts = [f'{{"s":"{status}"']
    if kind != "do":
        parts.append(f',"k":"{kind}"')
    parts.append(f',"i":{index}')
    if n is not None:
        parts.append(f',"n":{n}')
    if attempts != 1:
        parts.append(f',"a":{attempts}')
    parts.append(f',"t0":{t0 - base:.3f}')
    if t1 is not None:
        parts.append(f',"d":{max(0.0, t1 - t0):.3f}')
    if u is not None:
        parts.append(f',"u":{u:.3f}')
    if ty is not None:
        parts.append(f',"ty":"{ty}"')
    if err is not None:
        parts.append(f',"e":{codec.encode(dict(err))}')
    if f is not None:
        parts.append(f',"f":"{f}"')
    if q is not None:
        parts.append(f',"q":{codec.encode(q)}' if '"' in q or "\\" in q else f',"q":"{q}"')
    if value_json is not None:
        parts.append(f',"v":{value_json}')
    parts.append("}")
    return "".join(parts)


def decode_entry(key: Any, raw: Any, base: float) -> dict[str, Any]:
    """A stored step entry as a dict, its ``t0`` an epoch again (``base``: the creation
    epoch).  ``ValueError`` naming the key when the value is no step entry."""
    value = codec.decode(raw)
    if not isinstance(value, dict) or "s" not in value or "i" not in value:
        raise ValueError(f"step entry {text(key)!r} is not a step entry: {value!r}")
    if "t0" in value:
        value["t0"] = base + float(value["t0"])
    return value


def step_row(key: str, e: Mapping[str, Any]) -> dict[str, Any]:
    """One row of ``steps()`` (columns ``STEP_COLUMNS``) from a decoded entry."""
    name, count = split_key(key)
    t0, d = e.get("t0"), e.get("d")
    t1 = None if t0 is None or d is None else float(t0) + float(d)
    err = e.get("e")
    return {
        "step": name,
        "kind": e.get("k", "do"),
        "count": count,
        "status": e["s"],
        "attempts": int(e.get("a", 1)),
        "started_at": epoch_datetime(t0),
        "finished_at": epoch_datetime(t1),
        "duration_s": None if d is None else float(d),
        "output": e.get("v"),
        "error": {"name": err["name"], "message": err["message"]} if err else None,
        "stale": False,  # the engine knows the current code (nbflow.fingerprint)
    }


# -- events and statuses ---------------------------------------------------------------


def event_json(event_type: str, payload: Any) -> str:
    """The stored form of a sent event, as ``wait_for_event`` returns it."""
    return codec.encode({"type": event_type, "payload": payload, "timestamp": datetime.now(UTC)})


class InstanceStatus(dict[str, Any]):
    """What ``status()`` and ``wait()`` return: a plain dict (equal to one) that a
    notebook shows as a small table (see ``nbflow.reprs``)."""

    def _repr_html_(self) -> str | None:
        html: str | None = reprs.render("status_html", self)
        return html


def instance_status(status: Any, output: Any, error: Any) -> InstanceStatus:
    """The status dict from the state hash's ``status``, ``output`` and ``error`` fields
    (``status`` None: the instance does not exist)."""
    if status is None:
        return InstanceStatus(status="unknown")
    result = InstanceStatus(status=text(status))
    if result["status"] == "complete":
        result["output"] = codec.decode(output) if output is not None else None
    elif result["status"] == "errored" and error is not None:
        result["error"] = codec.decode(error)
    return result


def published_status(data: bytes) -> InstanceStatus | None:
    """The status dict from a ``done`` message, or None when it carries no value (a large
    output or error is read from the state instead)."""
    status, _, value = data.partition(b" ")
    result = InstanceStatus(status=text(status))
    if result["status"] == "terminated":
        return result
    if not value:
        return None
    result["output" if result["status"] == "complete" else "error"] = codec.decode(value)
    return result
