"""Store: put and get artifacts by hash, over any fsspec storage with a SQL index beside it.

The Store is the one place that knows both halves: it hashes and encodes objects (hashing,
codec), writes their bytes and manifests to storage (blobs), then records them in the index
(index). Lower layers never import it. The order of a put is always blobs, then manifest,
then index rows: a crash at any point leaves at worst unreferenced blobs (freed by gc),
never an index row or manifest whose data is missing.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import xxhash

from casml import codec, registry
from casml.blobs import BlobStore
from casml.errors import (
    AmbiguousHashError,
    CasmlError,
    IntegrityError,
    InvalidHashError,
    NotFoundError,
    UnhashableError,
)
from casml.graph import render_graph
from casml.hashing import TREE_CHUNK_BYTES, ChunkDigestLog, hash_value_logging_chunks
from casml.index import ArtifactRecord, Index
from casml.info import ArtifactInfo
from casml.manifest import Manifest, dump_manifest, load_manifest, writer_versions
from casml.memo import CachedFunction
from casml.persistable import LazyReference, Persistable
from casml.sync import TransferReport, transfer

if TYPE_CHECKING:
    from casml.maintenance import DiskUsage, GcReport, VerifyReport

__all__ = ["Store", "default_root"]

P = TypeVar("P", bound=Persistable)
Params = ParamSpec("Params")
Result = TypeVar("Result")

#: Payloads up to this size live inside the manifest: one object per small put, not two.
INLINE_PAYLOAD_LIMIT = 16 * 1024
MIN_PREFIX = 8
#: Nested eager references a load follows before calling the artifact forged (see _load).
MAX_REFERENCE_DEPTH = 64
_LOADING = object()  # in a load's memo: this address is being loaded, deeper in the stack
_MMAP_THRESHOLD = 1024 * 1024
_KEY = re.compile(r"^[0-9a-f]{8,32}$")


def default_root() -> Path:
    """The embedded store's folder: ``$CASML_HOME`` if set, else ``~/.casml``."""
    home = os.environ.get("CASML_HOME")
    return Path(home).expanduser() if home else Path.home() / ".casml"


def _normalize_key(key: object) -> str:
    if not isinstance(key, str):
        raise InvalidHashError(f"an artifact hash is a str, got {type(key).__name__}")
    lowered = key.strip().lower()
    if not _KEY.match(lowered):
        shown = key if len(key) <= 40 else key[:37] + "..."
        raise InvalidHashError(
            f"{shown!r} is not an artifact hash: give the 32 hex characters store.put returned, "
            f"or a unique prefix of at least {MIN_PREFIX}"
        )
    return lowered


def _check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name or len(name) > 255 or "\x00" in name:
        raise CasmlError(f"an artifact name is a non-empty str of at most 255 characters: {name!r}")
    if not _encodable(name):
        raise CasmlError(f"an artifact name must be valid Unicode text: {name!r}")
    return name


def _encodable(text: str) -> bool:
    # Lone surrogates (from os.fsdecode of odd bytes, say) have no UTF-8 form: no database
    # could store them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_tags(tags: object) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise CasmlError(f"tags must be a mapping of str to str, got {type(tags).__name__}")
    checked: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise CasmlError(f"tags must map str to str; got {key!r}: {value!r}")
        if (
            not key
            or len(key) > 255
            or len(value) > 1024
            or "\x00" in key + value
            or not _encodable(key + value)
        ):
            raise CasmlError(
                f"tag {key!r}: keys are 1-255 characters, values at most 1024, valid Unicode "
                "without NUL characters"
            )
        checked[key] = value
    return checked


def _new_buffer(size: int, address: str) -> memoryview:
    """A writable buffer for ``size`` bytes about to be overwritten by a read.

    ``bytearray(n)`` zero-fills every page first, a full extra pass over memory. Large
    buffers (in practice numpy arrays, which decode as views of this buffer) come from
    ``numpy.empty``, whose allocator asks for huge pages: reading 512 MiB into it took half
    the time of reading into an anonymous ``mmap`` here. Without numpy, an anonymous mapping
    still avoids the zero-fill pass.
    """
    try:
        if size < _MMAP_THRESHOLD:
            return memoryview(bytearray(size))
        try:
            import numpy
        except ImportError:
            return memoryview(mmap.mmap(-1, size))
        return numpy.empty(size, dtype=numpy.uint8).data
    except (MemoryError, OSError, OverflowError, ValueError) as exc:
        raise CasmlError(
            f"cannot reserve {size} bytes of memory to load artifact {address}: {exc}"
        ) from None


