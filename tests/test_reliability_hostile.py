"""Hostile input: fuzzed manifests, payloads, records, keys, names and tags.

The attacker here controls the storage: they can write any bytes as a blob (under that blob's
true digest), any manifest (with a correctly recomputed checksum: it is not a signature) and
any name/tag record, and they choose the keys, names and tags passed to the API. Whatever they
do, only CasmlError subclasses may come out, memory stays bounded (tracemalloc peak), nothing
outside the store's root is read or written (an audit hook watches every file operation),
and names and tags are stored literally.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import sys
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import pytest
import xxhash
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casml import codec, maintenance
from casml.cli import cli
from casml.errors import CasmlError
from casml.manifest import _checksum
from casml.store import Store
from tests.reliability_tools import CRASH_CHUNK, make_object, put_seed, write_report

#: Multiplies every test's number of examples (docs/reliability.md reports a run at 10;
#: the default, about 3,800 cases, takes about 45 s).
SCALE = float(os.environ.get("CASML_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Hypothesis settings for ``examples`` cases (times $CASML_FUZZ_SCALE)."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


#: Peak Python allocation any single hostile operation may reach.
MEMORY_LIMIT = 64 * 1024 * 1024


@pytest.fixture(autouse=True)
def no_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maintenance, "_SETTLE_SECONDS", 0.0)


# ---------------------------------------------------------------------------- confinement


class Confinement:
    """Record every file operation outside the allowed folders while active.

    ``sys.addaudithook`` hooks cannot be removed, so one hook is installed for the module
    and switched on and off.
    """

    EVENTS: ClassVar[dict[str, int]] = {
        "open": 0,
        "os.listdir": 0,
        "os.scandir": 0,
        "os.remove": 0,
        "os.rmdir": 0,
        "os.mkdir": 0,
        "os.rename": 1,
        "os.link": 1,
        "os.symlink": 1,
        "os.truncate": 0,
        "os.utime": 0,
        "os.chmod": 0,
        "shutil.rmtree": 0,
        "sqlite3.connect": 0,
    }

    def __init__(self) -> None:
        self.active = False
        self.allowed: tuple[str, ...] = ()
        self.violations: list[tuple[str, str]] = []
        python = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__)}
        repo = str(Path(__file__).resolve().parent.parent)
        # Imports read Python's own files and the project's; the zone database is read
        # (through zoneinfo's own path checks) for stored time zones.
        self.always = (*python, repo, "/usr/share/zoneinfo", "/dev/null", "/proc/self")
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event not in self.EVENTS:
            return
        paths = args[: self.EVENTS[event] + 1]
        for path in paths:
            if isinstance(path, int) or path is None:
                continue  # a file descriptor: its opening was checked
            text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
            if text in ("", ":memory:") or text.startswith("file:"):
                continue
            full = os.path.abspath(text)
            if not any(full == a or full.startswith(a.rstrip("/") + "/") for a in self.allowed):
                self.violations.append((event, full))

    @contextlib.contextmanager
    def only(self, *folders: Path | str) -> Iterator[None]:
        self.allowed = (*self.always, *(os.path.abspath(str(f)) for f in folders))
        self.active = True
        try:
            yield
        finally:
            self.active = False
        found, self.violations = self.violations, []
        assert not found, f"touched files outside the store: {found[:5]}"


@pytest.fixture(scope="module")
def confinement() -> Confinement:
    return Confinement()


@contextlib.contextmanager
def bounded_memory(figures: dict[str, int] | None = None) -> Iterator[None]:
    # Traced only here: tracemalloc slows everything it watches several times over.
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if figures is not None:
        figures["peak"] = max(figures.get("peak", 0), peak)
    assert peak < MEMORY_LIMIT, f"peak allocation {peak} bytes"


def only_casml_errors(action: Callable[[], Any]) -> str:
    """Run ``action``; return "ok" or the CasmlError class name; anything else fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reindex warns about what it skips: that is fine
        try:
            action()
        except CasmlError as exc:
            return type(exc).__name__
    return "ok"


