"""numpy arrays, scalars and dtypes for casml.codec; imported only once a numpy value shows up.

An array of a plain dtype is its raw bytes in memory order plus ``[dtype, shape, order]``;
from ``inline_limit`` bytes on, the bytes are an out-of-band buffer: a view of the array's
memory when it is contiguous (C or Fortran), so nothing is copied. Decoding makes the array a
view of the given buffer. Arrays of Python objects are stored element by element.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal, cast

import numpy as np

from casml.codec import (
    _NO_HANDLER,
    TAG_NDARRAY,
    TAG_NDARRAY_OBJECT,
    TAG_NDARRAY_STRING,
    TAG_NPDTYPE,
    TAG_NPSCALAR,
    TAGS,
    Handler,
    _Decoder,
    _Encoder,
    _generic,
    corrupt,
    fields_of,
)

__all__ = [
    "build_dtype",
    "build_ndarray",
    "build_ndarray_object",
    "build_ndarray_string",
    "build_scalar",
    "children",
    "dtype_spec",
    "handler_for",
    "is_object_array",
    "parse_dtype",
]

# Kinds whose values are plain bytes; anything else ("O" objects, "T" strings) holds
# pointers, which must never be read from a payload.
_RAW_KINDS = frozenset("biufcmMSUV")
_MAX_DTYPE_NESTING = 32
_MAX_EMPTY_ITEMS = 1 << 24  # elements of an itemsize-0 dtype: they cost no bytes to claim
_STRING_DTYPE: Any = getattr(getattr(np, "dtypes", None), "StringDType", None)

_specs: dict[np.dtype[Any], object] = {}  # dtype -> its spec, or None if it cannot go raw


def handler_for(t: type) -> Handler | None:
    """The encoder for a numpy type, or None to treat it as an unknown object."""
    if t is np.ndarray:
        return _encode_ndarray
    if issubclass(t, np.generic):
        return _encode_scalar
    if issubclass(t, np.dtype):
        return _encode_dtype
    return None


# -- dtypes -------------------------------------------------------------------------------


def dtype_spec(dt: np.dtype[Any]) -> object:
    """A msgpack-native description of a dtype: ``dt.str``, or a list for structures."""
    if dt.fields is not None:
        names = list(dt.names or ())
        formats: list[object] = []
        offsets: list[int] = []
        titles: list[object] = []
        for name in names:
            info = dt.fields[name]
            formats.append(dtype_spec(info[0]))
            offsets.append(int(info[1]))
            titles.append(info[2] if len(info) > 2 else None)
        spec: list[object] = [
            "struct",
            names,
            formats,
            offsets,
            dt.itemsize,
            bool(dt.isalignedstruct),
        ]
        if any(t is not None for t in titles):
            spec.append(titles)
        return spec
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return ["sub", dtype_spec(base), list(shape)]
    if dt.kind == "T":
        return "T"
    return dt.str


def parse_dtype(spec: object, depth: int = 0) -> np.dtype[Any]:
    """The dtype a spec describes; IntegrityError if it describes none."""
    if depth > _MAX_DTYPE_NESTING:
        raise corrupt("a dtype nests too deeply")
    try:
        if type(spec) is str:
            return np.dtype(spec)
        if type(spec) is list and spec and spec[0] == "struct" and len(spec) in (6, 7):
            names, formats, offsets, itemsize, aligned = spec[1:6]
            if type(formats) is not list:
                raise corrupt("a structured dtype lists no formats")
            layout: dict[str, Any] = {
                "names": names,
                "formats": [parse_dtype(f, depth + 1) for f in formats],
                "offsets": offsets,
                "itemsize": itemsize,
            }
            if len(spec) == 7:
                layout["titles"] = spec[6]
            dtype: np.dtype[Any] = np.dtype(cast(Any, layout), align=aligned is True)
            return dtype
        if type(spec) is list and len(spec) == 3 and spec[0] == "sub":
            shape = spec[2]
            if type(shape) is not list or not all(type(n) is int for n in shape):
                raise corrupt("a sub-array dtype has a bad shape")
            return np.dtype((parse_dtype(spec[1], depth + 1), tuple(shape)))
    except (TypeError, ValueError, OverflowError, KeyError) as exc:
        raise corrupt(f"the dtype {spec!r} is invalid ({exc})") from None
    raise corrupt(f"the dtype {spec!r} is invalid")


def _is_raw(dt: np.dtype[Any]) -> bool:
    if dt.fields is not None:
        return all(_is_raw(info[0]) for info in dt.fields.values())
    if dt.subdtype is not None:
        return _is_raw(dt.subdtype[0])
    return dt.kind in _RAW_KINDS


def _raw_spec(dt: np.dtype[Any]) -> object:
    """The spec of a plain-bytes dtype that round-trips exactly, else None."""
    try:
        return _specs[dt]
    except KeyError:
        pass
    spec: object = None
    if _is_raw(dt):
        candidate = dtype_spec(dt)
        try:
            if parse_dtype(candidate) == dt:
                spec = candidate
        except Exception:
            spec = None  # e.g. a dtype from a numpy plugin that its string does not name
    _specs[dt] = spec
    return spec


def _encode_dtype(enc: _Encoder, dt: np.dtype[Any]) -> object:
    spec = dtype_spec(dt)
    try:
        same = parse_dtype(spec) == dt
    except Exception:
        same = False
    return [TAGS[TAG_NPDTYPE], spec] if same else _generic(enc, dt)


def build_dtype(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_NPDTYPE."""
    (spec,) = fields_of(items, 1, "numpy dtype")
    return parse_dtype(spec)


# -- arrays -------------------------------------------------------------------------------


