"""Flow control (spec 10.2): concurrency and rate limits, priorities, delayed starts.

The checks of ``engine.register(..., concurrency=, rate_limit=)`` and of
``create(..., priority=, concurrency_key=, start_at=, delay=)`` live here, with the
call that stores a workflow's limits.  Enforcement is in Redis, in ``nbflow.store``'s
scripts (key names and Lua stay there):

* the ``claim`` script reads ``{p}:limits:{wf}`` (one HMGET: a workflow without limits
  pays nothing else).  A claim over a limit does not start the instance: it stays
  ``queued`` in ``{p}:held:{scope}`` (scope: the workflow, or ``wf:key`` with a
  concurrency key), ordered by priority then time, and the worker moves on to its
  next job -- it never waits for a slot.
* every script that takes an instance out of ``running`` goes through the shared
  ``release`` helper, which frees the slot and, in the same script, admits the next
  held instance(s): their slot is reserved and their id pushed on ``{p}:go:{wf}``, a
  list workers BLPOP before the workflow's RQ queues.  So held instances start in
  order when a slot frees, with no caller having to enqueue anything.
* a rate window that frees is put on ``{p}:ratewake``; the housekeeper's ``wake_due``
  (every 50 ms) admits the held instances then.  Its sweep also admits held instances
  whose slot is free for any other reason (limits raised or removed).

Limits are stored with the workflow and bind every worker and engine of the prefix,
including ones that register the class without limits: registering **without** limits
leaves the stored ones as they are (a worker process registering the class must not
lift them); registering with either limit replaces both (one not given is removed).
``Workflow.set_limits()`` replaces them explicitly (no arguments: no limits).

Priorities: new instances of priority 5 go on the workflow's RQ queue, others on
``{queue}:{wf}:p{n}``; workers BLPOP ``p0 .. p4``, the workflow's queue, ``p6 .. p9``.
Woken, resumed and recovered instances are put at the front of the workflow's queue,
so they come before new instances of priority 5 to 9 (and, while held, before every
held instance that never started).
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nbflow.backend import DEFAULT_PRIORITY, Backend
from nbflow.durations import parse_duration, to_epoch

_KEY_MAX = 200


class OptionTypeError(ValueError, TypeError):
    """A limit, priority or start time of the wrong type: both a ``TypeError`` (what it
    is) and a ``ValueError`` (what the spec promises for bad input)."""


@dataclass(frozen=True)
class StartOptions:
    """What ``create`` was asked for beyond id and params, checked."""

    concurrency_key: str | None = None
    priority: int = DEFAULT_PRIORITY
    start_at: float | None = None  # epoch seconds, None = now

    @property
    def default(self) -> bool:
        return (
            self.concurrency_key is None
            and self.priority == DEFAULT_PRIORITY
            and self.start_at is None
        )

    def fields(self) -> list[str]:
        """The three per-instance fields of the ``create_opts`` script."""
        return [
            self.concurrency_key or "",
            "" if self.priority == DEFAULT_PRIORITY else str(self.priority),
            "" if self.start_at is None else f"{self.start_at:.6f}",
        ]


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionTypeError(
            f"invalid {what} {value!r} of type {type(value).__name__!r}: "
            "use a positive integer (1, 2, 3, ...)"
        )
    if value < 1:
        raise ValueError(f"invalid {what} {value!r}: use a positive integer (1, 2, 3, ...)")
    return value


def check_limits(concurrency: Any, rate_limit: Any) -> tuple[int | None, tuple[int, float] | None]:
    """``register``'s ``concurrency`` (a positive int or None) and ``rate_limit``
    (``{"limit": positive int, "period": duration}`` or None), checked."""
    conc = None if concurrency is None else _positive_int(concurrency, "concurrency")
    if rate_limit is None:
        return conc, None
    if not isinstance(rate_limit, Mapping):
        raise OptionTypeError(
            f"invalid rate_limit {rate_limit!r}: use a dict such as "
            '{"limit": 50, "period": "1 minute"}'
        )
    extra = set(rate_limit) - {"limit", "period"}
    missing = {"limit", "period"} - set(rate_limit)
    if extra or missing:
        raise ValueError(
            f"invalid rate_limit {dict(rate_limit)!r}: it takes exactly the keys 'limit' "
            f"and 'period'"
            + (f"; unknown {sorted(extra)}" if extra else "")
            + (f"; missing {sorted(missing)}" if missing else "")
        )
    limit = _positive_int(rate_limit["limit"], "rate_limit limit")
    try:
        period = parse_duration(rate_limit["period"])
    except ValueError as exc:
        raise ValueError(f"invalid rate_limit period: {exc}") from None
    if period <= 0:
        raise ValueError(
            f"invalid rate_limit period {rate_limit['period']!r}: it must be longer than zero"
        )
    return conc, (limit, period)


def check_start(
    priority: Any = DEFAULT_PRIORITY,
    concurrency_key: Any = None,
    start_at: Any = None,
    delay: Any = None,
    now: float | None = None,
) -> StartOptions:
    """``create``'s flow-control options, checked (nothing is written before)."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise OptionTypeError(
            f"invalid priority {priority!r} of type {type(priority).__name__!r}: "
            "use an integer from 0 (first) to 9 (last)"
        )
    if not 0 <= priority <= 9:
        raise ValueError(
            f"invalid priority {priority!r}: use an integer from 0 (first) to 9 (last)"
        )
    if concurrency_key is not None:
        if not isinstance(concurrency_key, str):
            raise OptionTypeError(
                f"invalid concurrency_key {concurrency_key!r}: use a string such as 'tenant-7'"
            )
        if not 0 < len(concurrency_key) <= _KEY_MAX or not concurrency_key.isprintable():
            raise ValueError(
                f"invalid concurrency_key {concurrency_key!r}: use 1-{_KEY_MAX} printable "
                "characters"
            )
    at: float | None = None
    if start_at is not None and delay is not None:
        raise ValueError(
            "create() takes start_at or delay, not both: start_at is a moment (an aware "
            "datetime or epoch seconds), delay a duration from now"
        )
    if start_at is not None:
        if isinstance(start_at, datetime.timedelta | str):
            start_at = (now if now is not None else _now()) + parse_duration(start_at)
        try:
            at = to_epoch(start_at)
        except ValueError as exc:
            raise ValueError(f"invalid start_at: {exc}") from None
    elif delay is not None:
        try:
            at = (now if now is not None else _now()) + parse_duration(delay)
        except ValueError as exc:
            raise ValueError(f"invalid delay: {exc}") from None
    if at is not None and not math.isfinite(at):
        raise ValueError(f"invalid start time {at!r}: it must be a finite moment")
    return StartOptions(concurrency_key, priority, at)


