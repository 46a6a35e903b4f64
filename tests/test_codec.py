"""The JSON codec for step results, params and event payloads (SPEC 2.1, 4). No Redis needed."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import json
import math
from typing import Any
from zoneinfo import ZoneInfo

import dateutil.tz
import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal, assert_index_equal, assert_series_equal

from nbflow.codec import TAG, UnstorableValueError, decode, encode

UTC = datetime.UTC


def roundtrip(value: object) -> Any:
    return decode(encode(value))


def strict_loads(text: str) -> Any:
    """json.loads that refuses the non-standard NaN/Infinity tokens."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- plain JSON

PLAIN_VALUES = [
    None,
    True,
    False,
    0,
    -7,
    2**70,
    1.5,
    -0.0,
    1e-300,
    "",
    "hello",
    "ünïcødé ✓ 名前",
    [],
    {},
    [1, "two", 3.0, None, True],
    {"a": 1, "b": [1, 2, {"c": None}], "d": {"e": {"f": "g"}}},
    [{"id": i, "x": i / 2, "name": str(i)} for i in range(20)],
    {"$notreserved": 1, "nbflow": 2, "$": 3},
]


@pytest.mark.parametrize("value", PLAIN_VALUES)
def test_plain_json_values_round_trip_exactly(value: object) -> None:
    result = roundtrip(value)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize("value", PLAIN_VALUES)
def test_plain_json_values_are_stored_as_themselves_in_compact_form(value: object) -> None:
    assert encode(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_non_ascii_text_is_stored_unescaped() -> None:
    assert encode({"name": "José ✓"}) == '{"name":"José ✓"}'


def test_float_values_round_trip_bit_for_bit() -> None:
    values = [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, -2.5]
    assert roundtrip(values) == values


def test_tuples_come_back_as_lists() -> None:
    assert roundtrip((1, (2, 3), [4, (5,)])) == [1, [2, 3], [4, [5]]]
    assert roundtrip({"t": ()}) == {"t": []}


def test_dict_key_order_is_kept() -> None:
    value = {"z": 1, "a": 2, "m": 3}
    assert list(roundtrip(value)) == ["z", "a", "m"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_round_trip_without_bare_nan_tokens(value: float) -> None:
    text = encode(value)
    strict_loads(text)  # valid standard JSON
    assert strict_loads(text) == {TAG: "float", "value": repr(value)}
    result = roundtrip(value)
    assert isinstance(result, float)
    assert (math.isnan(result) and math.isnan(value)) or result == value


def test_nan_nested_in_plain_data_round_trips() -> None:
    result = roundtrip({"scores": [1.0, math.nan, math.inf], "n": 2})
    assert result["n"] == 2
    assert result["scores"][0] == 1.0
    assert math.isnan(result["scores"][1])
    assert result["scores"][2] == math.inf


def test_int_and_str_subclasses_are_stored_as_their_base_value() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    assert roundtrip([Color.RED, Name("x")]) == [1, "x"]


# --------------------------------------------------------------------------- reserved key


@pytest.mark.parametrize(
    "value",
    [
        {TAG: "bytes", "b64": "aGk="},
        {TAG: "datetime", "iso": "not really"},
        {TAG: 1},
        {TAG: {"nested": TAG}, "other": [1, 2]},
        {"outer": {TAG: "dict", "pairs": []}},
        [{TAG: None}, {TAG: [{TAG: "x"}]}],
        {TAG: b"raw", "when": datetime.date(2024, 1, 2)},
    ],
)
def test_user_dicts_using_the_reserved_key_round_trip(value: object) -> None:
    assert roundtrip(value) == value


def test_reserved_key_in_user_data_is_escaped_as_pairs() -> None:
    assert strict_loads(encode({TAG: "x", "a": 1})) == {
        TAG: "dict",
        "pairs": [[TAG, "x"], ["a", 1]],
    }


# --------------------------------------------------------------------------- special types


@pytest.mark.parametrize("value", [b"", b"hello", bytes(range(256)), b"\x00" * 1000])
def test_bytes_round_trip(value: bytes) -> None:
    result = roundtrip(value)
    assert result == value
    assert type(result) is bytes


def test_bytes_are_stored_as_base64_envelope() -> None:
    assert strict_loads(encode(b"hi")) == {TAG: "bytes", "b64": "aGk="}


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 1, 2, 3, 4, 5),
        datetime.datetime(2024, 1, 2, 3, 4, 5, 123456),
        datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime.datetime(1, 1, 1),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999999),
        datetime.datetime(
            2024, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))
        ),
        datetime.datetime(2024, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=-8))),
    ],
)
def test_datetimes_round_trip_with_microseconds_and_offset(value: datetime.datetime) -> None:
    result = roundtrip(value)
    assert result == value
    assert type(result) is datetime.datetime
    assert result.utcoffset() == value.utcoffset()
    assert (result.tzinfo is None) == (value.tzinfo is None)


