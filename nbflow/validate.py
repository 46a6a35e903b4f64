"""Every input check the public API makes, in one place.

The engine calls these at the API boundary -- when a user creates an instance,
sends an event, or calls ``step.do`` -- so a bad argument fails *at the call*
with a message that says what was wrong and what is allowed (SPEC 2.1, 2.2,
2.5, 3.4), instead of surfacing later from Redis, a worker, or a replay.

Every check raises ``ValueError``, even for a value of the wrong type: the
spec promises ``ValueError`` for bad names, ids, event types and configs, and
one exception type is simpler for callers to catch than two.  The one exception is
``check_progress`` (``ctx.progress``, SPEC 8.4): a non-number there is a ``TypeError``,
as for any arithmetic, and a number out of range a ``ValueError``.
"""

from __future__ import annotations

import datetime
import difflib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

from .durations import BACKOFFS, parse_duration

__all__ = [
    "DEFAULT_CONFIG",
    "StepConfig",
    "check_event_type",
    "check_instance_id",
    "check_progress",
    "check_step_name",
    "resolve_step_config",
]

_IDENTIFIER_RE: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_-]*")
_IDENTIFIER_CHAR_RE: Final = re.compile(r"[a-zA-Z0-9_-]")
_IDENTIFIER_MAX: Final = 100
_IDENTIFIER_RULE: Final = (
    f"use 1-{_IDENTIFIER_MAX} characters from a-z, A-Z, 0-9, '_' and '-', not starting with '-'"
)
_STEP_NAME_MAX: Final = 256


def _check_identifier(value: object, what: str) -> str:
    """Check an instance id or event type; both become parts of Redis keys, hence the tight rule."""
    if not isinstance(value, str):
        raise ValueError(
            f"invalid {what} {value!r}: it is a {type(value).__name__}, not a str; "
            f"{_IDENTIFIER_RULE}"
        )
    # fullmatch, not match with ``$``: ``$`` would accept a trailing newline.
    if len(value) <= _IDENTIFIER_MAX and _IDENTIFIER_RE.fullmatch(value):
        return value
    if not value:
        why = "it is empty"
    elif len(value) > _IDENTIFIER_MAX:
        why = f"it is {len(value)} characters long"
    elif value[0] == "-":
        why = "it starts with '-'"
    else:
        index, char = next(
            (i, c) for i, c in enumerate(value) if not _IDENTIFIER_CHAR_RE.fullmatch(c)
        )
        why = f"character {char!r} at position {index} is not allowed"
    raise ValueError(f"invalid {what} {value!r}: {why}; {_IDENTIFIER_RULE}")


def check_instance_id(value: object) -> str:
    """Return ``value`` if it is a valid instance id, else raise ``ValueError``.

    Ids match ``^[a-zA-Z0-9_][a-zA-Z0-9_-]*$`` and have 1-100 characters
    (Cloudflare's rule). They are embedded in Redis keys
    (``{prefix}:{id}:state``), so ``:``, spaces and wildcards must never get in.
    A non-str raises ``ValueError`` too (see the module docstring).
    """
    return _check_identifier(value, "instance id")


def check_event_type(value: object) -> str:
    """Return ``value`` if it is a valid event type, else raise ``ValueError``.

    Same rule as instance ids (SPEC 2.5): event types name per-instance event
    buffers in Redis. A non-str raises ``ValueError`` too.
    """
    return _check_identifier(value, "event type")


#: A longer progress message is cut to this many characters (it shows on one line).
PROGRESS_MESSAGE_MAX: Final = 200


def _progress_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"ctx.progress: {what} must be a number (int or float), not "
            f"{type(value).__name__} {value!r}"
        )
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"ctx.progress: {what} must be a finite number, not {value!r}")
    return number


