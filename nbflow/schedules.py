"""Cron schedules (SPEC 10.3): a workflow started on every tick of a cron expression.

A schedule lives in Redis (``{p}:schedules`` and ``{p}:schedule:{name}``, see
``nbflow.store``), so it survives worker and Redis restarts and binds every engine and
worker on that prefix.  Nobody runs a scheduler process: every worker's
``Housekeeper`` calls ``fire_due`` on its wake cycle; one cheap script hands each due
schedule to one of them (a claim), and a second script moves the schedule to its next
tick and creates the tick's instance, through the same ``create`` script as
``Workflow.create``, in one MULTI/EXEC with its RQ job.

Choices where the spec is silent:

* **Ids.**  A tick's instance is ``{schedule name}-{tick as YYYYMMDDTHHMMSS}`` with the
  tick in **UTC**: ids then never repeat when a wall-clock hour repeats (the end of
  daylight saving time) and sort in tick order.  ``next_runs`` and the DataFrame's
  ``timezone`` column show the schedule's own zone.  The id is a function of the
  tick, so however many housekeepers race, or a claim expires and is taken over, a
  tick has at most one instance.
* **Cron.**  Whatever ``croniter`` accepts: five fields, an optional sixth for
  seconds (``"*/10 * * * * *"``), ``@hourly``, ``@daily`` ... evaluated in the
  schedule's ``timezone`` (an IANA name, ``zoneinfo``).  Daylight saving time: a
  tick whose wall-clock time does not exist (spring forward) fires when the clock
  jumps (croniter's rule); a wall-clock time that occurs twice (fall back) fires
  once, at its first occurrence, when the hour field is fixed (``"30 1 * * *"``),
  and twice when the hour field is a wildcard or a step (``"0 * * * *"`` keeps
  firing every real hour), as Vixie cron does.
* **Missed ticks.**  A tick fires if some housekeeper gets to it within
  ``MISFIRE_GRACE`` seconds; older ticks (nothing ran: no worker, Redis down, the
  schedule paused) are not created afterwards: the schedule records a ``missed``
  and jumps to its next tick after now.  ``Schedule.backfill(start, end)`` creates
  them on request.
* **Overlap.**  ``"skip"``: a tick is skipped (counted in ``skipped`` and the
  schedule's history) while the instance the schedule made last (by a tick or
  ``trigger()``) is not ``complete``, ``errored`` or ``terminated``.  ``"allow"``
  never skips.
* **Name.**  Defaults to the workflow's name; at most ``NAME_MAX`` characters (the
  tick suffix must fit the 100 characters of an id).  Calling ``engine.schedule``
  again with the same name updates that schedule (a paused one stays paused; one
  whose cron and time zone are unchanged keeps the tick it waits for).
* **Backfill.**  ``start`` and ``end`` are aware datetimes, both inclusive; ticks
  later than now are left to the schedule; at most ``BACKFILL_MAX`` ticks a call.
* **Retention and params** are the scheduling engine's, stored with the schedule,
  so an instance is the same whichever worker's housekeeper fires its tick.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
from croniter import croniter

from nbflow import codec
from nbflow.backend import Backend
from nbflow.fingerprint import class_version
from nbflow.records import FINAL_STATUSES, text, text_or_none
from nbflow.store import clock
from nbflow.validate import check_instance_id

log = logging.getLogger("nbflow")

OVERLAPS = ("skip", "allow")
#: A due tick older than this (seconds) when a housekeeper finds it is missed, not fired.
MISFIRE_GRACE = 60.0
#: How long a housekeeper's claim on a due schedule keeps other housekeepers off it.
CLAIM_SECONDS = 5.0
#: The longest a housekeeper goes without looking for due schedules (a schedule made
#: meanwhile by another process is seen within this); otherwise it looks when the
#: earliest tick is due.
POLL_SECONDS = 0.5
#: Schedules claimed per call of the due script.
DUE_LIMIT = 500
#: The tick suffix of an id is 16 characters, plus room for a trigger's "-n".
NAME_MAX = 80
BACKFILL_MAX = 10_000
#: The columns of ``engine.schedules()``.
SCHEDULE_COLUMNS = [
    "name",
    "workflow",
    "cron",
    "timezone",
    "overlap",
    "paused",
    "next_run",
    "last_run",
    "last_instance",
    "fired",
    "skipped",
    "missed",
    "triggered",
    "backfilled",
]

I = TypeVar("I")  # noqa: E741  (what the engine hands out for an instance id)

#: Makes a handle on instance ``id`` of ``workflow`` (the engine's ``WorkflowInstance``).
Handle = Callable[[str, str], I]

_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_FIXED_HOUR = re.compile(r"\d+(,\d+)*")
_tokens = itertools.count(1)
_TOKEN_BASE = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- cron maths (pure) -------------------------------------------------------------------


def check_cron(cron: object) -> str:
    """``cron`` if croniter can read it and it ever fires, else ``ValueError`` saying why."""
    if not isinstance(cron, str):
        raise TypeError(f"cron must be a string such as '*/5 * * * *', not {cron!r}")
    expr = " ".join(cron.split())
    try:
        it = croniter(expr, datetime(2000, 1, 1, tzinfo=UTC))
        it.get_next(float)
    except Exception as exc:  # croniter's errors are ValueErrors, KeyErrors, ...
        raise ValueError(
            f"invalid cron expression {cron!r} ({exc}); use five fields "
            "(minute hour day-of-month month day-of-week), an optional sixth for seconds, "
            f"or one of {', '.join(_ALIASES)}"
        ) from None
    return expr


def check_timezone(timezone: object) -> ZoneInfo:
    """The ``ZoneInfo`` for an IANA name such as ``"Europe/Berlin"``; ``ValueError`` if unknown."""
    if isinstance(timezone, ZoneInfo):
        return timezone
    if not isinstance(timezone, str):
        raise TypeError(f"timezone must be an IANA time zone name such as 'UTC', not {timezone!r}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {timezone!r}: use an IANA name such as 'UTC', "
            "'Europe/Berlin' or 'America/New_York'"
        ) from None


def check_overlap(overlap: object) -> str:
    if overlap not in OVERLAPS:
        raise ValueError(
            f"overlap must be one of {', '.join(map(repr, OVERLAPS))}, not {overlap!r}"
        )
    return str(overlap)


def check_schedule_name(name: object) -> str:
    """A schedule name: the instance-id rule, at most ``NAME_MAX`` characters."""
    try:
        check_instance_id(name)
    except (TypeError, ValueError):
        raise ValueError(
            f"invalid schedule name {name!r}: use letters, digits, '_' and '-' "
            f"(not starting with '-'), at most {NAME_MAX} characters"
        ) from None
    assert isinstance(name, str)
    if len(name) > NAME_MAX:
        raise ValueError(
            f"schedule name {name!r} is {len(name)} characters; at most {NAME_MAX} "
            "(its instances' ids add the tick time): pass a shorter name="
        )
    return name


def _hour_is_fixed(cron: str) -> bool:
    if cron.startswith("@"):
        return cron != "@hourly"
    fields = cron.split()
    return len(fields) > 1 and bool(_FIXED_HOUR.fullmatch(fields[1]))


def ticks_after(cron: str, zone: ZoneInfo, after: float) -> Iterator[datetime]:
    """The ticks strictly after epoch ``after``, as aware datetimes in ``zone``, for ever.

    A wall-clock time that repeats (the end of daylight saving time) gives one tick
    when the hour field is fixed (see the module docstring).
    """
    start = datetime.fromtimestamp(after, zone)
    it = croniter(cron, start)
    fixed = _hour_is_fixed(cron)
    wall = start.replace(tzinfo=None)
    while True:
        tick: datetime = it.get_next(datetime)
        naive = tick.replace(tzinfo=None)
        if fixed and naive <= wall:
            continue  # the repeated hour of a fall-back day: this wall time already fired
        wall = naive
        yield tick


def next_tick(cron: str, zone: ZoneInfo, after: float) -> float:
    """The first tick strictly after epoch ``after`` (epoch seconds)."""
    return next(ticks_after(cron, zone, after)).timestamp()


def tick_instance_id(name: str, tick: float) -> str:
    """``{name}-{tick as YYYYMMDDTHHMMSS}``, the tick in UTC."""
    return f"{name}-{datetime.fromtimestamp(tick, UTC).strftime('%Y%m%dT%H%M%S')}"


def _aware(value: object, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be an aware datetime, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{what} is a naive datetime ({value.isoformat()}); give it a time zone, "
            "e.g. datetime(..., tzinfo=datetime.UTC)"
        )
    return value


def _epoch(raw: Any) -> float | None:
    if raw is None or raw == b"" or raw == "":
        return None
    value = float(text(raw))
    return None if math.isinf(value) else value


def _stamp(epoch: float | None) -> pd.Timestamp | None:
    return None if epoch is None else pd.Timestamp(epoch, unit="s", tz="UTC")


def _now(at: float | None = None) -> tuple[float, str, str]:
    """Now (or the epoch ``at``) as epoch, its ``%.6f`` text and the ISO text of state."""
    if at is None:
        t, iso = clock()
    else:
        t = at
        iso = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return t, f"{t:.6f}", iso


# -- the public handle -------------------------------------------------------------------


class Schedule(Generic[I]):
    """A cron schedule stored in Redis: each tick of ``cron`` starts one instance.

    Made by ``engine.schedule(...)`` (or found with ``engine.get_schedule(name)``).
    The handle holds only the name; every call reads or changes the stored schedule,
    so handles in different processes see the same thing.
    """

    def __init__(self, backend: Backend, name: str, handle: Handle[I]) -> None:
        self._backend = backend
        self._handle = handle
        self.name = name

    def __repr__(self) -> str:
        return f"Schedule({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Schedule)
            and other.name == self.name
            and other._backend.prefix == self._backend.prefix
        )

    def __hash__(self) -> int:
        return hash((self._backend.prefix, self.name))

    def _fields(self) -> dict[str, str]:
        raw = self._backend.redis.hgetall(self._backend.keys.schedule(self.name))
        if not raw:
            raise LookupError(
                f"no schedule {self.name!r} under prefix {self._backend.prefix!r} (deleted?)"
            )
        return {text(k): text(v) for k, v in raw.items()}

    def info(self) -> dict[str, Any]:
        """Everything stored about the schedule: one row of ``engine.schedules()``, plus
        ``params``.  ``LookupError`` if it was deleted."""
        return _row(self.name, self._fields(), with_params=True)

    @property
    def workflow(self) -> str:
        """The name of the workflow each tick starts."""
        return self._fields()["workflow"]

    @property
    def cron(self) -> str:
        return self._fields()["cron"]

    @property
    def timezone(self) -> str:
        return self._fields()["timezone"]

    @property
    def overlap(self) -> str:
        return self._fields()["overlap"]

    @property
    def params(self) -> Any:
        """The params every instance of the schedule gets."""
        return codec.decode(self._fields()["params"])

    @property
    def paused(self) -> bool:
        return self._fields().get("paused") == "1"

    def _call(self, script: str, *args: str) -> str:
        b = self._backend
        # a request key: a resend after a lost reply answers as the first call did
        call = getattr(b.scripts, script)
        res = text(call(keys=[b.keys.request()], args=[b.prefix, self.name, *args]))
        if res == "unknown":
            raise LookupError(f"no schedule {self.name!r} under prefix {b.prefix!r}")
        return res

    def pause(self) -> None:
        """No tick fires until ``resume()`` (ticks meanwhile are not made up later)."""
        self._call("schedule_pause", _now()[1])

    def resume(self) -> None:
        """Fire again, from the first tick after now."""
        fields = self._fields()
        t, now, _ = _now()
        nxt = next_tick(fields["cron"], check_timezone(fields["timezone"]), t)
        self._call("schedule_resume", f"{nxt:.0f}", now)

    def delete(self) -> None:
        """Remove the schedule (its instances stay).  ``LookupError`` if there is none."""
        b = self._backend
        if not b.scripts.schedule_delete(keys=[b.keys.request()], args=[b.prefix, self.name]):
            raise LookupError(f"no schedule {self.name!r} under prefix {b.prefix!r}")

    def trigger(self) -> I:
        """One instance now (also while paused), id ``{name}-{now as YYYYMMDDTHHMMSS}``
        (``-2``, ``-3`` ... when that second already has one).  It counts as the
        schedule's last instance for ``overlap="skip"``."""
        b = self._backend
        fields = self._fields()
        t, now, now_iso = _now()
        base = tick_instance_id(self.name, t)
        for n in range(1, 100):
            iid = base if n == 1 else f"{base}-{n}"

            def job(pipe: Any, iid: str = iid) -> None:
                b.enqueue([iid], fields["workflow"], pipe=pipe)

            res = text(
                b.scripts.execute(
                    [("schedule_trigger", [b.prefix, self.name, iid, now, now_iso])],
                    job,
                    once=b.keys.request(),  # a lost reply: the same instance, one job
                )[0]
            )
            if res == "unknown":
                raise LookupError(f"no schedule {self.name!r} under prefix {b.prefix!r}")
            if res == "created":
                return self._handle(iid, fields["workflow"])
        raise RuntimeError(f"schedule {self.name!r}: no free instance id for {base}")

    def next_runs(self, n: int = 5) -> list[datetime]:
        """The next ``n`` ticks as aware datetimes in the schedule's time zone (for a
        paused schedule: the ticks it would fire if resumed now)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, not {n!r}")
        fields = self._fields()
        zone = check_timezone(fields["timezone"])
        pending = _epoch(fields.get("nextTick"))
        t = time.time()
        out: list[datetime] = []
        if fields.get("paused") != "1" and pending is not None and n > 0:
            out.append(datetime.fromtimestamp(pending, zone))  # the tick it waits for
            t = pending
        out.extend(itertools.islice(ticks_after(fields["cron"], zone, t), n - len(out)))
        return out

    def backfill(self, start: datetime, end: datetime) -> list[I]:
        """Create the instance of every tick from ``start`` to ``end`` (aware datetimes,
        both inclusive; ticks after now are left to the schedule) that does not exist
        yet; returns them in tick order.  At most ``BACKFILL_MAX`` ticks a call."""
        start = _aware(start, "backfill start")
        end = _aware(end, "backfill end")
        if end < start:
            raise ValueError(f"backfill end {end.isoformat()} is before start {start.isoformat()}")
        b = self._backend
        fields = self._fields()
        zone = check_timezone(fields["timezone"])
        last = min(end.timestamp(), time.time())
        ids: list[str] = []
        for tick in ticks_after(fields["cron"], zone, start.timestamp() - 1e-3):
            if tick.timestamp() > last:
                break
            if len(ids) == BACKFILL_MAX:
                raise ValueError(
                    f"backfill from {start.isoformat()} to {end.isoformat()} covers more than "
                    f"{BACKFILL_MAX} ticks of {fields['cron']!r}; backfill a shorter range"
                )
            ids.append(tick_instance_id(self.name, tick.timestamp()))
        pipe = b.redis.pipeline(transaction=False)
        for iid in ids:
            pipe.exists(b.keys.state(iid))
        missing = [iid for iid, there in zip(ids, pipe.execute(), strict=True) if not there]
        created: list[I] = []
        for at in range(0, len(missing), 500):
            chunk = missing[at : at + 500]
            _, now, now_iso = _now()

            def jobs(pipe: Any, chunk: list[str] = chunk) -> None:
                for iid in chunk:
                    b.enqueue([iid], fields["workflow"], pipe=pipe)

            res = b.scripts.execute(
                [("schedule_backfill", [b.prefix, self.name, now, now_iso, *chunk])],
                jobs,
                once=b.keys.request(),
            )[0]
            if text(res[0]) == "unknown":
                raise LookupError(f"no schedule {self.name!r} under prefix {b.prefix!r}")
            for iid, flag in zip(chunk, res[1], strict=True):
                if int(flag):
                    created.append(self._handle(iid, fields["workflow"]))
        return created

    def history(self) -> list[dict[str, Any]]:
        """The schedule's recent events (at most 200), oldest first: created, updated,
        fired (tick, instance), skipped, missed, triggered, backfilled, paused, resumed."""
        b = self._backend
        events = [
            codec.decode(x) for x in b.redis.lrange(b.keys.schedule_history(self.name), 0, -1)
        ]
        return [e for e in events if isinstance(e, dict)]


# -- what the engine calls ---------------------------------------------------------------


def put(
    backend: Backend,
    workflow: str,
    cron: object,
    handle: Handle[I],
    *,
    name: object = None,
    params: Any = None,
    timezone: object = "UTC",
    overlap: object = "skip",
) -> Schedule[I]:
    """``engine.schedule``: check everything, then create or update in one script."""
    sname = check_schedule_name(workflow if name is None else name)
    expr = check_cron(cron)
    zone = check_timezone(timezone)
    mode = check_overlap(overlap)
    try:
        payload = codec.encode(params)
    except TypeError as exc:
        raise TypeError(f"params of schedule {sname!r}: {exc}") from None
    if len(payload.encode()) > backend.max_step_bytes:
        raise ValueError(
            f"params of schedule {sname!r} are larger than max_step_bytes={backend.max_step_bytes}"
        )
    t, now, now_iso = _now()
    try:
        nxt = next_tick(expr, zone, t)
    except Exception:
        raise ValueError(f"cron expression {cron!r} never fires after now") from None
    retention = "" if backend.retention is None else f"{backend.retention:.6f}"
    args = [backend.prefix, sname, workflow, expr, zone.key, mode, payload, retention]
    cls = backend.classes.get(workflow)
    version = "" if cls is None else class_version(cls)
    backend.scripts.schedule_put(
        keys=[backend.keys.request()], args=[*args, f"{nxt:.0f}", now, now_iso, version]
    )
    return Schedule(backend, sname, handle)


def get(backend: Backend, name: str, handle: Handle[I]) -> Schedule[I]:
    """The stored schedule ``name``; ``LookupError`` if there is none."""
    check_schedule_name(name)
    if not backend.redis.exists(backend.keys.schedule(name)):
        raise LookupError(f"no schedule {name!r} under prefix {backend.prefix!r}")
    return Schedule(backend, name, handle)


def listing(backend: Backend) -> pd.DataFrame:
    """``engine.schedules()``: one row per schedule, by name (columns ``SCHEDULE_COLUMNS``;
    times as UTC timestamps)."""
    names = sorted(text(n) for n in backend.redis.zrange(backend.keys.schedules, 0, -1))
    pipe = backend.redis.pipeline(transaction=False)
    for n in names:
        pipe.hgetall(backend.keys.schedule(n))
    rows = []
    for n, raw in zip(names, pipe.execute(), strict=True):
        if raw:
            rows.append(_row(n, {text(k): text(v) for k, v in raw.items()}))
    return pd.DataFrame(rows, columns=SCHEDULE_COLUMNS)


def _row(name: str, f: dict[str, str], with_params: bool = False) -> dict[str, Any]:
    paused = f.get("paused") == "1"
    row: dict[str, Any] = {
        "name": name,
        "workflow": f.get("workflow"),
        "cron": f.get("cron"),
        "timezone": f.get("timezone"),
        "overlap": f.get("overlap"),
        "paused": paused,
        "next_run": None if paused else _stamp(_epoch(f.get("nextTick"))),
        "last_run": _stamp(_epoch(f.get("lastTick"))),
        "last_instance": text_or_none(f.get("lastInstance")),
    }
    for counter in ("fired", "skipped", "missed", "triggered", "backfilled"):
        row[counter] = int(f.get(counter) or 0)
    if with_params:
        row["params"] = codec.decode(f["params"]) if f.get("params") else None
    return row


# -- what housekeepers call --------------------------------------------------------------


def fire_due(backend: Backend, now: float | None = None) -> float:
    """Fire the ticks that are due at ``now`` (default: the clock); returns the epoch at
    which to look again.  Every worker's housekeeper calls it; any number may race.

    ``now`` is injectable so tests can walk a clock through many ticks without waiting.
    """
    b = backend
    t = time.time() if now is None else now
    token = f"{_TOKEN_BASE}-{next(_tokens)}"
    res = b.scripts.schedule_due(
        args=[b.prefix, f"{t:.6f}", token, f"{t + CLAIM_SECONDS:.6f}", DUE_LIMIT]
    )
    earliest = float(text(res[0])) if res[0] else math.inf
    if len(res) == 1:
        return min(earliest, t + POLL_SECONDS)
    creating: list[tuple[list[str], str, str]] = []  # (fire args, instance id, workflow)
    others: list[list[str]] = []
    workflows: dict[str, str] = {}  # schedule name -> its workflow (whose queue gets the job)
    _, now_s, now_iso = _now(now)
    for entry in res[1:]:
        name, wf, cron, tz, overlap, tick_s, _last, last_status = (text(x) for x in entry)
        tick = float(tick_s)
        try:
            zone = check_timezone(tz)
            stale = t - tick > MISFIRE_GRACE
            nxt = next_tick(cron, zone, t if stale else tick)
        except Exception:
            log.exception("nbflow: schedule %r cannot be fired (cron %r, tz %r)", name, cron, tz)
            continue  # its claim expires; it is tried again then
        iid = tick_instance_id(name, tick)
        workflows[name] = wf
        action = "miss" if stale else "fire"
        args = [b.prefix, name, token, action, f"{tick:.0f}", f"{nxt:.0f}", iid, now_s, now_iso]
        blocked = overlap == "skip" and last_status not in ("", *FINAL_STATUSES)
        if action == "fire" and not blocked:
            creating.append((args, iid, wf))
        else:
            others.append(args)
    if others:
        replies = b.scripts.pipeline([("schedule_fire", [*a, "0"]) for a in others])
        for a, reply in zip(others, replies, strict=True):
            if isinstance(reply, Exception):
                log.warning("nbflow: firing schedule %r failed: %s", a[1], reply)
            elif text(reply) == "retry":  # its last instance finished meanwhile
                creating.append((a, a[6], workflows[a[1]]))
    if creating:

        def jobs(pipe: Any) -> None:
            for _, iid, wf in creating:
                b.enqueue([iid], wf, pipe=pipe)

        b.scripts.execute([("schedule_fire", [*a, "1"]) for a, _, _ in creating], jobs)
    return t  # look again on the next cycle: these schedules now wait for later ticks