def test_utc_datetime_comes_back_with_the_utc_singleton() -> None:
    assert roundtrip(datetime.datetime(2024, 1, 1, tzinfo=UTC)).tzinfo is UTC


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 7, 1, 12, tzinfo=ZoneInfo("Europe/Paris")),
        datetime.datetime(2024, 1, 1, 12, tzinfo=ZoneInfo("America/New_York")),
        # The repeated hour at the end of daylight saving time: fold=1 is the second one.
        datetime.datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
    ],
)
def test_zoneinfo_datetimes_come_back_in_their_named_zone(value: datetime.datetime) -> None:
    result = roundtrip(value)
    assert result == value
    assert result.tzinfo == value.tzinfo
    assert result.utcoffset() == value.utcoffset()
    assert result.replace(tzinfo=None) == value.replace(tzinfo=None)


def test_datetime_is_stored_as_iso_8601() -> None:
    value = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert strict_loads(encode(value)) == {TAG: "datetime", "iso": "2024-05-01T12:00:00+02:00"}


@pytest.mark.parametrize("value", [datetime.date(2024, 2, 29), datetime.date(1, 1, 1)])
def test_dates_round_trip_as_dates(value: datetime.date) -> None:
    result = roundtrip(value)
    assert result == value
    assert type(result) is datetime.date


@pytest.mark.parametrize(
    "value",
    [
        datetime.timedelta(0),
        datetime.timedelta(days=-1, microseconds=3),
        datetime.timedelta(days=999999999, seconds=86399, microseconds=999999),
    ],
)
def test_timedeltas_round_trip_exactly(value: datetime.timedelta) -> None:
    assert roundtrip(value) == value


def test_nested_mixture_of_special_types_round_trips() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    value = {
        "frame": frame,
        "blob": b"\x00\x01",
        "when": datetime.datetime(2024, 1, 1, tzinfo=UTC),
        "items": [(1, b"a"), {"nan": math.nan, TAG: "user"}],
    }
    result = roundtrip(value)
    assert_frame_equal(result["frame"], frame)
    assert result["blob"] == b"\x00\x01"
    assert result["when"] == value["when"]
    assert result["items"][0] == [1, b"a"]
    assert math.isnan(result["items"][1]["nan"])
    assert result["items"][1][TAG] == "user"


def test_numpy_scalars_are_stored_as_python_numbers() -> None:
    result = roundtrip([np.int64(3), np.float64(2.5), np.bool_(True), np.float32(0.5), np.uint8(7)])
    assert result == [3, 2.5, True, 0.5, 7]
    assert [type(v) for v in result] == [int, float, bool, float, int]
    assert math.isnan(roundtrip(np.float32("nan")))