def _encode_ndarray(enc: _Encoder, a: np.ndarray[Any, Any]) -> object:
    dt = a.dtype
    if dt.kind == "O":
        return [TAGS[TAG_NDARRAY_OBJECT], list(a.shape), _order(a), a.ravel(order="C").tolist()]
    if dt.kind == "T" and _STRING_DTYPE is not None and dt == _STRING_DTYPE():
        return [TAGS[TAG_NDARRAY_STRING], list(a.shape), _order(a), a.ravel(order="C").tolist()]
    spec = _raw_spec(dt)
    if spec is None:
        return _generic(enc, a)
    hit = enc.cached(a)
    if hit is not _NO_HANDLER:
        return hit
    if a.flags.c_contiguous:
        order, memory = "C", a
    elif a.flags.f_contiguous:
        order, memory = "F", a.T  # the transpose of a Fortran array is C-contiguous
    else:
        order, memory = "C", np.ascontiguousarray(a)  # the only copy: a strided view
    shape = list(a.shape)
    if dt.itemsize and a.nbytes >= enc.inline_limit:
        view = memoryview(cast(Any, memory.reshape(-1).view(np.uint8)))
        return enc.remember(a, [TAGS[TAG_NDARRAY], spec, shape, order, enc.add_buffer(view)])
    return [TAGS[TAG_NDARRAY], spec, shape, order, memory.tobytes()]


def _order(a: np.ndarray[Any, Any]) -> str:
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def _shape(shape: object) -> tuple[int, ...]:
    if type(shape) is not list or len(shape) > 64:
        raise corrupt("an array shape is not a list of at most 64 sizes")
    for n in shape:
        if type(n) is not int or n < 0:
            raise corrupt(f"an array dimension is {n!r}")
    return tuple(shape)


def _order_field(order: object) -> Literal["C", "F"]:
    if order == "C":
        return "C"
    if order == "F":
        return "F"
    raise corrupt(f"an array order is {order!r}")


def build_ndarray(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_NDARRAY: a view of the out-of-band buffer, or a fresh copy of inline bytes."""
    spec, shape_field, order_field, data = fields_of(items, 4, "numpy array")
    dt = parse_dtype(spec)
    if not _is_raw(dt):
        raise corrupt(f"a raw array claims the dtype {dt}, which holds pointers")
    shape = _shape(shape_field)
    order = _order_field(order_field)
    count = math.prod(shape)
    nbytes = count * dt.itemsize
    buffer: bytearray | memoryview
    if type(data) is bytes:
        if len(data) != nbytes:
            raise corrupt(f"an inline array has {len(data)} bytes, its shape needs {nbytes}")
        buffer = bytearray(data)  # writable, as numpy.load would give
    else:
        buffer = dec.buffer(data)
        if buffer.nbytes != nbytes:
            raise corrupt(
                f"buffer {data} has {buffer.nbytes} bytes, its array of shape {shape} and "
                f"dtype {dt} needs {nbytes}"
            )
    if nbytes == 0:
        if count > _MAX_EMPTY_ITEMS:
            raise corrupt(f"an array of empty items claims {count} elements")
        return np.empty(shape, dtype=dt, order=order)
    return np.frombuffer(buffer, dtype=dt, count=count).reshape(shape, order=order)


def build_ndarray_object(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_NDARRAY_OBJECT."""
    shape_field, order_field, values = fields_of(items, 3, "object array")
    shape = _shape(shape_field)
    order = _order_field(order_field)
    count = math.prod(shape)
    if type(values) is not list or len(values) != count:
        raise corrupt(f"an object array of shape {shape} does not hold {count} items")
    # fromiter keeps each item as one element, even tuples and lists.
    flat = np.fromiter(values, dtype=object, count=count)
    array = flat.reshape(shape)
    return np.asfortranarray(array) if order == "F" else array


def build_ndarray_string(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_NDARRAY_STRING (numpy's variable-width StringDType)."""
    shape_field, order_field, values = fields_of(items, 3, "string array")
    shape = _shape(shape_field)
    order = _order_field(order_field)
    if _STRING_DTYPE is None:
        raise corrupt("a StringDType array needs numpy 2; upgrade numpy")
    count = math.prod(shape)
    if type(values) is not list or len(values) != count or not all(type(v) is str for v in values):
        raise corrupt(f"a string array of shape {shape} does not hold {count} strings")
    array = np.array(values, dtype=_STRING_DTYPE()).reshape(shape)
    return np.asfortranarray(array) if order == "F" else array


# -- scalars ------------------------------------------------------------------------------


def _encode_scalar(enc: _Encoder, value: np.generic) -> object:
    dt = value.dtype
    spec = _raw_spec(dt)
    if spec is None:
        return _generic(enc, value)
    return [TAGS[TAG_NPSCALAR], spec, np.asarray(value).tobytes()]


def build_scalar(dec: _Decoder, items: list[Any]) -> object:
    """Decode TAG_NPSCALAR."""
    spec, data = fields_of(items, 2, "numpy scalar")
    dt = parse_dtype(spec)
    if not _is_raw(dt) or type(data) is not bytes or len(data) != dt.itemsize:
        raise corrupt(f"a numpy scalar of dtype {dt} does not fit its {len(data)} bytes")
    if dt.itemsize == 0:
        return np.zeros(1, dtype=dt)[0]
    return np.frombuffer(bytearray(data), dtype=dt, count=1)[0]


# -- error reporting ------------------------------------------------------------------------


def is_object_array(o: object) -> bool:
    """True for a numpy array of Python objects."""
    return type(o) is np.ndarray and o.dtype.kind == "O"


def children(o: np.ndarray[Any, Any]) -> Iterator[tuple[str, object]]:
    """(label, element) of an object array, to say where an unstorable element sits."""
    for i, x in enumerate(o.ravel(order="C").tolist()):
        yield f".flat[{i}]", x