def check_progress(done: object, total: object, message: object) -> tuple[float, str | None]:
    """The fraction done (0-1) and the message of ``ctx.progress(done, total, message)``.

    With ``total``: ``0 <= done <= total`` and ``total > 0`` (counts: ``progress(3, 10)``
    is 30 %).  Without it ``done`` is the fraction itself, ``0 <= done <= 1``.
    Non-numbers (``bool`` included) raise ``TypeError``; negative, non-finite or
    out-of-range numbers ``ValueError``; ``message`` is a str or None (``TypeError``)
    and is cut to ``PROGRESS_MESSAGE_MAX`` characters.
    """
    d = _progress_number(done, "done")
    if d < 0:
        raise ValueError(f"ctx.progress: done must be >= 0, not {done!r}")
    if total is None:
        if d > 1:
            raise ValueError(
                f"ctx.progress: done={done!r} without total must be a fraction between 0 "
                "and 1; pass total= for counts, e.g. ctx.progress(3, 10)"
            )
        fraction = d
    else:
        t = _progress_number(total, "total")
        if t <= 0:
            raise ValueError(f"ctx.progress: total must be > 0, not {total!r}")
        if d > t:
            raise ValueError(
                f"ctx.progress: done={done!r} is more than total={total!r}; "
                "done must be between 0 and total"
            )
        fraction = d / t
    if message is not None and not isinstance(message, str):
        raise TypeError(
            f"ctx.progress: message must be a str or None, not {type(message).__name__}"
        )
    if message is not None and len(message) > PROGRESS_MESSAGE_MAX:
        message = message[: PROGRESS_MESSAGE_MAX - 1] + "…"
    return fraction, message


def check_step_name(value: object) -> str:
    """Return ``value`` if it is a valid step name, else raise ``ValueError``.

    Names are free text (1-256 characters, SPEC 2.1) because users write
    sentences like ``"charge card"``, but control characters are refused:
    they would corrupt the step cache key, log lines and notebook widgets.
    A non-str raises ``ValueError`` too.
    """
    if not isinstance(value, str):
        raise ValueError(
            f"invalid step name {value!r}: it is a {type(value).__name__}, not a str; "
            f"use a str of 1-{_STEP_NAME_MAX} characters without control characters"
        )
    if not value:
        raise ValueError(
            f"invalid step name '': it is empty; use 1-{_STEP_NAME_MAX} characters "
            "without control characters"
        )
    if len(value) > _STEP_NAME_MAX:
        raise ValueError(
            f"invalid step name {value[:40]!r}...: it is {len(value)} characters long; "
            f"use at most {_STEP_NAME_MAX} characters"
        )
    # isprintable() is a C-speed fast path for the usual name; it is stricter than
    # the rule (it also refuses e.g. a no-break space), so only its False is re-checked.
    if not value.isprintable():
        for index, char in enumerate(value):
            if unicodedata.category(char) == "Cc":  # covers \x00-\x1f, \x7f and \x80-\x9f
                raise ValueError(
                    f"invalid step name {value!r}: control character {char!r} at position "
                    f"{index}; use printable characters (letters, digits, spaces, punctuation)"
                )
    return value


@dataclass(frozen=True, slots=True)
class StepConfig:
    """A step's resolved retry and timeout settings, all durations in seconds.

    Frozen so the shared :data:`DEFAULT_CONFIG` (and cached resolutions) can be
    handed to every step without anyone mutating them underneath the others.
    """

    retry_limit: int
    retry_delay: float
    backoff: str
    timeout: float

    def as_dict(self) -> dict[str, object]:
        """Return the config in the user-facing shape (SPEC 2.2), durations as seconds.

        This is what a step callback sees as ``StepContext.config`` and what is
        stored next to a step; feeding it back to :func:`resolve_step_config`
        gives an equal ``StepConfig``.
        """
        return {
            "retries": {
                "limit": self.retry_limit,
                "delay": self.retry_delay,
                "backoff": self.backoff,
            },
            "timeout": self.timeout,
        }


#: SPEC 2.2 defaults: 5 retries, 10 seconds apart, doubling; 10 minutes per attempt.
DEFAULT_CONFIG: Final = StepConfig(
    retry_limit=5, retry_delay=10.0, backoff="exponential", timeout=600.0
)

