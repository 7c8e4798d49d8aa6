"""Canonical hashing: the same value gives the same 32-hex digest everywhere, forever.

``hash_value(x)`` feeds a type-tagged, length-prefixed encoding of ``x`` into xxh3-128. The
encoding is specified in ``docs/hashing.md``; its format version is the first byte hashed, so
a change of encoding can never silently collide with an old digest. Values that cannot be
encoded deterministically raise :class:`~casml.errors.UnhashableError` naming the type and
where it sits; there is no pickle fallback, because pickle bytes drift between library
versions and would make "was this already trained?" answer wrongly.

numpy and pandas are handled when they are already imported by the caller (a value of those
types cannot exist otherwise), so importing casml never imports them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import functools
import inspect
import linecache
import math
import os
import pathlib
import struct
import sys
import textwrap
import threading
import types
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import xxhash

from casml.errors import UnhashableError

__all__ = [
    "HASH_FORMAT_VERSION",
    "TREE_CHUNK_BYTES",
    "ChunkDigestLog",
    "hash_value",
    "hash_value_logging_chunks",
    "register_hasher",
]

#: Version of the canonical encoding. Bump it whenever any digest of any value would change.
HASH_FORMAT_VERSION = 1

_PREFIX = b"casml-hash\x00" + bytes([HASH_FORMAT_VERSION])
_MAX_DEPTH = 400
# Arrays that are not C-contiguous are re-laid out in blocks of this many bytes, so hashing a
# Fortran-ordered or strided array never needs a full copy in memory.
_BLOCK_BYTES = 16 * 1024 * 1024
#: Arrays holding more bytes than this hash as a tree: the xxh3-128 digests of their
#: consecutive chunks of this size stand in for the bytes (docs/hashing.md). Part of the
#: format: changing it changes digests. It equals the blob store's default chunk size, so a
#: put can reuse these digests as blob names instead of hashing the same bytes again.
TREE_CHUNK_BYTES = 4 * 1024 * 1024
# xxhash releases the GIL on large inputs, so the chunks of one array hash in parallel.
_HASH_THREADS = max(1, min(8, os.cpu_count() or 1))

_pack_len = struct.Struct("<Q").pack
_pack_f64 = struct.Struct("<d").pack
_CANONICAL_NAN = struct.pack("<Q", 0x7FF8000000000000)

Hasher = Callable[[Any], Any]
_hashers: dict[type, Hasher] = {}


def register_hasher(cls: type, fn: Hasher) -> None:
    """Teach ``hash_value`` a third-party type: ``fn(obj)`` returns a hashable stand-in.

    The stand-in is hashed in place of the object, tagged with ``cls``'s qualified name, so
    two types with equal stand-ins still hash differently. Subclasses of ``cls`` use ``fn``
    too unless they have their own. Registering again replaces the previous function.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_hasher expects a class, got {cls!r}")
    if not callable(fn):
        raise TypeError(f"register_hasher expects a callable, got {fn!r}")
    _hashers[cls] = fn


def hash_value(value: Any) -> str:
    """Return the canonical 32-hex-char xxh3-128 digest of ``value``.

    Equal values of the same types give equal digests in every process, on every OS and under
    every PYTHONHASHSEED; dict and set order, array memory layout and views do not matter.
    Raises :class:`~casml.errors.UnhashableError` for values with no canonical encoding.
    """
    return _hash(value, _Visited(None))


def hash_value_logging_chunks(value: Any) -> tuple[str, ChunkDigestLog]:
    """Hash ``value`` like :func:`hash_value`; also return the chunk digests computed on the way.

    Large C-contiguous arrays hash as a tree of :data:`TREE_CHUNK_BYTES` chunks; the log
    remembers those digests by memory address, so that storing the same memory right after
    (``ChunkDigestLog.find``) need not hash it a second time.
    """
    log = ChunkDigestLog()
    return _hash(value, _Visited(log)), log


def _hash(value: Any, seen: _Visited) -> str:
    h = xxhash.xxh3_128(_PREFIX)
    try:
        _encode(value, h, seen, 0)
    except UnhashableError as exc:
        raise _finish(exc) from None
    except RecursionError:
        raise UnhashableError(
            "value nests too deeply to hash; flatten it or define __casml_hash__"
        ) from None
    return str(h.hexdigest())