# --------------------------------------------------------------------------- unstorable values


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (Opaque(), "Opaque"),
        (lambda: None, "function"),
        (1 + 2j, "complex"),
        (decimal.Decimal("1.5"), "Decimal"),
        (bytearray(b"x"), "bytearray"),
        (datetime.time(12, 0), "time"),
        (np.array([1, 2]), "ndarray"),
        ({"nested": [1, {"deeper": {1, 2}}]}, "set"),
        ({"a": math.nan, "b": Opaque()}, "Opaque"),
    ],
)
def test_unstorable_values_raise_naming_the_type_and_what_is_storable(
    value: object, type_name: str
) -> None:
    with pytest.raises(UnstorableValueError) as info:
        encode(value)
    message = str(info.value)
    assert f"cannot store a value of type {type_name!r}" in message
    assert "dict with str keys" in message
    assert "pandas.DataFrame/Series, bytes or datetime" in message


def test_unstorable_value_error_is_a_type_error() -> None:
    assert issubclass(UnstorableValueError, TypeError)
    with pytest.raises(TypeError):
        encode(object())


@pytest.mark.parametrize(
    ("value", "key_type"),
    [
        ({1: "a"}, "int"),
        ({1.5: "a"}, "float"),
        ({True: "a"}, "bool"),
        ({None: "a"}, "NoneType"),
        ({(1, 2): "a"}, "tuple"),
        ({"ok": 1, 2: "b"}, "int"),
        ([{"a": {3: "deep"}}], "int"),
        ([{"a": 1}, {"b": 2}, {4: "record"}], "int"),
        ({"x": [{b"k": 1}]}, "bytes"),
    ],
)
def test_dicts_with_non_str_keys_are_refused_not_stringified(value: object, key_type: str) -> None:
    with pytest.raises(UnstorableValueError) as info:
        encode(value)
    assert f"key of type {key_type!r}" in str(info.value)
    assert "dict keys must be str" in str(info.value)


def test_dict_subclasses_are_checked_like_dicts() -> None:
    assert roundtrip(collections.OrderedDict(a=1)) == {"a": 1}
    assert roundtrip(collections.defaultdict(list, {"a": [1]})) == {"a": [1]}
    with pytest.raises(UnstorableValueError, match="key of type 'int'"):
        encode(collections.OrderedDict({1: "a"}))
    with pytest.raises(UnstorableValueError, match="key of type 'int'"):
        encode({"wrapped": collections.Counter({1: 2})})


@pytest.mark.parametrize("container", ["list", "dict"])
def test_circular_references_are_refused_clearly(container: str) -> None:
    value: Any
    if container == "list":
        value = []
        value.append(value)
    else:
        value = {}
        value["self"] = [value]
    with pytest.raises(UnstorableValueError, match="contains itself"):
        encode(value)


def test_shared_sub_objects_are_fine() -> None:
    shared = {"k": [1, 2]}
    assert roundtrip([shared, shared, {"again": shared}]) == [shared, shared, {"again": shared}]


# --------------------------------------------------------------------------- decode


def test_decode_accepts_bytes_as_read_from_redis() -> None:
    assert decode(encode({"a": "é", "b": b"x"}).encode("utf-8")) == {"a": "é", "b": b"x"}


def test_decode_reads_json_written_by_other_tools() -> None:
    assert decode('{ "a" : [1, 2.5, null, true] }') == {"a": [1, 2.5, None, True]}


@pytest.mark.parametrize("value", [None, 3, ["{}"]])
def test_decode_rejects_non_text(value: Any) -> None:
    with pytest.raises(TypeError, match="str or bytes"):
        decode(value)


@pytest.mark.parametrize("text", ["", "{", "not json", "[1,]"])
def test_decode_rejects_invalid_json(text: str) -> None:
    with pytest.raises(ValueError):
        decode(text)


def test_decode_rejects_an_unknown_envelope_type_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown type 'pickle'") as info:
        decode('{"$nbflow": "pickle", "data": "..."}')
    assert "'bytes'" in str(info.value)
    assert "'dataframe'" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        '{"$nbflow": "bytes"}',
        '{"$nbflow": "bytes", "b64": "!!!"}',
        '{"$nbflow": "datetime", "iso": "yesterday"}',
        '{"$nbflow": "float", "value": "big"}',
        '{"$nbflow": "dict", "pairs": [[1]]}',
        '{"$nbflow": 5}',
    ],
)
def test_decode_rejects_malformed_envelopes(text: str) -> None:
    with pytest.raises(ValueError, match="envelope"):
        decode(text)