_TOP_KEYS: Final = ("retries", "timeout")
_RETRY_KEYS: Final = ("limit", "delay", "backoff")


def _check_keys(config: Mapping[str, object], allowed: tuple[str, ...], where: str) -> None:
    """Reject unknown keys: a typo like ``"retry"`` must not silently fall back to defaults."""
    for key in config:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {where} key {key!r}{hint}: allowed keys are "
                + ", ".join(repr(k) for k in allowed)
            )


def _duration_field(value: object, field: str) -> float:
    """Parse one duration field, naming the field in the error so the user knows which one."""
    try:
        # parse_duration checks the type itself (and raises ValueError), hence the cast.
        return parse_duration(cast("str | int | float | datetime.timedelta", value))
    except ValueError as exc:
        raise ValueError(f"step config {field!r}: {exc}") from None


def resolve_step_config(config: Mapping[str, object] | None) -> StepConfig:
    """Merge a user's (possibly partial) step config over the defaults and validate it.

    ``{"retries": {"limit": 0}}`` keeps the default delay, backoff and timeout.
    Raises ``ValueError`` for unknown keys at either level, a limit that is not
    a non-negative int, a bad delay, an unknown backoff, a timeout that is not
    a positive duration, or a config / ``retries`` that is not a mapping.

    Called once per ``step.do``, so the common no-config case returns the
    shared :data:`DEFAULT_CONFIG` without any work, and duration strings are
    parsed through a cache.
    """
    if config is None:
        return DEFAULT_CONFIG
    if not isinstance(config, Mapping):
        raise ValueError(
            f"invalid step config {config!r}: it is a {type(config).__name__}, not a mapping; "
            'use a dict like {"retries": {"limit": 3, "delay": "2 seconds", '
            '"backoff": "exponential"}, "timeout": "30 seconds"}'
        )
    if not config:
        return DEFAULT_CONFIG
    _check_keys(config, _TOP_KEYS, "step config")

    d = DEFAULT_CONFIG
    limit, delay, backoff = d.retry_limit, d.retry_delay, d.backoff
    timeout = DEFAULT_CONFIG.timeout
    if "retries" in config:
        limit, delay, backoff = _resolve_retries(config["retries"], limit, delay, backoff)

    if "timeout" in config:
        timeout = _duration_field(config["timeout"], "timeout")
        if timeout <= 0:
            raise ValueError(
                f"step config 'timeout': invalid timeout {config['timeout']!r}; it must be "
                'greater than zero, e.g. "30 seconds" or "10 minutes"'
            )

    return StepConfig(retry_limit=limit, retry_delay=delay, backoff=backoff, timeout=timeout)


def _resolve_retries(
    retries: object, limit: int, delay: float, backoff: str
) -> tuple[int, float, str]:
    """The ``retries`` part of a step config merged over (limit, delay, backoff)."""
    if not isinstance(retries, Mapping):
        raise ValueError(
            f"invalid step config 'retries' {retries!r}: it is a {type(retries).__name__}, "
            'not a mapping; use a dict like {"limit": 3, "delay": "2 seconds", '
            '"backoff": "exponential"}'
        )
    _check_keys(retries, _RETRY_KEYS, "step config 'retries'")
    if "limit" in retries:
        raw_limit = retries["limit"]
        if isinstance(raw_limit, bool) or not isinstance(raw_limit, int) or raw_limit < 0:
            raise ValueError(
                f"step config 'retries.limit': invalid limit {raw_limit!r}; use a "
                "non-negative int (0 = no retries, one attempt)"
            )
        limit = raw_limit
    if "delay" in retries:
        delay = _duration_field(retries["delay"], "retries.delay")
    if "backoff" in retries:
        raw_backoff = retries["backoff"]
        if raw_backoff not in BACKOFFS:
            raise ValueError(
                f"step config 'retries.backoff': invalid backoff {raw_backoff!r}; use one of "
                + ", ".join(repr(b) for b in BACKOFFS)
            )
        backoff = str(raw_backoff)
    return limit, delay, backoff