class ChunkDigestLog:
    """Chunk digests of the arrays one hash call saw, found again by the memory they cover.

    An entry holds a weak reference to the array that owns the memory, never the memory
    itself: a temporary made while hashing dies as usual, and its entry with it, so memory
    reused for other bytes at the same address is never mistaken for the hashed bytes.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], tuple[weakref.ref[Any], list[bytes]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, array: Any, digests: list[bytes]) -> None:
        """Remember the chunk digests of the bytes of the C-contiguous ``array``."""
        owner = array
        while isinstance(owner.base, type(array)):
            owner = owner.base
        key = (int(array.__array_interface__["data"][0]), int(array.nbytes))
        self._entries[key] = (weakref.ref(owner), digests)

    def find(self, view: memoryview) -> list[str] | None:
        """Hex digests of ``view``'s chunks if this very memory was hashed, else None."""
        np = sys.modules.get("numpy")
        if not self._entries or np is None or view.nbytes <= TREE_CHUNK_BYTES:
            return None
        address = int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])
        entry = self._entries.get((address, view.nbytes))
        if entry is None or entry[0]() is None:
            return None
        return [digest.hex() for digest in entry[1]]


class _Visited(set[int]):
    """The ids of the containers being hashed (to catch cycles), and where chunk digests go."""

    __slots__ = ("chunk_log",)

    def __init__(self, chunk_log: ChunkDigestLog | None) -> None:
        super().__init__()
        self.chunk_log = chunk_log


# ---------------------------------------------------------------------------------------
# Errors carry the path to the offending value; each container on the way out prepends its
# own step, so the happy path pays nothing for error reporting.


