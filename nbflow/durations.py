"""Durations, retry back-off and wake-up times: the time arithmetic of nbflow.

Everything here is a pure function of its arguments. The engine stores times
in Redis as epoch seconds and durations as seconds, so every user-facing
spelling (``"5 seconds"``, ``30``, ``timedelta(minutes=2)``, an aware
``datetime``) is turned into a plain ``float`` at the API boundary, once,
and nothing deeper in the engine has to care how the user wrote it.
"""

from __future__ import annotations

import datetime
import math
import re
from functools import lru_cache
from typing import Final

__all__ = ["BACKOFFS", "parse_duration", "retry_delay", "to_epoch"]

#: The back-off strategies a step's ``retries.backoff`` may name (SPEC 2.2).
BACKOFFS: Final = ("constant", "linear", "exponential")

_SECOND: Final = 1.0
_MINUTE: Final = 60.0
_HOUR: Final = 60 * _MINUTE
_DAY: Final = 24 * _HOUR

# Cloudflare's month and year are calendar-free: a month is 30 days and a year
# is 365 days, so a duration never depends on the date it starts.
_UNITS: Final[dict[str, float]] = {
    **dict.fromkeys(("millisecond", "milliseconds", "ms"), 0.001),
    **dict.fromkeys(("second", "seconds", "s", "sec", "secs"), _SECOND),
    **dict.fromkeys(("minute", "minutes", "m", "min", "mins"), _MINUTE),
    **dict.fromkeys(("hour", "hours", "h", "hr", "hrs"), _HOUR),
    **dict.fromkeys(("day", "days", "d"), _DAY),
    **dict.fromkeys(("week", "weeks", "w"), 7 * _DAY),
    **dict.fromkeys(("month", "months"), 30 * _DAY),
    **dict.fromkeys(("year", "years"), 365 * _DAY),
}

# A non-negative decimal number, optional whitespace, then a unit word.
# ``fullmatch`` is used, so a trailing newline is not silently accepted.
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*")

_HELP: Final = (
    'use a number of seconds, a datetime.timedelta, or a string like "5 seconds", '
    '"250 milliseconds", "2 minutes", "1 hour", "3 days"'
)


def _invalid(value: object, why: str = "") -> ValueError:
    """Build the one error message every bad duration gets, so users learn the accepted forms."""
    reason = f" ({why})" if why else ""
    return ValueError(f"invalid duration {value!r}{reason}: {_HELP}")


@lru_cache(maxsize=256)
def _parse_duration_text(text: str) -> float:
    """Parse a duration string; cached because the same literals recur on every step call."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise _invalid(text)
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise _invalid(text, f"unknown unit {unit!r}")
    seconds = float(number) * factor
    if not math.isfinite(seconds):
        raise _invalid(text, "too large")
    return seconds


def parse_duration(value: str | int | float | datetime.timedelta) -> float:
    """Return ``value`` as a number of seconds (a finite float, ``>= 0``).

    Accepted forms (SPEC 2.3): a string ``"<number> <unit>"`` (units
    millisecond, second, minute, hour, day, week, month = 30 days,
    year = 365 days, singular or plural, any case, plus the short forms
    ``ms``, ``s``/``sec``/``secs``, ``m``/``min``/``mins``, ``h``/``hr``/``hrs``,
    ``d``, ``w``); a bare int or float, meaning seconds; or a
    ``datetime.timedelta``.

    Every rejected value raises ``ValueError`` -- including values of the wrong
    type -- because the spec promises ``ValueError`` for any bad duration and a
    single exception type is simpler to catch at the API boundary.
    """
    # bool is an int subclass, but ``timeout=True`` is a bug, not one second.
    if isinstance(value, bool):
        raise _invalid(value, "a bool is not a duration")
    if isinstance(value, str):
        return _parse_duration_text(value)
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float range
            raise _invalid(value, "too large") from None
        if math.isnan(seconds) or math.isinf(seconds):
            raise _invalid(value, "must be a finite number")
        if seconds < 0:
            raise _invalid(value, "must not be negative")
        return seconds
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
        if seconds < 0:
            raise _invalid(value, "must not be negative")
        return seconds
    raise _invalid(value, f"a value of type {type(value).__name__!r} is not a duration")


def retry_delay(delay: float, backoff: str, retry_number: int) -> float:
    """Return the wait in seconds before retry number ``retry_number`` (1 = first retry).

    ``constant`` waits ``delay`` every time, ``linear`` waits ``delay * n`` and
    ``exponential`` waits ``delay * 2 ** (n - 1)`` (SPEC 2.2). An exponential
    wait too large for a float is returned as ``math.inf`` rather than raising,
    because a step with a huge retry limit must not crash the scheduler; the
    caller decides what an infinite wait means.
    """
    if isinstance(retry_number, bool) or not isinstance(retry_number, int) or retry_number < 1:
        raise ValueError(
            f"invalid retry number {retry_number!r}: retries are numbered 1, 2, 3, ..."
        )
    if backoff == "constant":
        return float(delay)
    if backoff == "linear":
        return float(delay) * retry_number
    if backoff == "exponential":
        try:
            # ldexp is exact (it only moves the exponent), unlike delay * 2.0 ** k.
            return math.ldexp(float(delay), retry_number - 1)
        except OverflowError:
            return math.inf
    raise ValueError(
        f"invalid backoff {backoff!r}: use one of {', '.join(repr(b) for b in BACKOFFS)}"
    )


def to_epoch(when: datetime.datetime | int | float) -> float:
    """Return the moment ``when`` (for ``step.sleep_until``) as epoch seconds.

    An aware ``datetime`` is converted; an int or float is taken to already be
    epoch seconds. A naive ``datetime`` is rejected instead of guessed at: a
    worker in another time zone would read it differently, and a sleep that
    silently wakes hours early or late is worse than an error.
    """
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
            raise ValueError(
                f"invalid wake-up time {when!r}: it is a naive datetime; "
                "use an aware datetime, e.g. datetime.now(timezone.utc), or epoch seconds"
            )
        return when.timestamp()
    if isinstance(when, int | float) and not isinstance(when, bool):
        try:
            seconds = float(when)
        except OverflowError:  # an int beyond float range
            seconds = math.inf
        if math.isfinite(seconds):
            return seconds
        raise ValueError(f"invalid wake-up time {when!r}: epoch seconds must be a finite number")
    raise ValueError(
        f"invalid wake-up time {when!r} of type {type(when).__name__!r}: use an aware "
        "datetime, e.g. datetime.now(timezone.utc), or epoch seconds (int or float)"
    )