# ---------------------------------------------------------------------------- a sandboxed store


class Sandbox:
    """A store in ``folder/root`` with its index in ``folder/db``, among decoy files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = folder / "root"
        self.db = folder / "db"
        self.db.mkdir(parents=True)
        for name in ("decoy.txt", "etc/passwd", "manifests/ab/cdef"):
            decoy = folder / name
            decoy.parent.mkdir(parents=True, exist_ok=True)
            decoy.write_text("decoy: casml must never touch this file\n")
        self.store = Store(self.root, index=f"sqlite:///{self.db / 'index.sqlite'}")
        self.store._blobs.chunk_size = CRASH_CHUNK
        self.other = Store(folder / "db" / "other", index=f"sqlite:///{self.db / 'other.sqlite'}")
        # Good artifacts live beside the hostile ones: they must survive every example.
        self.good = {put_seed(self.store, s): s for s in (1, 2, 3)}
        self.template = json.loads(self.store._blobs.get_manifest(self._address(3)))[
            "casml_manifest"
        ]

    def _address(self, seed: int) -> str:
        return next(h for h, s in self.good.items() if s == seed)

    def decoys_intact(self) -> None:
        for name in ("decoy.txt", "etc/passwd", "manifests/ab/cdef"):
            assert (self.folder / name).read_text().startswith("decoy"), name

    def plant_manifest(self, address: str, data: bytes) -> None:
        path = self.root / "manifests" / address[:2] / address[2:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def plant_blob(self, data: bytes) -> str:
        digest = xxhash.xxh3_128_hexdigest(data)
        path = self.root / "objects" / digest[:2] / digest[2:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    def remove(self, address: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "manifests" / address[:2] / address[2:]).unlink()
        self.store._index.delete(address)
        self.other._index.delete(address)
        with contextlib.suppress(FileNotFoundError):
            other = Path(self.other.root) / "manifests" / address[:2] / address[2:]
            other.unlink()

    def exercise(self, address: str, figures: dict[str, Any]) -> dict[str, str]:
        """Every read path on ``address``; each may only succeed or raise a CasmlError.

        The paths that decode (get, and pull, which parses manifests) run under the memory
        bound; the scans (verify, gc, reindex, du) read every manifest, forged one included.
        """
        s = self.store
        with bounded_memory(figures):
            outcomes = {
                "get": only_casml_errors(lambda: s.get(address)),
                "pull": only_casml_errors(lambda: self.other.pull(s, hashes=[address])),
            }
        outcomes.update(
            {
                "info": only_casml_errors(lambda: s.info(address)),
                "exists": only_casml_errors(lambda: s.exists(address)),
                "lineage": only_casml_errors(lambda: s.lineage(address)),
                "graph": only_casml_errors(lambda: s.graph(address)),
                "push": only_casml_errors(lambda: s.push(self.other, hashes=[address])),
                "reindex": only_casml_errors(s.reindex),
                "verify": only_casml_errors(s.verify),
                "du": only_casml_errors(s.du),
                "gc": only_casml_errors(lambda: s.gc(grace=0)),
            }
        )
        assert address in s or address not in s  # __contains__ never raises
        return outcomes

    def good_still_good(self) -> None:
        from tests.reliability_tools import matches

        for h, seed in self.good.items():
            assert matches(self.store.get(h), seed)
        self.decoys_intact()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path_factory.mktemp("hostile"))
    try:
        yield box
    finally:
        box.store.close()
        box.other.close()


# ---------------------------------------------------------------------------- strategies

HOSTILE_TEXT = st.sampled_from(
    [
        "../../etc/passwd",
        "/etc/passwd",
        "..",
        "a\x00b",
        "'; DROP TABLE artifacts; --",
        "x" * 5000,
        "0" * 32,
        "ab" * 16,
        "ZZ" * 16,
        "\ud800",
        "objects/../../decoy.txt",
        "",
    ]
)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**40, 2**62, 2**64 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    HOSTILE_TEXT,
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MANIFEST_PATHS = [
    ("format",),
    ("address",),
    ("kind",),
    ("class_name",),
    ("module",),
    ("created_at",),
    ("codec",),
    ("codec", "name"),
    ("codec", "version"),
    ("payload",),
    ("payload", "digest"),
    ("payload", "size"),
    ("payload", "inline"),
    ("buffers",),
    ("buffers", 0),
    ("buffers", 0, 0),
    ("buffers", 0, 0, 0),
    ("buffers", 0, 0, 1),
    ("dependencies",),
    ("dependencies", 0),
    ("lazy_refs",),
    ("lazy_refs", "parent"),
    ("hash_attributes",),
    ("versions",),
]


def _set(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    """Replace the value at ``path`` in ``body`` (nothing if the path does not exist)."""

    def reachable(container: Any, step: Any) -> bool:
        if isinstance(container, dict):
            return isinstance(step, str)
        return isinstance(container, list) and isinstance(step, int) and step < len(container)

    target: Any = body
    for step in path[:-1]:
        if not reachable(target, step) or (isinstance(target, dict) and step not in target):
            return
        target = target[step]
    if reachable(target, path[-1]):
        target[path[-1]] = value


def forge(body: dict[str, Any], *, checksum: bool = True) -> bytes:
    document = {"casml_manifest": body, "checksum": _checksum(body) if checksum else "0" * 32}
    return json.dumps(document).encode()


def address_of(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(b"hostile\x00" + data)


def _tally(figures: dict[str, Any], outcomes: dict[str, str]) -> None:
    figures["examples"] = figures.get("examples", 0) + 1
    for what, outcome in outcomes.items():
        key = f"{what}:{outcome}"
        figures[key] = figures.get(key, 0) + 1


# ---------------------------------------------------------------------------- manifests

MANIFEST_FIGURES: dict[str, Any] = {}


@fuzz(200)
@given(
    mutations=st.lists(
        st.tuples(st.sampled_from(MANIFEST_PATHS), JSON_VALUE), min_size=1, max_size=3
    ),
    keep_checksum=st.booleans(),
)
def test_fuzzed_manifests(
    sandbox: Sandbox,
    confinement: Confinement,
    mutations: list[tuple[tuple[Any, ...], Any]],
    keep_checksum: bool,
) -> None:
    """Valid manifests with fields replaced by hostile JSON (checksum recomputed or not)."""
    body = copy.deepcopy(sandbox.template)
    # A fresh address (the template's is a good artifact's): mutations may still change it.
    address = xxhash.xxh3_128_hexdigest(repr((mutations, keep_checksum)).encode())
    body["address"] = address
    for path, value in mutations:
        _set(body, path, value)
    try:
        data = forge(body, checksum=keep_checksum)
    except (ValueError, UnicodeEncodeError):
        return  # not representable as stored JSON
    sandbox.plant_manifest(address, data)
    try:
        with confinement.only(sandbox.root, sandbox.db):
            _tally(MANIFEST_FIGURES, sandbox.exercise(address, MANIFEST_FIGURES))
    finally:
        sandbox.remove(address)
    sandbox.good_still_good()


RAW_FIGURES: dict[str, Any] = {}


@fuzz(200)
@given(
    data=st.one_of(
        st.binary(max_size=2000),
        st.builds(lambda n: b"[" * n, st.integers(1, 200_000)),
        st.builds(lambda n: b'{"a":' * n, st.integers(1, 100_000)),
        st.builds(lambda n: b"1" * n, st.integers(1, 20_000)),
    ),
    flips=st.lists(st.integers(0, 10_000), max_size=4),
    cut=st.integers(0, 4000),
)
def test_random_and_mutated_manifest_bytes(
    sandbox: Sandbox, confinement: Confinement, data: bytes, flips: list[int], cut: int
) -> None:
    """Random bytes, deep JSON nesting, long numbers, bit-flipped and truncated manifests."""
    good = sandbox.store._blobs.get_manifest(sandbox._address(3))
    if flips or cut:
        mutated = bytearray(good[: cut or None])
        for f in flips:
            if mutated:
                mutated[f % len(mutated)] ^= 1 << (f % 8)
        data = bytes(mutated) if not data else data + bytes(mutated)
    address = address_of(data)
    sandbox.plant_manifest(address, data)
    try:
        with confinement.only(sandbox.root, sandbox.db):
            _tally(RAW_FIGURES, sandbox.exercise(address, RAW_FIGURES))
    finally:
        sandbox.remove(address)
    sandbox.good_still_good()


# ---------------------------------------------------------------------------- payloads


def _pack(value: Any) -> bytes:
    try:
        return bytes(msgpack.packb(value))
    except (OverflowError, ValueError, TypeError):
        return bytes(msgpack.packb(repr(value)))


def _crafted_msgpack() -> st.SearchStrategy[bytes]:
    """msgpack that claims huge lengths, nests deeply, or carries every extension code."""
    huge_headers = st.sampled_from(
        [
            b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
            b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
            b"\xdd\xff\xff\xff\xff",  # array32 of 4 G items
            b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
            b"\xc9\xff\xff\xff\xff\x05",  # ext32 of 4 GiB
            b"\xdc\xff\xff",  # array16
        ]
    )
    nested = st.builds(
        lambda n, head: head * n, st.integers(1, 300_000), st.sampled_from([b"\x91", b"\x81\xa0"])
    )
    ext = st.builds(
        lambda code, data: msgpack.packb(msgpack.ExtType(code, data)),
        st.integers(0, 127),
        st.one_of(st.binary(max_size=64), HOSTILE_TEXT.map(lambda t: t.encode("utf-8", "replace"))),
    )
    tagged = st.builds(
        lambda code, fields: _pack([msgpack.ExtType(code, b""), *fields]),
        st.sampled_from(sorted(codec.TAGS)),
        st.lists(JSON_VALUE, max_size=6),
    )
    return st.one_of(
        st.builds(lambda h, tail: h + tail, huge_headers, st.binary(max_size=64)),
        nested,
        ext,
        tagged,
        st.binary(max_size=512),
    )


def _mutated_encodings() -> st.SearchStrategy[bytes]:
    values = st.sampled_from([make_object(0), make_object(1)["data"][:300], {"t": (1, 2.5)}])

    def mutate(value: Any, flips: list[int], cut: int) -> bytes:
        encoded = codec.encode(value, allow_pickle=False)
        body = bytearray(encoded.payload[: cut or None])
        for f in flips:
            if len(body) > 1:
                body[1 + f % (len(body) - 1)] ^= 1 << (f % 8)
        return bytes(body)

    return st.builds(
        mutate, values, st.lists(st.integers(0, 10**6), max_size=6), st.integers(0, 2000)
    )


PAYLOAD_FIGURES: dict[str, Any] = {}


@fuzz(500)
@given(
    payload=st.one_of(
        _crafted_msgpack().map(lambda b: b"\x01" + b),
        _mutated_encodings(),
        st.binary(max_size=300),
    ),
    as_blob=st.booleans(),
    buffers=st.lists(st.tuples(st.binary(max_size=200), st.integers(-3, 2**62)), max_size=3),
)
def test_fuzzed_payloads_through_the_store(
    sandbox: Sandbox,
    confinement: Confinement,
    payload: bytes,
    as_blob: bool,
    buffers: list[tuple[bytes, int]],
) -> None:
    """Hostile payloads and buffers behind a well-formed manifest (checksums all correct)."""
    body = copy.deepcopy(sandbox.template)
    digest = xxhash.xxh3_128_hexdigest(payload)
    if as_blob:
        sandbox.plant_blob(payload)
        body["payload"] = {"digest": digest, "size": len(payload), "inline": None}
    else:
        inline = base64.b64encode(payload).decode()
        body["payload"] = {"digest": digest, "size": len(payload), "inline": inline}
    # Real chunks with claimed sizes that may lie (negative, huge, a little off).
    body["buffers"] = [[[sandbox.plant_blob(data), claimed]] for data, claimed in buffers]
    body["kind"] = "value"
    body["lazy_refs"] = {}
    body["dependencies"] = []
    data = forge(body)
    address = address_of(data)
    body["address"] = address
    data = forge(body)
    sandbox.plant_manifest(address, data)
    try:
        with confinement.only(sandbox.root, sandbox.db), bounded_memory(PAYLOAD_FIGURES):
            outcome = only_casml_errors(lambda: sandbox.store.get(address))
            _tally(PAYLOAD_FIGURES, {"get": outcome})
    finally:
        sandbox.remove(address)


DECODE_FIGURES: dict[str, Any] = {}


@fuzz(2000)
@given(
    payload=st.one_of(_crafted_msgpack(), _mutated_encodings().map(lambda b: b[1:])),
    buffers=st.lists(st.binary(max_size=300), max_size=3),
)
def test_fuzzed_payloads_decode(payload: bytes, buffers: list[bytes]) -> None:
    """The codec alone, many more cases: only CasmlErrors, bounded memory."""
    with bounded_memory(DECODE_FIGURES):
        outcome = only_casml_errors(
            lambda: codec.decode(
                b"\x01" + payload, [bytearray(b) for b in buffers], allow_pickle=False
            )
        )
    _tally(DECODE_FIGURES, {"decode": outcome})


def test_reference_cycles_and_deep_reference_chains(sandbox: Sandbox) -> None:
    """A payload naming its own address, or a chain of 1000 references, fails cleanly.

    Eager references load while their parent decodes: before casml bounded their depth, a
    forged cycle overflowed the native stack and killed the process (SIGSEGV).
    """

    def plant(address: str, target: str | None) -> None:
        inner: Any = msgpack.ExtType(codec.EXT_REF, target.encode()) if target else 1
        payload = b"\x01" + msgpack.packb([inner])
        body = copy.deepcopy(sandbox.template)
        body.update(
            address=address,
            kind="value",
            lazy_refs={},
            dependencies=[target] if target else [],
            buffers=[],
            payload={
                "digest": xxhash.xxh3_128_hexdigest(payload),
                "size": len(payload),
                "inline": base64.b64encode(payload).decode(),
            },
        )
        sandbox.plant_manifest(address, forge(body))

    cycle = "c" * 32
    plant(cycle, cycle)
    chain = [xxhash.xxh3_128_hexdigest(b"chain%d" % i) for i in range(1000)]
    for here, following in zip(chain, [*chain[1:], None], strict=True):
        plant(here, following)
    short = [xxhash.xxh3_128_hexdigest(b"short%d" % i) for i in range(20)]
    for here, following in zip(short, [*short[1:], None], strict=True):
        plant(here, following)
    try:
        assert only_casml_errors(lambda: sandbox.store.get(cycle)) == "IntegrityError"
        assert only_casml_errors(lambda: sandbox.store.get(chain[0])) == "IntegrityError"
        value = sandbox.store.get(short[0])  # an honest depth still loads
        depth = 0
        while isinstance(value, list):
            value, depth = value[0], depth + 1
        assert (depth, value) == (20, 1)
    finally:
        for address in [cycle, *chain, *short]:
            sandbox.remove(address)


# ---------------------------------------------------------------------------- records

RECORD_FIGURES: dict[str, Any] = {}


@fuzz(120)
@given(
    record=st.one_of(
        st.fixed_dictionaries(
            {
                "casml_record": st.just(1),
                "kind": st.sampled_from(["name", "tags", "other"]),
                "address": st.one_of(st.just("GOOD"), HOSTILE_TEXT, JSON_VALUE),
                "name": st.one_of(HOSTILE_TEXT, JSON_VALUE, st.text(max_size=300)),
                "version": JSON_VALUE,
                "tags": st.one_of(
                    JSON_VALUE, st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT, max_size=3)
                ),
                "at": JSON_VALUE,
            }
        ),
        JSON_VALUE,
    ),
    raw=st.one_of(st.none(), st.binary(max_size=200), st.just(b"[" * 50_000)),
)
def test_fuzzed_name_and_tag_records(
    sandbox: Sandbox, confinement: Confinement, record: Any, raw: bytes | None
) -> None:
    """Hostile records (stored under their true digest): reindex, pull, gc, verify survive."""
    if isinstance(record, dict) and record.get("address") == "GOOD":
        record["address"] = sandbox._address(1)
    try:
        data = raw if raw is not None else json.dumps(record).encode()
    except (ValueError, UnicodeEncodeError):
        return
    key = sandbox.store._blobs.put_record(data)
    s = sandbox.store
    try:
        with confinement.only(sandbox.root, sandbox.db):
            outcomes = {
                "reindex": only_casml_errors(s.reindex),
                "pull": only_casml_errors(lambda: sandbox.other.pull(s, hashes=list(sandbox.good))),
                "verify": only_casml_errors(s.verify),
                "gc": only_casml_errors(lambda: s.gc(grace=0)),
            }
            _tally(RECORD_FIGURES, outcomes)
        # A record must never stop the index from being rebuilt: it is skipped, not fatal.
        assert outcomes["reindex"] == "ok", outcomes
        assert outcomes["pull"] == "ok", outcomes
    finally:
        s._blobs.delete_record(key)
        with contextlib.suppress(CasmlError):
            sandbox.other._blobs.delete_record(key)
    sandbox.good_still_good()


# ---------------------------------------------------------------------------- keys

KEY_FIGURES: dict[str, Any] = {}


@fuzz(400)
@given(key=st.one_of(HOSTILE_TEXT, st.text(max_size=80), st.binary(max_size=40), st.integers()))
def test_hostile_keys_everywhere(sandbox: Sandbox, confinement: Confinement, key: Any) -> None:
    """Hashes such as ``../../etc/passwd``: refused before any path is built."""
    s = sandbox.store
    with confinement.only(sandbox.root, sandbox.db):
        outcomes = {
            "get": only_casml_errors(lambda: s.get(key)),
            "info": only_casml_errors(lambda: s.info(key)),
            "exists": only_casml_errors(lambda: s.exists(key)),
            "delete": only_casml_errors(lambda: s.delete(key)),
            "lineage": only_casml_errors(lambda: s.lineage(key)),
            "dependents": only_casml_errors(lambda: s.dependents(key)),
            "graph": only_casml_errors(lambda: s.graph(key)),
            "push": only_casml_errors(lambda: s.push(sandbox.other, hashes=[key])),
            "pull": only_casml_errors(lambda: sandbox.other.pull(s, hashes=[key])),
            "latest": only_casml_errors(lambda: s.latest(key)),
            "find": only_casml_errors(lambda: s.find(name=key)),
        }
        assert (key in s) in (True, False)
    _tally(KEY_FIGURES, outcomes)
    sandbox.good_still_good()


def test_hostile_keys_through_the_cli(sandbox: Sandbox, confinement: Confinement) -> None:
    runner = CliRunner()
    base = ["--root", str(sandbox.root), "--index", f"sqlite:///{sandbox.db / 'index.sqlite'}"]
    for key in ["../../etc/passwd", "/etc/passwd", "'; DROP TABLE artifacts; --", "0" * 40]:
        for command in (
            ["show", key],
            ["rm", key],
            ["graph", key],
            ["push", key, "--to", str(sandbox.db / "other")],
        ):
            with confinement.only(sandbox.root, sandbox.db):
                result = runner.invoke(cli, [*base, *command])
            assert result.exit_code in (1, 2), (command, result.output)
            assert "error:" in result.output and "Traceback" not in result.output
    sandbox.good_still_good()


# ---------------------------------------------------------------------------- names and tags

NAME = st.one_of(
    st.text(min_size=1, max_size=255),
    st.sampled_from(
        [
            "'; DROP TABLE artifacts; --",
            '" OR 1=1 --',
            "%",
            "_",
            "a%b_c",
            "\\",
            "Robert'); DROP TABLE names;--",
            "../../etc/passwd",
            "ünïcödé ✓ 名前 🚀",
            "\u202eevil",
            " leading and trailing ",
            "x" * 255,
        ]
    ),
)
NAMING_FIGURES: dict[str, Any] = {"stored": 0, "refused": 0}
NAMED: dict[str, tuple[str, dict[str, str]]] = {}


@pytest.fixture(scope="module")
def names_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    folder = tmp_path_factory.mktemp("names")
    with Store(folder / "root", index=f"sqlite:///{folder / 'index.sqlite'}") as store:
        yield store


@fuzz(400)
@given(
    name=st.one_of(NAME, st.just("x" * 256), st.just("a\x00b"), st.just("\udcff"), st.just("")),
    tags=st.dictionaries(
        st.one_of(NAME, st.just("k\x00")), st.one_of(st.text(max_size=1024), NAME), max_size=3
    ),
)
def test_names_and_tags_stored_literally(
    names_store: Store, confinement: Confinement, name: str, tags: dict[str, str]
) -> None:
    """SQL metacharacters, wildcards, Unicode, NUL and overlong strings: stored exactly or
    refused with a CasmlError; never interpreted."""
    s = names_store
    value = {"named": name, "tags": sorted(tags.items())}
    with confinement.only(s.root, Path(s.root).parent):
        try:
            h = s.put(value, name=name, tags=tags)
        except CasmlError:
            NAMING_FIGURES["refused"] += 1
            return
    NAMING_FIGURES["stored"] += 1
    NAMED[h] = (name, tags)
    info = s.info(h)
    assert info.name == name and info.tags == tags
    versions = s.find(name=name)
    assert all(v.name == name for v in versions) and h in {v.hash for v in versions}
    if tags:
        assert h in {i.hash for i in s.find(tags=tags)}
    # Wildcards are not wildcards: a name of "%" matches only "%".
    for wildcard in ("%", "_", "*"):
        assert all(v.name == wildcard for v in s.find(name=wildcard))


def test_names_and_tags_survive_reindex(names_store: Store, tmp_path: Path) -> None:
    """The index rebuilt from storage alone holds the same names and tags, byte for byte."""
    assert NAMED, "the naming fuzz test stored nothing"
    with Store(names_store.root, index=f"sqlite:///{tmp_path / 'rebuilt.sqlite'}") as rebuilt:
        rebuilt.reindex()
        for h, (name, tags) in NAMED.items():
            info = rebuilt.info(h)
            assert info.name == name and info.tags == tags, (h, name, tags, info)
            assert h in {i.hash for i in rebuilt.find(name=name)}


def test_figures_report() -> None:
    """Write the fuzzing tallies (when $CASML_RELIABILITY_REPORT is set)."""
    for section, figures in (
        ("manifests", MANIFEST_FIGURES),
        ("manifest_bytes", RAW_FIGURES),
        ("payloads_in_store", PAYLOAD_FIGURES),
        ("payloads_decode", DECODE_FIGURES),
        ("records", RECORD_FIGURES),
        ("keys", KEY_FIGURES),
        ("names_and_tags", NAMING_FIGURES),
    ):
        write_report(f"hostile/{section}", dict(figures))
    assert DECODE_FIGURES.get("examples", 0) > 0 or not DECODE_FIGURES


def test_reindex_survives_a_damaged_named_artifact(tmp_path: Path) -> None:
    """One artifact's manifest is damaged and it has a name record: the rebuild of the index
    skips it with a warning and restores every other name."""
    with Store(tmp_path / "root") as store:
        damaged = store.put({"n": 0}, name="series")
        kept = store.put({"n": 1}, name="series")
        path = tmp_path / "root" / "manifests" / damaged[:2] / damaged[2:]
        path.write_bytes(path.read_bytes()[:-20])
    with Store(tmp_path / "root", index=f"sqlite:///{tmp_path / 'rebuilt.sqlite'}") as rebuilt:
        with pytest.warns(UserWarning, match=damaged):
            rebuilt.reindex()
        # (Versions are renumbered in order on a rebuild: the survivor becomes version 1.)
        assert [i.hash for i in rebuilt.find(name="series")] == [kept]
