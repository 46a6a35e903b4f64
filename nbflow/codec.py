"""JSON with tagged envelopes: how step results, params and event payloads are stored.

Values live in Redis as JSON text so that any tool -- ``redis-cli``, another
language, a notebook without nbflow -- can read them (SPEC 4); pickle is never
used, because unpickling runs code and ties the data to one Python's classes.

Plain JSON values are stored as themselves. Everything else that nbflow can
store becomes an *envelope*: a JSON object whose reserved key ``"$nbflow"``
names the type, for example::

    {"$nbflow": "bytes", "b64": "aGk="}
    {"$nbflow": "datetime", "iso": "2024-05-01T12:00:00+02:00"}
    {"$nbflow": "float", "value": "nan"}
    {"$nbflow": "dict", "pairs": [["$nbflow", "user data"], ["a", 1]]}
    {"$nbflow": "dataframe", "index": {...}, "columns": {...}, "data": [...]}

A user dict that itself has a ``"$nbflow"`` key is stored as a ``dict``
envelope of key/value *pairs*, so the user's key never appears as an object
key and can never be mistaken for a tag.

Speed matters -- this runs for every step, event and param. ``encode`` checks
the containers' key types with C-level set operations, then makes one
``json.dumps``-style call whose ``default`` hook only fires for the special
types; ``decode`` is one ``json.loads`` and only installs its envelope hook
when the text contains ``"$nbflow"`` at all.

pandas is imported lazily: a process that never handles a DataFrame (e.g. a
worker running plain steps) does not pay for importing it.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import sys
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, Final
from zoneinfo import ZoneInfo

__all__ = ["TAG", "ArtifactRef", "ArtifactSummary", "UnstorableValueError", "decode", "encode"]

#: The reserved object key that marks an envelope.
TAG: Final = "$nbflow"

_STORABLE: Final = (
    "results must be JSON-like (dict with str keys, list, str, int, float, bool, None), "
    "pandas.DataFrame/Series, bytes or datetime"
)


class UnstorableValueError(TypeError):
    """A value nbflow cannot store as JSON (a set, an arbitrary object, a dict with int keys...).

    A ``TypeError`` because the problem is the value's type, and that is what the
    engine catches: the step protocol, the runner and ``Workflow.create`` /
    ``send_event`` wrap only their ``codec.encode`` call in ``except TypeError``
    (fail the step or instance at once, no retries; reject params or payloads),
    so no ``TypeError`` from user code can reach those handlers.  The subclass
    is there for callers who want to name this case precisely, e.g.
    ``pytest.raises(UnstorableValueError)``.
    """


def _unstorable(value: object) -> UnstorableValueError:
    """Build the standard message, naming the offending type and what is storable instead."""
    return UnstorableValueError(
        f"cannot store a value of type {type(value).__name__!r}: {_STORABLE}"
    )


# --------------------------------------------------------------------------- scalars


def _float_envelope(value: float) -> dict[str, object]:
    """NaN and infinities have no JSON spelling (bare ``NaN`` is not JSON), so tag them."""
    text = "nan" if value != value else ("inf" if value > 0 else "-inf")
    return {TAG: "float", "value": text}


_DATEUTIL_ZONES: Final = "zoneinfo/"
_TIME_ZONES: Final = (
    "time zones must be zoneinfo.ZoneInfo, datetime.timezone, pytz, or dateutil's "
    "tz.gettz(name) / tzutc() / tzoffset() / tzlocal()"
)


def _dateutil_spec(tz: datetime.tzinfo) -> dict[str, object] | None:
    """A dateutil time zone as a spec, or None if ``tz`` is not one nbflow can rebuild.

    ``tz.gettz("Europe/Paris")`` and pandas' ``tz="dateutil/Europe/Paris"`` are a
    ``tzfile`` read from a file whose path ends in the zone's name; ``tzutc``,
    ``tzoffset`` and ``tzlocal`` are kept as what they are.  (Stored as a plain
    ``{"name": str(tz)}`` they used to come back as ``ZoneInfoNotFoundError``.)
    """
    module = sys.modules.get("dateutil.tz")
    if module is None or not type(tz).__module__.startswith("dateutil"):
        return None
    if isinstance(tz, module.tzutc):
        return {"dateutil": "UTC"}
    if isinstance(tz, module.tzlocal):
        return {"dateutil": "local"}
    if isinstance(tz, module.tzoffset):
        offset = tz.utcoffset(None)
        name = tz.tzname(None)
        if offset is None:
            return None
        return {"dateutil_offset": int(offset.total_seconds()), "name": name}
    if isinstance(tz, module.tzfile):
        path = str(getattr(tz, "_filename", "") or "")
        key = path.rpartition(_DATEUTIL_ZONES)[2] if _DATEUTIL_ZONES in path else path
        if key and not key.startswith("/") and module.gettz(key) == tz:
            return {"dateutil": key}
    return None


def _tz_spec(tz: datetime.tzinfo | None, value: object = None) -> dict[str, object] | None:
    """Describe a time zone so it can be rebuilt: a zone name if it has one, else an offset.

    An ISO string keeps only the UTC offset; keeping the zone name too means an
    ``Europe/Paris`` datetime comes back in ``Europe/Paris`` (and DST rules).  A time
    zone that cannot be rebuilt exactly is refused (``UnstorableValueError``) rather
    than stored in a form that cannot be read back.
    """
    if tz is None:
        return None
    if isinstance(tz, ZoneInfo):
        return {"zone": tz.key}
    zone = getattr(tz, "zone", None)  # pytz
    if isinstance(zone, str):
        return {"zone": zone}
    if isinstance(tz, datetime.timezone):
        seconds = tz.utcoffset(None).total_seconds()
        return {"offset": int(seconds) if seconds.is_integer() else seconds}
    spec = _dateutil_spec(tz)
    if spec is not None:
        return spec
    held = "" if value is None else f" in a value of type {type(value).__name__!r}"
    raise UnstorableValueError(
        f"cannot store a value of type {type(tz).__name__!r} (the time zone {tz!r}{held}): "
        f"{_TIME_ZONES}; {_STORABLE}"
    )


def _tz_from_spec(spec: dict[str, Any]) -> datetime.tzinfo:
    """Inverse of :func:`_tz_spec`; ``ValueError`` for a zone this machine does not know."""
    if "zone" in spec:
        return ZoneInfo(spec["zone"])
    if "offset" in spec:
        # timezone(timedelta(0)) is the datetime.timezone.utc singleton.
        return datetime.timezone(datetime.timedelta(seconds=spec["offset"]))
    if "dateutil" in spec or "dateutil_offset" in spec:
        from dateutil import tz as dateutil_tz  # type: ignore[import-untyped, unused-ignore]

        made: datetime.tzinfo | None
        key = str(spec.get("dateutil", ""))
        if "dateutil_offset" in spec:
            made = dateutil_tz.tzoffset(spec.get("name"), spec["dateutil_offset"])
        elif key == "UTC":
            made = dateutil_tz.tzutc()
        elif key == "local":
            made = dateutil_tz.tzlocal()
        else:
            made = dateutil_tz.gettz(key)
        if made is None:
            raise ValueError(f"dateutil knows no time zone {key!r} on this machine")
        return made
    # written by an older nbflow as {"name": str(tz)}: dateutil zones are readable again
    name = str(spec.get("name"))
    if name.startswith("tzfile(") and _DATEUTIL_ZONES in name:
        key = name.rpartition(_DATEUTIL_ZONES)[2].rstrip("')\"")
        return _tz_from_spec({"dateutil": key})
    if name == "tzutc()":
        return _tz_from_spec({"dateutil": "UTC"})
    raise ValueError(f"time zone {name!r} cannot be rebuilt")


def _encode_datetime(value: datetime.datetime) -> dict[str, object]:
    """ISO 8601 keeps microseconds and the UTC offset; the zone name rides alongside."""
    envelope: dict[str, object] = {TAG: "datetime", "iso": value.isoformat()}
    spec = _tz_spec(value.tzinfo, value)
    if spec is not None and "offset" not in spec:
        envelope["tz"] = spec
    return envelope


def _encode_bytes(value: bytes) -> dict[str, object]:
    return {TAG: "bytes", "b64": base64.b64encode(value).decode("ascii")}


def _encode_date(value: datetime.date) -> dict[str, object]:
    return {TAG: "date", "iso": value.isoformat()}


def _encode_timedelta(value: datetime.timedelta) -> dict[str, object]:
    # Three ints rather than total_seconds(): exact for any timedelta.
    return {
        TAG: "timedelta",
        "days": value.days,
        "seconds": value.seconds,
        "microseconds": value.microseconds,
    }


def _size_text(n: int) -> str:
    """Bytes as a short decimal size: ``96 MB``, ``1.5 kB``, ``12 B``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(size)} B"
            return f"{size:.0f} {unit}" if size >= 10 else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class ArtifactSummary(str):
    """What ``steps()`` shows for a result stored as an artifact: a one-line summary
    such as ``DataFrame 1,000,000 × 12 (96 MB)`` (a ``str``, so it compares and prints
    as text), with the reference itself as ``.ref``.  Showing it never loads the data."""

    ref: ArtifactRef

    def __new__(cls, ref: ArtifactRef) -> ArtifactSummary:
        obj = super().__new__(cls, ref.summary())
        obj.ref = ref
        return obj

    def __repr__(self) -> str:
        return str(self)


