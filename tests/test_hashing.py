"""hash_value: distinct types differ, equal values agree, layouts and orders do not matter."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import casml
from casml.errors import CasmlError, UnhashableError


def test_digest_is_32_lowercase_hex() -> None:
    digest = casml.hash_value({"a": [1, 2.5, None]})
    assert len(digest) == 32
    assert digest == digest.lower()
    int(digest, 16)


@pytest.mark.parametrize(
    "group",
    [
        [1, 1.0, True, "1", b"1", bytearray(b"1"), [1], (1,), {1}, frozenset({1}), np.int64(1)],
        [None, 0, "", b"", [], (), {}, set(), frozenset(), 0.0, False, range(0)],
        [[1, 2], (1, 2), {1, 2}, {1: 2}, [2, 1]],
        [0.0, -0.0],
        [np.float64(1.0), np.float32(1.0), np.int32(1), 1.0],
    ],
)
def test_distinct_values_and_types_hash_differently(group: list[Any]) -> None:
    digests = [casml.hash_value(v) for v in group]
    assert len(set(digests)) == len(group), list(zip(group, digests, strict=True))


def test_all_nans_are_equal() -> None:
    quiet = float("nan")
    other = struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000123))[0]  # another payload
    assert other != other
    assert casml.hash_value(quiet) == casml.hash_value(other)
    assert casml.hash_value([quiet]) == casml.hash_value([float("nan")])


def test_aware_datetimes_normalize_to_utc_but_differ_from_naive() -> None:
    utc = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
    tokyo = utc.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert casml.hash_value(utc) == casml.hash_value(tokyo)
    assert casml.hash_value(utc) != casml.hash_value(utc.replace(tzinfo=None))


def test_unhashable_names_type_and_path() -> None:
    class Opaque:
        pass

    with pytest.raises(UnhashableError) as info:
        casml.hash_value({"config": {"model": [1, 2, Opaque()]}})
    message = str(info.value)
    assert "Opaque" in message
    assert "value['config']['model'][2]" in message
    assert "register_hasher" in message
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, CasmlError)


def test_cycles_raise_unhashable_not_recursion_error() -> None:
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    with pytest.raises(UnhashableError, match="cyclic"):
        casml.hash_value(cyclic)
    d: dict[str, Any] = {}
    d["self"] = d
    with pytest.raises(UnhashableError, match="cyclic"):
        casml.hash_value(d)


def test_shared_non_cyclic_references_are_fine() -> None:
    shared = [1, 2]
    assert casml.hash_value([shared, shared]) == casml.hash_value([[1, 2], [1, 2]])


def test_deep_nesting_raises_unhashable() -> None:
    value: Any = 0
    for _ in range(5000):
        value = [value]
    with pytest.raises(UnhashableError, match="nesting"):
        casml.hash_value(value)


def test_casml_hash_protocol_and_register_hasher() -> None:
    class Tokenizer:
        def __init__(self, vocab: list[str]) -> None:
            self.vocab = vocab

        def __casml_hash__(self) -> Any:
            return {"vocab": self.vocab}

    assert casml.hash_value(Tokenizer(["a"])) == casml.hash_value(Tokenizer(["a"]))
    assert casml.hash_value(Tokenizer(["a"])) != casml.hash_value(Tokenizer(["b"]))
    # Tagged by type: the stand-in alone hashes differently.
    assert casml.hash_value(Tokenizer(["a"])) != casml.hash_value({"vocab": ["a"]})

    class Thirdparty:
        def __init__(self, n: int) -> None:
            self.n = n

    with pytest.raises(UnhashableError):
        casml.hash_value(Thirdparty(1))
    casml.register_hasher(Thirdparty, lambda obj: obj.n)
    assert casml.hash_value(Thirdparty(1)) != casml.hash_value(Thirdparty(2))
    assert casml.hash_value(Thirdparty(1)) != casml.hash_value(1)


def test_functions_change_when_source_or_closure_changes(tmp_path: Path) -> None:
    def make(offset: int) -> Any:
        def add(x: int) -> int:
            return x + offset

        return add

    assert casml.hash_value(make(1)) == casml.hash_value(make(1))
    assert casml.hash_value(make(1)) != casml.hash_value(make(2))

    module = tmp_path / "edited_mod.py"
    module.write_text("def f(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        mod = importlib.import_module("edited_mod")
        before = casml.hash_value(mod.f)
        module.write_text("def f(x):\n    return x + 2\n")
        importlib.invalidate_caches()
        mod = importlib.reload(mod)
        assert casml.hash_value(mod.f) != before
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("edited_mod", None)


def test_dataclass_and_namedtuple_and_enum() -> None:
    @dataclasses.dataclass
    class Config:
        lr: float
        layers: tuple[int, ...]

    assert casml.hash_value(Config(0.1, (2,))) == casml.hash_value(Config(0.1, (2,)))
    assert casml.hash_value(Config(0.1, (2,))) != casml.hash_value(Config(0.2, (2,)))
    assert casml.hash_value(Config(0.1, (2,))) != casml.hash_value({"lr": 0.1, "layers": (2,)})


# --- numpy ------------------------------------------------------------------------------


def test_array_layout_and_views_do_not_matter() -> None:
    a = np.arange(60, dtype=np.float64).reshape(6, 10)
    reference = casml.hash_value(a)
    assert casml.hash_value(np.asfortranarray(a)) == reference
    assert casml.hash_value(a.astype(">f8")) == reference
    view = a[::2, 3:]
    assert casml.hash_value(view) == casml.hash_value(view.copy())
    assert casml.hash_value(a.T) == casml.hash_value(np.ascontiguousarray(a.T))


def test_array_dtype_and_shape_matter() -> None:
    a = np.arange(12, dtype=np.int64)
    digests = {
        casml.hash_value(a),
        casml.hash_value(a.reshape(3, 4)),
        casml.hash_value(a.reshape(4, 3)),
        casml.hash_value(a.astype(np.int32)),
        casml.hash_value(a.astype(np.float64)),
        casml.hash_value(a.view(np.uint64)),
    }
    assert len(digests) == 6


def test_large_strided_array_hashes_in_blocks() -> None:
    big = np.arange(3_000_000, dtype=np.float64).reshape(1000, 3000)
    f = np.asfortranarray(big)
    assert casml.hash_value(f) == casml.hash_value(big)


# --- pandas -----------------------------------------------------------------------------


def test_dataframe_names_dtypes_index_values_matter() -> None:
    df = pd.DataFrame({"a": [1, 2, 3], "b": [0.5, 1.5, 2.5]})
    reference = casml.hash_value(df)
    assert casml.hash_value(df.copy()) == reference
    variants = [
        df.rename(columns={"a": "A"}),
        df.astype({"a": "int32"}),
        df.set_index(pd.Index([1, 2, 3])),
        df.assign(b=[0.5, 1.5, 2.6]),
        df[["b", "a"]],
        df.rename_axis("rows"),
    ]
    assert len({casml.hash_value(v) for v in variants} | {reference}) == len(variants) + 1


def test_series_extension_dtypes_distinguish_missing_values() -> None:
    a = pd.Series([1, None, 3], dtype="Int64")
    b = pd.Series([1, 0, 3], dtype="Int64")
    assert casml.hash_value(a) != casml.hash_value(b)
    cat = pd.Series(["x", "y"], dtype="category")
    assert casml.hash_value(cat) != casml.hash_value(cat.astype(object))
    tz = pd.Series(pd.date_range("2024-01-01", periods=2, tz="UTC"))
    assert casml.hash_value(tz) != casml.hash_value(tz.dt.tz_convert("Asia/Tokyo"))


def test_default_string_inference_is_stable_across_pandas_versions() -> None:
    # pandas 3 infers "str", pandas 2 object: both are the same text column.
    inferred = pd.Series(["a", None, "c"])
    assert casml.hash_value(inferred) == casml.hash_value(pd.Series(["a", None, "c"], dtype=object))
    assert casml.hash_value(inferred) != casml.hash_value(
        pd.Series(["a", None, "c"], dtype="string")
    )


# --- determinism across processes -------------------------------------------------------


def test_same_digests_under_different_hash_seeds() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from tests.golden import load_vectors_module
        from casml import hash_value
        values = load_vectors_module().all_vectors()
        print(json.dumps({k: hash_value(v) for k, v in values.items()}))
        """
    )
    root = str(Path(__file__).parent.parent)
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script, root],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1