def test_text_mentioning_the_tag_inside_a_string_is_plain_data() -> None:
    value = {"note": 'the key "$nbflow" is reserved', "$nbflow!": 1}
    assert roundtrip(value) == value


# --------------------------------------------------------------------------- pandas

INDEX = pd.date_range("2024-01-01", periods=3, freq="D", name="day")


def frame_cases() -> list[Any]:
    return [
        pytest.param(pd.DataFrame({"a": [1, 2, 3]}), id="int64-rangeindex"),
        pytest.param(pd.DataFrame({"x": [1.5, np.nan, -np.inf, np.inf]}), id="float64-nan-inf"),
        pytest.param(pd.DataFrame({"x": np.array([1.5, np.nan], dtype="float32")}), id="float32"),
        pytest.param(pd.DataFrame({"b": [True, False, True]}), id="bool"),
        pytest.param(
            pd.DataFrame(
                {
                    "i8": np.array([1, -2], dtype="int8"),
                    "u64": np.array([0, 2**64 - 1], dtype="uint64"),
                    "i32": np.array([7, 8], dtype="int32"),
                }
            ),
            id="sized-ints",
        ),
        pytest.param(pd.DataFrame({"s": ["a", None, "c"]}), id="str-with-missing"),
        pytest.param(
            pd.DataFrame({"s": pd.Series(["a", None, "c"], dtype=object)}), id="object-str"
        ),
        pytest.param(
            pd.DataFrame(
                {
                    "o": pd.Series(
                        [{"k": [1, 2]}, [1, [2, 3]], None, math.nan, b"raw", 3, "s"],
                        dtype=object,
                    )
                }
            ),
            id="object-mixed",
        ),
        pytest.param(
            pd.DataFrame(
                {
                    "o": pd.Series(
                        [
                            datetime.datetime(2024, 1, 1, tzinfo=UTC),
                            datetime.date(2024, 1, 2),
                            pd.NA,
                            pd.NaT,
                        ],
                        dtype=object,
                    )
                }
            ),
            id="object-datetimes-and-missing-markers",
        ),
        pytest.param(
            pd.DataFrame(
                {"t": pd.to_datetime(["2024-01-01 00:00", "NaT", "2024-03-01 12:00"]).as_unit("ns")}
            ),
            id="datetime64ns-naive-nat",
        ),
        pytest.param(
            pd.DataFrame({"t": pd.to_datetime(["2024-01-01", "2024-03-01"]).as_unit("us")}),
            id="datetime64us-naive",
        ),
        pytest.param(
            pd.DataFrame(
                {"t": pd.date_range("2024-03-30", periods=3, freq="D", tz="Europe/Paris")}
            ),
            id="datetime64-tz-named",
        ),
        pytest.param(
            pd.DataFrame(
                {
                    "t": pd.DatetimeIndex(
                        ["2024-01-01 00:00:00.123456789", None], tz="UTC"
                    ).as_unit("ns")
                }
            ),
            id="datetime64ns-utc-nanoseconds",
        ),
        pytest.param(
            pd.DataFrame(
                {
                    "t": pd.date_range(
                        "2024-01-01",
                        periods=2,
                        tz=datetime.timezone(datetime.timedelta(hours=-3)),
                    )
                }
            ),
            id="datetime64-tz-fixed-offset",
        ),
        pytest.param(
            pd.DataFrame({"d": pd.to_timedelta([1, None, 3], unit="s")}), id="timedelta64"
        ),
        pytest.param(pd.DataFrame({"c": pd.Categorical(["a", "b", None, "a"])}), id="category"),
        pytest.param(
            pd.DataFrame({"c": pd.Categorical([3, 1, 2], categories=[3, 2, 1], ordered=True)}),
            id="category-ordered-int",
        ),
        pytest.param(pd.DataFrame({"n": pd.array([1, None, 3], dtype="Int64")}), id="Int64"),
        pytest.param(pd.DataFrame({"n": pd.array([1, None], dtype="UInt8")}), id="UInt8"),
        pytest.param(
            pd.DataFrame({"n": pd.array([True, None, False], dtype="boolean")}), id="boolean"
        ),
        pytest.param(
            pd.DataFrame({"n": pd.array([1.5, None, np.inf], dtype="Float64")}), id="Float64"
        ),
        pytest.param(
            pd.DataFrame({"s": pd.array(["x", None, "z"], dtype="string")}), id="string-NA"
        ),
        pytest.param(
            pd.DataFrame({"a": [1.0, 2.0, 3.0]}, index=INDEX), id="datetimeindex-with-freq"
        ),
        pytest.param(
            pd.DataFrame(
                {"a": [1, 2]}, index=pd.DatetimeIndex(["2024-01-05", "2023-02-01"], name="t")
            ),
            id="datetimeindex-no-freq",
        ),
        pytest.param(
            pd.DataFrame({"a": [1, 2]}, index=pd.Index(["r1", "r2"], name="row")),
            id="str-index-named",
        ),
        pytest.param(
            pd.DataFrame({"a": [1, 2]}, index=pd.Index(["x", "y"], dtype=object)),
            id="object-index",
        ),
        pytest.param(pd.DataFrame({"a": [1, 2, 3]}, index=[10, 5, 10]), id="int-index-dup"),
        pytest.param(pd.DataFrame({"a": [1, 2]}, index=[0.5, np.nan]), id="float-index-nan"),
        pytest.param(
            pd.DataFrame({"a": [1, 2]}, index=pd.RangeIndex(10, 14, 2, name="r")),
            id="rangeindex-step",
        ),
        pytest.param(
            pd.DataFrame([[1, "a"], [2, "b"]], columns=["dup", "dup"]), id="duplicate-columns"
        ),
        pytest.param(pd.DataFrame([[1, 2]], columns=[0, 1]), id="int-column-labels"),
        pytest.param(
            pd.DataFrame(
                np.arange(6).reshape(2, 3),
                columns=pd.MultiIndex.from_tuples(
                    [("a", 1), ("a", 2), ("b", 1)], names=["letter", "number"]
                ),
            ),
            id="multiindex-columns",
        ),
        pytest.param(
            pd.DataFrame(
                {"v": [1.0, 2.0, 3.0]},
                index=pd.MultiIndex.from_arrays(
                    [["x", "x", "y"], pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-01"])],
                    names=["key", "when"],
                ),
            ),
            id="multiindex-rows",
        ),
        pytest.param(pd.DataFrame(), id="empty"),
        pytest.param(pd.DataFrame({"a": pd.Series([], dtype="int64")}), id="zero-rows"),
        pytest.param(pd.DataFrame(index=pd.Index(["a", "b"])), id="zero-columns"),
        pytest.param(
            pd.DataFrame(
                {
                    "int": [1, 2, 3],
                    "float": [0.1, np.nan, 2.5],
                    "str": ["a", "b", None],
                    "when": pd.to_datetime(["2024-01-01", "NaT", "2024-01-03"]),
                    "cat": pd.Categorical(["lo", "hi", "lo"]),
                },
                index=INDEX,
            ),
            id="mixed-dtypes",
        ),
    ]


@pytest.mark.parametrize("frame", frame_cases())
def test_dataframes_round_trip_with_index_columns_and_dtypes(frame: pd.DataFrame) -> None:
    result = roundtrip(frame)
    assert isinstance(result, pd.DataFrame)
    assert_frame_equal(result, frame, check_exact=True)
    assert list(result.dtypes) == list(frame.dtypes)
    assert_index_equal(result.index, frame.index, exact=True)
    assert_index_equal(result.columns, frame.columns, exact=True)


@pytest.mark.parametrize("frame", frame_cases())
def test_dataframes_are_stored_as_standard_json(frame: pd.DataFrame) -> None:
    envelope = strict_loads(encode(frame))
    assert envelope[TAG] == "dataframe"
    assert len(envelope["data"]) == frame.shape[1]


def test_object_column_keeps_none_and_nan_apart() -> None:
    frame = pd.DataFrame({"o": pd.Series([None, math.nan, "x"], dtype=object)})
    cells = roundtrip(frame)["o"].tolist()
    assert cells[0] is None
    assert isinstance(cells[1], float) and math.isnan(cells[1])
    assert cells[2] == "x"


def test_object_column_keeps_lists_as_cells() -> None:
    frame = pd.DataFrame({"o": pd.Series([[1, 2], [3, 4]], dtype=object)})
    assert roundtrip(frame)["o"].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    "series",
    [
        pd.Series([1, 2, 3], name="n"),
        pd.Series([1.0, np.nan], index=["a", "b"], name=None),
        pd.Series(["x", None], name=("tuple", "name")),
        pd.Series([1.0, 2.0], index=pd.Index([("a", 1), ("b", 2)])),
        pd.Series(pd.Categorical(["a", "b"]), index=INDEX[:2], name=0),
        pd.Series(pd.array([1, None], dtype="Int64"), name="nullable"),
        pd.Series(pd.date_range("2024", periods=2, tz="America/New_York"), name="t"),
        pd.Series([], dtype="float64"),
    ],
)
def test_series_round_trip_with_name_index_and_dtype(series: pd.Series) -> None:
    result = roundtrip(series)
    assert isinstance(result, pd.Series)
    assert_series_equal(result, series, check_exact=True)
    assert_index_equal(result.index, series.index, exact=True)


