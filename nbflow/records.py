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
found by again (``nbflow.fingerprint``).  A result stored as an artifact
(``nbflow.artifacts``) has its reference as ``v`` and the artifact's URL as ``r``, right
after ``s`` (the scripts count references by it).
"""

from __future__ import annotations

import json
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
    "parent",
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
    "progress",
    "message",
]
#: ``inst.logs()`` columns (SPEC 8.3).
LOG_COLUMNS = ["time", "step", "stream", "line"]


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
    ref: str | None = None,
) -> str:
    """A step entry as compact JSON; ``s`` stays first (see the module docstring).

    ``t0`` and ``t1`` are epochs; ``t0`` is stored relative to ``base`` (the instance's
    creation) and ``t1`` as the duration ``d``.  ``ref``: the URL of the artifact that
    ``value_json`` refers to (it holds no quote or backslash: ``nbflow.artifacts``).
    """
    parts = [f'{{"s":"{status}"']
    if ref is not None:
        parts.append(f',"r":"{ref}"')
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


def step_row(
    key: str, e: Mapping[str, Any], progress: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One row of ``steps()`` (columns ``STEP_COLUMNS``) from a decoded entry and the
    step's last reported progress (``decode_progress``), if any."""
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
        "output": summarized(e.get("v")),
        "error": {"name": err["name"], "message": err["message"]} if err else None,
        "stale": False,  # the engine knows the current code (nbflow.fingerprint)
        "progress": None if progress is None or progress.get("p") is None else float(progress["p"]),
        "message": None if progress is None else progress.get("m"),
    }


def summarized(value: Any) -> Any:
    """A stored value as listings show it: an artifact reference (the value itself, or
    an event's payload) as its one-line summary, never loaded."""
    if isinstance(value, codec.ArtifactRef):
        return codec.ArtifactSummary(value)
    if isinstance(value, dict) and isinstance(value.get("payload"), codec.ArtifactRef):
        return {**value, "payload": codec.ArtifactSummary(value["payload"])}
    return value


# -- progress (SPEC 8.4) ---------------------------------------------------------------


def progress_json(seq: int, fraction: float | None, message: str | None) -> str:
    """A step's reported progress as stored in ``{p}:{id}:progress``: ``q`` (first, so Lua
    reads it: a write older than the stored one is ignored) is when it was reported, in
    microseconds; ``p`` the fraction done (0-1) or null, ``m`` the message or null."""
    p = "null" if fraction is None else f"{fraction:.6g}"
    return f'{{"q":{seq},"p":{p},"m":{json.dumps(message, ensure_ascii=False)}}}'


def decode_progress(raw: Any) -> dict[str, Any]:
    """A stored progress value as a dict (``q``, ``p``, ``m``)."""
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


# -- logs (SPEC 8.3) ------------------------------------------------------------------

#: The field of the instance's log hash that holds lines ``run`` wrote outside steps
#: after reaching the step of order n is ``"#n"`` (``"#-1"``: before any step); a step's
#: own lines are under its key.  No step key starts with ``#`` (names are not empty).
RUN_FIELD_PREFIX = "#"
#: Each step's log keeps at most this many bytes (in Redis and in a run's memory); older
#: lines are dropped and a marker line says how many.
STEP_LOG_BYTES = 64 * 1024


def log_line(t: float, stream: str, line: str) -> str:
    """One captured line as stored (JSON on one line): time, stream, text."""
    return f'{{"t":{t:.6f},"s":"{stream}","l":{json.dumps(line, ensure_ascii=False)}}}'


def log_label(field: str) -> str | None:
    """The ``step`` shown for a log field: None for ``run``'s own lines, else the step as
    a user names it (``name``, or ``name#n`` for its n-th occurrence)."""
    if field.startswith(RUN_FIELD_PREFIX):
        return None
    name, count = split_key(field)
    return name if count == 1 else field


def log_rows(field: str, raw: str) -> list[dict[str, Any]]:
    """The rows (``LOG_COLUMNS`` plus ``seq``, the order written) of one field of the
    log hash.  Its first line may be the marker ``{"dropped":N}`` left by trimming,
    shown as a ``WARNING`` line saying how many lines were dropped."""
    step = log_label(field)
    rows: list[dict[str, Any]] = []
    dropped = 0
    for n, text_line in enumerate(raw.split("\n")):
        if not text_line:
            continue
        item = json.loads(text_line)
        if "dropped" in item:
            dropped = int(item["dropped"])
            continue
        rows.append(
            {"t": float(item["t"]), "seq": n, "step": step, "stream": item["s"], "line": item["l"]}
        )
    if dropped:
        first = rows[0]["t"] if rows else 0.0
        what = "this step" if step is not None else "run() between steps"
        rows.insert(
            0,
            {
                "t": first,
                "seq": -1,
                "step": step,
                "stream": "WARNING",
                "line": f"[nbflow] {dropped} earlier line{'s' if dropped != 1 else ''} of "
                f"{what} dropped (each step keeps the last {STEP_LOG_BYTES // 1024} KiB "
                "of its log)",
            },
        )
    return rows


# -- events and statuses ---------------------------------------------------------------


def event_json(event_type: str, payload: Any) -> str:
    """The stored form of a sent event, as ``wait_for_event`` returns it.  ``type`` comes
    first and ``payload`` second (the scripts find an artifact payload by its place)."""
    return codec.encode({"type": event_type, "payload": payload, "timestamp": datetime.now(UTC)})


class InstanceStatus(dict[str, Any]):
    """What ``status()`` and ``wait()`` return: a plain dict (equal to one) that a
    notebook shows as a small table (see ``nbflow.reprs``)."""

    def _repr_html_(self) -> str | None:
        html: str | None = reprs.render("status_html", self)
        return html


def instance_status(status: Any, output: Any, error: Any, rollback: Any = None) -> InstanceStatus:
    """The status dict from the state hash's ``status``, ``output`` and ``error`` fields
    (``status`` None: the instance does not exist), and of an errored instance whose
    rollbacks ran, their report (``rollback``, spec 10.4)."""
    if status is None:
        return InstanceStatus(status="unknown")
    result = InstanceStatus(status=text(status))
    if result["status"] == "complete":
        result["output"] = codec.decode(output) if output is not None else None
    elif result["status"] == "errored" and error is not None:
        result["error"] = codec.decode(error)
    if rollback is not None and result["status"] == "errored":
        result["rollback"] = codec.decode(rollback)
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
