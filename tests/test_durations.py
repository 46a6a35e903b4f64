"""Durations, retry back-off and wake-up times (SPEC 2.2-2.4). No Redis needed."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest

from nbflow.durations import BACKOFFS, parse_duration, retry_delay, to_epoch

UTC = datetime.UTC
DAY = 86400.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250 milliseconds", 0.25),
        ("1 millisecond", 0.001),
        ("5 seconds", 5.0),
        ("1 second", 1.0),
        ("2 minutes", 120.0),
        ("1 minute", 60.0),
        ("1 hour", 3600.0),
        ("3 hours", 10800.0),
        ("1 day", DAY),
        ("3 days", 3 * DAY),
        ("1 week", 7 * DAY),
        ("2 weeks", 14 * DAY),
        ("1 month", 30 * DAY),
        ("2 months", 60 * DAY),
        ("1 year", 365 * DAY),
        ("2 years", 730 * DAY),
        ("0 seconds", 0.0),
    ],
)
def test_spec_duration_strings_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250 ms", 0.25),
        ("5 s", 5.0),
        ("5 sec", 5.0),
        ("5 secs", 5.0),
        ("2 m", 120.0),
        ("2 min", 120.0),
        ("2 mins", 120.0),
        ("1 h", 3600.0),
        ("1 hr", 3600.0),
        ("2 hrs", 7200.0),
        ("3 d", 3 * DAY),
        ("1 w", 7 * DAY),
        ("5s", 5.0),
        ("250ms", 0.25),
    ],
)
def test_short_unit_forms_are_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5 SECONDS", 5.0),
        ("1 Hour", 3600.0),
        ("  10 minutes  ", 600.0),
        ("\t1 day\n", DAY),
        ("1.5 hours", 5400.0),
        ("0.5 seconds", 0.5),
        (".5 seconds", 0.5),
        ("2.  minutes", 120.0),
        ("1   second", 1.0),
    ],
)
def test_duration_strings_ignore_case_and_whitespace_and_allow_decimals(
    text: str, seconds: float
) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(0, 0.0), (5, 5.0), (2.5, 2.5), (86400, DAY), (10**6, 1e6)],
)
def test_bare_numbers_are_seconds(value: float, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert type(result) is float


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (datetime.timedelta(0), 0.0),
        (datetime.timedelta(seconds=5), 5.0),
        (datetime.timedelta(minutes=2, milliseconds=250), 120.25),
        (datetime.timedelta(days=3), 3 * DAY),
    ],
)
def test_timedelta_is_its_total_seconds(value: datetime.timedelta, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "five secs",
        "soon",
        "",
        "   ",
        "5",
        "seconds",
        "5 fortnights",
        "5 secondz",
        "-5 seconds",
        "1e3 seconds",
        "5 seconds ago",
        "5 seconds 3 minutes",
        "5,5 seconds",
        "1_000 seconds",
        "5 seconds\x00",
        -1,
        -0.001,
        math.nan,
        math.inf,
        -math.inf,
        10**400,
        True,
        False,
        None,
        [5],
        {"seconds": 5},
        b"5 seconds",
        datetime.timedelta(seconds=-1),
        datetime.datetime(2024, 1, 1),
    ],
)
def test_invalid_durations_raise_value_error_listing_the_accepted_forms(value: Any) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(value)
    message = str(info.value)
    assert '"5 seconds"' in message
    assert "timedelta" in message
    assert "number of seconds" in message


def test_invalid_duration_message_quotes_the_bad_value() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("five secs")
    assert str(info.value).startswith("invalid duration 'five secs': use a number of seconds")


def test_unknown_unit_is_named_in_the_message() -> None:
    with pytest.raises(ValueError, match="unknown unit 'fortnights'"):
        parse_duration("5 fortnights")


def test_backoff_names_are_the_three_spec_strategies() -> None:
    assert BACKOFFS == ("constant", "linear", "exponential")


@pytest.mark.parametrize("retry_number", [1, 2, 3, 10])
def test_constant_backoff_waits_the_same_delay_every_retry(retry_number: int) -> None:
    assert retry_delay(2.0, "constant", retry_number) == 2.0


@pytest.mark.parametrize(("retry_number", "wait"), [(1, 2.0), (2, 4.0), (3, 6.0), (10, 20.0)])
def test_linear_backoff_grows_by_delay_each_retry(retry_number: int, wait: float) -> None:
    assert retry_delay(2.0, "linear", retry_number) == wait


@pytest.mark.parametrize(
    ("retry_number", "wait"), [(1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 160.0)]
)
def test_exponential_backoff_doubles_each_retry(retry_number: int, wait: float) -> None:
    assert retry_delay(10.0, "exponential", retry_number) == wait


@pytest.mark.parametrize("backoff", BACKOFFS)
def test_zero_delay_never_waits(backoff: str) -> None:
    assert retry_delay(0.0, backoff, 5) == 0.0


def test_exponential_backoff_too_large_for_a_float_is_infinite_not_an_error() -> None:
    assert retry_delay(1.0, "exponential", 5000) == math.inf


@pytest.mark.parametrize("backoff", ["fibonacci", "Exponential", "", "expo"])
def test_unknown_backoff_raises_value_error_listing_the_allowed_ones(backoff: str) -> None:
    with pytest.raises(ValueError, match="invalid backoff") as info:
        retry_delay(1.0, backoff, 1)
    for name in BACKOFFS:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("retry_number", [0, -1, True, 1.0])
def test_retry_numbers_start_at_one(retry_number: Any) -> None:
    with pytest.raises(ValueError, match="retries are numbered 1, 2, 3"):
        retry_delay(1.0, "constant", retry_number)


@pytest.mark.parametrize(
    "when",
    [
        datetime.datetime(2030, 1, 1, tzinfo=UTC),
        datetime.datetime(2030, 1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
        datetime.datetime(2029, 12, 31, 19, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    ],
)
def test_aware_datetimes_become_the_same_epoch_whatever_their_zone(
    when: datetime.datetime,
) -> None:
    assert to_epoch(when) == 1893456000.0


def test_aware_datetime_keeps_microseconds() -> None:
    when = datetime.datetime(2030, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)
    assert to_epoch(when) == 1893456000.25


@pytest.mark.parametrize(("when", "epoch"), [(0, 0.0), (1893456000, 1893456000.0), (1.5, 1.5)])
def test_epoch_numbers_are_taken_as_is(when: float, epoch: float) -> None:
    result = to_epoch(when)
    assert result == epoch
    assert type(result) is float


def test_naive_datetime_is_rejected_with_advice_to_use_an_aware_one() -> None:
    with pytest.raises(ValueError, match="naive") as info:
        to_epoch(datetime.datetime(2030, 1, 1))
    assert "datetime.now(timezone.utc)" in str(info.value)


@pytest.mark.parametrize(
    "when",
    [
        "2030-01-01",
        None,
        True,
        math.nan,
        math.inf,
        datetime.date(2030, 1, 1),
        datetime.timedelta(seconds=5),
    ],
)
def test_other_wake_up_times_are_rejected_naming_what_is_allowed(when: Any) -> None:
    with pytest.raises(ValueError, match="invalid wake-up time") as info:
        to_epoch(when)
    assert "epoch seconds" in str(info.value)
