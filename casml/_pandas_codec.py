"""pandas Series, DataFrames, Indexes and scalars for casml.codec; imported only when needed.

A frame is its column Index, one values entry per column (a numpy array, which the numpy
codec stores raw and out of band when large, or a tagged extension array), its row Index,
``attrs`` and flags. Works with pandas 2.2 and 3.x; private pandas attributes are used only
with a public fallback.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import pandas as pd
from msgpack import ExtType

from casml.codec import (
    _NO_HANDLER,
    EXT_PD_NA,
    EXT_PD_NAT,
    TAG_PD_CATEGORICAL,
    TAG_PD_DATAFRAME,
    TAG_PD_DATETIMETZ,
    TAG_PD_INDEX,
    TAG_PD_MASKED,
    TAG_PD_MULTIINDEX,
    TAG_PD_RANGEINDEX,
    TAG_PD_SERIES,
    TAG_PD_STRING,
    TAG_PD_TIMEDELTA,
    TAG_PD_TIMESTAMP,
    TAGS,
    Handler,
    _Decoder,
    _Encoder,
    _generic,
    corrupt,
    fields_of,
)

__all__ = [
    "build_categorical",
    "build_dataframe",
    "build_datetimetz",
    "build_index",
    "build_masked",
    "build_multiindex",
    "build_rangeindex",
    "build_series",
    "build_string",
    "build_timedelta",
    "build_timestamp",
    "handler_for",
]

_NA = ExtType(EXT_PD_NA, b"")
_NAT = ExtType(EXT_PD_NAT, b"")

_MASKED_ARRAYS: dict[str, Any] = {
    **{name: pd.arrays.IntegerArray for name in ("Int8", "Int16", "Int32", "Int64")},
    **{name: pd.arrays.IntegerArray for name in ("UInt8", "UInt16", "UInt32", "UInt64")},
    "Float32": pd.arrays.FloatingArray,
    "Float64": pd.arrays.FloatingArray,
    "boolean": pd.arrays.BooleanArray,
}
_STR_OR_NONE = frozenset({str, type(None)})
_INDEX_TYPES = (
    pd.Index,
    pd.DatetimeIndex,
    pd.TimedeltaIndex,
    pd.CategoricalIndex,
    pd.PeriodIndex,
    pd.IntervalIndex,
)


def handler_for(t: type) -> Handler | None:
    """The encoder for a pandas type, or None to treat it as an unknown object."""
    if t is pd.DataFrame:
        return _encode_dataframe
    if t is pd.Series:
        return _encode_series
    if t is pd.RangeIndex:
        return _encode_rangeindex
    if t is pd.MultiIndex:
        return _encode_multiindex
    if t in _INDEX_TYPES:
        return _encode_index
    if t is pd.Timestamp:
        return _encode_timestamp
    if t is pd.Timedelta:
        return _encode_timedelta
    if t is type(pd.NaT):
        return lambda enc, o: _NAT
    if t is type(pd.NA):
        return lambda enc, o: _NA
    if issubclass(t, pd.api.extensions.ExtensionArray):
        return _encode_extension_array
    return None


# -- values -----------------------------------------------------------------------------


def _values(arr: Any) -> object:
    """What a column (or Index) holds: a numpy array, or a tagged extension array."""
    if isinstance(arr, np.ndarray):
        return arr
    dtype = arr.dtype
    if isinstance(dtype, np.dtype) or type(dtype).__name__ in ("NumpyEADtype", "PandasDtype"):
        # NumpyExtensionArray (not its StringArray subclass), naive DatetimeArray, TimedeltaArray
        return np.asarray(arr)  # the backing array itself, no copy
    if isinstance(dtype, pd.CategoricalDtype):
        return [TAGS[TAG_PD_CATEGORICAL], arr.codes, arr.categories, bool(dtype.ordered)]
    if isinstance(dtype, pd.DatetimeTZDtype):
        utc = getattr(arr, "_ndarray", None)
        if not isinstance(utc, np.ndarray):
            utc = np.asarray(arr.tz_convert("UTC").tz_localize(None))
        return [TAGS[TAG_PD_DATETIMETZ], utc, _zone(dtype.tz)]
    if isinstance(dtype, pd.StringDtype):
        na = "nan" if _is_nan(dtype.na_value) else "NA"
        items = arr.to_numpy(dtype=object, na_value=None).tolist()
        return [TAGS[TAG_PD_STRING], str(dtype.storage), na, items]
    name = getattr(dtype, "name", None)
    data, mask = getattr(arr, "_data", None), getattr(arr, "_mask", None)
    if (
        type(arr) is _MASKED_ARRAYS.get(name)  # type: ignore[arg-type]
        and isinstance(data, np.ndarray)
        and isinstance(mask, np.ndarray)
    ):
        return [TAGS[TAG_PD_MASKED], name, data, mask]
    return arr  # another extension array: a reference, or pickle


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _encode_extension_array(enc: _Encoder, arr: Any) -> object:
    out = _values(arr)
    if type(out) is not list:  # would come back as another type (e.g. a numpy array)
        return _generic(enc, arr)
    return enc.remember(arr, out)


def _column_arrays(df: pd.DataFrame) -> list[Any]:
    arrays = getattr(df, "_iter_column_arrays", None)
    if callable(arrays):
        try:
            return list(arrays())
        except Exception:
            pass  # a pandas without it: the public route below
    return [df.iloc[:, i].array for i in range(df.shape[1])]


# -- encoders (their outputs hold temporaries, so they are cached per object) -------------


def _encode_dataframe(enc: _Encoder, df: pd.DataFrame) -> object:
    hit = enc.cached(df)
    if hit is not _NO_HANDLER:
        return hit
    values = [_values(a) for a in _column_arrays(df)]
    out = [
        TAGS[TAG_PD_DATAFRAME],
        df.columns,
        values,
        df.index,
        dict(df.attrs),
        bool(df.flags.allows_duplicate_labels),
    ]
    return enc.remember(df, out)


def _encode_series(enc: _Encoder, s: pd.Series) -> object:
    hit = enc.cached(s)
    if hit is not _NO_HANDLER:
        return hit
    out = [
        TAGS[TAG_PD_SERIES],
        _values(s.array),
        s.index,
        s.name,
        dict(s.attrs),
        bool(s.flags.allows_duplicate_labels),
    ]
    return enc.remember(s, out)


def _encode_index(enc: _Encoder, idx: pd.Index) -> object:
    hit = enc.cached(idx)
    if hit is not _NO_HANDLER:
        return hit
    freq = None
    if isinstance(idx, (pd.DatetimeIndex, pd.TimedeltaIndex)) and idx.freq is not None:
        freq = idx.freqstr
    return enc.remember(idx, [TAGS[TAG_PD_INDEX], _values(idx.array), idx.name, freq])


def _encode_rangeindex(enc: _Encoder, idx: pd.RangeIndex) -> object:
    return [TAGS[TAG_PD_RANGEINDEX], idx.start, idx.stop, idx.step, idx.name]


def _encode_multiindex(enc: _Encoder, idx: pd.MultiIndex) -> object:
    hit = enc.cached(idx)
    if hit is not _NO_HANDLER:
        return hit
    out = [
        TAGS[TAG_PD_MULTIINDEX],
        list(idx.levels),
        [np.asarray(c) for c in idx.codes],
        list(idx.names),
    ]
    return enc.remember(idx, out)


def _encode_timestamp(enc: _Encoder, ts: pd.Timestamp) -> object:
    # asm8 is the UTC instant in the Timestamp's own unit; the zone is applied on decode.
    return [TAGS[TAG_PD_TIMESTAMP], ts.asm8, _zone(ts.tz)]


def _zone(tz: Any) -> Any:
    """The zone itself for a pytz tzinfo bound to one offset (tz_convert re-binds it)."""
    zone = getattr(tz, "zone", None)
    if isinstance(zone, str) and type(tz).__module__.partition(".")[0] == "pytz":
        return importlib.import_module("pytz").timezone(zone)
    return tz


def _encode_timedelta(enc: _Encoder, td: pd.Timedelta) -> object:
    return [TAGS[TAG_PD_TIMEDELTA], td.asm8]


# -- builders ---------------------------------------------------------------------------


def _array_or_ea(values: object, what: str) -> Any:
    if isinstance(values, (np.ndarray, pd.api.extensions.ExtensionArray)):
        return values
    raise corrupt(f"the values of a {what} are a {type(values).__name__}")


def _index(value: object, what: str) -> pd.Index:
    if not isinstance(value, pd.Index):
        raise corrupt(f"the {what} is a {type(value).__name__}, not an Index")
    return value


def _series(values: Any, index: pd.Index, name: object) -> pd.Series:
    dtype = values.dtype if isinstance(values, np.ndarray) else None
    # An explicit dtype stops pandas from re-inferring object columns (as "str" in pandas 3).
    return pd.Series(values, index=index, name=name, dtype=dtype, copy=False)


def _finish(obj: Any, attrs: object, allows_duplicates: object) -> Any:
    if type(attrs) is not dict or type(allows_duplicates) is not bool:
        raise corrupt("attrs or flags of a pandas object have the wrong types")
    if attrs:
        obj.attrs = attrs
    if not allows_duplicates:
        obj = obj.set_flags(allows_duplicate_labels=False)
    return obj


def build_series(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_SERIES."""
    values, index, name, attrs, allows = fields_of(items, 5, "Series")
    series = _series(_array_or_ea(values, "Series"), _index(index, "Series index"), name)
    return _finish(series, attrs, allows)