@pytest.mark.parametrize(
    "index",
    [
        pd.Index(["a", "b"], name="letters"),
        pd.RangeIndex(3),
        INDEX,
        pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["l", "n"]),
        pd.CategoricalIndex(["x", "y", "x"]),
        pd.timedelta_range("1 day", periods=3, freq="D"),
    ],
)
def test_pandas_indexes_round_trip(index: pd.Index) -> None:
    result = roundtrip(index)
    assert_index_equal(result, index, exact=True)
    assert getattr(result, "freq", None) == getattr(index, "freq", None)


@pytest.mark.parametrize(
    "value",
    [
        pd.Timestamp("2024-01-01 00:00:00.123456789"),
        pd.Timestamp("2024-07-01 12:00", tz="Europe/Paris"),
        pd.Timestamp("2024-01-01", tz="UTC").as_unit("s"),
    ],
)
def test_pandas_timestamps_round_trip_with_nanoseconds_and_zone(value: pd.Timestamp) -> None:
    result = roundtrip(value)
    assert isinstance(result, pd.Timestamp)
    assert result == value
    assert result.unit == value.unit
    assert str(result.tz) == str(value.tz)


def test_pandas_missing_markers_round_trip() -> None:
    result = roundtrip([pd.NaT, pd.NA])
    assert result[0] is pd.NaT
    assert result[1] is pd.NA