class ArtifactRef:
    """Where a large value is stored instead of Redis (``nbflow.artifacts``), as Redis keeps
    it: the envelope ``{"$nbflow": "artifact", "url": ..., "format": "parquet"|"json",
    "bytes": ..., "sha256": ..., "type": ..., "rows"/"columns" (frames), "mem" (bytes in
    memory), "host" (who wrote it)}``, well under 1 KB.

    Decoding stored JSON gives this object, never the value: whoever hands a value to a
    user loads it (``ArtifactStore.load``), and listings show ``summary()``.  ``url``
    comes first in the envelope, so the Lua scripts find it with an anchored match.
    """

    __slots__ = ("url", "format", "size", "sha256", "meta")

    def __init__(self, url: str, format: str, size: int, sha256: str, **meta: Any) -> None:
        self.url = url
        self.format = format
        self.size = size
        self.sha256 = sha256
        self.meta = meta

    def envelope(self) -> dict[str, object]:
        return {
            TAG: "artifact",
            "url": self.url,
            "format": self.format,
            "bytes": self.size,
            "sha256": self.sha256,
            **self.meta,
        }

    def summary(self) -> str:
        """``DataFrame 1,000,000 × 12 (96 MB)``, ``Series 5,000 (40 kB)``, ``list (3.2 MB)``:
        the size in memory when known, else the size stored."""
        kind = str(self.meta.get("type", "value"))
        size = _size_text(int(self.meta.get("mem", self.size)))
        if "rows" in self.meta and "columns" in self.meta:
            return f"{kind} {self.meta['rows']:,} × {self.meta['columns']:,} ({size})"
        if "rows" in self.meta:
            return f"{kind} {self.meta['rows']:,} ({size})"
        return f"{kind} ({size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArtifactRef) and other.envelope() == self.envelope()

    def __hash__(self) -> int:
        return hash((self.url, self.sha256))

    def __repr__(self) -> str:
        return f"<artifact {self.summary()} at {self.url}>"


