"""Turn Python values into msgpack payloads plus out-of-band buffers, and back, type for type.

``encode(obj, allow_pickle=...)`` returns an :class:`Encoded`: a msgpack document (``payload``)
whose values carry typed msgpack extensions, the large buffers it refers to by index
(``buffers``: views of the caller's memory, not copies) and the hashes of the Persistables it
refers to (``references``). ``decode(payload, buffers, allow_pickle=...)`` rebuilds the value:
tuples stay tuples, sets stay sets, dict keys keep their types and order, numpy arrays keep
dtype, shape and memory order, DataFrames compare equal with ``assert_frame_equal``.

Decoding never runs code from the payload unless ``allow_pickle=True``; classes named by the
payload (dataclasses, NamedTuples, Enums) are imported from installed modules only. Corrupt or
hostile bytes raise :class:`casml.errors.IntegrityError`.

Payload layout (version 1), also documented in docs/storage.md::

    payload  = 0x01 (positive fixint CODEC_VERSION) + one msgpack object
    value    = msgpack nil/bool/int/float/str/bin/array/map   (list, dict, bytes: as is)
             | ext(code, data)                                 leaf type, data = raw bytes
             | array [ext(tag, b""), field, field, ...]        composite type

A composite value is a msgpack array whose first element is an empty extension of a tag code;
its fields are ordinary values, so they are packed and unpacked by msgpack's C code.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import gc
import importlib
import pathlib
import pickle
import re
import struct
import sys
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgpack
from msgpack import ExtType

from casml.errors import CasmlError, IntegrityError, PickleNotAllowedError, UnregisteredClassError

__all__ = [
    "CODEC_NAME",
    "CODEC_VERSION",
    "INLINE_LIMIT",
    "MAX_DEPTH",
    "Encoded",
    "UnresolvedReferenceError",
    "decode",
    "encode",
]

CODEC_NAME = "casml-msgpack"
CODEC_VERSION = 1
INLINE_LIMIT = 256 * 1024
#: msgpack's C unpacker refuses documents nested deeper than 1024 arrays/maps; encoding
#: refuses anything the decoder could not read back.
MAX_DEPTH = 1024


class UnresolvedReferenceError(CasmlError):
    """A payload refers to a Persistable by hash, and no store was given to load it from."""


@dataclass
class Encoded:
    """The result of encoding one object.

    payload:    the msgpack document (bytes).
    buffers:    out-of-band buffers, each a contiguous 1-D unsigned-byte memoryview
                (format "B"), referenced by index from the payload. They are views of the
                user's data (no full copy) whenever the data is contiguous.
    references: hashes returned by ``reference_of`` in order of first occurrence, deduplicated.
    """

    payload: bytes
    buffers: list[memoryview] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


# -- extension codes ----------------------------------------------------------------------
# Leaf extensions: the ext data is the whole value.
EXT_BIGINT = 1  # int outside msgpack's 64-bit range: signed big-endian two's complement
EXT_COMPLEX = 2  # struct ">dd" (real, imag)
EXT_BYTEARRAY = 3  # the bytes
EXT_DECIMAL = 4  # str(d) in ASCII
EXT_UUID = 5  # the 16 bytes
EXT_DATE = 6  # struct ">HBB" (year, month, day)
EXT_TIMEDELTA = 7  # struct ">iii" (days, seconds, microseconds)
EXT_ZONEINFO = 8  # the IANA key, UTF-8
EXT_REF = 9  # a Persistable hash, ASCII
EXT_PD_NA = 10  # pandas.NA (empty data)
EXT_PD_NAT = 11  # pandas.NaT (empty data)
EXT_PYTZ = 12  # a pytz time zone name, UTF-8
EXT_SURROGATE_STR = 13  # a str holding lone surrogates, UTF-8 with "surrogatepass"

# Tag extensions (empty data): first element of an array that holds the value's fields.
TAG_TUPLE = 32  # [*items]
TAG_SET = 33  # [*items]
TAG_FROZENSET = 34  # [*items]
TAG_RANGE = 35  # [start, stop, step]
TAG_DATETIME = 36  # [year, month, day, hour, minute, second, microsecond, fold, tzinfo]
TAG_TIME = 37  # [hour, minute, second, microsecond, fold, tzinfo]
TAG_TIMEZONE = 38  # [offset: timedelta, name: str | None]
TAG_PATH = 39  # [class name, str(path)]
TAG_ENUM = 40  # [class "module:qualname", member name] or [class, None, value]
TAG_DATACLASS = 41  # [class "module:qualname", {field: value}]
TAG_NAMEDTUPLE = 42  # [class "module:qualname", *fields]
TAG_ORDEREDDICT = 43  # [{key: value}]
TAG_MEMORYVIEW = 44  # [format, shape, readonly, bytes]
TAG_PICKLE = 45  # [type name, pickle protocol 5 bytes, [buffer index, ...]]
TAG_NDARRAY = 48  # [dtype, shape, order "C"|"F", bytes (inline) | int (buffer index)]
TAG_NDARRAY_OBJECT = 49  # [shape, order, [items in C order]]
TAG_NPSCALAR = 50  # [dtype, bytes]
TAG_NPDTYPE = 51  # [dtype]
TAG_NDARRAY_STRING = 52  # [shape, order, [items in C order]]  (numpy StringDType)
TAG_PD_SERIES = 64  # [values, index, name, attrs, allows_duplicate_labels]
TAG_PD_DATAFRAME = 65  # [columns, [values per column], index, attrs, allows_duplicate_labels]
TAG_PD_INDEX = 66  # [values, name, freq str | None]
TAG_PD_RANGEINDEX = 67  # [start, stop, step, name]
TAG_PD_MULTIINDEX = 68  # [[level Index, ...], [codes ndarray, ...], [name, ...]]
TAG_PD_CATEGORICAL = 69  # [codes ndarray, categories Index, ordered]
TAG_PD_MASKED = 70  # [dtype name, data ndarray, mask ndarray]
TAG_PD_STRING = 71  # [storage, "NA" | "nan", [items]]
TAG_PD_DATETIMETZ = 72  # [datetime64 ndarray (UTC, naive), tz]
TAG_PD_TIMESTAMP = 73  # [numpy datetime64 (UTC), tz]
TAG_PD_TIMEDELTA = 74  # [numpy timedelta64]

_TAG_CODES = (
    *range(TAG_TUPLE, TAG_PICKLE + 1),
    *range(TAG_NDARRAY, TAG_NDARRAY_STRING + 1),
    *range(TAG_PD_SERIES, TAG_PD_TIMEDELTA + 1),
)
#: the array head written for each tag
TAGS: dict[int, ExtType] = {code: ExtType(code, b"") for code in _TAG_CODES}

_T_TUPLE = TAGS[TAG_TUPLE]
_T_SET = TAGS[TAG_SET]
_T_FROZENSET = TAGS[TAG_FROZENSET]

_BIG_INT_LIMIT = 1 << 20  # bytes: a 8-Mbit integer is absurd in a payload; refuse on decode
_NO_HANDLER = object()

# -- errors -----------------------------------------------------------------------------


def corrupt(detail: str) -> IntegrityError:
    """Build the IntegrityError for a payload that cannot be a casml encoding."""
    return IntegrityError(
        f"the payload is corrupt or truncated ({detail}); run `casml verify` to find damaged "
        "blobs, then re-put the artifact or restore its storage"
    )


class _NeedsPickle(Exception):
    """Raised inside the packer's default hook; ``encode`` turns it into a casml error."""

    def __init__(self, obj: object, cause: BaseException | None = None) -> None:
        super().__init__(obj)
        self.obj = obj
        self.cause = cause


