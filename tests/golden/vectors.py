"""Golden hash vectors: values whose digests must never change within a format version.

Loaded under the fixed module name ``golden_vectors`` (see ``load_vectors`` in
tests/golden/__init__.py) so the qualified names of the classes and functions below, which
enter their hashes, do not depend on how pytest imports this file. Every value is built
with explicit dtypes where numpy/pandas versions would otherwise infer different ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import enum
import functools
import pathlib
import uuid
from collections import OrderedDict
from typing import Any, NamedTuple


class Color(enum.Enum):
    RED = 1
    GREEN = "g"


@dataclasses.dataclass
class Point:
    x: int
    y: float = 0.5


class Pair(NamedTuple):
    left: Any
    right: Any


class Custom:
    def __init__(self, key: str) -> None:
        self.key = key

    def __casml_hash__(self) -> Any:
        return {"key": self.key}


class MyList(list):  # type: ignore[type-arg]
    pass


def plain_function(x: int, y: int = 2) -> int:
    return x + y


def make_closure(offset: int) -> Any:
    def add(x: int) -> int:
        return x + offset

    return add


def python_vectors() -> dict[str, Any]:
    utc = dt.timezone.utc
    plus2 = dt.timezone(dt.timedelta(hours=2))
    return {
        "none": None,
        "true": True,
        "false": False,
        "int_0": 0,
        "int_1": 1,
        "int_neg": -1,
        "int_big": 2**100,
        "int_neg_big": -(2**100) + 7,
        "int_64_edge": 2**63,
        "float_0": 0.0,
        "float_neg_0": -0.0,
        "float_1": 1.0,
        "float_pi": 3.141592653589793,
        "float_nan": float("nan"),
        "float_inf": float("inf"),
        "float_ninf": float("-inf"),
        "complex": complex(1.5, -2.0),
        "str_empty": "",
        "str_1": "1",
        "str_unicode": "héllo wörld ✓ 日本",
        "str_surrogate": "\udcff",
        "bytes_empty": b"",
        "bytes_1": b"1",
        "bytes_bin": bytes(range(256)),
        "bytearray": bytearray(b"1"),
        "memoryview": memoryview(b"abc"),
        "list_empty": [],
        "list_1": [1],
        "list_nested": [1, [2, [3, [4]]], "x"],
        "tuple_empty": (),
        "tuple_1": (1,),
        "tuple_mixed": (1, "a", None, 2.5),
        "dict_empty": {},
        "dict_str": {"a": 1, "b": 2},
        "dict_nonstr_keys": {1: "one", (2, 3): "pair", None: 0, 1.5: "f"},
        "dict_nested": {"model": {"layers": [64, 32], "lr": 0.001}, "seed": 42},
        "set_empty": set(),
        "set_1": {1},
        "set_mixed": {1, "a", (2, 3), None},
        "frozenset": frozenset({1, 2, 3}),
        "range": range(0, 10, 3),
        "datetime_naive": dt.datetime(2024, 2, 29, 13, 45, 10, 123456),
        "datetime_utc": dt.datetime(2024, 2, 29, 13, 45, 10, tzinfo=utc),
        "datetime_plus2": dt.datetime(2024, 2, 29, 15, 45, 10, tzinfo=plus2),
        "date": dt.date(1999, 12, 31),
        "time": dt.time(23, 59, 59, 999999),
        "time_tz": dt.time(8, 0, tzinfo=plus2),
        "timedelta": dt.timedelta(days=-1, seconds=5, microseconds=7),
        "decimal": decimal.Decimal("3.14159"),
        "decimal_trailing": decimal.Decimal("1.10"),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "path": pathlib.PurePosixPath("data/train.csv"),
        "path_abs": pathlib.PurePosixPath("/srv/data"),
        "enum_int": Color.RED,
        "enum_str": Color.GREEN,
        "dataclass": Point(3),
        "dataclass_nested": Point(1, y=[1, 2]),  # type: ignore[arg-type]
        "namedtuple": Pair(1, "b"),
        "custom_hash": Custom("k1"),
        "builtin_subclass": MyList([1, 2]),
        "ordered_dict": OrderedDict([("b", 1), ("a", 2)]),
        "class": Point,
        "builtin_class": int,
        "function": plain_function,
        "closure": make_closure(5),
        "partial": functools.partial(plain_function, 1, y=3),
        "builtin_function": len,
        "deep": {"a": [{"b": ({"c": frozenset({"d"})},)}]},
    }


def numpy_vectors() -> dict[str, Any]:
    import numpy as np

    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    return {
        "np_f64_2d": base,
        "np_f64_fortran": np.asfortranarray(base),
        "np_f64_view": base[::2, 1::2],
        "np_f32": np.arange(5, dtype=np.float32) / 3,
        "np_i8": np.array([-128, 0, 127], dtype=np.int8),
        "np_u64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "np_i64_big_endian": np.arange(4, dtype=">i8"),
        "np_bool": np.array([True, False, True]),
        "np_complex": np.array([1 + 2j, -3j], dtype=np.complex128),
        "np_empty": np.zeros((0, 3), dtype=np.float64),
        "np_0d": np.array(7, dtype=np.int32),
        "np_str": np.array(["a", "bc"], dtype="<U2"),
        "np_bytes": np.array([b"a", b"bc"], dtype="S2"),
        "np_datetime": np.array(["2024-01-01", "2024-06-30"], dtype="datetime64[D]"),
        "np_timedelta": np.array([1, 2], dtype="timedelta64[s]"),
        "np_object": np.array([1, "a", None], dtype=object),
        "np_structured": np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        "np_3d": np.arange(27, dtype=np.int16).reshape(3, 3, 3),
        "np_scalar_f64": np.float64(1.0),
        "np_scalar_f32": np.float32(1.0),
        "np_scalar_i64": np.int64(1),
        "np_scalar_bool": np.bool_(True),
        "np_scalar_nan": np.float64("nan"),
        "np_scalar_datetime": np.datetime64("2024-01-01T00:00:00", "s"),
        "np_dtype": np.dtype("float32"),
        "np_in_dict": {"weights": np.ones(3, dtype=np.float64), "bias": np.float32(0.5)},
        # Over 4 MiB of bytes an array hashes as the digests of its 4 MiB chunks (the tree
        # rule of docs/hashing.md); exactly 4 MiB is still hashed byte by byte.
        "np_tree_exact_chunk": np.arange(524_288, dtype=np.float64),
        "np_tree_f64": np.arange(600_000, dtype=np.float64),
        "np_tree_f64_big_endian": np.arange(600_000, dtype=">f8"),
        "np_tree_i32_fortran": np.asfortranarray(
            np.arange(3_000_000, dtype=np.int32).reshape(1_500, 2_000)
        ),
        "np_tree_strided": np.arange(2_000_000, dtype=np.int64).reshape(1_000, 2_000)[:, ::3],
    }


def _with_attrs(frame: Any) -> Any:
    frame.attrs["source"] = "golden"
    return frame


def pandas_vectors() -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    idx = pd.Index([10, 20, 30], dtype="int64", name="id")
    return {
        "pd_series_int": pd.Series([1, 2, 3], dtype="int64", name="n"),
        "pd_series_float_idx": pd.Series([1.5, np.nan, 3.0], dtype="float64", index=idx),
        "pd_series_object": pd.Series([1, "a", None], dtype=object),
        "pd_series_text_default": pd.Series(["a", "b", None]),
        "pd_series_string": pd.Series(["a", None], dtype="string"),
        "pd_series_category": pd.Series(["lo", "hi", "lo"], dtype="category"),
        "pd_series_category_ordered": pd.Series(
            pd.Categorical(["b", "a"], categories=["b", "a"], ordered=True)
        ),
        "pd_series_int64_nullable": pd.Series([1, None, 3], dtype="Int64"),
        "pd_series_boolean": pd.Series([True, None], dtype="boolean"),
        "pd_series_float64_nullable": pd.Series([0.5, None], dtype="Float64"),
        "pd_series_datetime": pd.Series(pd.to_datetime(["2024-01-01", "2024-01-02"])),
        "pd_series_datetime_tz": pd.Series(
            pd.to_datetime(["2024-01-01 12:00", "2024-07-01 08:30"]).tz_localize("Europe/Paris")
        ),
        "pd_series_timedelta": pd.Series(pd.to_timedelta([1, 2], unit="D")),
        "pd_index_range": pd.RangeIndex(5),
        "pd_index_str": pd.Index(["x", "y"]),
        "pd_multiindex": pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["k", "n"]),
        "pd_frame_numeric": pd.DataFrame(
            {"a": np.arange(4, dtype="int64"), "b": np.linspace(0, 1, 4)}
        ),
        "pd_frame_mixed": pd.DataFrame(
            {
                "name": ["ann", "bob", None],
                "score": pd.Series([1, None, 3], dtype="Int64"),
                "when": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]),
                "grade": pd.Series(["a", "b", "a"], dtype="category"),
            },
            index=pd.Index(["r1", "r2", "r3"], name="row"),
        ),
        "pd_frame_empty": pd.DataFrame(),
        "pd_frame_attrs": _with_attrs(pd.DataFrame({"a": [1]}, dtype="int64")),
        "pd_timestamp": pd.Timestamp("2024-03-01 10:00:00", tz="UTC"),
        "pd_timedelta": pd.Timedelta(seconds=90),
        "pd_in_list": [pd.Series([1.0], dtype="float64"), {"frame": pd.DataFrame({"z": [0]})}],
        "pd_tree_frame": pd.DataFrame(
            {"x": np.arange(700_000, dtype="float64"), "y": np.arange(700_000, dtype="int64")}
        ),
    }


def all_vectors() -> dict[str, Any]:
    """Every golden value by name (numpy/pandas ones only when those are installed)."""
    values = python_vectors()
    with contextlib.suppress(ImportError):
        values.update(numpy_vectors())
    with contextlib.suppress(ImportError):
        values.update(pandas_vectors())
    return values