# Exact-type dispatch for the common special types: one dict lookup, no isinstance chain.
_SIMPLE_ENCODERS: Final[dict[type, Callable[[Any], dict[str, object]]]] = {
    bytes: _encode_bytes,
    datetime.datetime: _encode_datetime,
    datetime.date: _encode_date,
    datetime.timedelta: _encode_timedelta,
    ArtifactRef: ArtifactRef.envelope,
}


def _default(value: object) -> object:
    """``json`` calls this for anything it cannot encode itself; it returns a JSON-able stand-in.

    Whatever it returns must already be pure JSON (str keys, no NaN): the fast
    and the slow path both rely on that.
    """
    encoder = _SIMPLE_ENCODERS.get(type(value))
    if encoder is not None:
        return encoder(value)
    if "pandas" in sys.modules:  # if pandas was never imported, value cannot be a pandas object
        envelope = _encode_pandas(value)
        if envelope is not None:
            return envelope
    # Subclasses (checked after pandas, since pandas.Timestamp subclasses datetime).
    if isinstance(value, datetime.datetime):
        return _encode_datetime(value)
    if isinstance(value, datetime.date):
        return _encode_date(value)
    if isinstance(value, datetime.timedelta):
        return _encode_timedelta(value)
    if isinstance(value, bytes):
        return _encode_bytes(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.integer | numpy.floating | numpy.bool_):
        # numpy scalars become the equal Python number (np.float64 never gets here:
        # it subclasses float and json encodes it directly).
        return _to_json(value.item(), set())
    raise _unstorable(value)