def type_name(t: type) -> str:
    """``module.QualName`` of a class, builtins without the module."""
    module = getattr(t, "__module__", None)
    if module in (None, "builtins"):
        return t.__qualname__
    return f"{module}.{t.__qualname__}"


# -- class references -------------------------------------------------------------------

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


def class_ref(cls: type) -> str | None:
    """``"module:qualname"`` if importing the module gives back this very class, else None."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    if not _DOTTED.match(module) or not _DOTTED.match(qualname):
        return None  # e.g. a class defined inside a function ("f.<locals>.C")
    target: object = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return f"{module}:{qualname}" if target is cls else None


def resolve_class(ref: object, what: str) -> type:
    """Import the installed module named by ``ref`` and return its class (never payload code)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise corrupt(f"a {what} names its class as {ref!r}")
    module, qualname = ref.split(":")
    if not _DOTTED.match(module) or not _DOTTED.match(qualname):
        raise corrupt(f"a {what} names its class as {ref!r}")
    try:
        target: object = importlib.import_module(module)
    except Exception as exc:
        raise UnregisteredClassError(
            f"cannot load {what} class {qualname!r}: importing its module {module!r} failed "
            f"({type(exc).__name__}: {exc}); install the package that defines it (or put it "
            "on sys.path) and load again"
        ) from None
    for part in qualname.split("."):
        target = getattr(target, part, _NO_HANDLER)
        if target is _NO_HANDLER:
            raise UnregisteredClassError(
                f"cannot load {what} class {qualname!r}: module {module!r} has no attribute "
                f"{qualname!r}; the class was renamed or removed since the value was stored. "
                "Install the version of the module that defines it"
            )
    if not isinstance(target, type):
        raise UnregisteredClassError(f"{module}:{qualname} is not a class; cannot load a {what}")
    return target


# -- encoding ---------------------------------------------------------------------------

Handler = Callable[["_Encoder", Any], object]


