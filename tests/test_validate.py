"""Input checks of the public API: ids, event types, step names, step configs. No Redis needed."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest

from nbflow.validate import (
    DEFAULT_CONFIG,
    StepConfig,
    check_event_type,
    check_instance_id,
    check_step_name,
    resolve_step_config,
)

IDENTIFIER_CHECKS = [
    pytest.param(check_instance_id, "instance id", id="instance_id"),
    pytest.param(check_event_type, "event type", id="event_type"),
]


# --------------------------------------------------------------------------- ids, event types


@pytest.mark.parametrize(("check", "what"), IDENTIFIER_CHECKS)
@pytest.mark.parametrize(
    "value",
    ["a", "A", "0", "_", "order-42", "approved", "user_7-retry", "_private", "9lives", "x" * 100],
)
def test_valid_identifiers_are_returned_unchanged(
    check: Callable[[object], str], what: str, value: str
) -> None:
    assert check(value) == value


@pytest.mark.parametrize(("check", "what"), IDENTIFIER_CHECKS)
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "it is empty"),
        ("x" * 101, "101 characters long"),
        ("-leading-dash", "starts with '-'"),
        ("a:b", "':' at position 1"),
        ("has space", "' ' at position 3"),
        ("star*", "'*' at position 4"),
        ("café", "'é' at position 3"),
        ("dot.ted", "'.' at position 3"),
        ("slash/", "'/' at position 5"),
        ("trailing-newline\n", "'\\n' at position 16"),
    ],
)
def test_invalid_identifiers_say_what_is_wrong_and_what_is_allowed(
    check: Callable[[object], str], what: str, value: str, why: str
) -> None:
    with pytest.raises(ValueError) as info:
        check(value)
    message = str(info.value)
    assert message.startswith(f"invalid {what}")
    assert why in message
    assert "a-z, A-Z, 0-9, '_' and '-'" in message
    assert "1-100 characters" in message


@pytest.mark.parametrize(("check", "what"), IDENTIFIER_CHECKS)
@pytest.mark.parametrize("value", [None, 42, b"order-1", ["a"], 1.5])
def test_non_str_identifiers_raise_value_error_naming_the_type(
    check: Callable[[object], str], what: str, value: object
) -> None:
    with pytest.raises(ValueError, match="not a str") as info:
        check(value)
    assert type(value).__name__ in str(info.value)
    assert "a-z, A-Z, 0-9" in str(info.value)


# --------------------------------------------------------------------------- step names


@pytest.mark.parametrize(
    "name",
    [
        "fetch user",
        "charge card",
        "x",
        "x" * 256,
        "step: 1/3 (retry?)",
        "名前 ✓ émoji 🎉",
        "no-break\u00a0space",
        "  leading and trailing spaces  ",
    ],
)
def test_valid_step_names_are_returned_unchanged(name: str) -> None:
    assert check_step_name(name) == name


@pytest.mark.parametrize(
    ("name", "char"),
    [
        ("line\nbreak", "'\\n'"),
        ("tab\there", "'\\t'"),
        ("nul\x00", "'\\x00'"),
        ("escape\x1b[0m", "'\\x1b'"),
        ("delete\x7f", "'\\x7f'"),
        ("c1 control \x85", "'\\x85'"),
        ("\r", "'\\r'"),
    ],
)
def test_step_names_with_control_characters_are_rejected(name: str, char: str) -> None:
    with pytest.raises(ValueError, match="control character") as info:
        check_step_name(name)
    assert char in str(info.value)
    assert "printable characters" in str(info.value)


def test_empty_step_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="it is empty; use 1-256 characters"):
        check_step_name("")


def test_step_name_longer_than_256_characters_is_rejected() -> None:
    with pytest.raises(ValueError, match="257 characters long; use at most 256 characters"):
        check_step_name("x" * 257)


@pytest.mark.parametrize("name", [None, 3, b"bytes", ("a",)])
def test_non_str_step_name_is_rejected_naming_its_type(name: object) -> None:
    with pytest.raises(ValueError, match="not a str") as info:
        check_step_name(name)
    assert type(name).__name__ in str(info.value)
    assert "1-256 characters" in str(info.value)


# --------------------------------------------------------------------------- StepConfig


def test_default_config_is_the_spec_default() -> None:
    assert DEFAULT_CONFIG == StepConfig(
        retry_limit=5, retry_delay=10.0, backoff="exponential", timeout=600.0
    )


def test_step_config_as_dict_has_the_user_facing_shape_in_seconds() -> None:
    assert DEFAULT_CONFIG.as_dict() == {
        "retries": {"limit": 5, "delay": 10.0, "backoff": "exponential"},
        "timeout": 600.0,
    }


def test_step_config_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_CONFIG.retry_limit = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    "config",
    [
        DEFAULT_CONFIG,
        StepConfig(0, 0.0, "constant", 0.5),
        StepConfig(3, 2.5, "linear", 30.0),
    ],
)
def test_as_dict_resolves_back_to_an_equal_config(config: StepConfig) -> None:
    assert resolve_step_config(config.as_dict()) == config


# --------------------------------------------------------------------------- resolve_step_config


@pytest.mark.parametrize("config", [None, {}, MappingProxyType({})])
def test_missing_or_empty_config_is_the_shared_default(config: Any) -> None:
    assert resolve_step_config(config) is DEFAULT_CONFIG


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"retries": {"limit": 0}}, StepConfig(0, 10.0, "exponential", 600.0)),
        ({"retries": {"delay": "2 seconds"}}, StepConfig(5, 2.0, "exponential", 600.0)),
        ({"retries": {"backoff": "linear"}}, StepConfig(5, 10.0, "linear", 600.0)),
        ({"retries": {}}, DEFAULT_CONFIG),
        ({"timeout": "30 seconds"}, StepConfig(5, 10.0, "exponential", 30.0)),
        (
            {
                "retries": {"limit": 3, "delay": "2 seconds", "backoff": "exponential"},
                "timeout": "30 seconds",
            },
            StepConfig(3, 2.0, "exponential", 30.0),
        ),
        (
            {"retries": {"limit": 1, "delay": 0, "backoff": "constant"}, "timeout": 0.25},
            StepConfig(1, 0.0, "constant", 0.25),
        ),
        (
            {
                "retries": {"delay": datetime.timedelta(milliseconds=250)},
                "timeout": datetime.timedelta(hours=1),
            },
            StepConfig(5, 0.25, "exponential", 3600.0),
        ),
        ({"retries": {"limit": 1000}}, StepConfig(1000, 10.0, "exponential", 600.0)),
    ],
)
def test_partial_configs_merge_over_the_defaults(
    config: dict[str, Any], expected: StepConfig
) -> None:
    assert resolve_step_config(config) == expected


def test_config_may_be_any_mapping() -> None:
    config = MappingProxyType({"retries": MappingProxyType({"limit": 2})})
    assert resolve_step_config(config).retry_limit == 2


def test_resolving_does_not_modify_the_users_config() -> None:
    config: dict[str, Any] = {"retries": {"limit": 1}}
    resolve_step_config(config)
    assert config == {"retries": {"limit": 1}}


@pytest.mark.parametrize(
    ("config", "key", "hint"),
    [
        ({"retry": {"limit": 1}}, "'retry'", "did you mean 'retries'?"),
        ({"timeout": "1 second", "timeouts": 2}, "'timeouts'", "did you mean 'timeout'?"),
        ({"name": "x"}, "'name'", ""),
        ({1: "x"}, "1", ""),
    ],
)
def test_unknown_top_level_keys_are_named_with_the_allowed_ones(
    config: dict[Any, Any], key: str, hint: str
) -> None:
    with pytest.raises(ValueError, match="unknown step config key") as info:
        resolve_step_config(config)
    message = str(info.value)
    assert key in message
    assert hint in message
    assert "allowed keys are 'retries', 'timeout'" in message


@pytest.mark.parametrize(
    ("retries", "key", "hint"),
    [
        ({"limits": 1}, "'limits'", "did you mean 'limit'?"),
        ({"delays": "1 second"}, "'delays'", "did you mean 'delay'?"),
        ({"back_off": "linear"}, "'back_off'", "did you mean 'backoff'?"),
        ({"jitter": True}, "'jitter'", ""),
    ],
)
def test_unknown_retries_keys_are_named_with_the_allowed_ones(
    retries: dict[str, Any], key: str, hint: str
) -> None:
    with pytest.raises(ValueError, match="unknown step config 'retries' key") as info:
        resolve_step_config({"retries": retries})
    message = str(info.value)
    assert key in message
    assert hint in message
    assert "allowed keys are 'limit', 'delay', 'backoff'" in message


@pytest.mark.parametrize("limit", [-1, -100, True, False, 1.0, 2.5, "3", None])
def test_retry_limit_must_be_a_non_negative_int(limit: Any) -> None:
    with pytest.raises(ValueError, match="retries.limit") as info:
        resolve_step_config({"retries": {"limit": limit}})
    assert "non-negative int" in str(info.value)


@pytest.mark.parametrize("delay", ["soon", "-1 seconds", -1, None, True, [1]])
def test_retry_delay_must_be_a_duration(delay: Any) -> None:
    with pytest.raises(ValueError, match="'retries.delay': invalid duration") as info:
        resolve_step_config({"retries": {"delay": delay}})
    assert '"5 seconds"' in str(info.value)


@pytest.mark.parametrize("backoff", ["fibonacci", "Exponential", "", None, 2])
def test_backoff_must_be_one_of_the_three_strategies(backoff: Any) -> None:
    with pytest.raises(ValueError, match="retries.backoff") as info:
        resolve_step_config({"retries": {"backoff": backoff}})
    assert "'constant', 'linear', 'exponential'" in str(info.value)


@pytest.mark.parametrize("timeout", [0, 0.0, "0 seconds", "0 ms", datetime.timedelta(0)])
def test_zero_timeout_is_rejected(timeout: Any) -> None:
    with pytest.raises(ValueError, match="'timeout'") as info:
        resolve_step_config({"timeout": timeout})
    assert "greater than zero" in str(info.value)


@pytest.mark.parametrize(
    "timeout", [-1, "-5 seconds", datetime.timedelta(seconds=-1), "forever", None, True]
)
def test_negative_or_malformed_timeout_is_rejected(timeout: Any) -> None:
    with pytest.raises(ValueError, match="'timeout': invalid duration") as info:
        resolve_step_config({"timeout": timeout})
    assert '"10 minutes"' in str(info.value) or '"5 seconds"' in str(info.value)


@pytest.mark.parametrize("config", [[("retries", {})], "retries", 5, True, {"retries"}])
def test_config_that_is_not_a_mapping_is_rejected_with_an_example(config: Any) -> None:
    with pytest.raises(ValueError, match="not a mapping") as info:
        resolve_step_config(config)
    assert '{"retries": {"limit": 3' in str(info.value)


@pytest.mark.parametrize("retries", [None, 3, [1, 2], "limit=3"])
def test_retries_that_is_not_a_mapping_is_rejected_with_an_example(retries: Any) -> None:
    with pytest.raises(ValueError, match="'retries'.*not a mapping") as info:
        resolve_step_config({"retries": retries})
    assert '{"limit": 3' in str(info.value)