# --- properties -------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(), st.binary()
)
keys = st.one_of(st.integers(), st.text(), st.tuples(st.integers(), st.text()))
nested = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
        st.frozensets(st.integers(), max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, nested, max_size=8), st.randoms(use_true_random=False))
def test_dict_order_does_not_matter(d: dict[Any, Any], rnd: Any) -> None:
    items = list(d.items())
    rnd.shuffle(items)
    assert casml.hash_value(dict(items)) == casml.hash_value(d)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.one_of(st.integers(), st.text()), max_size=10), st.randoms(use_true_random=False))
def test_set_order_does_not_matter(s: set[Any], rnd: Any) -> None:
    items = list(s)
    rnd.shuffle(items)
    assert casml.hash_value(set(items)) == casml.hash_value(s)
    assert casml.hash_value(frozenset(items)) != casml.hash_value(s)


@settings(max_examples=200, deadline=None)
@given(nested)
def test_wrapping_in_a_list_or_tuple_changes_the_hash(value: Any) -> None:
    digest = casml.hash_value(value)
    assert casml.hash_value([value]) != digest
    assert casml.hash_value((value,)) != casml.hash_value([value])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-(2**62), max_value=2**62), min_size=1, max_size=20))
def test_changing_one_element_changes_the_hash(values: list[int]) -> None:
    changed = list(values)
    changed[-1] += 1
    assert casml.hash_value(values) != casml.hash_value(changed)
    assert casml.hash_value(values) != casml.hash_value(tuple(values))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=6),
    st.sampled_from(["<f8", ">f8", "<i4", ">i2", "<c16"]),
    st.sampled_from(["C", "F"]),
)
def test_array_relayout_keeps_hash(rows: int, cols: int, dtype: str, order: str) -> None:
    base = (np.arange(rows * cols) * 3 - 7).reshape(rows, cols)
    a = np.asarray(base, dtype=dtype)
    relaid = np.array(a, order=order, dtype=np.dtype(dtype).newbyteorder("="))
    assert casml.hash_value(relaid) == casml.hash_value(a)
    assert casml.hash_value(a[:, ::-1]) == casml.hash_value(np.ascontiguousarray(a[:, ::-1]))
    if rows * cols > 1:
        bumped = a.copy()
        bumped.flat[0] += 1
        assert casml.hash_value(bumped) != casml.hash_value(a)