def _dump_record(body: dict[str, Any]) -> bytes:
    # Canonical bytes: the same naming always gives the same record key (idempotent).
    return json.dumps({"casml_record": 1, **body}, sort_keys=True, separators=(",", ":")).encode()


def _class_name_of_value(value: object) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


class Store:
    """A content-addressed artifact store: ``h = store.put(obj)``, ``store.get(h)``.

    ``root`` is a local folder or any fsspec URL (``memory://...``, ``s3://bucket/prefix``);
    by default the embedded store in ``$CASML_HOME`` or ``~/.casml``. ``index`` is a
    SQLAlchemy URL for the metadata index; by default a SQLite file beside a local root.
    ``allow_pickle=True`` lets put and get use pickle for objects casml cannot encode
    natively: only enable it for stores whose writers you trust. Use the Store as a context
    manager, or call ``close()``, to release the database connections.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        index: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        allow_pickle: bool = False,
        remote: Store | None = None,
        lease_seconds: float = 60,
    ) -> None:
        location = str(default_root() if root is None else root)
        self._blobs = BlobStore.from_url(location, storage_options)
        cache_index = index is None and not self._blobs.is_local
        if index is None:
            index = self._default_index_url(location)
        self._index = Index(index)
        self.allow_pickle = allow_pickle
        self.remote = remote
        if lease_seconds <= 0:
            raise CasmlError(f"lease_seconds must be positive, got {lease_seconds}")
        self.lease_seconds = float(lease_seconds)
        self._loading = threading.local()
        if cache_index and not location.startswith("memory://"):
            # The bucket is the truth; this machine's cached index catches up on open.
            self.reindex()

    def _default_index_url(self, location: str) -> str:
        if self._blobs.is_local:
            return f"sqlite:///{Path(self._blobs.url) / 'index.sqlite'}"
        if location.startswith("memory://"):
            # Lives and dies with the process, like the memory filesystem itself.
            return "sqlite://"
        digest = xxhash.xxh3_64_hexdigest(self._blobs.url.encode())
        return f"sqlite:///{default_root() / 'cache' / digest / 'index.sqlite'}"

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def root(self) -> str:
        """Where the blobs and manifests live (a path or URL)."""
        return self._blobs.url

    @property
    def index_url(self) -> str:
        """The SQLAlchemy URL of the metadata index (password masked)."""
        return self._index.url

    def close(self) -> None:
        """Release the index's database connections."""
        self._index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.root!r}, index={self.index_url!r})"

    # -- put ----------------------------------------------------------------------------

    def put(
        self,
        obj: Any,
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Store ``obj`` and return its hash; storing it again writes nothing new.

        ``obj`` is a Persistable (addressed by its configuration hash) or any value casml can
        encode (addressed by its canonical hash). A ``name`` gives the artifact the next
        version under that name unless it already has one there; ``tags`` are attached
        (a new value replaces an old one). Dependencies are stored first.
        """
        checked_name = _check_name(name)
        checked_tags = _check_tags(tags)
        return self._put(obj, checked_name, checked_tags, {})

    def _put(self, obj: Any, name: str | None, tags: dict[str, str], memo: dict[int, str]) -> str:
        address, chunk_log = self._address_and_chunks(obj)
        if address is not None and name is None and not tags and self._index.contains(address):
            memo[id(obj)] = address
            return address
        manifest = self._existing_manifest(address) if address is not None else None
        if manifest is None:
            manifest = self._write(obj, address, memo, chunk_log=chunk_log)
        memo[id(obj)] = manifest.address
        self._index_named(manifest, name, tags)
        return manifest.address

    def _index_named(
        self, manifest: Manifest, name: str | None, tags: dict[str, str] | None = None
    ) -> ArtifactInfo:
        """Add index rows, then record the naming and tags in storage for reindex/pull."""
        info = self._index.add(self._record(manifest), name=name, tags=tags or None)
        if name is not None:
            version = info.version if info.name == name else None
            self._blobs.put_record(
                _dump_record(
                    {"kind": "name", "address": info.hash, "name": name, "version": version}
                )
            )
        if tags:
            self._blobs.put_record(
                _dump_record(
                    {
                        "kind": "tags",
                        "address": info.hash,
                        "tags": dict(tags),
                        "at": datetime.now(timezone.utc).isoformat(),
                    }
                )
            )
        return info

    def _address_of(self, obj: Any) -> str | None:
        return self._address_and_chunks(obj)[0]

    def _address_and_chunks(self, obj: Any) -> tuple[str | None, ChunkDigestLog | None]:
        """The address of ``obj``, with the chunk digests hashing a plain value produced."""
        if isinstance(obj, Persistable):
            return obj.hash_, None
        try:
            return hash_value_logging_chunks(obj)
        except UnhashableError:
            if not self.allow_pickle:
                raise
            return None, None  # addressed by its encoded bytes instead (see _write)

    def _existing_manifest(self, address: str) -> Manifest | None:
        try:
            data = self._blobs.get_manifest(address, fresh=False)
            return load_manifest(data, address)
        except NotFoundError:
            return None

    def _write(
        self,
        obj: Any,
        address: str | None,
        memo: dict[int, str],
        extra_dependencies: tuple[str, ...] = (),
        chunk_log: ChunkDigestLog | None = None,
    ) -> Manifest:
        lazy_refs: dict[str, str] = {}
        if isinstance(obj, Persistable):
            state = obj.__casml_state__()
            for attribute, value in list(state.items()):
                if isinstance(value, (Persistable, LazyReference)):
                    lazy_refs[attribute] = self._reference_of(value, memo) or ""
                    del state[attribute]
            target: Any = state
        else:
            target = obj
        encoded = codec.encode(
            target,
            allow_pickle=self.allow_pickle,
            reference_of=lambda value: self._reference_of(value, memo),
        )
        if chunk_log is not None and self._blobs.chunk_size != TREE_CHUNK_BYTES:
            chunk_log = None  # its chunks are not this store's chunks
        buffers = tuple(
            tuple(self._blobs.put_chunked(buf, chunk_log.find(buf) if chunk_log else None))
            for buf in encoded.buffers
        )
        payload_digest = xxhash.xxh3_128_hexdigest(encoded.payload)
        inline = len(encoded.payload) <= INLINE_PAYLOAD_LIMIT
        if not inline:
            self._blobs.put_bytes(encoded.payload)
        if address is None:
            # Unhashable values stored through pickle: address the exact bytes instead.
            content = xxhash.xxh3_128(b"casml-content\x00" + payload_digest.encode())
            for chunks in buffers:
                for digest, _ in chunks:
                    content.update(digest.encode())
            address = str(content.hexdigest())
        dependencies = list(
            dict.fromkeys([*lazy_refs.values(), *encoded.references, *extra_dependencies])
        )
        if isinstance(obj, Persistable):
            cls = type(obj)
            kind, class_name, module = "persistable", cls.__casml_name__, cls.__module__
        else:
            kind, class_name, module = "value", _class_name_of_value(obj), None
        manifest = Manifest(
            address=address,
            kind=kind,
            class_name=class_name,
            module=module,
            created_at=datetime.now(timezone.utc),
            codec=codec.CODEC_NAME,
            codec_version=codec.CODEC_VERSION,
            payload_digest=payload_digest,
            payload_size=len(encoded.payload),
            inline_payload=encoded.payload if inline else None,
            buffers=buffers,
            dependencies=tuple(dependencies),
            lazy_refs=lazy_refs,
            hash_attributes=type(obj).hash_attributes if isinstance(obj, Persistable) else (),
            versions=writer_versions(),
        )
        if not self._blobs.put_manifest(address, dump_manifest(manifest)):
            # Another writer stored this address first: theirs is the one that counts.
            existing = self._existing_manifest(address)
            if existing is not None:
                return existing
        return manifest

    def _reference_of(self, value: Any, memo: dict[int, str]) -> str | None:
        if isinstance(value, LazyReference):
            return value.hash
        if not isinstance(value, Persistable):
            return None
        known = memo.get(id(value))
        if known is not None:
            return known
        return self._put(value, None, {}, memo)

    @staticmethod
    def _record(manifest: Manifest) -> ArtifactRecord:
        return ArtifactRecord(
            hash=manifest.address,
            class_name=manifest.class_name,
            kind=manifest.kind,
            size=manifest.size,
            created_at=manifest.created_at,
            blobs=manifest.blob_list(),
            dependencies=manifest.dependencies,
        )

    # -- get ----------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """Load the artifact stored under a full hash or a unique prefix (>= 8 chars).

        Raises NotFoundError (a KeyError) if nothing matches, AmbiguousHashError if the
        prefix matches several, InvalidHashError for a malformed key (before any storage is
        touched), IntegrityError if stored bytes are damaged.
        """
        return self._load(self._resolve(key), {})

    def _resolve(self, key: str) -> str:
        normalized = _normalize_key(key)
        if len(normalized) == 32:
            return normalized
        matches = self._index.match_prefix(normalized, limit=2)
        if not matches:
            matches = self._blobs.manifests_with_prefix(normalized)[:2]
        if not matches and self.remote is not None:
            with contextlib.suppress(NotFoundError):
                matches = [self.remote._resolve(normalized)]
        if not matches:
            raise NotFoundError(f"no artifact hash starts with {normalized!r} in {self.root}")
        if len(matches) > 1:
            raise AmbiguousHashError(
                f"prefix {normalized!r} matches several artifacts ({', '.join(matches)}, ...); "
                "give more characters"
            )
        return matches[0]

    def _read_manifest(self, address: str) -> Manifest:
        try:
            data = self._blobs.get_manifest(address)
        except NotFoundError:
            if self.remote is not None and self.remote._stored(address):
                # Fetch it with its dependencies and keep the local copy.
                self.pull(self.remote, [address])
                return load_manifest(self._blobs.get_manifest(address), address)
            raise NotFoundError(
                f"no artifact {address} in {self.root}; if it was stored on another machine, "
                "reach the same storage or pull it from there"
            ) from None
        return load_manifest(data, address)

    def _load(self, address: str, memo: dict[str, Any]) -> Any:
        if address in memo:
            known = memo[address]
            if known is _LOADING:
                raise IntegrityError(
                    f"artifact {address} refers to itself through its own references, which "
                    "no artifact casml wrote can do: its manifests were forged or damaged; "
                    "run `casml verify` and restore it from a trusted copy"
                )
            return known
        # An eager reference (a Persistable inside a stored container) loads while its
        # parent decodes, a level of native stack each: bound the depth so that a forged
        # chain fails cleanly instead of overflowing the stack (SIGSEGV).
        depth = getattr(self._loading, "depth", 0)
        if depth >= MAX_REFERENCE_DEPTH:
            raise IntegrityError(
                f"artifact {address} sits more than {MAX_REFERENCE_DEPTH} references deep "
                "inside the artifact being loaded; its manifests were forged or damaged"
            )
        self._loading.depth = depth + 1
        memo[address] = _LOADING
        try:
            value = self._load_uncached(address, memo)
        except BaseException:
            if memo.get(address) is _LOADING:
                del memo[address]
            raise
        finally:
            self._loading.depth = depth
        memo[address] = value
        return value

    def _load_uncached(self, address: str, memo: dict[str, Any]) -> Any:
        manifest = self._read_manifest(address)
        if manifest.codec != codec.CODEC_NAME or manifest.codec_version > codec.CODEC_VERSION:
            raise IntegrityError(
                f"artifact {address} was written with codec {manifest.codec} "
                f"v{manifest.codec_version}, which this casml cannot read; upgrade casml"
            )
        if manifest.inline_payload is not None:
            payload = manifest.inline_payload
            if xxhash.xxh3_128_hexdigest(payload) != manifest.payload_digest:
                raise IntegrityError(
                    f"the inline payload of artifact {address} does not match its digest; "
                    "run `casml verify`"
                )
        else:
            payload = self._blobs.get_bytes(manifest.payload_digest)
        buffers: list[memoryview] = []
        for chunks in manifest.buffers:
            total = sum(size for _, size in chunks)
            if total >= _MMAP_THRESHOLD:
                self._blobs.check_sizes(chunks)  # before reserving memory a manifest claims
            buffer = _new_buffer(total, address)
            self._blobs.read_into(chunks, buffer)
            buffers.append(buffer)
        value = codec.decode(
            payload,
            buffers,
            allow_pickle=self.allow_pickle,
            resolve_reference=lambda ref: self._load(_normalize_key(ref), memo),
        )
        if manifest.kind == "persistable":
            value = self._restore(manifest, value)
        return value

    def _restore(self, manifest: Manifest, state: Any) -> Persistable:
        cls = registry.lookup(manifest.class_name, manifest.module)
        if not (isinstance(cls, type) and issubclass(cls, Persistable)):
            raise IntegrityError(f"{manifest.class_name} is not a Persistable class")
        if not isinstance(state, dict):
            raise IntegrityError(f"artifact {manifest.address}: stored state is not a dict")
        lazy = {
            attribute: LazyReference(_normalize_key(ref), self._load_reference)
            for attribute, ref in manifest.lazy_refs.items()
        }
        return cls.__casml_restore__(state, lazy)

    def _load_reference(self, address: str) -> Any:
        return self._load(address, {})

    # -- queries ------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """True if an artifact is stored under this full hash or unique prefix."""
        try:
            address = self._resolve(key)
        except (NotFoundError, AmbiguousHashError):
            return False
        return self._stored(address)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            return self.exists(key)
        except InvalidHashError:
            return False

    def info(self, key: str) -> ArtifactInfo:
        """Describe one artifact: class, name/version, size, created_at, tags, dependencies."""
        address = self._resolve(key)
        try:
            return self._index.info(address)
        except NotFoundError:
            # Stored by another process or machine but not indexed here yet: index it now.
            manifest = self._read_manifest(address)
            return self._index.add(self._record(manifest))

    def find(
        self,
        name: str | None = None,
        class_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[ArtifactInfo]:
        """Artifacts matching every filter given, newest first (per version under a name)."""
        if isinstance(class_name, type):
            class_name = getattr(class_name, "__casml_name__", None) or _class_name_of_value(
                class_name
            )
        if class_name is not None and not (isinstance(class_name, str) and _encodable(class_name)):
            raise CasmlError(f"class_name must be a str or a class, got {class_name!r}")
        return self._index.find(
            name=_check_name(name), class_name=class_name, tags=_check_tags(tags) or None
        )

    def latest(self, name: str) -> Any:
        """Load the newest version stored under ``name`` (NotFoundError if none)."""
        checked = _check_name(name)
        if checked is None:
            raise CasmlError("latest needs a name, got None")
        return self.get(self._index.latest(checked))

    def delete(self, key: str) -> None:
        """Remove an artifact's records and manifest; its blobs are freed by the next gc."""
        address = self._resolve(key)
        found = self._index.delete(address)
        if self._blobs.has_manifest(address):
            self._blobs.delete_manifest(address)
            found = True
        if not found:
            raise NotFoundError(f"no artifact {address} in {self.root}")

    def reindex(self) -> int:
        """Bring the index up to date from storage alone; return how many artifacts were added.

        Incremental: manifests the index lacks are indexed, then the name and tag records
        are replayed in order, so names, versions and tags survive a lost database.
        """
        stored = list(self._blobs.iter_manifests())
        missing = self._index.missing(stored)
        added = 0
        for address in stored:
            if address in missing:
                try:
                    self._index.add(self._record(self._read_manifest(address)))
                except IntegrityError as exc:
                    warnings.warn(f"reindex skipped a damaged artifact: {exc}", stacklevel=2)
                    continue
                added += 1
        records = [record for _, _, record in self._records()]
        names = sorted(
            (r for r in records if r.get("kind") == "name"),
            key=lambda r: (str(r.get("name")), r.get("version") or 0, str(r.get("address"))),
        )
        tag_sets = sorted(
            (r for r in records if r.get("kind") == "tags"), key=lambda r: str(r.get("at"))
        )
        for record in [*names, *tag_sets]:
            try:
                self._apply_record(record)
            except NotFoundError:
                continue
            except IntegrityError as exc:
                # Its manifest is damaged (warned about above): the other names still count.
                warnings.warn(
                    f"reindex skipped a record of a damaged artifact: {exc}", stacklevel=2
                )
        return added

    def _records(self) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
        """Every readable name/tag record in storage: (key, raw bytes, parsed)."""
        for key in self._blobs.iter_records():
            try:
                data = self._blobs.get_record(key)
                record = json.loads(data)
            except (IntegrityError, ValueError, RecursionError) as exc:
                warnings.warn(f"skipping damaged record {key}: {exc}", stacklevel=3)
                continue
            if isinstance(record, dict) and record.get("casml_record") == 1:
                yield key, data, record

    def _apply_record(self, record: Mapping[str, Any]) -> None:
        address = record.get("address")
        if not isinstance(address, str) or not _KEY.match(address) or len(address) != 32:
            return
        if not self._blobs.has_manifest(address):
            raise NotFoundError(f"no artifact {address}")
        kind = record.get("kind")
        try:
            # Records come from storage: one that a put would have refused is skipped, so a
            # damaged or forged record cannot stop a reindex or a pull.
            name = _check_name(record.get("name")) if kind == "name" else None
            tags = _check_tags(record.get("tags")) if kind == "tags" else None
        except CasmlError as exc:
            warnings.warn(f"skipping an invalid {kind} record of {address}: {exc}", stacklevel=3)
            return
        if name is None and not tags:
            return
        manifest = self._read_manifest(address)
        self._index.add(self._record(manifest), name=name, tags=tags)

    # -- sharing --------------------------------------------------------------------------

    def push(
        self, other: Store | None = None, hashes: Iterable[str] | None = None
    ) -> TransferReport:
        """Copy artifacts (default: all) with their dependencies to ``other`` (default: remote).

        Only blobs and manifests the other store lacks are transferred; running it again
        transfers nothing. Returns what was moved.
        """
        return transfer(self, self._other(other, "push"), hashes)

    def pull(
        self, other: Store | None = None, hashes: Iterable[str] | None = None
    ) -> TransferReport:
        """Copy artifacts (default: all) and their dependencies from ``other`` (or the remote)."""
        return transfer(self._other(other, "pull"), self, hashes)

    def _other(self, other: Store | None, action: str) -> Store:
        target = other if other is not None else self.remote
        if target is None:
            raise CasmlError(
                f"nothing to {action} with: pass another Store, or open this one with "
                "remote=Store(...)"
            )
        return target

    # -- maintenance ----------------------------------------------------------------------

    def gc(self, *, grace: float | timedelta = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete blobs that no artifact reaches, once older than ``grace`` seconds."""
        from casml.maintenance import gc

        return gc(self, grace=grace, dry_run=dry_run)

    def verify(self, *, repair: bool = False, source: Store | None = None) -> VerifyReport:
        """Re-hash every blob and cross-check manifests and index rows; report the problems.

        ``repair=True`` fixes what storage allows (re-indexing, dropping rows whose data is
        gone); with ``source``, missing or damaged blobs are copied back from that store.
        """
        from casml.maintenance import verify

        return verify(self, repair=repair, source=source)

    def du(self) -> DiskUsage:
        """Logical bytes (what artifacts hold) against stored bytes, and the dedup ratio."""
        from casml.maintenance import disk_usage

        return disk_usage(self)

    # -- "only train if new" -------------------------------------------------------------

    def get_or_build(self, obj: P, name: str | None = None) -> P:
        """Return the stored object with ``obj``'s hash, or build, store and return ``obj``.

        Only configurations never stored before are built: the hash comes from
        ``hash_attributes`` alone, so this check trains nothing. Persistable dependencies
        (attributes, or items of list/tuple/dict attributes) are brought in first through
        ``get_or_build`` and replaced by their built or stored versions. Use the return
        value: when the artifact was stored, it is a loaded copy, not ``obj``.
        """
        checked_name = _check_name(name)
        address = obj.hash_
        if self._stored(address):
            return self._load_stored(obj, address, checked_name)
        owner = uuid.uuid4().hex
        pause = 0.02
        while not self._index.claim_lease(address, owner, self.lease_seconds):
            # Another process is building this configuration: wait for its artifact, or for
            # its lease to expire (a crashed builder) and take over.
            time.sleep(pause)
            pause = min(pause * 1.5, max(0.05, self.lease_seconds / 10))
            if self._stored(address):
                return self._load_stored(obj, address, checked_name)
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew_lease, args=(address, owner, stop), daemon=True
        )
        renewer.start()
        try:
            if self._stored(address):  # finished by the previous holder meanwhile
                return self._load_stored(obj, address, checked_name)
            for attribute in type(obj).hash_attributes:
                if attribute in obj.__dict__:
                    obj.__dict__[attribute] = self._built(obj.__dict__[attribute])
            obj.build()
            self._put(obj, checked_name, {}, {})
            return obj
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(CasmlError):
                self._index.release_lease(address, owner)

    def _renew_lease(self, address: str, owner: str, stop: threading.Event) -> None:
        while not stop.wait(self.lease_seconds / 3):
            with contextlib.suppress(CasmlError):
                self._index.claim_lease(address, owner, self.lease_seconds)

    def _stored(self, address: str) -> bool:
        if self._index.contains(address) or self._blobs.has_manifest(address):
            return True
        return self.remote is not None and self.remote._stored(address)

    def _load_stored(self, obj: P, address: str, name: str | None) -> P:
        loaded = self._load(address, {})
        if name is not None:
            self._index_named(self._read_manifest(address), name)
        if not isinstance(loaded, type(obj)):
            raise IntegrityError(
                f"artifact {address} holds a {type(loaded).__name__}, not a {type(obj).__name__}"
            )
        return loaded

    def _built(self, value: Any) -> Any:
        if isinstance(value, Persistable):
            return self.get_or_build(value)
        if isinstance(value, list):
            return [self._built(item) for item in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self._built(item) for item in value)
        if isinstance(value, dict):
            return {key: self._built(item) for key, item in value.items()}
        return value

    @overload
    def cache(self, fn: Callable[Params, Result]) -> CachedFunction[Params, Result]: ...

    @overload
    def cache(
        self, fn: None = None, *, ignore: Iterable[str] = (), name: str | None = None
    ) -> Callable[[Callable[Params, Result]], CachedFunction[Params, Result]]: ...

    def cache(
        self,
        fn: Callable[Params, Result] | None = None,
        *,
        ignore: Iterable[str] = (),
        name: str | None = None,
    ) -> (
        CachedFunction[Params, Result]
        | Callable[[Callable[Params, Result]], CachedFunction[Params, Result]]
    ):
        """Memoize a function in this store: ``@store.cache`` or ``@store.cache(ignore=[...])``.

        A call is keyed by the function's name, source and closure and by its bound
        arguments (defaults applied; ``ignore`` drops arguments such as ``verbose``).
        Results are ordinary artifacts named after the function (``name`` overrides).
        """
        if fn is None:
            return lambda f: CachedFunction(self, f, ignore=ignore, name=name)
        return CachedFunction(self, fn, ignore=ignore, name=name)

    def _lookup(self, address: str) -> tuple[bool, Any]:
        if not (self._index.contains(address) or self._blobs.has_manifest(address)):
            return False, None
        return True, self._load(address, {})

    def _put_call_result(
        self, result: Any, address: str, *, name: str, inputs: dict[str, Any]
    ) -> None:
        memo: dict[int, str] = {}
        # Persistable arguments are the call's inputs: record them as dependencies.
        found: list[Any] = []
        _collect_references(list(inputs.values()), found)
        extra = tuple(ref for ref in (self._reference_of(v, memo) for v in found) if ref)
        manifest = self._existing_manifest(address)
        if manifest is None:
            manifest = self._write(result, address, memo, extra_dependencies=extra)
        self._index_named(manifest, _check_name(name))

    # -- lineage ------------------------------------------------------------------------

    def lineage(self, key: str) -> list[ArtifactInfo]:
        """Every artifact ``key`` was built from (all ancestors), nearest first."""
        return self._walk(self._resolve(key), self._index.dependencies)

    def dependents(self, key: str) -> list[ArtifactInfo]:
        """Every artifact built from ``key`` (all descendants), nearest first."""
        return self._walk(self._resolve(key), self._index.dependents)

    def _walk(self, start: str, step: Callable[[str], list[str]]) -> list[ArtifactInfo]:
        seen = {start}
        order: list[str] = []
        frontier = [start]
        while frontier:
            following: list[str] = []
            for address in frontier:
                for neighbour in step(address):
                    if neighbour not in seen:
                        seen.add(neighbour)
                        order.append(neighbour)
                        following.append(neighbour)
            frontier = following
        infos = []
        for address in order:
            try:
                infos.append(self.info(address))
            except NotFoundError:
                continue  # deleted since; its edges remain until gc
        return infos

    def graph(self, key: str, format: str = "mermaid") -> str:
        """The dependency graph around ``key`` (ancestors and descendants) as text.

        ``format`` is ``"mermaid"`` (for Markdown and notebooks) or ``"dot"`` (Graphviz).
        """
        address = self._resolve(key)
        nodes = [self.info(address), *self.lineage(address), *self.dependents(address)]
        edges = [(dep, info.hash) for info in nodes for dep in self._index.dependencies(info.hash)]
        return render_graph(nodes, edges, focus=address, format=format)


def _collect_references(value: Any, found: list[Any]) -> None:
    if isinstance(value, (Persistable, LazyReference)):
        found.append(value)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _collect_references(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_references(item, found)