# --------------------------------------------------------------------------- encode

_JSON_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_STR_ONLY: Final = frozenset({str})
_DICT_ONLY: Final = frozenset({dict})


def _needs_slow_path(value: object) -> bool:
    """Return True if ``json.dumps`` alone would store ``value`` wrongly.

    That is the case for a dict with a non-str key (json would silently turn
    ``1`` into ``"1"``), a dict with the reserved ``"$nbflow"`` key, and dict or
    list *subclasses* (json encodes those natively, skipping both checks).
    Per container the work is C-level set operations; a Python-level loop only
    runs over containers that hold other containers, and a list of flat dicts
    (records, the usual table-like result) is checked in one batch. NaN and
    circular references are left to ``json`` itself, which raises ``ValueError``.
    """
    stack: list[Any] = [value]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        kind = type(obj)
        children: Iterable[object]
        if kind is dict:
            if TAG in obj or not _STR_ONLY.issuperset(map(type, obj)):
                return True
            children = obj.values()
        elif kind is list or kind is tuple:
            children = obj
        else:
            # Only the top-level value can get here; a dict/list subclass needs the slow path.
            return isinstance(obj, dict | list | tuple)
        if _JSON_SCALARS.issuperset(map(type, children)):
            continue
        if kind is not dict and _DICT_ONLY.issuperset(map(type, obj)):
            # A list of dicts (records, the usual table-like result): check all their
            # keys, then all their values, in one C-level pass each.
            keys: set[object] = set(chain.from_iterable(obj))
            if TAG in keys or not _STR_ONLY.issuperset(map(type, keys)):
                return True
            if _JSON_SCALARS.issuperset(map(type, chain.from_iterable(map(dict.values, obj)))):
                continue
        if id(obj) in seen:  # a container seen before: shared, or a cycle (json reports those)
            continue
        seen.add(id(obj))
        for child in children:
            child_kind = type(child)
            if child_kind is dict or child_kind is list or child_kind is tuple:
                stack.append(child)
            elif child_kind not in _JSON_SCALARS and isinstance(child, dict | list | tuple):
                return True
    return False