class _PathError(UnhashableError):
    def __init__(self, reason: str, type_name: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.type_name = type_name
        self.steps: list[str] = []


def _fail(value: Any, reason: str | None = None) -> _PathError:
    tname = _qualname(type(value))
    return _PathError(reason or f"cannot hash an object of type {tname}", tname)


def _finish(exc: UnhashableError) -> UnhashableError:
    if not isinstance(exc, _PathError):
        return exc
    where = "value" + "".join(reversed(exc.steps))
    return UnhashableError(
        f"{exc.reason} (at {where}). casml hashes only values it can encode "
        "deterministically: convert it to a supported type, give its class a "
        "__casml_hash__() method returning a hashable value, or call "
        "casml.register_hasher(type, fn). See docs/hashing.md."
    )


def _step(exc: UnhashableError, step: str) -> UnhashableError:
    if isinstance(exc, _PathError):
        exc.steps.append(step)
    return exc


def _key_repr(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------
# Primitive writers.


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _type_name(cls: type) -> str:
    # The tag an object's __casml_hash__ stand-in is hashed under. Persistables share one
    # (their hash already names their class), so a lazy reference hashes like the object.
    name = getattr(cls, "__casml_type_name__", None)
    return name if isinstance(name, str) else _qualname(cls)


def _class_name(cls: type) -> str:
    # Registered classes hash under their registered name, which survives a module move.
    name = cls.__dict__.get("__casml_name__")
    return name if isinstance(name, str) else _qualname(cls)


def _bytes(h: Any, tag: bytes, data: bytes | bytearray | memoryview) -> None:
    h.update(tag)
    h.update(_pack_len(len(data)))
    h.update(data)


def _str(h: Any, tag: bytes, text: str) -> None:
    _bytes(h, tag, text.encode("utf-8", "surrogatepass"))


def _int_bytes(n: int) -> bytes:
    return n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)


def _float_bytes(x: float) -> bytes:
    return _CANONICAL_NAN if math.isnan(x) else _pack_f64(x)


def _sub_digest(value: Any, seen: _Visited, depth: int) -> bytes:
    sub = xxhash.xxh3_128()
    _encode(value, sub, seen, depth)
    return bytes(sub.digest())


# ---------------------------------------------------------------------------------------
# The dispatcher. Exact types first (fast path for plain data), then protocols and families.


def _encode(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _fail(value, f"nesting deeper than {_MAX_DEPTH} levels")
    cls = type(value)
    writer = _EXACT.get(cls)
    if writer is not None:
        writer(value, h, seen, depth)
        return
    custom = getattr(cls, "__casml_hash__", None)
    if custom is not None:
        _encode_custom(value, custom(value), cls, h, seen, depth)
        return
    for base in cls.__mro__:
        fn = _hashers.get(base)
        if fn is not None:
            _encode_custom(value, fn(value), cls, h, seen, depth)
            return
    module = cls.__module__.partition(".")[0]
    if module == "numpy":
        _encode_numpy(value, h, seen, depth)
        return
    if module == "pandas":
        _encode_pandas(value, h, seen, depth)
        return
    if isinstance(value, enum.Enum):
        _str(h, b"E", _qualname(cls))
        _str(h, b"s", value.name)
        return
    if isinstance(value, type):
        _str(h, b"K", _class_name(value))
        return
    if dataclasses.is_dataclass(value):
        _encode_dataclass(value, h, seen, depth)
        return
    if isinstance(value, tuple) and hasattr(cls, "_fields"):
        _encode_namedtuple(value, h, seen, depth)
        return
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        _encode_function(value, h, seen, depth)
        return
    if isinstance(value, types.MethodType):
        _enter(value, seen)
        try:
            h.update(b"Q")
            _encode(value.__func__, h, seen, depth + 1)
            _encode(value.__self__, h, seen, depth + 1)
        except UnhashableError as exc:
            raise _step(exc, ".__self__") from None
        finally:
            seen.discard(id(value))
        return
    if isinstance(value, functools.partial):
        _encode_partial(value, h, seen, depth)
        return
    if isinstance(value, pathlib.PurePath):
        _encode_path(value, h, seen, depth)
        return
    if isinstance(value, OrderedDict):
        _encode_ordered_dict(value, h, seen, depth)
        return
    for base in _BUILTIN_BASES:
        if isinstance(value, base):
            # A subclass of a builtin hashes as its base value, tagged with its own name.
            _str(h, b"x", _qualname(cls))
            _EXACT[base](value, h, seen, depth)
            return
    raise _fail(value)


def _encode_custom(value: Any, standin: Any, cls: type, h: Any, seen: _Visited, depth: int) -> None:
    if standin is value:
        raise _fail(value, f"__casml_hash__ of {_qualname(cls)} returned the object itself")
    _str(h, b"X", _type_name(cls))
    try:
        _encode(standin, h, seen, depth + 1)
    except UnhashableError as exc:
        raise _step(exc, ".__casml_hash__()") from None


def _enter(value: Any, seen: _Visited) -> None:
    key = id(value)
    if key in seen:
        raise _fail(value, f"cyclic reference to a {_qualname(type(value))}")
    seen.add(key)


def _none(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"N")


def _bool(value: bool, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"T" if value else b"F")


def _int(value: int, h: Any, seen: _Visited, depth: int) -> None:
    _bytes(h, b"i", _int_bytes(value))


def _float(value: float, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"f")
    h.update(_float_bytes(value))


def _complex(value: complex, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"c")
    h.update(_float_bytes(value.real))
    h.update(_float_bytes(value.imag))


def _text(value: str, h: Any, seen: _Visited, depth: int) -> None:
    _str(h, b"s", value)


def _raw_bytes(value: bytes, h: Any, seen: _Visited, depth: int) -> None:
    _bytes(h, b"b", value)


def _bytearray(value: bytearray, h: Any, seen: _Visited, depth: int) -> None:
    _bytes(h, b"y", value)


def _memoryview(value: memoryview, h: Any, seen: _Visited, depth: int) -> None:
    _bytes(h, b"v", value.tobytes() if not value.c_contiguous else value.cast("B"))


def _sequence(tag: bytes) -> Callable[[Any, Any, _Visited, int], None]:
    def write(value: Any, h: Any, seen: _Visited, depth: int) -> None:
        _enter(value, seen)
        h.update(tag)
        h.update(_pack_len(len(value)))
        index = 0
        try:
            for index, item in enumerate(value):  # noqa: B007 - index is used on failure
                _encode(item, h, seen, depth + 1)
        except UnhashableError as exc:
            raise _step(exc, f"[{index}]") from None
        finally:
            seen.discard(id(value))

    return write


def _dict(value: dict[Any, Any], h: Any, seen: _Visited, depth: int) -> None:
    _enter(value, seen)
    try:
        pairs = []
        for key, item in value.items():
            sub = xxhash.xxh3_128()
            try:
                _encode(key, sub, seen, depth + 1)
            except UnhashableError as exc:
                raise _step(exc, f" key {_key_repr(key)}") from None
            try:
                _encode(item, sub, seen, depth + 1)
            except UnhashableError as exc:
                raise _step(exc, f"[{_key_repr(key)}]") from None
            pairs.append(sub.digest())
    finally:
        seen.discard(id(value))
    pairs.sort()
    h.update(b"d")
    h.update(_pack_len(len(pairs)))
    for digest in pairs:
        h.update(digest)


def _ordered_dict_items(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    h.update(_pack_len(len(value)))
    for key, item in value.items():
        try:
            _encode(key, h, seen, depth + 1)
            _encode(item, h, seen, depth + 1)
        except UnhashableError as exc:
            raise _step(exc, f"[{_key_repr(key)}]") from None


def _encode_ordered_dict(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    # OrderedDict equality depends on order, so its hash does too.
    _enter(value, seen)
    try:
        _str(h, b"o", _qualname(type(value)))
        _ordered_dict_items(value, h, seen, depth)
    finally:
        seen.discard(id(value))


def _unordered(tag: bytes) -> Callable[[Any, Any, _Visited, int], None]:
    def write(value: Any, h: Any, seen: _Visited, depth: int) -> None:
        _enter(value, seen)
        try:
            digests = []
            for item in value:
                try:
                    digests.append(_sub_digest(item, seen, depth + 1))
                except UnhashableError as exc:
                    raise _step(exc, f" element {_key_repr(item)}") from None
        finally:
            seen.discard(id(value))
        digests.sort()
        h.update(tag)
        h.update(_pack_len(len(digests)))
        for digest in digests:
            h.update(digest)

    return write


def _range(value: range, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"r")
    for n in (value.start, value.stop, value.step):
        _bytes(h, b"i", _int_bytes(n))


def _datetime(value: _dt.datetime, h: Any, seen: _Visited, depth: int) -> None:
    offset = value.utcoffset()
    if offset is None:
        _str(h, b"D", value.isoformat())
    else:
        # Aware datetimes denote an instant: the same instant in any zone hashes alike.
        utc = (value - offset).replace(tzinfo=None)
        _str(h, b"Z", utc.isoformat())


def _date(value: _dt.date, h: Any, seen: _Visited, depth: int) -> None:
    _str(h, b"a", value.isoformat())


def _time(value: _dt.time, h: Any, seen: _Visited, depth: int) -> None:
    _str(h, b"h", value.isoformat())


def _timedelta(value: _dt.timedelta, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"e")
    for n in (value.days, value.seconds, value.microseconds):
        _bytes(h, b"i", _int_bytes(n))


def _decimal(value: decimal.Decimal, h: Any, seen: _Visited, depth: int) -> None:
    _str(h, b"m", str(value))


def _uuid(value: uuid.UUID, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"u")
    h.update(value.bytes)


def _encode_path(value: pathlib.PurePath, h: Any, seen: _Visited, depth: int) -> None:
    # Parts, not the native string: Path("a/b") hashes alike on POSIX and Windows.
    h.update(b"p")
    h.update(_pack_len(len(value.parts)))
    for part in value.parts:
        _str(h, b"s", part)


def _encode_dataclass(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    _enter(value, seen)
    try:
        fields = sorted(dataclasses.fields(value), key=lambda f: f.name)
        _str(h, b"C", _qualname(type(value)))
        h.update(_pack_len(len(fields)))
        for field in fields:
            _str(h, b"s", field.name)
            try:
                _encode(getattr(value, field.name), h, seen, depth + 1)
            except UnhashableError as exc:
                raise _step(exc, f".{field.name}") from None
    finally:
        seen.discard(id(value))


def _encode_namedtuple(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    _enter(value, seen)
    try:
        _str(h, b"n", _qualname(type(value)))
        h.update(_pack_len(len(value)))
        for name, item in zip(type(value)._fields, value, strict=True):
            _str(h, b"s", name)
            try:
                _encode(item, h, seen, depth + 1)
            except UnhashableError as exc:
                raise _step(exc, f".{name}") from None
    finally:
        seen.discard(id(value))


def _source_fingerprint(fn: Any) -> str:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return ""
    # Indentation of the enclosing block and trailing spaces are not part of the function.
    lines = [line.rstrip() for line in textwrap.dedent(source).splitlines()]
    text = "\n".join(line for line in lines if line)
    if fn.__name__ == "<lambda>":
        # getsource gives the whole line, shared by every lambda on it: add this one's body.
        text += "\n#lambda " + _lambda_body(fn.__code__)
    return text


def _lambda_body(code: Any) -> str:
    positions = getattr(code, "co_positions", None)
    if positions is None:  # Python 3.10: constants and names tell lambdas apart
        consts = [repr(c) for c in code.co_consts if not isinstance(c, types.CodeType)]
        return repr((consts, code.co_names, code.co_varnames))
    # Bookkeeping instructions (RESUME, RETURN) carry empty spans at column 0: skip them.
    spans = [
        p for p in positions() if None not in p and p[0] > 0 and not (p[0] == p[1] and p[2] == p[3])
    ]
    if not spans:
        return ""
    first = min((p[0], p[2]) for p in spans)
    last = max((p[1], p[3]) for p in spans)
    lines = linecache.getlines(code.co_filename)
    # Column offsets count UTF-8 bytes.
    chunk = [line.encode("utf-8") for line in lines[first[0] - 1 : last[0]]]
    if not chunk:
        return ""
    if len(chunk) == 1:
        body = chunk[0][first[1] : last[1]]
    else:
        body = b"".join([chunk[0][first[1] :], *chunk[1:-1], chunk[-1][: last[1]]])
    return body.decode("utf-8", "replace").strip()


def _encode_function(fn: Any, h: Any, seen: _Visited, depth: int) -> None:
    _enter(fn, seen)
    try:
        module = getattr(fn, "__module__", None) or ""
        _str(h, b"L", f"{module}.{fn.__qualname__}")
        code = getattr(fn, "__code__", None)
        if code is None:
            # Builtins have no source; their identity is their name.
            _str(h, b"s", "")
            return
        source = _source_fingerprint(fn)
        if source:
            _str(h, b"s", source)
        else:
            # No source (REPL, exec): fall back to the compiled code, which is stable for
            # one Python version. docs/hashing.md says so.
            _bytes(h, b"b", code.co_code)
            try:
                _encode(
                    tuple(c for c in code.co_consts if not isinstance(c, types.CodeType)),
                    h,
                    seen,
                    depth + 1,
                )
            except UnhashableError as exc:
                raise _step(exc, ".__code__.co_consts") from None
        closure = fn.__closure__ or ()
        h.update(_pack_len(len(closure)))
        for name, cell in zip(code.co_freevars, closure, strict=True):
            _str(h, b"s", name)
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell: the variable was never assigned
                h.update(b"-")
                continue
            try:
                _encode(contents, h, seen, depth + 1)
            except UnhashableError as exc:
                raise _step(exc, f" closure variable {name!r}") from None
        try:
            _encode(fn.__defaults__, h, seen, depth + 1)
            _encode(fn.__kwdefaults__, h, seen, depth + 1)
        except UnhashableError as exc:
            raise _step(exc, ".__defaults__") from None
    finally:
        seen.discard(id(fn))


def _encode_partial(value: functools.partial[Any], h: Any, seen: _Visited, depth: int) -> None:
    _enter(value, seen)
    try:
        h.update(b"q")
        _encode(value.func, h, seen, depth + 1)
        _encode(value.args, h, seen, depth + 1)
        _encode(value.keywords, h, seen, depth + 1)
    except UnhashableError as exc:
        raise _step(exc, " (partial)") from None
    finally:
        seen.discard(id(value))


_EXACT: dict[type, Callable[[Any, Any, _Visited, int], None]] = {
    type(None): _none,
    bool: _bool,
    int: _int,
    float: _float,
    complex: _complex,
    str: _text,
    bytes: _raw_bytes,
    bytearray: _bytearray,
    memoryview: _memoryview,
    list: _sequence(b"l"),
    tuple: _sequence(b"t"),
    dict: _dict,
    set: _unordered(b"S"),
    frozenset: _unordered(b"z"),
    range: _range,
    _dt.datetime: _datetime,
    _dt.date: _date,
    _dt.time: _time,
    _dt.timedelta: _timedelta,
    decimal.Decimal: _decimal,
    uuid.UUID: _uuid,
}

# Most-derived first: bool before int, datetime before date.
_BUILTIN_BASES: tuple[type, ...] = (
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    list,
    tuple,
    dict,
    set,
    frozenset,
    _dt.datetime,
    _dt.date,
    _dt.time,
    _dt.timedelta,
    decimal.Decimal,
    uuid.UUID,
)


# ---------------------------------------------------------------------------------------
# numpy: dtype and shape matter; memory layout, strides, views and byte order do not.


def _canonical_array(arr: Any) -> Any:
    """Return ``arr`` in little-endian byte order (a copy only for big-endian data)."""
    little = arr.dtype.newbyteorder("<")
    return arr if arr.dtype == little else arr.astype(little)


def _dtype_descr(dtype: Any) -> Any:
    """A plain, numpy-version-independent description of a dtype (little-endian)."""
    little = dtype.newbyteorder("<")
    if little.fields is None and little.subdtype is None:
        return little.str
    return little.descr


def _update_array_bytes(arr: Any, h: Any, seen: _Visited) -> None:
    np = sys.modules["numpy"]
    if arr.size == 0:
        return
    tree = arr.nbytes > TREE_CHUNK_BYTES
    if arr.flags.c_contiguous:
        flat = memoryview(arr.reshape(-1).view(np.uint8))
        if not tree:
            h.update(flat)
            return
        digests = _chunk_digests(flat)
        if seen.chunk_log is not None:
            seen.chunk_log.record(arr, digests)
        h.update(b"".join(digests))
        return
    # Re-lay out block by block along the first axis: the byte stream equals the C-order one.
    feed = _ChunkFeed() if tree else None
    rows = arr.shape[0]
    row_bytes = max(1, arr.nbytes // rows)
    step = max(1, _BLOCK_BYTES // row_bytes)
    for start in range(0, rows, step):
        block = np.ascontiguousarray(arr[start : start + step])
        data = memoryview(block.reshape(-1).view(np.uint8))
        if feed is None:
            h.update(data)
        else:
            feed.add(data)
    if feed is not None:
        h.update(b"".join(feed.finish()))


def _chunk_digests(data: memoryview) -> list[bytes]:
    """The xxh3-128 digests of ``data``'s consecutive TREE_CHUNK_BYTES chunks, in parallel."""
    size = TREE_CHUNK_BYTES
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    workers = min(_HASH_THREADS, len(pieces))
    if workers < 2:
        return [xxhash.xxh3_128_digest(piece) for piece in pieces]
    # Each thread takes a contiguous run of chunks: one hand-off per thread, not per chunk.
    results: list[list[bytes] | None] = [None] * workers
    failures: list[BaseException] = []
    bounds = [len(pieces) * k // workers for k in range(workers + 1)]

    def run(k: int) -> None:
        try:
            results[k] = [xxhash.xxh3_128_digest(p) for p in pieces[bounds[k] : bounds[k + 1]]]
        except BaseException as exc:  # re-raised in the caller: a lost part is a wrong hash
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(1, workers)]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    digests: list[bytes] = []
    for part in results:
        assert part is not None  # every thread filled its part or recorded its failure
        digests.extend(part)
    return digests


class _ChunkFeed:
    """Cuts a stream of byte pieces into TREE_CHUNK_BYTES chunks and digests each one."""

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._state = xxhash.xxh3_128()
        self._filled = 0

    def add(self, data: memoryview) -> None:
        pos, n = 0, len(data)
        while pos < n:
            take = min(n - pos, TREE_CHUNK_BYTES - self._filled)
            self._state.update(data[pos : pos + take])
            self._filled += take
            pos += take
            if self._filled == TREE_CHUNK_BYTES:
                self._digests.append(self._state.digest())
                self._state.reset()
                self._filled = 0

    def finish(self) -> list[bytes]:
        if self._filled:
            self._digests.append(self._state.digest())
        return self._digests


def _encode_ndarray(arr: Any, h: Any, seen: _Visited, depth: int) -> None:
    h.update(b"A")
    _encode(_dtype_descr(arr.dtype), h, seen, depth + 1)
    _encode(tuple(int(n) for n in arr.shape), h, seen, depth + 1)
    if arr.dtype.hasobject:
        if arr.dtype.fields is not None:
            raise _fail(arr, "cannot hash a structured numpy array holding Python objects")
        h.update(_pack_len(arr.size))
        for index, item in enumerate(arr.reshape(-1, order="C")):
            try:
                _encode(item, h, seen, depth + 1)
            except UnhashableError as exc:
                raise _step(exc, f".flat[{index}]") from None
        return
    arr = _canonical_array(arr)
    h.update(_pack_len(arr.nbytes))
    _update_array_bytes(arr, h, seen)


def _encode_numpy(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    np = sys.modules["numpy"]
    if isinstance(value, np.ndarray):
        if type(value) is not np.ndarray:
            # Subclasses (matrix, masked arrays) carry more than dtype, shape and data.
            raise _fail(value, f"cannot hash the numpy array subclass {_qualname(type(value))}")
        _encode_ndarray(value, h, seen, depth)
        return
    if isinstance(value, np.generic):
        h.update(b"g")
        _encode(_dtype_descr(value.dtype), h, seen, depth + 1)
        if value.dtype.hasobject:
            _encode(value.item(), h, seen, depth + 1)
            return
        data = _canonical_array(np.asarray(value))
        if value.dtype.kind in "fc":
            # Every NaN is the same value, as for Python floats.
            flat = data.reshape(-1)
            if np.isnan(flat).any():
                flat = flat.copy()
                if value.dtype.kind == "f":
                    flat[np.isnan(flat)] = np.nan
                else:
                    flat.real[np.isnan(flat.real)] = np.nan
                    flat.imag[np.isnan(flat.imag)] = np.nan
                data = flat
        _bytes(h, b"b", data.tobytes())
        return
    if isinstance(value, np.dtype):
        h.update(b"k")
        _encode(_dtype_descr(value), h, seen, depth + 1)
        return
    raise _fail(value)


# ---------------------------------------------------------------------------------------
# pandas: names, dtypes, index and values matter. Representation details that pandas
# versions change on their own (the default string dtype, datetime resolution, RangeIndex)
# are canonicalized, so a pandas upgrade does not invalidate every stored dataset.


def _encode_pandas(value: Any, h: Any, seen: _Visited, depth: int) -> None:
    pd = sys.modules["pandas"]
    if isinstance(value, pd.DataFrame):
        h.update(b"F")
        _encode_index(value.columns, h, seen, depth + 1)
        _encode_index(value.index, h, seen, depth + 1)
        h.update(_pack_len(value.shape[1]))
        for position in range(value.shape[1]):
            try:
                _encode_column(value.iloc[:, position], h, seen, depth + 1)
            except UnhashableError as exc:
                raise _step(exc, f"[{_key_repr(value.columns[position])}]") from None
        _encode(dict(value.attrs), h, seen, depth + 1)
        return
    if isinstance(value, pd.Series):
        h.update(b"P")
        _encode(value.name, h, seen, depth + 1)
        _encode_index(value.index, h, seen, depth + 1)
        _encode_column(value, h, seen, depth + 1)
        _encode(dict(value.attrs), h, seen, depth + 1)
        return
    if isinstance(value, pd.Index):
        _encode_index(value, h, seen, depth)
        return
    if isinstance(value, pd.Timestamp):
        # Not a subclass of _EXACT's datetime entry; hash it as the datetime it is.
        if value.nanosecond:
            _str(h, b"x", "pandas.Timestamp")
            _bytes(h, b"i", _int_bytes(int(value.value)))
            _encode(str(value.tz) if value.tz is not None else None, h, seen, depth + 1)
            return
        _datetime(value.to_pydatetime(), h, seen, depth)
        return
    if isinstance(value, pd.Timedelta):
        _timedelta(value.to_pytimedelta(), h, seen, depth)
        return
    if value is pd.NA:
        h.update(b"-")
        return
    raise _fail(value)


def _encode_index(index: Any, h: Any, seen: _Visited, depth: int) -> None:
    pd = sys.modules["pandas"]
    h.update(b"I")
    if isinstance(index, pd.MultiIndex):
        h.update(b"M")
        _encode(tuple(index.names), h, seen, depth + 1)
        h.update(_pack_len(index.nlevels))
        for level in range(index.nlevels):
            _encode_column(index.get_level_values(level), h, seen, depth + 1)
        return
    _encode(index.name, h, seen, depth + 1)
    _encode_column(index, h, seen, depth + 1)


def _is_text_like(values: Any) -> bool:
    pd = sys.modules["pandas"]
    kind = pd.api.types.infer_dtype(values, skipna=True)
    return kind in ("string", "empty")


def _encode_missing_aware(items: Any, h: Any, seen: _Visited, depth: int) -> None:
    pd = sys.modules["pandas"]
    h.update(_pack_len(len(items)))
    for index, item in enumerate(items):
        if item is None or item is pd.NA or (isinstance(item, float) and math.isnan(item)):
            h.update(b"-")
            continue
        try:
            _encode(item, h, seen, depth + 1)
        except UnhashableError as exc:
            raise _step(exc, f".iloc[{index}]") from None


def _encode_column(values: Any, h: Any, seen: _Visited, depth: int) -> None:
    """Hash a Series' or an Index's values by dtype family (see docs/hashing.md)."""
    pd = sys.modules["pandas"]
    np = sys.modules["numpy"]
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        h.update(b"Ccat")
        _encode(bool(dtype.ordered), h, seen, depth + 1)
        _encode_index(dtype.categories, h, seen, depth + 1)
        codes = np.asarray(pd.Categorical(values).codes, dtype=np.int64)
        _encode_ndarray(codes, h, seen, depth + 1)
        return
    if isinstance(dtype, pd.DatetimeTZDtype):
        h.update(b"Ctz")
        _str(h, b"s", str(dtype.tz))
        utc = pd.DatetimeIndex(values).tz_convert("UTC").tz_localize(None)
        naive = np.asarray(utc, dtype="datetime64[ns]")
        _encode_ndarray(naive, h, seen, depth + 1)
        return
    if isinstance(dtype, pd.StringDtype):
        if dtype.na_value is pd.NA:
            h.update(b"Cstr")  # the explicit "string" dtype, missing values are pd.NA
        else:
            h.update(b"Ctext")  # pandas 3's default "str": same as object columns of str
        _encode_missing_aware(values.tolist(), h, seen, depth + 1)
        return
    if isinstance(dtype, pd.api.extensions.ExtensionDtype):
        numpy_dtype = getattr(dtype, "numpy_dtype", None)
        if numpy_dtype is not None and hasattr(values, "isna"):
            # Masked nullable dtypes (Int64, Float64, boolean): data with holes zeroed + mask.
            h.update(b"Cmask")
            _str(h, b"s", str(dtype.name))
            mask = np.asarray(values.isna(), dtype=bool)
            zero = False if numpy_dtype.kind == "b" else 0
            data = np.asarray(values.to_numpy(dtype=numpy_dtype, na_value=zero))
            _encode_ndarray(data, h, seen, depth + 1)
            _encode_ndarray(mask, h, seen, depth + 1)
            return
        raise _fail(values, f"cannot hash a pandas column of dtype {dtype}")
    array = np.asarray(values)
    if array.dtype.kind in "mM":
        # pandas 3 infers coarser datetime units than pandas 2: hash at nanoseconds.
        unit_dtype = "datetime64[ns]" if array.dtype.kind == "M" else "timedelta64[ns]"
        h.update(b"Cnp")
        # copy=False: a column already in nanoseconds is hashed in place, not copied.
        _encode_ndarray(array.astype(unit_dtype, copy=False), h, seen, depth + 1)
        return
    if array.dtype.kind == "O":
        if _is_text_like(array):
            h.update(b"Ctext")
        else:
            h.update(b"Cobj")
        _encode_missing_aware(array.tolist(), h, seen, depth + 1)
        return
    h.update(b"Cnp")
    _encode_ndarray(array, h, seen, depth + 1)