class _Boxed:
    """Wraps a value the packer would write natively but lossily (bytearray, memoryview, str
    with lone surrogates), so that the careful pass routes it through ``default``."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __hash__(self) -> int:
        return hash(self.value)

    def __eq__(self, other: object) -> bool:
        return self is other


class _Encoder:
    """Per-call state of one ``encode``: the packer's ``default`` hook and what it collects."""

    __slots__ = (
        "allow_pickle",
        "buffers",
        "cache",
        "careful",
        "emitted",
        "inline_limit",
        "reference_of",
        "references",
        "seen_refs",
    )

    def __init__(
        self,
        allow_pickle: bool,
        reference_of: Callable[[object], str | None] | None,
        inline_limit: int,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.reference_of = reference_of
        self.inline_limit = inline_limit
        self.buffers: list[memoryview] = []
        self.references: list[str] = []
        self.seen_refs: set[str] = set()
        # Outputs with side effects (a buffer appended, a pickle, a reference) are computed
        # once per object and reused, by a second (careful) pass too; keeping the source
        # object in the entry keeps its id from being reused while we run.
        self.cache: dict[int, tuple[object, object]] = {}
        # Outputs whose fields msgpack packs natively as containers or bytes: the bytes-like
        # scan must look inside them.
        self.emitted: list[list[object]] = []
        self.careful = False

    # The hot path: called by msgpack's C packer for every value it does not know.
    def default(self, o: object) -> object:
        t = type(o)
        handler = _HANDLERS.get(t)
        if handler is None:
            handler = _find_handler(t)
        out = handler(self, o)
        if type(out) is list:
            if self.careful:
                return [self.prep(x) for x in out]
            if not _SCAN_TYPES.isdisjoint(map(type, out)):
                self.emitted.append(out)
        return out

    def cached(self, o: object) -> object:
        hit = self.cache.get(id(o))
        if hit is not None and hit[0] is o:
            return hit[1]
        return _NO_HANDLER

    def remember(self, o: object, out: object) -> object:
        self.cache[id(o)] = (o, out)
        return out

    def add_buffer(self, view: memoryview) -> int:
        self.buffers.append(view)
        return len(self.buffers) - 1

    def pack(self, obj: object) -> bytes:
        packer = msgpack.Packer(
            default=self.default, strict_types=True, use_bin_type=True, autoreset=False
        )
        packer.pack(CODEC_VERSION)
        packer.pack(obj)
        return packer.bytes()  # type: ignore[no-any-return]

    # -- the careful pass (rare): rebuild dicts/lists with lossy leaves boxed -----------
    def prep(self, o: object) -> object:
        t = type(o)
        if t is dict:
            return {self.prep(k): self.prep(v) for k, v in o.items()}  # type: ignore[attr-defined]
        if t is list:
            return [self.prep(x) for x in o]  # type: ignore[attr-defined]
        if t is bytearray or t is memoryview:
            return _Boxed(o)
        if t is str and not _utf8_ok(o):  # type: ignore[arg-type]
            return _Boxed(o)
        return o

    def has_bytes_like(self, root: object) -> bool:
        """True if a bytearray or memoryview sits where msgpack would pack it natively."""
        level: list[object] = [root, *self.emitted]
        while level:
            found = set(map(type, level))
            if bytearray in found or memoryview in found:
                return True
            containers = [x for x in level if type(x) is dict or type(x) is list]
            # gc.get_referents visits dict keys/values and list items in C.
            level = gc.get_referents(*containers) if containers else []
        return False


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SCAN_TYPES = frozenset({dict, list, bytearray, memoryview})


def _may_hold_bin(body: bytes) -> bool:
    # Every msgpack bin object starts with 0xc4, 0xc5 or 0xc6: without those bytes anywhere,
    # no bytes-like value was packed natively and the scan can be skipped.
    return b"\xc4" in body or b"\xc5" in body or b"\xc6" in body


def _check_depth(body: bytes) -> None:
    # msgpack's packer stops at a depth that depends on the Python version and the stack;
    # its unpacker at exactly MAX_DEPTH. Never write what cannot be read back.
    if len(body) <= MAX_DEPTH:
        return  # every level costs at least one byte
    unpacker = msgpack.Unpacker(max_buffer_size=len(body) + 1)
    unpacker.feed(body)
    try:
        unpacker.skip()
        unpacker.skip()
    except msgpack.StackError:
        raise CasmlError(
            f"the value is nested more than {MAX_DEPTH} containers deep, more than casml "
            "can read back; flatten it (or store the deep part with a Persistable)"
        ) from None


def encode(
    obj: object,
    *,
    allow_pickle: bool,
    reference_of: Callable[[object], str | None] | None = None,
    inline_limit: int = INLINE_LIMIT,
) -> Encoded:
    """Encode a value into a msgpack payload plus out-of-band buffers; see the module doc.

    ``reference_of(x)`` is asked about every object that is not a built-in, numpy or pandas
    type; a hash string makes ``x`` a reference (listed in ``Encoded.references``). Arrays of
    ``inline_limit`` bytes or more go out of band, as views of their memory. Values of other
    types need pickle: with ``allow_pickle=False`` they raise PickleNotAllowedError naming the
    type and where it sits. Cycles and nesting deeper than MAX_DEPTH raise CasmlError.
    """
    enc = _Encoder(allow_pickle, reference_of, inline_limit)
    try:
        try:
            body = enc.pack(obj)
            if _may_hold_bin(body) and enc.has_bytes_like(obj):
                enc.careful = True
                body = enc.pack(enc.prep(obj))
        except UnicodeEncodeError:
            if enc.careful:
                raise
            enc.careful = True  # a str with lone surrogates: box it in the careful pass
            body = enc.pack(enc.prep(obj))
        _check_depth(body)
    except _NeedsPickle as exc:
        raise _pickle_error(obj, exc, enc) from exc.cause
    except (RecursionError, ValueError) as exc:
        if isinstance(exc, RecursionError) or "recursion limit" in str(exc):
            raise _depth_error(obj, enc) from None
        raise CasmlError(f"cannot encode the value: {exc}") from exc
    except CasmlError:
        raise
    except Exception as exc:
        raise CasmlError(f"cannot encode the value: {type(exc).__name__}: {exc}") from exc
    return Encoded(payload=body, buffers=enc.buffers, references=enc.references)


def _pickle_error(obj: object, exc: _NeedsPickle, enc: _Encoder) -> CasmlError:
    where = find_path(obj, exc.obj, enc)
    name = type_name(type(exc.obj))
    if exc.cause is not None:
        return CasmlError(
            f"cannot store the {name} at {where}: pickle failed "
            f"({type(exc.cause).__name__}: {exc.cause}); define it at module level, or "
            "register/define a Persistable for it"
        )
    return PickleNotAllowedError(
        f"the {name} at {where} is not a type casml encodes natively and storing it needs "
        "pickle: open the Store with allow_pickle=True to store it, "
        "or register/define a Persistable"
    )


def _depth_error(obj: object, enc: _Encoder) -> CasmlError:
    cycle = find_cycle(obj, enc)
    if cycle is not None:
        return CasmlError(
            f"the value contains a reference cycle: {cycle} is a container that encloses "
            "it; casml stores trees of values, so break the cycle (or make the shared part "
            "a Persistable)"
        )
    return CasmlError(
        f"the value is nested too deeply to encode (the limit is {MAX_DEPTH} containers, "
        "fewer if the call itself runs deep in the stack); flatten it"
    )


# -- handlers for built-in types ---------------------------------------------------------


def _enc_tuple(enc: _Encoder, o: tuple[object, ...]) -> object:
    return [_T_TUPLE, *o]


def _sorted_if_possible(items: set[object] | frozenset[object]) -> list[object]:
    # Sorted elements make the payload independent of PYTHONHASHSEED, so equal sets give
    # equal blobs; mixed types that cannot be ordered keep iteration order.
    try:
        return sorted(items)  # type: ignore[type-var]
    except Exception:
        return list(items)


def _enc_set(enc: _Encoder, o: set[object]) -> object:
    return [_T_SET, *_sorted_if_possible(o)]


def _enc_frozenset(enc: _Encoder, o: frozenset[object]) -> object:
    return [_T_FROZENSET, *_sorted_if_possible(o)]


def _enc_int(enc: _Encoder, o: int) -> object:
    return ExtType(EXT_BIGINT, o.to_bytes((o.bit_length() + 8) // 8, "big", signed=True))


def _enc_complex(enc: _Encoder, o: complex) -> object:
    return ExtType(EXT_COMPLEX, struct.pack(">dd", o.real, o.imag))


def _enc_decimal(enc: _Encoder, o: Decimal) -> object:
    return ExtType(EXT_DECIMAL, str(o).encode("ascii"))


def _enc_uuid(enc: _Encoder, o: uuid.UUID) -> object:
    return ExtType(EXT_UUID, o.bytes)


def _enc_range(enc: _Encoder, o: range) -> object:
    return [TAGS[TAG_RANGE], o.start, o.stop, o.step]


def _enc_datetime(enc: _Encoder, o: _dt.datetime) -> object:
    return [
        TAGS[TAG_DATETIME],
        o.year,
        o.month,
        o.day,
        o.hour,
        o.minute,
        o.second,
        o.microsecond,
        o.fold,
        o.tzinfo,
    ]


def _enc_date(enc: _Encoder, o: _dt.date) -> object:
    return ExtType(EXT_DATE, struct.pack(">HBB", o.year, o.month, o.day))


def _enc_time(enc: _Encoder, o: _dt.time) -> object:
    return [TAGS[TAG_TIME], o.hour, o.minute, o.second, o.microsecond, o.fold, o.tzinfo]


def _enc_timedelta(enc: _Encoder, o: _dt.timedelta) -> object:
    return ExtType(EXT_TIMEDELTA, struct.pack(">iii", o.days, o.seconds, o.microseconds))


def _enc_timezone(enc: _Encoder, o: _dt.timezone) -> object:
    offset = o.utcoffset(None)
    name: str | None = o.tzname(None)
    # Only a name given at construction is kept; the default one is derived from the offset.
    if name == _dt.timezone(offset).tzname(None):
        name = None
    return [TAGS[TAG_TIMEZONE], offset, name]


def _enc_zoneinfo(enc: _Encoder, o: ZoneInfo) -> object:
    if o.key is None:  # built from a file: no key to find it again
        return _generic(enc, o)
    return ExtType(EXT_ZONEINFO, o.key.encode("utf-8"))


_PATH_CLASSES: dict[str, type[pathlib.PurePath]] = {
    "PurePosixPath": pathlib.PurePosixPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
    "PosixPath": pathlib.PosixPath,
    "WindowsPath": pathlib.WindowsPath,
}


def _enc_path(enc: _Encoder, o: pathlib.PurePath) -> object:
    return [TAGS[TAG_PATH], type(o).__name__, str(o)]


def _enc_ordereddict(enc: _Encoder, o: OrderedDict[object, object]) -> object:
    return [TAGS[TAG_ORDEREDDICT], dict(o)]


def _enc_boxed(enc: _Encoder, o: _Boxed) -> object:
    value = o.value
    if type(value) is bytearray:
        return ExtType(EXT_BYTEARRAY, bytes(value))
    if type(value) is str:
        return ExtType(EXT_SURROGATE_STR, value.encode("utf-8", "surrogatepass"))
    assert type(value) is memoryview
    try:
        memoryview(b"\0" * value.itemsize).cast("B").cast(value.format)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise CasmlError(
            f"cannot store a memoryview of format {value.format!r}; store bytes(view) or a "
            "numpy array instead"
        ) from None
    return [TAGS[TAG_MEMORYVIEW], value.format, list(value.shape or ()), value.readonly,
            value.tobytes()]  # fmt: skip


def _generic(enc: _Encoder, o: object) -> object:
    """Objects of types casml does not know: a reference, a user class, or pickle."""
    hit = enc.cached(o)
    if hit is not _NO_HANDLER:
        return hit
    if enc.reference_of is not None:
        ref = enc.reference_of(o)
        if ref is not None:
            if not isinstance(ref, str) or not ref.isascii() or not ref:
                raise CasmlError(f"reference_of returned {ref!r}; it must be a hash string")
            if ref not in enc.seen_refs:
                enc.seen_refs.add(ref)
                enc.references.append(ref)
            return enc.remember(o, ExtType(EXT_REF, ref.encode("ascii")))
    cls: Any = type(o)
    if isinstance(o, enum.Enum):
        ref_name = class_ref(cls)
        if ref_name is not None:
            if o.name is not None and cls.__members__.get(o.name) is o:
                return [TAGS[TAG_ENUM], ref_name, o.name]
            return [TAGS[TAG_ENUM], ref_name, None, o.value]
    elif dataclasses.is_dataclass(o):
        ref_name = class_ref(cls)
        if ref_name is not None:
            values = {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}
            return [TAGS[TAG_DATACLASS], ref_name, values]
    elif isinstance(o, tuple) and _is_namedtuple_class(cls):
        ref_name = class_ref(cls)
        if ref_name is not None:
            return [TAGS[TAG_NAMEDTUPLE], ref_name, *o]
    return enc.remember(o, _pickle(enc, o))


def _is_namedtuple_class(cls: type) -> bool:
    fields = getattr(cls, "_fields", None)
    return (
        issubclass(cls, tuple)
        and isinstance(fields, tuple)
        and all(isinstance(f, str) for f in fields)
        and callable(getattr(cls, "_make", None))
    )


def _pickle(enc: _Encoder, o: object) -> object:
    if not enc.allow_pickle:
        raise _NeedsPickle(o)
    indexes: list[int] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < enc.inline_limit:
            return True  # small: keep it inside the pickle
        indexes.append(enc.add_buffer(view))
        return False

    try:
        data = pickle.dumps(o, protocol=5, buffer_callback=out_of_band)
    except Exception as exc:
        raise _NeedsPickle(o, exc) from exc
    return [TAGS[TAG_PICKLE], type_name(type(o)), data, indexes]


_HANDLERS: dict[type, Handler] = {
    tuple: _enc_tuple,
    set: _enc_set,
    frozenset: _enc_frozenset,
    int: _enc_int,
    complex: _enc_complex,
    Decimal: _enc_decimal,
    uuid.UUID: _enc_uuid,
    range: _enc_range,
    _dt.datetime: _enc_datetime,
    _dt.date: _enc_date,
    _dt.time: _enc_time,
    _dt.timedelta: _enc_timedelta,
    _dt.timezone: _enc_timezone,
    ZoneInfo: _enc_zoneinfo,
    OrderedDict: _enc_ordereddict,
    _Boxed: _enc_boxed,
    pathlib.PurePosixPath: _enc_path,
    pathlib.PureWindowsPath: _enc_path,
    pathlib.PosixPath: _enc_path,
    pathlib.WindowsPath: _enc_path,
}


def _find_handler(t: type) -> Handler:
    module = getattr(t, "__module__", "") or ""
    root = module.partition(".")[0]
    if root == "numpy":
        from casml import _numpy_codec

        handler = _numpy_codec.handler_for(t)
        if handler is not None:
            _HANDLERS[t] = handler  # a finite set of numpy types: memoize
            return handler
    elif root == "pandas":
        from casml import _pandas_codec

        handler = _pandas_codec.handler_for(t)
        if handler is not None:
            _HANDLERS[t] = handler
            return handler
    elif root == "pytz":
        return _enc_pytz
    return _generic


def _enc_pytz(enc: _Encoder, o: object) -> object:
    zone = getattr(o, "zone", None)
    pytz: Any = importlib.import_module("pytz")  # reached for pytz objects only: installed
    if isinstance(zone, str) and pytz.timezone(zone) is o:
        return ExtType(EXT_PYTZ, zone.encode("utf-8"))
    return _generic(enc, o)


# -- where is it? (only on error paths) --------------------------------------------------


def _children(o: object, enc: _Encoder) -> Iterator[tuple[str, object]]:
    t = type(o)
    if isinstance(o, dict):
        for k, v in o.items():
            if type(k) not in (str, int, float, bool, bytes):
                yield f"<key {k!r}>", k
            yield f"[{k!r}]", v
    elif isinstance(o, (list, tuple)) and (t is list or t is tuple):
        for i, x in enumerate(o):
            yield f"[{i}]", x
    elif t is set or t is frozenset:
        for x in o:  # type: ignore[attr-defined]
            yield "<element>", x
    elif dataclasses.is_dataclass(o) and not isinstance(o, type):
        for f in dataclasses.fields(o):
            yield f".{f.name}", getattr(o, f.name, None)
    elif isinstance(o, tuple):
        names = getattr(t, "_fields", None)
        for i, x in enumerate(o):
            label = names[i] if isinstance(names, tuple) and i < len(names) else None
            yield (f".{label}" if isinstance(label, str) else f"[{i}]"), x
    else:
        if getattr(t, "__module__", "").partition(".")[0] == "numpy":
            from casml import _numpy_codec

            if _numpy_codec.is_object_array(o):
                yield from _numpy_codec.children(o)  # type: ignore[arg-type]
                return
        out = enc.cached(o)
        if out is _NO_HANDLER:
            handler = _HANDLERS.get(t)
            if handler is None or handler is _generic:
                return
            try:
                out = handler(enc, o)  # what this value is packed as (cached if costly)
            except Exception:
                return
        if type(out) is not list or not out:
            return
        if out[0] is TAGS[TAG_PD_DATAFRAME]:
            yield ".columns", out[1]
            names = (f"[{name!r}]" for name in o.columns)  # type: ignore[attr-defined]
            yield from zip(names, out[2], strict=False)
            yield ".index", out[3]
            yield ".attrs", out[4]
        elif out[0] is TAGS[TAG_PD_SERIES]:
            yield from zip((".values", ".index", ".name", ".attrs"), out[1:5], strict=True)
        else:
            yield from _output_children(out, f"<in {type_name(t)}>")


def _output_children(out: list[object], label: str) -> Iterator[tuple[str, object]]:
    for x in out:
        if type(x) is list:
            yield from _output_children(x, label)
        elif type(x) is not ExtType and not isinstance(x, str):
            yield label, x


_ATOMS = (type(None), bool, int, float, str, bytes, complex)
_MAX_PATH = 300

_Frame = tuple[str, object, Iterator[tuple[str, object]]]


def _path(stack: list[_Frame], label: str) -> str:
    text = "value" + "".join(frame[0] for frame in stack[1:]) + label
    return text if len(text) <= _MAX_PATH else f"{text[:150]} ... {text[-150:]}"


def _search(root: object, enc: _Encoder, target: object | None) -> str | None:
    """Depth-first, iteratively (any depth), over the containers casml descends.

    With a ``target``: the path where it sits, like ``value['model'][2]``. Without: the
    path of the first container that contains itself (a cycle). None if there is none.
    """
    if target is not None and root is target:
        return "value"
    if isinstance(root, _ATOMS):
        return None
    stack: list[_Frame] = [("", root, _children(root, enc))]
    on_path = {id(root)}
    done: set[int] = set()
    while stack:
        _, current, kids = stack[-1]
        for label, child in kids:
            if target is not None and child is target:
                return _path(stack, label)
            if isinstance(child, _ATOMS):
                continue
            if id(child) in on_path:
                if target is None:
                    return _path(stack, label)
                continue
            if id(child) in done:
                continue
            on_path.add(id(child))
            stack.append((label, child, _children(child, enc)))
            break
        else:
            stack.pop()
            on_path.discard(id(current))
            done.add(id(current))
    return None


def find_path(root: object, target: object, enc: _Encoder) -> str:
    """Where ``target`` sits inside ``root``, like ``value['model'][2]``."""
    return _search(root, enc, target) or "value (somewhere inside)"


def find_cycle(root: object, enc: _Encoder) -> str | None:
    """The path of a container that contains itself, or None."""
    return _search(root, enc, None)


# -- decoding ---------------------------------------------------------------------------


class _Tag:
    """What a tag extension decodes to, until ``list_hook`` consumes its array."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


_TAG_OBJECTS: dict[int, _Tag] = {code: _Tag(code) for code in _TAG_CODES}

Builder = Callable[["_Decoder", list[Any]], object]


class _Decoder:
    """Per-call state of one ``decode``: msgpack's hooks, the buffers, the counters."""

    __slots__ = (
        "allow_pickle",
        "classes",
        "raw_buffers",
        "resolve_reference",
        "tags_seen",
        "tags_used",
        "views",
    )

    def __init__(
        self,
        buffers: Sequence[memoryview | bytearray | bytes],
        allow_pickle: bool,
        resolve_reference: Callable[[str], object] | None,
    ) -> None:
        self.raw_buffers = buffers
        self.views: dict[int, memoryview] = {}
        self.allow_pickle = allow_pickle
        self.resolve_reference = resolve_reference
        self.classes: dict[str, type] = {}
        self.tags_seen = 0
        self.tags_used = 0

    def ext_hook(self, code: int, data: bytes) -> object:
        tag = _TAG_OBJECTS.get(code)
        if tag is not None:
            if data:
                raise corrupt(f"tag extension {code} carries data")
            self.tags_seen += 1
            return tag
        leaf = _LEAVES.get(code)
        if leaf is None:
            raise corrupt(f"unknown extension code {code}")
        return leaf(self, data)

    def list_hook(self, items: list[Any]) -> object:
        if items and type(items[0]) is _Tag:
            self.tags_used += 1
            return _BUILDERS[items[0].code](self, items)
        return items

    def buffer(self, index: object) -> memoryview:
        """The out-of-band buffer ``index`` as a flat unsigned-byte memoryview."""
        if type(index) is not int or not 0 <= index < len(self.raw_buffers):
            raise corrupt(
                f"buffer index {index!r} is out of range (there are {len(self.raw_buffers)})"
            )
        view = self.views.get(index)
        if view is None:
            view = memoryview(self.raw_buffers[index])
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            self.views[index] = view
        return view

    def resolve(self, ref: object, what: str) -> type:
        if isinstance(ref, str):
            cls = self.classes.get(ref)
            if cls is not None:
                return cls
        cls = resolve_class(ref, what)
        self.classes[ref] = cls  # type: ignore[index]
        return cls


def decode(
    payload: bytes,
    buffers: Sequence[memoryview | bytearray | bytes],
    *,
    allow_pickle: bool,
    resolve_reference: Callable[[str], object] | None = None,
) -> object:
    """Rebuild the value encoded in ``payload``, reading out-of-band data from ``buffers``.

    Arrays stored out of band come back as views of the given buffers (writable if the
    buffer is, e.g. a bytearray). References call ``resolve_reference(hash)``. A pickled
    value with ``allow_pickle=False`` raises PickleNotAllowedError without unpickling;
    corrupt, truncated or hostile input raises IntegrityError.
    """
    view = memoryview(payload)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) == 0:
        raise corrupt("it is empty")
    version = view[0]
    if version != CODEC_VERSION:
        if 1 < version < 0x80:
            raise IntegrityError(
                f"the payload was written by casml codec version {version}, newer than this "
                f"casml reads ({CODEC_VERSION}); upgrade casml (pip install -U casml) to read it"
            )
        raise corrupt(f"it starts with byte 0x{version:02x}, not a casml codec version")
    dec = _Decoder(buffers, allow_pickle, resolve_reference)
    body = view[1:]
    limit = len(body)
    try:
        value = msgpack.unpackb(
            body,
            ext_hook=dec.ext_hook,
            list_hook=dec.list_hook,
            use_list=True,
            raw=False,
            strict_map_key=False,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=limit,
        )
    except CasmlError:
        raise
    except msgpack.StackError:
        raise corrupt(f"it nests deeper than {MAX_DEPTH} levels") from None
    except Exception as exc:
        raise corrupt(f"{type(exc).__name__}: {exc}") from exc
    if dec.tags_seen != dec.tags_used:
        raise corrupt("a type tag sits outside the head of an array")
    return value


# -- leaf decoders ----------------------------------------------------------------------


def _dec_bigint(dec: _Decoder, data: bytes) -> object:
    if not data or len(data) > _BIG_INT_LIMIT:
        raise corrupt(f"a big integer has {len(data)} bytes")
    return int.from_bytes(data, "big", signed=True)


def _dec_complex(dec: _Decoder, data: bytes) -> object:
    if len(data) != 16:
        raise corrupt("a complex number is not 16 bytes")
    real, imag = struct.unpack(">dd", data)
    return complex(real, imag)


def _dec_bytearray(dec: _Decoder, data: bytes) -> object:
    return bytearray(data)


def _dec_decimal(dec: _Decoder, data: bytes) -> object:
    return Decimal(data.decode("ascii"))


def _dec_uuid(dec: _Decoder, data: bytes) -> object:
    return uuid.UUID(bytes=data)


def _dec_date(dec: _Decoder, data: bytes) -> object:
    if len(data) != 4:
        raise corrupt("a date is not 4 bytes")
    return _dt.date(*struct.unpack(">HBB", data))


def _dec_timedelta(dec: _Decoder, data: bytes) -> object:
    if len(data) != 12:
        raise corrupt("a timedelta is not 12 bytes")
    days, seconds, micros = struct.unpack(">iii", data)
    return _dt.timedelta(days=days, seconds=seconds, microseconds=micros)


def _dec_zoneinfo(dec: _Decoder, data: bytes) -> object:
    key = data.decode("utf-8")
    try:
        return ZoneInfo(key)
    except ZoneInfoNotFoundError:
        raise CasmlError(
            f"time zone {key!r} is not in this machine's time zone database; "
            "install the tzdata package (pip install tzdata) and load again"
        ) from None


def _dec_ref(dec: _Decoder, data: bytes) -> object:
    ref = data.decode("ascii")
    if not ref:
        raise corrupt("an empty reference")
    if dec.resolve_reference is None:
        raise UnresolvedReferenceError(
            f"the value refers to the stored artifact {ref}; decode it through a Store "
            "(store.get) so the reference can be loaded, or pass resolve_reference"
        )
    return dec.resolve_reference(ref)


def _dec_pd_na(dec: _Decoder, data: bytes) -> object:
    if data:
        raise corrupt("pandas.NA carries data")
    import pandas as pd

    return pd.NA


def _dec_pd_nat(dec: _Decoder, data: bytes) -> object:
    if data:
        raise corrupt("pandas.NaT carries data")
    import pandas as pd

    return pd.NaT


def _dec_pytz(dec: _Decoder, data: bytes) -> object:
    name = data.decode("utf-8")
    try:
        pytz: Any = importlib.import_module("pytz")
    except ImportError:
        # Same zone rules, from the standard library.
        return _dec_zoneinfo(dec, data)
    return pytz.timezone(name)


def _dec_surrogate_str(dec: _Decoder, data: bytes) -> object:
    return data.decode("utf-8", "surrogatepass")


_LEAVES: dict[int, Callable[[_Decoder, bytes], object]] = {
    EXT_BIGINT: _dec_bigint,
    EXT_COMPLEX: _dec_complex,
    EXT_BYTEARRAY: _dec_bytearray,
    EXT_DECIMAL: _dec_decimal,
    EXT_UUID: _dec_uuid,
    EXT_DATE: _dec_date,
    EXT_TIMEDELTA: _dec_timedelta,
    EXT_ZONEINFO: _dec_zoneinfo,
    EXT_REF: _dec_ref,
    EXT_PD_NA: _dec_pd_na,
    EXT_PD_NAT: _dec_pd_nat,
    EXT_PYTZ: _dec_pytz,
    EXT_SURROGATE_STR: _dec_surrogate_str,
}

# -- composite builders -----------------------------------------------------------------


def fields_of(items: list[Any], count: int, what: str) -> list[Any]:
    """The fields after the tag, checking there are exactly ``count``."""
    if len(items) != count + 1:
        raise corrupt(f"a {what} has {len(items) - 1} fields instead of {count}")
    return items[1:]


def _int(x: object, what: str) -> int:
    if type(x) is not int:
        raise corrupt(f"{what} is {type(x).__name__}, not int")
    return x


def _tz(x: object) -> _dt.tzinfo | None:
    if x is not None and not isinstance(x, _dt.tzinfo):
        raise corrupt(f"a time zone is a {type(x).__name__}")
    return x


def _build_tuple(dec: _Decoder, items: list[Any]) -> object:
    return tuple(items[1:])


def _build_set(dec: _Decoder, items: list[Any]) -> object:
    return set(items[1:])


def _build_frozenset(dec: _Decoder, items: list[Any]) -> object:
    return frozenset(items[1:])


def _build_range(dec: _Decoder, items: list[Any]) -> object:
    start, stop, step = fields_of(items, 3, "range")
    return range(start, stop, step)


def _build_datetime(dec: _Decoder, items: list[Any]) -> object:
    fields = fields_of(items, 9, "datetime")
    y, mo, d, h, mi, s, us, fold = (_int(p, "a datetime field") for p in fields[:8])
    return _dt.datetime(y, mo, d, h, mi, s, us, tzinfo=_tz(fields[8]), fold=fold)


def _build_time(dec: _Decoder, items: list[Any]) -> object:
    fields = fields_of(items, 6, "time")
    h, mi, s, us, fold = (_int(p, "a time field") for p in fields[:5])
    return _dt.time(h, mi, s, us, tzinfo=_tz(fields[5]), fold=fold)


def _build_timezone(dec: _Decoder, items: list[Any]) -> object:
    offset, name = fields_of(items, 2, "timezone")
    if type(offset) is not _dt.timedelta:
        raise corrupt("a timezone offset is not a timedelta")
    if name is None:
        return _dt.timezone(offset)
    return _dt.timezone(offset, name)


def _build_path(dec: _Decoder, items: list[Any]) -> object:
    name, text = fields_of(items, 2, "path")
    cls = _PATH_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None or type(text) is not str:
        raise corrupt(f"a path of class {name!r}")
    try:
        return cls(text)
    except NotImplementedError:  # WindowsPath on POSIX or PosixPath on Windows
        pure = pathlib.PureWindowsPath if name == "WindowsPath" else pathlib.PurePosixPath
        return pure(text)


def _build_enum(dec: _Decoder, items: list[Any]) -> object:
    if len(items) not in (3, 4):
        raise corrupt("an enum member has the wrong number of fields")
    cls = dec.resolve(items[1], "Enum")
    if not issubclass(cls, enum.Enum):
        raise UnregisteredClassError(f"{items[1]} is no longer an Enum; cannot load its member")
    if len(items) == 3:
        name = items[2]
        member = cls.__members__.get(name) if isinstance(name, str) else None
        if member is None:
            raise UnregisteredClassError(
                f"Enum {items[1]} has no member {name!r} any more; restore it to load this value"
            )
        return member
    try:
        return cls(items[3])
    except ValueError:
        raise UnregisteredClassError(
            f"Enum {items[1]} has no member of value {items[3]!r} any more"
        ) from None


def _build_dataclass(dec: _Decoder, items: list[Any]) -> object:
    ref, values = fields_of(items, 2, "dataclass")
    cls = dec.resolve(ref, "dataclass")
    if not dataclasses.is_dataclass(cls) or type(values) is not dict:
        raise UnregisteredClassError(f"{ref} is not a dataclass any more; cannot load it")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UnregisteredClassError(
            f"the stored {ref} has fields {unknown} that the installed class lacks; install "
            "the version of the class it was stored with"
        )
    try:
        obj = cls(**{k: v for k, v in values.items() if known[k].init})
        for k, v in values.items():
            if not known[k].init:
                object.__setattr__(obj, k, v)
    except Exception as exc:
        raise UnregisteredClassError(
            f"cannot rebuild the stored {ref}: {type(exc).__name__}: {exc}; the class changed "
            "since it was stored"
        ) from exc
    return obj


def _build_namedtuple(dec: _Decoder, items: list[Any]) -> object:
    if len(items) < 2:
        raise corrupt("a NamedTuple has no class")
    cls = dec.resolve(items[1], "NamedTuple")
    if not _is_namedtuple_class(cls):
        raise UnregisteredClassError(f"{items[1]} is not a NamedTuple any more; cannot load it")
    values = items[2:]
    if len(values) != len(cls._fields):  # type: ignore[attr-defined]
        raise UnregisteredClassError(
            f"the stored {items[1]} has {len(values)} fields, the installed class "
            f"{len(cls._fields)}; install the version it was stored with"  # type: ignore[attr-defined]
        )
    return cls._make(values)  # type: ignore[attr-defined]


def _build_ordereddict(dec: _Decoder, items: list[Any]) -> object:
    (mapping,) = fields_of(items, 1, "OrderedDict")
    if type(mapping) is not dict:
        raise corrupt("an OrderedDict does not hold a map")
    return OrderedDict(mapping)


def _build_memoryview(dec: _Decoder, items: list[Any]) -> object:
    fmt, shape, readonly, data = fields_of(items, 4, "memoryview")
    if type(fmt) is not str or type(shape) is not list or type(data) is not bytes:
        raise corrupt("a memoryview has fields of the wrong types")
    base = memoryview(data if readonly else bytearray(data))
    return base.cast(fmt, [_int(n, "a memoryview dimension") for n in shape])  # type: ignore[call-overload]


def _build_pickle(dec: _Decoder, items: list[Any]) -> object:
    name, data, indexes = fields_of(items, 3, "pickle")
    if not dec.allow_pickle:
        raise PickleNotAllowedError(
            f"the stored value holds a pickled {name}, and unpickling runs code from the "
            "store: open the Store with allow_pickle=True to load it (only for stores you "
            "trust)"
        )
    if type(data) is not bytes or type(indexes) is not list:
        raise corrupt("a pickle has fields of the wrong types")
    views = [dec.buffer(i) for i in indexes]
    try:
        return pickle.loads(data, buffers=views)
    except (ImportError, AttributeError) as exc:
        raise UnregisteredClassError(
            f"cannot unpickle the stored {name}: {type(exc).__name__}: {exc}; install the "
            "package that defines it, at the version it was stored with"
        ) from exc


def _lazy_builder(code: int, module: str, name: str) -> Builder:
    # numpy and pandas are imported on the first value that needs them, then the real
    # builder replaces this stub.
    def build(dec: _Decoder, items: list[Any]) -> object:
        real: Builder = getattr(importlib.import_module(module), name)
        _BUILDERS[code] = real
        return real(dec, items)

    return build


_BUILDERS: dict[int, Builder] = {
    TAG_TUPLE: _build_tuple,
    TAG_SET: _build_set,
    TAG_FROZENSET: _build_frozenset,
    TAG_RANGE: _build_range,
    TAG_DATETIME: _build_datetime,
    TAG_TIME: _build_time,
    TAG_TIMEZONE: _build_timezone,
    TAG_PATH: _build_path,
    TAG_ENUM: _build_enum,
    TAG_DATACLASS: _build_dataclass,
    TAG_NAMEDTUPLE: _build_namedtuple,
    TAG_ORDEREDDICT: _build_ordereddict,
    TAG_MEMORYVIEW: _build_memoryview,
    TAG_PICKLE: _build_pickle,
}
for _code, _name in (
    (TAG_NDARRAY, "build_ndarray"),
    (TAG_NDARRAY_OBJECT, "build_ndarray_object"),
    (TAG_NPSCALAR, "build_scalar"),
    (TAG_NPDTYPE, "build_dtype"),
    (TAG_NDARRAY_STRING, "build_ndarray_string"),
):
    _BUILDERS[_code] = _lazy_builder(_code, "casml._numpy_codec", _name)
for _code, _name in (
    (TAG_PD_SERIES, "build_series"),
    (TAG_PD_DATAFRAME, "build_dataframe"),
    (TAG_PD_INDEX, "build_index"),
    (TAG_PD_RANGEINDEX, "build_rangeindex"),
    (TAG_PD_MULTIINDEX, "build_multiindex"),
    (TAG_PD_CATEGORICAL, "build_categorical"),
    (TAG_PD_MASKED, "build_masked"),
    (TAG_PD_STRING, "build_string"),
    (TAG_PD_DATETIMETZ, "build_datetimetz"),
    (TAG_PD_TIMESTAMP, "build_timestamp"),
    (TAG_PD_TIMEDELTA, "build_timedelta"),
):
    _BUILDERS[_code] = _lazy_builder(_code, "casml._pandas_codec", _name)
del _code, _name
assert set(_BUILDERS) == set(_TAG_CODES)