def build_dataframe(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_DATAFRAME."""
    columns, values, index, attrs, allows = fields_of(items, 5, "DataFrame")
    columns = _index(columns, "DataFrame columns")
    index = _index(index, "DataFrame index")
    if type(values) is not list or len(values) != len(columns):
        raise corrupt("a DataFrame's columns and values differ in number")
    if values:
        series = {
            i: _series(_array_or_ea(v, "DataFrame column"), index, None)
            for i, v in enumerate(values)
        }
        # All columns share one Index object, so the frame aligns nothing and copies nothing.
        frame = pd.DataFrame(series, copy=False)
    else:
        frame = pd.DataFrame(index=index)
    frame.columns = columns
    return _finish(frame, attrs, allows)


def build_index(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_INDEX (any Index but RangeIndex and MultiIndex)."""
    values, name, freq = fields_of(items, 3, "Index")
    values = _array_or_ea(values, "Index")
    dtype = values.dtype if isinstance(values, np.ndarray) else None
    idx = pd.Index(values, dtype=dtype, name=name, copy=False)
    if freq is not None:
        if type(freq) is not str:
            raise corrupt("an Index frequency is not a string")
        if isinstance(idx, pd.DatetimeIndex):
            idx = pd.DatetimeIndex(idx, freq=freq)
        elif isinstance(idx, pd.TimedeltaIndex):
            idx = pd.TimedeltaIndex(idx, freq=freq)
        else:
            raise corrupt("a frequency on an Index that is neither dates nor durations")
    return idx


def build_rangeindex(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_RANGEINDEX."""
    start, stop, step, name = fields_of(items, 4, "RangeIndex")
    if not all(type(v) is int for v in (start, stop, step)):
        raise corrupt("a RangeIndex bound is not an int")
    return pd.RangeIndex(start, stop, step, name=name)


def build_multiindex(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_MULTIINDEX (its integrity is verified: codes must fit the levels)."""
    levels, codes, names = fields_of(items, 3, "MultiIndex")
    if not (type(levels) is list and type(codes) is list and type(names) is list):
        raise corrupt("a MultiIndex has fields of the wrong types")
    levels = [_index(level, "MultiIndex level") for level in levels]
    for c in codes:
        if not isinstance(c, np.ndarray) or c.dtype.kind != "i":
            raise corrupt("MultiIndex codes are not integer arrays")
    return pd.MultiIndex(levels=levels, codes=codes, names=names, verify_integrity=True)


def build_categorical(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_CATEGORICAL (codes are checked against the categories)."""
    codes, categories, ordered = fields_of(items, 3, "Categorical")
    if not isinstance(codes, np.ndarray) or codes.dtype.kind != "i" or type(ordered) is not bool:
        raise corrupt("a Categorical has fields of the wrong types")
    dtype = pd.CategoricalDtype(_index(categories, "categories"), ordered=ordered)
    return pd.Categorical.from_codes(codes, dtype=dtype)


def build_masked(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_MASKED (Int*, UInt*, Float*, boolean)."""
    name, data, mask = fields_of(items, 3, "masked array")
    cls = _MASKED_ARRAYS.get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(data, np.ndarray) or not isinstance(mask, np.ndarray):
        raise corrupt(f"a masked array of dtype {name!r}")
    if mask.dtype != np.bool_ or mask.shape != data.shape or data.ndim != 1:
        raise corrupt("a masked array's mask does not match its data")
    array = cls(data, mask, copy=False)
    if array.dtype.name != name:
        raise corrupt(f"a masked array of dtype {name!r} holds {data.dtype} data")
    return array


def build_string(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_STRING (StringDtype, incl. pandas 3's default "str")."""
    storage, na, values = fields_of(items, 3, "string array")
    if type(storage) is not str or na not in ("NA", "nan") or type(values) is not list:
        raise corrupt("a string array has fields of the wrong types")
    if not set(map(type, values)) <= _STR_OR_NONE:
        raise corrupt("a string array holds something other than strings")
    dtype = _string_dtype(storage, na)
    return pd.array(np.array(values, dtype=object), dtype=dtype)


def _string_dtype(storage: str, na: str) -> Any:
    na_value = np.nan if na == "nan" else pd.NA
    string_dtype: Any = pd.StringDtype
    try:
        return string_dtype(storage=storage, na_value=na_value)
    except TypeError:
        pass  # pandas < 2.3: no na_value; its NaN-variant was the "pyarrow_numpy" storage
    except ImportError:
        return _string_dtype("python", na)  # pyarrow is missing here: same strings
    try:
        return string_dtype(storage=storage)
    except ImportError:
        return string_dtype(storage="python")


def build_datetimetz(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_DATETIMETZ."""
    utc, tz = fields_of(items, 2, "tz-aware datetimes")
    if not isinstance(utc, np.ndarray) or utc.dtype.kind != "M" or utc.ndim != 1:
        raise corrupt("tz-aware datetimes are not a datetime64 array")
    index = pd.DatetimeIndex(utc).tz_localize("UTC").tz_convert(tz)
    return index.array


def build_timestamp(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_TIMESTAMP."""
    value, tz = fields_of(items, 2, "Timestamp")
    if not isinstance(value, np.datetime64):
        raise corrupt("a Timestamp is not a datetime64")
    ts = pd.Timestamp(value)
    return ts if tz is None else ts.tz_localize("UTC").tz_convert(tz)


def build_timedelta(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_PD_TIMEDELTA."""
    (value,) = fields_of(items, 1, "Timedelta")
    if not isinstance(value, np.timedelta64):
        raise corrupt("a Timedelta is not a timedelta64")
    return pd.Timedelta(value)