def _to_json(value: object, active: set[int]) -> object:
    """Slow path: rebuild ``value`` as pure JSON data, enveloping whatever needs it.

    ``active`` holds the ids of the containers being converted (the current
    path), to turn a circular reference into a clear error instead of a
    ``RecursionError``.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum and friends: store the number
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else _float_envelope(value)
    if isinstance(value, dict | list | tuple):
        marker = id(value)
        if marker in active:
            raise UnstorableValueError(
                f"cannot store a {type(value).__name__} that contains itself "
                f"(circular reference): {_STORABLE}"
            )
        active.add(marker)
        try:
            if isinstance(value, dict):
                for key in value:
                    if not isinstance(key, str):
                        raise UnstorableValueError(
                            f"cannot store a dict with a key of type {type(key).__name__!r} "
                            f"({key!r}): dict keys must be str; {_STORABLE}"
                        )
                if TAG in value:
                    return {
                        TAG: "dict",
                        "pairs": [[str(k), _to_json(v, active)] for k, v in value.items()],
                    }
                return {str(k): _to_json(v, active) for k, v in value.items()}
            return [_to_json(item, active) for item in value]
        finally:
            active.discard(marker)
    return _default(value)


_FAST_ENCODE: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
).encode
_PLAIN_ENCODE: Final = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def encode(value: object) -> str:
    """Return ``value`` as compact JSON text that :func:`decode` turns back into an equal value.

    Storable: None, bool, int, float (NaN and infinities included), str, list,
    tuple (comes back as a list), dict with str keys, bytes, datetime.datetime
    (naive or aware), datetime.date, datetime.timedelta, pandas.DataFrame,
    pandas.Series, pandas.Index, pandas.Timestamp, and any nesting of these.
    numpy numbers are stored as the equal Python number.

    Raises :class:`UnstorableValueError` (a ``TypeError``) naming the type for
    anything else, including a dict with a non-str key -- ``json`` would turn
    ``{1: "a"}`` into ``{"1": "a"}``, so it would come back different.
    """
    if not _needs_slow_path(value):
        try:
            return _FAST_ENCODE(value)
        except ValueError:
            pass  # NaN/infinity or a circular reference: the slow path handles or names it
    return _PLAIN_ENCODE(_to_json(value, set()))


# --------------------------------------------------------------------------- decode


def _decode_dict(envelope: dict[str, Any]) -> object:
    return {key: item for key, item in envelope["pairs"]}


def _decode_float(envelope: dict[str, Any]) -> object:
    text = envelope["value"]
    if text not in ("nan", "inf", "-inf"):
        raise ValueError(f"unknown float value {text!r}")
    return float(text)


def _decode_datetime(envelope: dict[str, Any]) -> object:
    value = datetime.datetime.fromisoformat(envelope["iso"])
    if "tz" in envelope and value.tzinfo is not None:
        try:
            tz = _tz_from_spec(envelope["tz"])
        except (KeyError, ValueError):  # zone unknown on this machine: keep the UTC offset
            return value
        value = value.astimezone(tz)
    return value


def _decode_date(envelope: dict[str, Any]) -> object:
    return datetime.date.fromisoformat(envelope["iso"])


def _decode_timedelta(envelope: dict[str, Any]) -> object:
    return datetime.timedelta(
        days=envelope["days"], seconds=envelope["seconds"], microseconds=envelope["microseconds"]
    )


def _decode_bytes(envelope: dict[str, Any]) -> object:
    return base64.b64decode(envelope["b64"], validate=True)


def _decode_tuple(envelope: dict[str, Any]) -> object:
    return tuple(envelope["items"])


# --------------------------------------------------------------------------- pandas
#
# A DataFrame is stored column by column, each column as an array envelope that
# keeps its dtype; the index and the column labels are index envelopes. Arrays
# are emitted with ndarray.tolist() (C speed) and, because json decodes
# innermost objects first, arrive at decode time already rebuilt, so the frame
# is assembled from finished arrays. Missing values: NaN in a float column is
# ``null``; NaT is stored as its int64 sentinel; pandas.NA in a nullable
# column is ``null``.

_SUPPORTED_DTYPES: Final = (
    "supported column dtypes are bool, int*, uint*, float*, object, str/string, "
    "datetime64 (naive or tz-aware), timedelta64, category, and the nullable "
    "Int*/UInt*/Float*/boolean"
)


def _label_to_json(label: object, active: set[int]) -> object:
    """Index labels and names may be tuples (MultiIndex columns); keep them tuples."""
    if isinstance(label, tuple):
        return {TAG: "tuple", "items": [_label_to_json(item, active) for item in label]}
    return _to_json(label, active)


def _float_list(array: Any) -> list[object]:
    """A float array as a JSON list: NaN as null, infinities as float envelopes."""
    import numpy as np

    values: list[Any] = array.tolist()
    if not np.isfinite(array).all():
        values = [
            None if v != v else (v if math.isfinite(v) else _float_envelope(v)) for v in values
        ]
    return values


def _encode_array(data: Any, labels: bool = False) -> dict[str, object]:
    """Envelope for the values of a Series, an Index or a DataFrame column, keeping the dtype."""
    import numpy as np
    import pandas as pd

    dtype = data.dtype
    if isinstance(dtype, np.dtype):
        array = data.to_numpy()
        kind = dtype.kind
        if kind in "iub":
            return {TAG: "ndarray", "dtype": str(dtype), "values": array.tolist()}
        if kind == "f":
            return {TAG: "ndarray", "dtype": str(dtype), "values": _float_list(array)}
        if kind in "Mm":
            # int64 ticks are exact at any resolution; NaT is the int64 minimum.
            return {TAG: "ndarray", "dtype": str(dtype), "i8": array.view("i8").tolist()}
        if kind == "O":
            cell = _label_to_json if labels else _to_json
            active: set[int] = set()
            return {
                TAG: "ndarray",
                "dtype": "object",
                "values": [cell(value, active) for value in array.tolist()],
            }
    elif isinstance(dtype, pd.CategoricalDtype):
        categorical = data.array
        return {
            TAG: "categorical",
            "categories": _encode_index(dtype.categories),
            "ordered": bool(dtype.ordered),
            "codes": categorical.codes.tolist(),
        }
    elif isinstance(dtype, pd.DatetimeTZDtype):
        utc = np.asarray(data.array.tz_convert(None))  # naive UTC, datetime64[unit]
        return {
            TAG: "datetimes",
            "unit": dtype.unit,
            "tz": _tz_spec(dtype.tz, data),
            "i8": utc.view("i8").tolist(),
        }
    elif isinstance(dtype, pd.StringDtype):
        return {
            TAG: "strings",
            "storage": dtype.storage,
            "na": "nan" if dtype.na_value is not pd.NA else "NA",
            "values": data.array.to_numpy(dtype=object, na_value=None).tolist(),
        }
    elif isinstance(
        data.array, pd.arrays.IntegerArray | pd.arrays.FloatingArray | pd.arrays.BooleanArray
    ):
        masked: Any = data.array
        values = masked.to_numpy(dtype=object, na_value=None).tolist()
        if isinstance(masked, pd.arrays.FloatingArray):
            values = [v if v is None or math.isfinite(v) else _float_envelope(v) for v in values]
        return {TAG: "masked", "dtype": dtype.name, "values": values}
    raise UnstorableValueError(
        f"cannot store pandas data of dtype {str(dtype)!r}: {_SUPPORTED_DTYPES}"
    )


def _encode_index(index: Any) -> dict[str, object]:
    """Envelope for any pandas Index; RangeIndex stays a range, frequencies are kept."""
    import pandas as pd

    active: set[int] = set()
    name = _label_to_json(index.name, active)
    if isinstance(index, pd.MultiIndex):
        return {
            TAG: "multiindex",
            "names": [_label_to_json(n, active) for n in index.names],
            "levels": [_encode_index(level) for level in index.levels],
            "codes": [codes.tolist() for codes in index.codes],
        }
    if isinstance(index, pd.RangeIndex):
        return {
            TAG: "rangeindex",
            "name": name,
            "start": index.start,
            "stop": index.stop,
            "step": index.step,
        }
    envelope: dict[str, object] = {
        TAG: "index",
        "name": name,
        "values": _encode_array(index, labels=True),
    }
    # A date_range's freq is part of the index (assert_frame_equal compares it).
    freq = getattr(index, "freqstr", None)
    if freq is not None:
        envelope["freq"] = freq
    return envelope


def _encode_pandas(value: object) -> dict[str, object] | None:
    """Envelope for a pandas object, or None if ``value`` is not one."""
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return {
            TAG: "dataframe",
            "index": _encode_index(value.index),
            "columns": _encode_index(value.columns),
            "data": [_encode_array(value.iloc[:, i]) for i in range(value.shape[1])],
        }
    if isinstance(value, pd.Series):
        return {
            TAG: "series",
            "name": _label_to_json(value.name, set()),
            "index": _encode_index(value.index),
            "values": _encode_array(value),
        }
    if isinstance(value, pd.Index):
        return _encode_index(value)
    if value is pd.NaT:
        return {TAG: "nat"}
    if value is pd.NA:
        return {TAG: "na"}
    if isinstance(value, pd.Timestamp):
        # isoformat keeps nanoseconds and the offset; unit and zone name ride alongside.
        envelope: dict[str, object] = {
            TAG: "timestamp",
            "iso": value.isoformat(),
            "unit": value.unit,
        }
        spec = _tz_spec(value.tzinfo, value)
        if spec is not None:
            envelope["tz"] = spec
        return envelope
    return None


def _object_array(values: list[object]) -> Any:
    """A 1-d object ndarray of ``values``; np.array() would turn a list of lists into 2-d."""
    import numpy as np

    array = np.empty(len(values), dtype=object)
    if any(isinstance(v, list | tuple) for v in values):
        for i, v in enumerate(values):
            array[i] = v
    else:
        array[:] = values
    return array


def _decode_ndarray(envelope: dict[str, Any]) -> object:
    import numpy as np

    dtype = np.dtype(envelope["dtype"])
    if "i8" in envelope:
        return np.array(envelope["i8"], dtype="i8").view(dtype)
    if dtype.kind == "O":
        return _object_array(envelope["values"])
    return np.array(envelope["values"], dtype=dtype)


def _decode_datetimes(envelope: dict[str, Any]) -> object:
    import numpy as np
    import pandas as pd

    utc = np.array(envelope["i8"], dtype="i8").view(f"M8[{envelope['unit']}]")
    index = pd.DatetimeIndex(utc).tz_localize("UTC").tz_convert(_tz_from_spec(envelope["tz"]))
    return index.array


def _decode_categorical(envelope: dict[str, Any]) -> object:
    import pandas as pd

    dtype = pd.CategoricalDtype(envelope["categories"], ordered=envelope["ordered"])
    return pd.Categorical.from_codes(envelope["codes"], dtype=dtype)


def _decode_strings(envelope: dict[str, Any]) -> object:
    import numpy as np
    import pandas as pd

    na_value = pd.NA if envelope["na"] == "NA" else np.nan
    dtype = pd.StringDtype(storage=envelope["storage"], na_value=na_value)
    return pd.array(envelope["values"], dtype=dtype)


def _decode_masked(envelope: dict[str, Any]) -> object:
    import pandas as pd

    return pd.array(envelope["values"], dtype=envelope["dtype"])


def _decode_index(envelope: dict[str, Any]) -> object:
    import pandas as pd

    values = envelope["values"]
    freq = envelope.get("freq")
    if freq is not None:
        kind = pd.TimedeltaIndex if values.dtype.kind == "m" else pd.DatetimeIndex
        return kind(values, name=envelope["name"], freq=freq)
    return pd.Index(values, dtype=values.dtype, name=envelope["name"], copy=False)


def _decode_rangeindex(envelope: dict[str, Any]) -> object:
    import pandas as pd

    return pd.RangeIndex(
        envelope["start"], envelope["stop"], envelope["step"], name=envelope["name"]
    )


def _decode_multiindex(envelope: dict[str, Any]) -> object:
    import pandas as pd

    return pd.MultiIndex(
        levels=envelope["levels"], codes=envelope["codes"], names=envelope["names"]
    )


def _decode_series(envelope: dict[str, Any]) -> object:
    import pandas as pd

    values = envelope["values"]
    return pd.Series(
        values, index=envelope["index"], dtype=values.dtype, name=envelope["name"], copy=False
    )


def _decode_dataframe(envelope: dict[str, Any]) -> object:
    import pandas as pd

    index = envelope["index"]
    columns: dict[int, Any] = {}
    for position, values in enumerate(envelope["data"]):
        if values.dtype == object:
            # A bare object ndarray of str would be re-inferred as the str dtype;
            # a Series with an explicit dtype (and the same index) is taken as is.
            values = pd.Series(values, index=index, dtype=object, copy=False)
        columns[position] = values
    frame = pd.DataFrame(columns, index=index, copy=False)
    frame.columns = envelope["columns"]
    return frame


def _decode_timestamp(envelope: dict[str, Any]) -> object:
    import pandas as pd

    value = pd.Timestamp(envelope["iso"]).as_unit(envelope["unit"])
    if "tz" in envelope:
        value = value.tz_convert(_tz_from_spec(envelope["tz"]))
    return value


def _decode_artifact(envelope: dict[str, Any]) -> object:
    known = (TAG, "url", "format", "bytes", "sha256")
    fields = {k: v for k, v in envelope.items() if k not in known}
    return ArtifactRef(
        str(envelope["url"]),
        str(envelope["format"]),
        int(envelope["bytes"]),
        str(envelope["sha256"]),
        **fields,
    )


def _decode_nat(envelope: dict[str, Any]) -> object:
    import pandas as pd

    return pd.NaT


def _decode_na(envelope: dict[str, Any]) -> object:
    import pandas as pd

    return pd.NA


_DECODERS: Final[dict[str, Callable[[dict[str, Any]], object]]] = {
    "dict": _decode_dict,
    "float": _decode_float,
    "datetime": _decode_datetime,
    "date": _decode_date,
    "timedelta": _decode_timedelta,
    "bytes": _decode_bytes,
    "tuple": _decode_tuple,
    "dataframe": _decode_dataframe,
    "series": _decode_series,
    "index": _decode_index,
    "rangeindex": _decode_rangeindex,
    "multiindex": _decode_multiindex,
    "ndarray": _decode_ndarray,
    "datetimes": _decode_datetimes,
    "categorical": _decode_categorical,
    "masked": _decode_masked,
    "strings": _decode_strings,
    "timestamp": _decode_timestamp,
    "nat": _decode_nat,
    "na": _decode_na,
    "artifact": _decode_artifact,
}


def _object_hook(obj: dict[str, Any]) -> object:
    """Called by ``json`` for each object, innermost first; only envelopes are touched.

    Innermost first means an envelope's contents are already decoded when it
    is rebuilt -- a DataFrame's columns arrive as arrays, a dict envelope's
    values as Python values.
    """
    if TAG not in obj:
        return obj
    tag = obj[TAG]
    decoder = _DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise ValueError(
            f"cannot decode an envelope of unknown type {tag!r}: known types are "
            + ", ".join(repr(t) for t in _DECODERS)
        )
    try:
        return decoder(obj)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"cannot decode a malformed {tag!r} envelope: {exc!r}") from exc


_HOOKED_DECODE: Final = json.JSONDecoder(object_hook=_object_hook).decode
_MARKER: Final = '"' + TAG + '"'


def decode(text: str | bytes) -> object:
    """Turn text made by :func:`encode` back into the value (JSON text without envelopes too).

    Raises ``ValueError`` for text that is not JSON or holds a malformed envelope.
    """
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8")
    elif not isinstance(text, str):
        raise TypeError(f"decode() takes str or bytes, not {type(text).__name__!r}")
    if _MARKER not in text:  # no envelope anywhere: exactly json.loads
        return json.loads(text)
    return _HOOKED_DECODE(text)