def _now() -> float:
    return time.time()


def store_limits(
    backend: Backend, workflow: str, concurrency: int | None, rate: tuple[int, float] | None
) -> None:
    """Replaces the limits stored for ``workflow`` (None and None: removes them) and
    admits the held instances the new limits allow, in one script."""
    backend.scripts.set_limits(
        args=[
            backend.prefix,
            workflow,
            "" if concurrency is None else str(concurrency),
            "" if rate is None else str(rate[0]),
            "" if rate is None else f"{rate[1]:.6f}",
        ]
    )


def read_limits(backend: Backend, workflow: str) -> dict[str, Any]:
    """The limits stored for ``workflow``: ``{"concurrency": n | None, "rate_limit":
    {"limit": n, "period": seconds} | None}``."""
    got = backend.redis.hmget(backend.keys.limits(workflow), "concurrency", "rate", "period")
    conc, rate, period = (
        None if g is None else g.decode() if isinstance(g, bytes) else str(g) for g in got
    )
    return {
        "concurrency": None if conc is None else int(conc),
        "rate_limit": None
        if rate is None or period is None
        else {"limit": int(rate), "period": float(period)},
    }


__all__ = [
    "DEFAULT_PRIORITY",
    "OptionTypeError",
    "StartOptions",
    "check_limits",
    "check_start",
    "read_limits",
    "store_limits",
]