def test_importing_casml_does_not_import_numpy_or_pandas() -> None:
    code = (
        "import sys, casml; casml.hash_value({'a': [1]}); "
        "print('numpy' in sys.modules, 'pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_lambdas_on_one_line_are_told_apart() -> None:
    pair = [lambda: 1, lambda: 2]
    same = [lambda x: x + 1, lambda x: x + 1]
    assert casml.hash_value(pair[0]) != casml.hash_value(pair[1])
    assert casml.hash_value(same[0]) == casml.hash_value(same[1])


# -- large arrays hash as a tree of 4 MiB chunk digests (docs/hashing.md) ----------------


def _spec_array_digest(arr: np.ndarray[Any, Any]) -> str:
    """The spec of a 1-D little-endian numeric array, written out independently of casml."""
    import xxhash

    def length(n: int) -> bytes:
        return struct.pack("<Q", n)

    def text(tag: bytes, s: str) -> bytes:
        data = s.encode()
        return tag + length(len(data)) + data

    def integer(n: int) -> bytes:
        data = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
        return b"i" + length(len(data)) + data

    raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    chunk = casml.hashing.TREE_CHUNK_BYTES
    if len(raw) > chunk:
        body = b"".join(
            xxhash.xxh3_128_digest(raw[i : i + chunk]) for i in range(0, len(raw), chunk)
        )
    else:
        body = raw
    shape = b"t" + length(arr.ndim) + b"".join(integer(n) for n in arr.shape)
    encoded = (
        b"casml-hash\x00"
        + bytes([casml.hashing.HASH_FORMAT_VERSION])
        + b"A"
        + text(b"s", arr.dtype.newbyteorder("<").str)
        + shape
        + length(len(raw))
        + body
    )
    return xxhash.xxh3_128_hexdigest(encoded)


@pytest.mark.parametrize(
    "n_items",
    [
        100,  # small: the bytes themselves
        524_288,  # exactly one chunk (4 MiB of float64): still the bytes themselves
        524_289,  # one byte-item over: two chunks, the second of 8 bytes
        1_500_000,  # three chunks, uneven tail
    ],
)
def test_array_encoding_follows_the_written_spec(n_items: int) -> None:
    arr = np.random.default_rng(n_items).random(n_items)
    assert casml.hash_value(arr) == _spec_array_digest(arr)


def test_tree_hash_is_layout_free_and_sees_every_chunk() -> None:
    rows = np.random.default_rng(5).random((1_500, 700))  # 8.4 MB: three chunks
    padded = np.zeros((3_000, 700))
    padded[::2] = rows
    digest = casml.hash_value(rows)
    # Fortran order and strided views go through the block re-layout, whose blocks do not
    # line up with chunk boundaries; byte-swapped data is converted first.
    assert casml.hash_value(np.asfortranarray(rows)) == digest
    assert casml.hash_value(padded[::2]) == digest
    assert casml.hash_value(rows.astype(">f8")) == digest
    for flat_index in (0, 524_287, 524_288, rows.size - 1):  # both sides of a boundary
        changed = rows.copy()
        changed.flat[flat_index] += 1.0
        assert casml.hash_value(changed) != digest, flat_index


def test_chunk_digest_log_only_answers_for_live_hashed_memory() -> None:
    from casml.hashing import TREE_CHUNK_BYTES, hash_value_logging_chunks

    arr = np.random.default_rng(6).random(1_200_000)  # 9.6 MB
    digest, log = hash_value_logging_chunks({"w": arr, "small": np.ones(3)})
    assert digest == casml.hash_value({"w": arr, "small": np.ones(3)})
    view = memoryview(arr).cast("B")
    found = log.find(view)
    assert found == [
        __import__("xxhash").xxh3_128_hexdigest(view[i : i + TREE_CHUNK_BYTES])
        for i in range(0, len(view), TREE_CHUNK_BYTES)
    ]
    assert log.find(view[8:]) is None  # other memory, same array
    assert log.find(memoryview(arr.copy()).cast("B")) is None  # equal bytes, other memory
    # A temporary made while hashing (here the little-endian copy of a big-endian array) is
    # not remembered once it is gone, so its address can never vouch for other bytes.
    # The allocator hands freed blocks of one size out again, so fresh arrays of that size
    # are where a stale entry would show.
    _, log2 = hash_value_logging_chunks(arr.astype(">f8"))
    assert len(log2) == 1
    fresh = [np.empty_like(arr) for _ in range(4)]
    assert all(log2.find(memoryview(a).cast("B")) is None for a in [arr, *fresh])


def test_a_failure_while_hashing_a_chunk_in_a_thread_reaches_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import xxhash

    arr = np.arange(3_000_000, dtype=np.float64)  # 24 MB: six chunks, the last in a thread
    last_chunk_bytes = arr.nbytes % casml.hashing.TREE_CHUNK_BYTES or casml.hashing.TREE_CHUNK_BYTES
    real = xxhash.xxh3_128_digest

    def failing(data: Any) -> bytes:
        if len(memoryview(data)) == last_chunk_bytes:
            raise MemoryError("simulated")
        return bytes(real(data))

    monkeypatch.setattr(casml.hashing, "_HASH_THREADS", 2)
    monkeypatch.setattr(xxhash, "xxh3_128_digest", failing)
    with pytest.raises(MemoryError, match="simulated"):
        casml.hash_value(arr)