@pytest.mark.parametrize(
    ("frame", "dtype"),
    [
        (pd.DataFrame({"z": [1 + 2j]}), "complex128"),
        (pd.DataFrame({"p": pd.period_range("2024-01", periods=2, freq="M")}), "period[M]"),
        (pd.DataFrame({"i": pd.arrays.IntervalArray.from_breaks([0, 1, 2])}), "interval"),
    ],
)
def test_unsupported_pandas_dtypes_are_refused_naming_the_dtype(
    frame: pd.DataFrame, dtype: str
) -> None:
    with pytest.raises(UnstorableValueError, match="cannot store pandas data of dtype") as info:
        encode(frame)
    assert dtype in str(info.value)
    assert "supported column dtypes are" in str(info.value)


def test_unstorable_cell_in_object_column_is_named() -> None:
    frame = pd.DataFrame({"o": pd.Series([{1, 2}], dtype=object)})
    with pytest.raises(UnstorableValueError, match="of type 'set'"):
        encode(frame)


def test_decoded_dataframe_is_independent_and_writable() -> None:
    frame = pd.DataFrame({"a": [1, 2], "s": ["x", "y"]})
    result = roundtrip(frame)
    result.loc[0, "a"] = 99
    assert frame.loc[0, "a"] == 1


# --------------------------------------------------------------------------- dateutil zones
#
# Stored as {"name": "tzfile('/usr/share/zoneinfo/...')"} these used to be unreadable
# (ZoneInfoNotFoundError at decode: the instance ended errored); now they round-trip.


@pytest.mark.parametrize(
    "tz",
    [
        pytest.param(dateutil.tz.gettz("Europe/Paris"), id="gettz"),
        pytest.param(dateutil.tz.tzutc(), id="tzutc"),
        pytest.param(dateutil.tz.tzoffset("EST5", -5 * 3600), id="tzoffset"),
        pytest.param(dateutil.tz.tzlocal(), id="tzlocal"),
    ],
)
def test_dateutil_datetimes_round_trip_in_their_zone(tz: datetime.tzinfo) -> None:
    value = datetime.datetime(2024, 7, 1, 12, 30, 5, 123, tzinfo=tz)
    result = roundtrip(value)
    assert result == value
    assert result.tzinfo == value.tzinfo
    assert type(result.tzinfo) is type(value.tzinfo)
    assert result.replace(tzinfo=None) == value.replace(tzinfo=None)


@pytest.mark.parametrize(
    "value",
    [
        pd.Timestamp("2024-07-01 12:00", tz="dateutil/Europe/Paris"),
        pd.Timestamp("2024-01-01 00:00:00.123456789", tz=dateutil.tz.gettz("America/New_York")),
    ],
)
def test_dateutil_timestamps_round_trip(value: pd.Timestamp) -> None:
    result = roundtrip(value)
    assert result == value
    assert result.unit == value.unit
    assert str(result.tz) == str(value.tz)


def test_dateutil_columns_and_indexes_round_trip() -> None:
    frame = pd.DataFrame(
        {"t": pd.date_range("2024-03-30", periods=3, freq="D", tz="dateutil/Europe/Paris")},
        index=pd.date_range("2024", periods=3, freq="h", tz=dateutil.tz.gettz("Asia/Tokyo")),
    )
    result = roundtrip(frame)
    assert_frame_equal(result, frame, check_exact=True)
    assert result["t"].dtype == frame["t"].dtype
    assert_index_equal(result.index, frame.index, exact=True)
    assert result.index.freq == frame.index.freq
    series = pd.Series(frame["t"].array, name="s")
    assert_series_equal(roundtrip(series), series, check_exact=True)


def test_a_time_zone_that_cannot_be_rebuilt_is_refused_at_store_time() -> None:
    class Custom(datetime.tzinfo):
        def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(hours=1)

        def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
            return datetime.timedelta(0)

    with pytest.raises(UnstorableValueError, match="cannot store a value of type 'Custom'") as info:
        encode(datetime.datetime(2024, 1, 1, tzinfo=Custom()))
    assert "dateutil" in str(info.value) and "zoneinfo.ZoneInfo" in str(info.value)
    with pytest.raises(UnstorableValueError, match="tzstr"):
        encode(datetime.datetime(2024, 1, 1, tzinfo=dateutil.tz.tzstr("EST5EDT")))


def test_dateutil_values_stored_by_an_earlier_version_are_readable_again() -> None:
    old = (
        '{"$nbflow":"timestamp","iso":"2024-07-01T12:00:00+02:00","unit":"us",'
        '"tz":{"name":"tzfile(\'/usr/share/zoneinfo/Europe/Paris\')"}}'
    )
    value = decode(old)
    assert value == pd.Timestamp("2024-07-01 12:00", tz="dateutil/Europe/Paris")
    assert str(value.tz) == str(dateutil.tz.gettz("Europe/Paris"))
